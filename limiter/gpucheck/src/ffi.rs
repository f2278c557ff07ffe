//! C types of the driver API (`cuda.h`) and NVML (`nvml.h`), declared by hand.
//!
//! Only what gpucheck calls. Layouts are pinned by the size/offset tests at the bottom; they
//! follow the x86_64/aarch64 LP64 ABI (`size_t` = `unsigned long long` = 8 bytes).

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

// ---- driver API -----------------------------------------------------------------------------

pub type CUresult = c_int;
pub type CUdevice = c_int;
pub type CUdeviceptr = c_ulonglong;
pub type CUcontext = *mut c_void;
pub type CUmodule = *mut c_void;
pub type CUfunction = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type CUmemoryPool = *mut c_void;
pub type CUmemGenericAllocationHandle = c_ulonglong;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;

/// `CUdevice_attribute` values.
pub const CU_DEVICE_ATTRIBUTE_CLOCK_RATE: c_int = 13;
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
pub const CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: c_int = 102;
pub const CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: c_int = 115;

/// `CUstream_flags`.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// `CUevent_flags`.
pub const CU_EVENT_DEFAULT: c_uint = 0;

/// `cuGetProcAddress` flags (`CUdriverProcAddress_flags`).
pub const CU_GET_PROC_ADDRESS_DEFAULT: u64 = 0;
pub const CU_GET_PROC_ADDRESS_LEGACY_STREAM: u64 = 1;
pub const CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM: u64 = 2;

/// `CUdriverProcAddressQueryResult`.
pub type CUdriverProcAddressQueryResult = c_int;

/// `CUjit_option` values used to fetch the JIT log when PTX does not load.
pub type CUjitOption = c_int;
pub const CU_JIT_INFO_LOG_BUFFER: CUjitOption = 3;
pub const CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES: CUjitOption = 4;
pub const CU_JIT_ERROR_LOG_BUFFER: CUjitOption = 5;
pub const CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES: CUjitOption = 6;

/// `CUmemAllocationType`, `CUmemAllocationHandleType`, `CUmemLocationType`,
/// `CUmemAccess_flags`, `CUmemAllocationGranularity_flags`.
pub const CU_MEM_ALLOCATION_TYPE_PINNED: c_int = 1;
pub const CU_MEM_HANDLE_TYPE_NONE: c_int = 0;
pub const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;
pub const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: c_int = 3;
pub const CU_MEM_ALLOC_GRANULARITY_MINIMUM: c_int = 0;

/// `CUmemLocation`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CUmemLocation {
    pub type_: c_int,
    pub id: c_int,
}

/// The anonymous `allocFlags` member of `CUmemAllocationProp`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CUmemAllocFlags {
    pub compression_type: u8,
    pub gpu_direct_rdma_capable: u8,
    pub usage: u16,
    pub reserved: [u8; 4],
}

/// `CUmemAllocationProp`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CUmemAllocationProp {
    pub type_: c_int,
    pub requested_handle_types: c_int,
    pub location: CUmemLocation,
    pub win32_handle_meta_data: *mut c_void,
    pub alloc_flags: CUmemAllocFlags,
}

impl CUmemAllocationProp {
    /// Pinned device memory on `device`, no shareable handle.
    pub fn device(device: CUdevice) -> Self {
        Self {
            type_: CU_MEM_ALLOCATION_TYPE_PINNED,
            requested_handle_types: CU_MEM_HANDLE_TYPE_NONE,
            location: CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: device,
            },
            win32_handle_meta_data: std::ptr::null_mut(),
            alloc_flags: CUmemAllocFlags::default(),
        }
    }
}

/// `CUmemAccessDesc`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CUmemAccessDesc {
    pub location: CUmemLocation,
    pub flags: c_int,
}

pub type FnInit = unsafe extern "C" fn(c_uint) -> CUresult;
pub type FnDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> CUresult;
pub type FnDeviceGet = unsafe extern "C" fn(*mut CUdevice, c_int) -> CUresult;
pub type FnDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> CUresult;
pub type FnDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, CUdevice) -> CUresult;
pub type FnPrimaryCtxRetain = unsafe extern "C" fn(*mut CUcontext, CUdevice) -> CUresult;
pub type FnCtxSetCurrent = unsafe extern "C" fn(CUcontext) -> CUresult;
pub type FnCtxSynchronize = unsafe extern "C" fn() -> CUresult;
pub type FnModuleLoadData = unsafe extern "C" fn(*mut CUmodule, *const c_void) -> CUresult;
pub type FnModuleLoadDataEx = unsafe extern "C" fn(
    *mut CUmodule,
    *const c_void,
    c_uint,
    *mut CUjitOption,
    *mut *mut c_void,
) -> CUresult;
pub type FnModuleGetFunction =
    unsafe extern "C" fn(*mut CUfunction, CUmodule, *const c_char) -> CUresult;
pub type FnLaunchKernel = unsafe extern "C" fn(
    CUfunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CUstream,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CUresult;
pub type FnStreamCreate = unsafe extern "C" fn(*mut CUstream, c_uint) -> CUresult;
pub type FnStreamSynchronize = unsafe extern "C" fn(CUstream) -> CUresult;
pub type FnEventCreate = unsafe extern "C" fn(*mut CUevent, c_uint) -> CUresult;
pub type FnEventRecord = unsafe extern "C" fn(CUevent, CUstream) -> CUresult;
pub type FnEventSynchronize = unsafe extern "C" fn(CUevent) -> CUresult;
pub type FnEventElapsedTime = unsafe extern "C" fn(*mut f32, CUevent, CUevent) -> CUresult;
pub type FnMemAlloc = unsafe extern "C" fn(*mut CUdeviceptr, usize) -> CUresult;
pub type FnMemFree = unsafe extern "C" fn(CUdeviceptr) -> CUresult;
pub type FnMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult;
pub type FnDeviceTotalMem = unsafe extern "C" fn(*mut usize, CUdevice) -> CUresult;
pub type FnMemAllocAsync = unsafe extern "C" fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
pub type FnMemFreeAsync = unsafe extern "C" fn(CUdeviceptr, CUstream) -> CUresult;
pub type FnDeviceGetDefaultMemPool = unsafe extern "C" fn(*mut CUmemoryPool, CUdevice) -> CUresult;
pub type FnMemPoolTrimTo = unsafe extern "C" fn(CUmemoryPool, usize) -> CUresult;
pub type FnMemCreate = unsafe extern "C" fn(
    *mut CUmemGenericAllocationHandle,
    usize,
    *const CUmemAllocationProp,
    c_ulonglong,
) -> CUresult;
pub type FnMemRelease = unsafe extern "C" fn(CUmemGenericAllocationHandle) -> CUresult;
pub type FnMemAddressReserve =
    unsafe extern "C" fn(*mut CUdeviceptr, usize, usize, CUdeviceptr, c_ulonglong) -> CUresult;
pub type FnMemMap = unsafe extern "C" fn(
    CUdeviceptr,
    usize,
    usize,
    CUmemGenericAllocationHandle,
    c_ulonglong,
) -> CUresult;
pub type FnMemUnmap = unsafe extern "C" fn(CUdeviceptr, usize) -> CUresult;
pub type FnMemAddressFree = unsafe extern "C" fn(CUdeviceptr, usize) -> CUresult;
pub type FnMemSetAccess =
    unsafe extern "C" fn(CUdeviceptr, usize, *const CUmemAccessDesc, usize) -> CUresult;
pub type FnMemGetAllocationGranularity =
    unsafe extern "C" fn(*mut usize, *const CUmemAllocationProp, c_int) -> CUresult;
pub type FnGetProcAddressV2 = unsafe extern "C" fn(
    *const c_char,
    *mut *mut c_void,
    c_int,
    u64,
    *mut CUdriverProcAddressQueryResult,
) -> CUresult;
pub type FnGetErrorName = unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult;

// ---- NVML -----------------------------------------------------------------------------------

pub type NvmlReturn = c_int;
pub type NvmlDevice = *mut c_void;

pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
/// `usedGpuMemory` when the driver cannot tell (`NVML_VALUE_NOT_AVAILABLE`).
pub const NVML_VALUE_NOT_AVAILABLE: u64 = u64::MAX;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NvmlUtilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NvmlProcessUtilizationSample {
    pub pid: c_uint,
    pub time_stamp: u64,
    pub sm_util: c_uint,
    pub mem_util: c_uint,
    pub enc_util: c_uint,
    pub dec_util: c_uint,
}

/// `nvmlProcessInfo_t` in its v3 layout (what `…ComputeRunningProcesses_v3` fills).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct NvmlProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

pub type FnNvmlInit = unsafe extern "C" fn() -> NvmlReturn;
pub type FnNvmlGetHandleByIndex = unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> NvmlReturn;
pub type FnNvmlGetMemoryInfo = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> NvmlReturn;
pub type FnNvmlGetUtilizationRates =
    unsafe extern "C" fn(NvmlDevice, *mut NvmlUtilization) -> NvmlReturn;
pub type FnNvmlGetComputeRunningProcesses =
    unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;
pub type FnNvmlGetProcessUtilization = unsafe extern "C" fn(
    NvmlDevice,
    *mut NvmlProcessUtilizationSample,
    *mut c_uint,
    c_ulonglong,
) -> NvmlReturn;
pub type FnNvmlGetString = unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> NvmlReturn;
pub type FnNvmlGetMinorNumber = unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> NvmlReturn;
pub type FnNvmlSystemGetDriverVersion = unsafe extern "C" fn(*mut c_char, c_uint) -> NvmlReturn;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn driver_struct_layouts_match_cuda_h() {
        assert_eq!(size_of::<CUmemLocation>(), 8);
        assert_eq!(offset_of!(CUmemLocation, id), 4);

        assert_eq!(size_of::<CUmemAllocFlags>(), 8);
        assert_eq!(offset_of!(CUmemAllocFlags, usage), 2);
        assert_eq!(offset_of!(CUmemAllocFlags, reserved), 4);

        assert_eq!(size_of::<CUmemAllocationProp>(), 32);
        assert_eq!(offset_of!(CUmemAllocationProp, requested_handle_types), 4);
        assert_eq!(offset_of!(CUmemAllocationProp, location), 8);
        assert_eq!(offset_of!(CUmemAllocationProp, win32_handle_meta_data), 16);
        assert_eq!(offset_of!(CUmemAllocationProp, alloc_flags), 24);

        assert_eq!(size_of::<CUmemAccessDesc>(), 12);
        assert_eq!(offset_of!(CUmemAccessDesc, flags), 8);

        assert_eq!(size_of::<CUdeviceptr>(), 8);
        assert_eq!(size_of::<CUmemGenericAllocationHandle>(), 8);
        assert_eq!(
            size_of::<usize>(),
            8,
            "size_t is 64-bit on the targets we run on"
        );
    }

    #[test]
    fn nvml_struct_layouts_match_nvml_h() {
        assert_eq!(size_of::<NvmlMemory>(), 24);
        assert_eq!(offset_of!(NvmlMemory, free), 8);
        assert_eq!(offset_of!(NvmlMemory, used), 16);

        assert_eq!(size_of::<NvmlUtilization>(), 8);
        assert_eq!(offset_of!(NvmlUtilization, memory), 4);

        assert_eq!(size_of::<NvmlProcessUtilizationSample>(), 32);
        assert_eq!(offset_of!(NvmlProcessUtilizationSample, time_stamp), 8);
        assert_eq!(offset_of!(NvmlProcessUtilizationSample, sm_util), 16);
        assert_eq!(offset_of!(NvmlProcessUtilizationSample, mem_util), 20);
        assert_eq!(offset_of!(NvmlProcessUtilizationSample, enc_util), 24);
        assert_eq!(offset_of!(NvmlProcessUtilizationSample, dec_util), 28);

        assert_eq!(size_of::<NvmlProcessInfo>(), 24);
        assert_eq!(offset_of!(NvmlProcessInfo, used_gpu_memory), 8);
        assert_eq!(offset_of!(NvmlProcessInfo, gpu_instance_id), 16);
        assert_eq!(offset_of!(NvmlProcessInfo, compute_instance_id), 20);
    }

    #[test]
    fn device_prop_is_pinned_device_memory() {
        let p = CUmemAllocationProp::device(3);
        assert_eq!(p.type_, CU_MEM_ALLOCATION_TYPE_PINNED);
        assert_eq!(p.location.type_, CU_MEM_LOCATION_TYPE_DEVICE);
        assert_eq!(p.location.id, 3);
        assert!(p.win32_handle_meta_data.is_null());
    }
}
