//! What the application sees: `cuMemGetInfo`/`cuDeviceTotalMem` and NVML's memory calls report
//! `total = min(cap, physical)` and the container's own use, so `nvidia-smi` inside the
//! container shows the cap. Subtractions saturate (usage above the cap never underflows).

use std::ffi::{c_char, c_int, c_uint};

use crate::ffi::*;
use crate::shm;
use crate::state::{self, Mode2};
use crate::table::{cuda, nvml};

/// The card of the current context with its cap, when active.
fn current_cap() -> Option<(usize, u64)> {
    let card = state::current_card()?;
    Some((card, state::active()?.config.cards.get(card)?.memory_limit))
}

/// `(total, free)` as the container should see them, from the physical values.
/// `(total, used, free)` as the container should see them, from the physical values: the
/// container's use is read (and dead processes reaped) once per call.
pub fn view(card: usize, cap: u64, phys_total: u64, phys_free: u64) -> (u64, u64, u64) {
    let total = cap.min(phys_total);
    let used = shm::reported_used(card).min(total);
    (total, used, (total - used).min(phys_free))
}

/// Rewrite an NVML memory answer `(total, used, free)` for the device's card, if it is one of
/// the container's (then true).
fn nvml_view(device: nvmlDevice_t, total: &mut u64, used: &mut u64, free: &mut u64) -> bool {
    let Some((card, cap)) = nvml_card(device) else {
        return false;
    };
    (*total, *used, *free) = view(card, cap, *total, *free);
    true
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let Some(f) = cuda::real::cuMemGetInfo_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    if state::ensure() == Mode2::Refusing {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    // SAFETY: forwards the caller's out-pointers to the real function.
    let r = unsafe { f(free, total) };
    if r != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return r;
    }
    if let Some((card, cap)) = current_cap() {
        // SAFETY: both pointers were just written by the driver and are non-null.
        unsafe {
            let (t, _, fr) = view(card, cap, *total as u64, *free as u64);
            *total = t as usize;
            *free = fr as usize;
        }
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    let Some(f) = cuda::real::cuMemGetInfo() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    if state::ensure() == Mode2::Refusing {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    // SAFETY: forwards the caller's out-pointers to the real function.
    let r = unsafe { f(free, total) };
    if r != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return r;
    }
    if let Some((card, cap)) = current_cap() {
        // SAFETY: both pointers were just written by the driver and are non-null.
        unsafe {
            let (t, _, fr) = view(card, cap, (*total).into(), (*free).into());
            *total = t.min(u64::from(u32::MAX)) as c_uint;
            *free = fr.min(u64::from(u32::MAX)) as c_uint;
        }
    }
    r
}

fn device_cap(dev: CUdevice) -> Option<u64> {
    let card = state::card_of_device(dev)?;
    Some(state::active()?.config.cards.get(card)?.memory_limit)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    let Some(f) = cuda::real::cuDeviceTotalMem_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    if state::ensure() == Mode2::Refusing {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    // SAFETY: forwards the caller's arguments to the real function.
    let r = unsafe { f(bytes, dev) };
    if r == CUDA_SUCCESS && !bytes.is_null() {
        if let Some(cap) = device_cap(dev) {
            // SAFETY: the driver just wrote this non-null pointer.
            unsafe { *bytes = (*bytes as u64).min(cap) as usize };
        }
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    let Some(f) = cuda::real::cuDeviceTotalMem() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    if state::ensure() == Mode2::Refusing {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    // SAFETY: forwards the caller's arguments to the real function.
    let r = unsafe { f(bytes, dev) };
    if r == CUDA_SUCCESS && !bytes.is_null() {
        if let Some(cap) = device_cap(dev) {
            // SAFETY: the driver just wrote this non-null pointer.
            unsafe { *bytes = u64::from(*bytes).min(cap) as c_uint };
        }
    }
    r
}

/// The UUID of a CUDA device in NVML's text form.
pub fn device_uuid(dev: i32) -> Option<String> {
    let f = cuda::real::cuDeviceGetUuid_v2().or_else(cuda::real::cuDeviceGetUuid)?;
    let mut b = [0u8; 16];
    // SAFETY: the real function writes 16 bytes into our buffer.
    if unsafe { f(&mut b, dev) } != CUDA_SUCCESS {
        return None;
    }
    Some(format!(
        "GPU-{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    ))
}

/// The config card of an NVML device handle, by UUID.
fn nvml_card(device: nvmlDevice_t) -> Option<(usize, u64)> {
    let a = state::active()?;
    let f = nvml::real::nvmlDeviceGetUUID()?;
    let mut buf = [0 as c_char; 96];
    // SAFETY: the real function writes a NUL-terminated string of at most len bytes.
    if unsafe { f(device, buf.as_mut_ptr(), buf.len() as c_uint) } != NVML_SUCCESS {
        return None;
    }
    let uuid = state::c_name(buf.as_ptr())?;
    let i = a
        .config
        .cards
        .iter()
        .position(|c| c.uuid.eq_ignore_ascii_case(uuid))?;
    Some((i, a.config.cards.get(i)?.memory_limit))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    let Some(f) = nvml::real::nvmlDeviceGetMemoryInfo() else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    state::ensure();
    // SAFETY: forwards the caller's arguments to the real function.
    let r = unsafe { f(device, memory) };
    if r != NVML_SUCCESS {
        return r;
    }
    // SAFETY: the real function just filled the caller's struct.
    if let Some(m) = unsafe { memory.as_mut() } {
        let _ = nvml_view(device, &mut m.total, &mut m.used, &mut m.free);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    let Some(f) = nvml::real::nvmlDeviceGetMemoryInfo_v2() else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    state::ensure();
    // SAFETY: forwards the caller's arguments to the real function.
    let r = unsafe { f(device, memory) };
    if r != NVML_SUCCESS {
        return r;
    }
    // SAFETY: the real function just filled the caller's struct.
    if let Some(m) = unsafe { memory.as_mut() } {
        if nvml_view(device, &mut m.total, &mut m.used, &mut m.free) {
            m.reserved = 0;
        }
    }
    r
}

/// A limited container may not change the card's compute mode (it would affect every tenant).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceSetComputeMode(
    device: nvmlDevice_t,
    mode: c_int,
) -> nvmlReturn_t {
    let Some(f) = nvml::real::nvmlDeviceSetComputeMode() else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    if state::ensure() != Mode2::Inert {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    // SAFETY: forwards the caller's arguments to the real function.
    unsafe { f(device, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit() -> nvmlReturn_t {
    state::ensure();
    let Some(f) = nvml::real::nvmlInit() else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    // SAFETY: forwards to the real function.
    unsafe { f() }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    state::ensure();
    let Some(f) = nvml::real::nvmlInit_v2() else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    // SAFETY: forwards to the real function.
    unsafe { f() }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(flags: c_uint) -> nvmlReturn_t {
    state::ensure();
    let Some(f) = nvml::real::nvmlInitWithFlags() else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    // SAFETY: forwards to the real function.
    unsafe { f(flags) }
}
