//! The entry points that bring the library in: `dlsym` (how cudart, PyTorch and static cudart
//! reach the driver), `cuGetProcAddress`/`_v2` (routed by the identity of the pointer the real
//! driver returns, so every exact variant reaches a hook of the same ABI) and `cuInit`.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use gm_limiter_core::symbols::is_driver_or_nvml_name;

use crate::ffi::*;
use crate::state::{self, Mode2};
use crate::table::{cuda::real, hook_by_name};

/// Our `dlsym`. Names that are not driver or NVML functions take a straight tail call to the
/// real `dlsym` (no init, no lock, no allocation: Rust's std and the driver's own constructors
/// may call it at any time). Driver and NVML names the real library exports resolve to our
/// hook of the same exact name, whatever the handle (`RTLD_NEXT` and `RTLD_DEFAULT` included).
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let Some(real_dlsym) = crate::real::real_dlsym() else {
        return std::ptr::null_mut();
    };
    if name.is_null() {
        // SAFETY: forwards unchanged; the real dlsym reports the error.
        return unsafe { real_dlsym(handle, name) };
    }
    // SAFETY: a NUL-terminated name from the caller.
    let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
    if !is_driver_or_nvml_name(bytes) || state::in_init() {
        // SAFETY: forwards unchanged.
        return unsafe { real_dlsym(handle, name) };
    }
    state::ensure();
    // SAFETY: forwards unchanged.
    let mut found = unsafe { real_dlsym(handle, name) };
    if found.is_null() && handle == libc::RTLD_NEXT {
        // RTLD_NEXT resolved from here searches our own dependencies, not the caller's scope:
        // look in the global scope, where the caller's RTLD_NEXT would have found the driver.
        // SAFETY: the real dlsym with the RTLD_DEFAULT pseudo-handle.
        found = unsafe { real_dlsym(libc::RTLD_DEFAULT, name) };
    }
    if found.is_null() {
        return found;
    }
    hook_by_name(bytes).unwrap_or(found)
}

/// Replace the driver's pointer with our hook of the same exact function, if we hook it.
fn reroute(symbol: *const c_char, pfn: *mut Void) {
    if pfn.is_null() {
        return;
    }
    // SAFETY: the driver just wrote this out-pointer.
    let got = unsafe { *pfn };
    if got.is_null() {
        return;
    }
    let Some(requested) = state::c_name(symbol) else {
        return;
    };
    if let Some(hook) = crate::real::route(got, requested) {
        // SAFETY: the caller's out-pointer; the hook has the ABI of the function it replaces.
        unsafe { *pfn = hook };
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut Void,
    version: c_int,
    flags: u64,
) -> CUresult {
    state::ensure();
    let Some(f) = real::cuGetProcAddress() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged.
    let r = unsafe { f(symbol, pfn, version, flags) };
    if r == CUDA_SUCCESS {
        reroute(symbol, pfn);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut Void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    state::ensure();
    let Some(f) = real::cuGetProcAddress_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged.
    let r = unsafe { f(symbol, pfn, version, flags, status) };
    if r == CUDA_SUCCESS {
        reroute(symbol, pfn);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if state::ensure() == Mode2::Refusing {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    let Some(f) = real::cuInit() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    unsafe { f(flags) }
}
