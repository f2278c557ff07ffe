//! Allocation and free hooks: every path of reference §2.1 is charged before the driver sees
//! it. Host memory (pinned, registered), IPC/imported memory and host-located VMM allocations
//! pass through uncharged.

use std::ffi::c_uint;

use gm_limiter_core::cost;

use crate::ffi::*;
use crate::mem::{self, Gate, Kind};
use crate::table::cuda::real;

/// Run an allocation: charge, call, settle. `key` reads the new handle after success.
#[inline]
fn alloc(
    bytes: u64,
    card: Option<usize>,
    kind: Kind,
    call: impl FnOnce() -> CUresult,
    key: impl FnOnce() -> Option<u64>,
) -> CUresult {
    let gate = mem::before(bytes, card);
    match gate {
        Gate::Forward => call(),
        Gate::Refuse(code) => code,
        Gate::Charged(..) => {
            let r = call();
            mem::settle(gate, r, kind, if r == CUDA_SUCCESS { key() } else { None });
            r
        }
    }
}

/// Read an out-parameter the driver wrote (None if the pointer is null).
fn out<T: Copy>(p: *const T) -> Option<T> {
    if p.is_null() {
        None
    } else {
        // SAFETY: the application passed this out-pointer and the driver just wrote it.
        Some(unsafe { *p })
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut CUdeviceptr_v1, bytesize: c_uint) -> CUresult {
    let Some(f) = real::cuMemAlloc() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize.into(),
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize) },
        || out(dptr).map(u64::from),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    let Some(f) = real::cuMemAlloc_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize as u64,
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize) },
        || out(dptr),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    let Some(f) = real::cuMemAllocManaged() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize as u64,
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize, flags) },
        || out(dptr),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    let Some(f) = real::cuMemAllocAsync() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize as u64,
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize, stream) },
        || out(dptr),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    let Some(f) = real::cuMemAllocAsync_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize as u64,
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize, stream) },
        || out(dptr),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    let Some(f) = real::cuMemAllocFromPoolAsync() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize as u64,
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize, pool, stream) },
        || out(dptr),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    let Some(f) = real::cuMemAllocFromPoolAsync_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytesize as u64,
        None,
        Kind::Ptr,
        || unsafe { f(dptr, bytesize, pool, stream) },
        || out(dptr),
    )
}

/// Pitched memory: charged with the likely pitch first, then corrected to `pitch × height`
/// once the driver has chosen the pitch (freeing again if the correction exceeds the cap).
fn pitched(
    estimate: u64,
    height: u64,
    call: impl FnOnce() -> CUresult,
    pitch: impl FnOnce() -> Option<u64>,
    ptr: impl Fn() -> Option<u64>,
    free: impl FnOnce(u64),
) -> CUresult {
    let gate = mem::before(estimate, None);
    let (card, charged) = match gate {
        Gate::Forward => return call(),
        Gate::Refuse(code) => return code,
        Gate::Charged(c, b) => (c, b),
    };
    let r = call();
    if r != CUDA_SUCCESS {
        mem::undo(card, charged);
        return r;
    }
    let (Some(p), Some(actual)) = (ptr(), pitch().map(|p| p.saturating_mul(height.max(1)))) else {
        mem::undo(card, charged);
        return r;
    };
    if actual > charged {
        match mem::before(actual - charged, Some(card)) {
            Gate::Charged(..) => {}
            Gate::Forward => {}
            Gate::Refuse(code) => {
                free(p);
                mem::undo(card, charged);
                return code;
            }
        }
    } else {
        mem::undo(card, charged - actual);
    }
    mem::record(Kind::Ptr, p, card, actual);
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch(
    dptr: *mut CUdeviceptr_v1,
    pitch: *mut c_uint,
    width: c_uint,
    height: c_uint,
    elem: c_uint,
) -> CUresult {
    let Some(f) = real::cuMemAllocPitch() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let estimate = cost::pitch_estimate(width.into(), height.into(), 512);
    pitched(
        estimate,
        height.into(),
        // SAFETY: forwards the caller's arguments unchanged to the real function.
        || unsafe { f(dptr, pitch, width, height, elem) },
        || out(pitch).map(u64::from),
        || out(dptr).map(u64::from),
        |p| {
            if let Some(free) = real::cuMemFree() {
                // SAFETY: frees the allocation the driver just made for this call.
                unsafe { free(p as CUdeviceptr_v1) };
            }
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    let Some(f) = real::cuMemAllocPitch_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let estimate = cost::pitch_estimate(width as u64, height as u64, 512);
    pitched(
        estimate,
        height as u64,
        // SAFETY: forwards the caller's arguments unchanged to the real function.
        || unsafe { f(dptr, pitch, width, height, elem) },
        || out(pitch).map(|p| p as u64),
        || out(dptr),
        |p| {
            if let Some(free) = real::cuMemFree_v2() {
                // SAFETY: frees the allocation the driver just made for this call.
                unsafe { free(p) };
            }
        },
    )
}

/// Free through the real function; on success give back what `key` charged.
fn freed(r: CUresult, kind: Kind, key: u64) -> CUresult {
    if r == CUDA_SUCCESS {
        mem::release(kind, key);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree(dptr: CUdeviceptr_v1) -> CUresult {
    let Some(f) = real::cuMemFree() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    freed(unsafe { f(dptr) }, Kind::Ptr, dptr.into())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    let Some(f) = real::cuMemFree_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    freed(unsafe { f(dptr) }, Kind::Ptr, dptr)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    let Some(f) = real::cuMemFreeAsync() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged.
    freed(unsafe { f(dptr, stream) }, Kind::Ptr, dptr)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    let Some(f) = real::cuMemFreeAsync_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged.
    freed(unsafe { f(dptr, stream) }, Kind::Ptr, dptr)
}

fn desc<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: the application's descriptor pointer, valid for the duration of the call; we
    // only read it before forwarding.
    unsafe { p.as_ref() }
}

/// The extents and element of an array descriptor, whatever its ABI.
trait Extents {
    /// (width, height, depth, channels, format)
    fn extents(&self) -> (u64, u64, u64, u32, u32);
}

impl Extents for CUDA_ARRAY_DESCRIPTOR_v1 {
    fn extents(&self) -> (u64, u64, u64, u32, u32) {
        (
            self.width.into(),
            self.height.into(),
            0,
            self.num_channels,
            self.format as u32,
        )
    }
}

impl Extents for CUDA_ARRAY_DESCRIPTOR {
    fn extents(&self) -> (u64, u64, u64, u32, u32) {
        (
            self.width as u64,
            self.height as u64,
            0,
            self.num_channels,
            self.format as u32,
        )
    }
}

impl Extents for CUDA_ARRAY3D_DESCRIPTOR_v1 {
    fn extents(&self) -> (u64, u64, u64, u32, u32) {
        (
            self.width.into(),
            self.height.into(),
            self.depth.into(),
            self.num_channels,
            self.format as u32,
        )
    }
}

impl Extents for CUDA_ARRAY3D_DESCRIPTOR {
    fn extents(&self) -> (u64, u64, u64, u32, u32) {
        (
            self.width as u64,
            self.height as u64,
            self.depth as u64,
            self.num_channels,
            self.format as u32,
        )
    }
}

/// Create an array through the real function `f`, charged its bytes.
fn array<D: Extents>(
    f: Option<unsafe extern "C" fn(*mut CUarray, *const D) -> CUresult>,
    arr: *mut CUarray,
    d: *const D,
) -> CUresult {
    let Some(f) = f else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let Some(dd) = desc(d) else {
        // SAFETY: forwards unchanged; the driver reports the null descriptor.
        return unsafe { f(arr, d) };
    };
    let (w, h, depth, ch, fmt) = dd.extents();
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        cost::array_bytes(w, h, depth, ch, fmt),
        None,
        Kind::Array,
        || unsafe { f(arr, d) },
        || out(arr).map(|a| a as u64),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate(
    arr: *mut CUarray,
    d: *const CUDA_ARRAY_DESCRIPTOR_v1,
) -> CUresult {
    array(real::cuArrayCreate(), arr, d)
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayCreate_v2(
    arr: *mut CUarray,
    d: *const CUDA_ARRAY_DESCRIPTOR,
) -> CUresult {
    array(real::cuArrayCreate_v2(), arr, d)
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate(
    arr: *mut CUarray,
    d: *const CUDA_ARRAY3D_DESCRIPTOR_v1,
) -> CUresult {
    array(real::cuArray3DCreate(), arr, d)
}

#[no_mangle]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    arr: *mut CUarray,
    d: *const CUDA_ARRAY3D_DESCRIPTOR,
) -> CUresult {
    array(real::cuArray3DCreate_v2(), arr, d)
}

#[no_mangle]
pub unsafe extern "C" fn cuArrayDestroy(arr: CUarray) -> CUresult {
    let Some(f) = real::cuArrayDestroy() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    freed(unsafe { f(arr) }, Kind::Array, arr as u64)
}

#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    arr: *mut CUmipmappedArray,
    d: *const CUDA_ARRAY3D_DESCRIPTOR,
    levels: c_uint,
) -> CUresult {
    let Some(f) = real::cuMipmappedArrayCreate() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let Some(dd) = desc(d) else {
        // SAFETY: forwards unchanged; the driver reports the null descriptor.
        return unsafe { f(arr, d, levels) };
    };
    let bytes = cost::mipmapped_bytes(
        dd.width as u64,
        dd.height as u64,
        dd.depth as u64,
        dd.num_channels,
        dd.format as u32,
        levels,
    );
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        bytes,
        None,
        Kind::Array,
        || unsafe { f(arr, d, levels) },
        || out(arr).map(|a| a as u64),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(arr: CUmipmappedArray) -> CUresult {
    let Some(f) = real::cuMipmappedArrayDestroy() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    freed(unsafe { f(arr) }, Kind::Array, arr as u64)
}

/// VMM physical memory: charged on the card named by `prop->location` when it is a device;
/// host-located allocations (NCCL's host buffers) pass through.
#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    let Some(f) = real::cuMemCreate() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let device = desc(prop)
        .filter(|p| p.location.kind == CU_MEM_LOCATION_TYPE_DEVICE)
        .map(|p| p.location.id);
    let Some(dev) = device else {
        // SAFETY: forwards unchanged (host memory or a null prop the driver rejects).
        return unsafe { f(handle, size, prop, flags) };
    };
    match crate::state::ensure() {
        crate::state::Mode2::Refusing => return CUDA_ERROR_NOT_INITIALIZED,
        crate::state::Mode2::Inert => {
            // SAFETY: forwards unchanged.
            return unsafe { f(handle, size, prop, flags) };
        }
        crate::state::Mode2::Active => {}
    }
    let Some(card) = crate::state::card_of_device(dev) else {
        // A device outside the container's cards: the driver refuses it itself.
        // SAFETY: forwards unchanged.
        return unsafe { f(handle, size, prop, flags) };
    };
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    alloc(
        size as u64,
        Some(card),
        Kind::Handle,
        || unsafe { f(handle, size, prop, flags) },
        || out(handle),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    let Some(f) = real::cuMemRelease() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    freed(unsafe { f(handle) }, Kind::Handle, handle)
}
