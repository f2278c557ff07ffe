//! The symbol tables: every driver and NVML function the library hooks or calls, with its
//! exact C signature. For each table the macro generates the exact names, an array of the real
//! library's pointers (filled once at init), typed accessors for the real functions
//! (`cuda::real::cuMemAlloc_v2()`), and the address of our hook of the same exact name.
//!
//! Each ABI variant is its own entry with its own signature: `cuMemAlloc` (32-bit sizes) is
//! never aliased to `cuMemAlloc_v2`.

#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};

use crate::ffi::*;

macro_rules! table {
    ($lib:ident;
     hooked { $($h:ident ( $($ht:ty),* ) -> $hr:ty;)* }
     real { $($r:ident ( $($rt:ty),* ) -> $rr:ty;)* }) => {
        pub mod $lib {
            use super::*;
            use std::sync::atomic::{AtomicPtr, Ordering};

            /// Every symbol of this table; hooked ones first.
            #[allow(dead_code)]
            #[derive(Clone, Copy, Debug, PartialEq, Eq)]
            #[repr(u16)]
            pub enum Sym { $($h,)* $($r,)* }

            /// Exact names, NUL-terminated, in `Sym` order.
            pub const NAMES: &[&str] = &[$(concat!(stringify!($h), "\0"),)* $(concat!(stringify!($r), "\0"),)*];
            /// How many names are hooked (the first `HOOKED` entries).
            pub const HOOKED: usize = [$(stringify!($h),)*].len();
            /// The real library's pointer for each name (null: not resolved or not exported).
            pub static REAL: [AtomicPtr<c_void>; NAMES.len()] =
                [const { AtomicPtr::new(std::ptr::null_mut()) }; NAMES.len()];

            /// Our hook for the hooked entry `i`.
            pub fn hook_ptr(i: usize) -> Option<*mut c_void> {
                let hooks: [*mut c_void; HOOKED] =
                    [$(crate::hooks::$h as *const () as *mut c_void,)*];
                hooks.get(i).copied()
            }

            /// The real pointer of entry `i`, if resolved.
            pub fn real_ptr(i: usize) -> *mut c_void {
                REAL.get(i).map_or(std::ptr::null_mut(), |p| p.load(Ordering::Acquire))
            }

            /// The real pointer of entry `i`, initialising the library first if needed (a
            /// hook may be the process's very first CUDA or NVML call).
            #[inline]
            fn loaded(i: usize) -> *mut c_void {
                let p = real_ptr(i);
                if p.is_null() && !crate::state::initialised() {
                    crate::state::ensure();
                    return real_ptr(i);
                }
                p
            }

            /// Typed accessors of the real functions (None: the real library lacks it).
            pub mod real {
                use super::*;
                $(
                    #[inline]
                    pub fn $h() -> Option<unsafe extern "C" fn($($ht),*) -> $hr> {
                        let p = loaded(Sym::$h as usize);
                        if p.is_null() {
                            None
                        } else {
                            // SAFETY: the pointer was returned by the real library's dlsym for
                            // this exact name, whose C signature is the one declared here.
                            Some(unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ht),*) -> $hr>(p) })
                        }
                    }
                )*
                $(
                    #[inline]
                    pub fn $r() -> Option<unsafe extern "C" fn($($rt),*) -> $rr> {
                        let p = loaded(Sym::$r as usize);
                        if p.is_null() {
                            None
                        } else {
                            // SAFETY: as above: the real library's pointer for this exact name.
                            Some(unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($rt),*) -> $rr>(p) })
                        }
                    }
                )*
            }
        }
    };
}

table! { cuda;
    hooked {
        cuInit(c_uint) -> CUresult;
        cuGetProcAddress(Cstr, *mut Void, c_int, u64) -> CUresult;
        cuGetProcAddress_v2(Cstr, *mut Void, c_int, u64, *mut c_int) -> CUresult;
        cuMemAlloc(*mut CUdeviceptr_v1, c_uint) -> CUresult;
        cuMemAlloc_v2(*mut CUdeviceptr, usize) -> CUresult;
        cuMemAllocPitch(*mut CUdeviceptr_v1, *mut c_uint, c_uint, c_uint, c_uint) -> CUresult;
        cuMemAllocPitch_v2(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
        cuMemAllocManaged(*mut CUdeviceptr, usize, c_uint) -> CUresult;
        cuMemAllocAsync(*mut CUdeviceptr, usize, CUstream) -> CUresult;
        cuMemAllocAsync_ptsz(*mut CUdeviceptr, usize, CUstream) -> CUresult;
        cuMemAllocFromPoolAsync(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
        cuMemAllocFromPoolAsync_ptsz(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
        cuMemFree(CUdeviceptr_v1) -> CUresult;
        cuMemFree_v2(CUdeviceptr) -> CUresult;
        cuMemFreeAsync(CUdeviceptr, CUstream) -> CUresult;
        cuMemFreeAsync_ptsz(CUdeviceptr, CUstream) -> CUresult;
        cuArrayCreate(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR_v1) -> CUresult;
        cuArrayCreate_v2(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR) -> CUresult;
        cuArray3DCreate(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR_v1) -> CUresult;
        cuArray3DCreate_v2(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR) -> CUresult;
        cuArrayDestroy(CUarray) -> CUresult;
        cuMipmappedArrayCreate(*mut CUmipmappedArray, *const CUDA_ARRAY3D_DESCRIPTOR, c_uint) -> CUresult;
        cuMipmappedArrayDestroy(CUmipmappedArray) -> CUresult;
        cuMemCreate(*mut CUmemGenericAllocationHandle, usize, *const CUmemAllocationProp, u64) -> CUresult;
        cuMemRelease(CUmemGenericAllocationHandle) -> CUresult;
        cuMemGetInfo(*mut c_uint, *mut c_uint) -> CUresult;
        cuMemGetInfo_v2(*mut usize, *mut usize) -> CUresult;
        cuDeviceTotalMem(*mut c_uint, CUdevice) -> CUresult;
        cuDeviceTotalMem_v2(*mut usize, CUdevice) -> CUresult;
        cuLaunchKernel(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut Void, *mut Void) -> CUresult;
        cuLaunchKernel_ptsz(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut Void, *mut Void) -> CUresult;
        cuLaunchKernelEx(*const CUlaunchConfig, CUfunction, *mut Void, *mut Void) -> CUresult;
        cuLaunchKernelEx_ptsz(*const CUlaunchConfig, CUfunction, *mut Void, *mut Void) -> CUresult;
        cuLaunchCooperativeKernel(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut Void) -> CUresult;
        cuLaunchCooperativeKernel_ptsz(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut Void) -> CUresult;
        cuLaunch(CUfunction) -> CUresult;
        cuLaunchGrid(CUfunction, c_int, c_int) -> CUresult;
        cuLaunchGridAsync(CUfunction, c_int, c_int, CUstream) -> CUresult;
        cuGraphLaunch(CUgraphExec, CUstream) -> CUresult;
        cuGraphLaunch_ptsz(CUgraphExec, CUstream) -> CUresult;
        cuStreamBeginCapture(CUstream) -> CUresult;
        cuStreamBeginCapture_v2(CUstream, c_int) -> CUresult;
        cuStreamEndCapture(CUstream, *mut CUgraph) -> CUresult;
        cuStreamEndCapture_ptsz(CUstream, *mut CUgraph) -> CUresult;
    }
    real {
        cuCtxGetDevice(*mut CUdevice) -> CUresult;
        cuDeviceGetUuid(*mut [u8; 16], CUdevice) -> CUresult;
        cuDeviceGetUuid_v2(*mut [u8; 16], CUdevice) -> CUresult;
        cuDeviceGetAttribute(*mut c_int, c_int, CUdevice) -> CUresult;
        cuEventCreate(*mut CUevent, c_uint) -> CUresult;
        cuEventRecord(CUevent, CUstream) -> CUresult;
        cuEventRecord_ptsz(CUevent, CUstream) -> CUresult;
        cuEventQuery(CUevent) -> CUresult;
        cuEventElapsedTime(*mut f32, CUevent, CUevent) -> CUresult;
    }
}

table! { nvml;
    hooked {
        nvmlInit() -> nvmlReturn_t;
        nvmlInit_v2() -> nvmlReturn_t;
        nvmlInitWithFlags(c_uint) -> nvmlReturn_t;
        nvmlDeviceGetMemoryInfo(nvmlDevice_t, *mut nvmlMemory_t) -> nvmlReturn_t;
        nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t, *mut nvmlMemory_v2_t) -> nvmlReturn_t;
        nvmlDeviceSetComputeMode(nvmlDevice_t, c_int) -> nvmlReturn_t;
    }
    real {
        nvmlDeviceGetUUID(nvmlDevice_t, *mut c_char, c_uint) -> nvmlReturn_t;
        nvmlDeviceGetHandleByUUID(Cstr, *mut nvmlDevice_t) -> nvmlReturn_t;
        nvmlDeviceGetProcessUtilization(nvmlDevice_t, *mut nvmlProcessUtilizationSample_t, *mut c_uint, u64) -> nvmlReturn_t;
        nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_t) -> nvmlReturn_t;
    }
}

/// Our hook of an exact name, if we hook it (CUDA or NVML).
pub fn hook_by_name(name: &[u8]) -> Option<*mut c_void> {
    fn find(names: &[&str], hooked: usize, name: &[u8]) -> Option<usize> {
        names
            .iter()
            .take(hooked)
            .position(|n| n.as_bytes().strip_suffix(b"\0") == Some(name))
    }
    if name.starts_with(b"nvml") {
        find(nvml::NAMES, nvml::HOOKED, name).and_then(nvml::hook_ptr)
    } else {
        find(cuda::NAMES, cuda::HOOKED, name).and_then(cuda::hook_ptr)
    }
}
