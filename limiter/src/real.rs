//! Reaching the real driver: the real `dlsym` (bootstrapped with `dlvsym`, never through the
//! dynamic linker's `dlsym`, which is ours), the real `libcuda.so.1` and `libnvidia-ml.so.1`
//! opened with `RTLD_NODELETE`, their exact names resolved once, and the index that maps a
//! real function's address back to our hook of the same exact name (`cuGetProcAddress`).

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

use crate::spin::SpinLock;
use crate::table::{cuda, nvml};

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// The real `dlsym`. glibc 2.34 moved it into libc proper (`GLIBC_2.34`); older ones export
/// `GLIBC_2.2.5` (x86_64) or `GLIBC_2.17` (aarch64).
pub fn real_dlsym() -> Option<DlsymFn> {
    let mut p = REAL_DLSYM.load(Ordering::Acquire);
    if p.is_null() {
        for ver in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
            // SAFETY: dlvsym with RTLD_NEXT and two NUL-terminated literals; it does not call
            // dlsym, so it cannot re-enter our hook.
            p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), ver.as_ptr()) };
            if !p.is_null() {
                break;
            }
        }
        if p.is_null() {
            return None;
        }
        REAL_DLSYM.store(p, Ordering::Release);
    }
    // SAFETY: `p` is glibc's dlsym, whose signature is DlsymFn.
    Some(unsafe { std::mem::transmute::<*mut c_void, DlsymFn>(p) })
}

/// Look up `name` in `handle` with the real dlsym.
pub fn lookup(handle: *mut c_void, name: &CStr) -> *mut c_void {
    match real_dlsym() {
        // SAFETY: the real dlsym with a handle from dlopen (or a pseudo-handle) and a C string.
        Some(f) => unsafe { f(handle, name.as_ptr()) },
        None => std::ptr::null_mut(),
    }
}

/// Open a real library. `RTLD_NODELETE` keeps every pointer valid after an application's
/// `dlclose`; `RTLD_LOCAL` keeps its symbols out of the global scope we interpose.
fn open(path: &CStr) -> *mut c_void {
    // SAFETY: dlopen of a NUL-terminated path; the driver's constructors may call dlsym on
    // this thread, which our hook answers with the real symbol while the init guard is held.
    unsafe {
        libc::dlopen(
            path.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    }
}

/// `(real pointer, hook index)` for every hooked CUDA name the driver exports, sorted by
/// pointer so `cuGetProcAddress` routes with a binary search.
static ROUTES: SpinLock<Vec<(usize, u16)>> = SpinLock::new(Vec::new());
static LOADED: AtomicU8 = AtomicU8::new(0);

/// Resolve both tables (once). Returns whether the CUDA driver was found.
pub fn load(cuda_path: &CStr, nvml_path: &CStr) -> bool {
    if LOADED.load(Ordering::Acquire) != 0 {
        return LOADED.load(Ordering::Acquire) == 1;
    }
    let cu = open(cuda_path);
    let mut routes = Vec::with_capacity(cuda::HOOKED);
    if !cu.is_null() {
        for (i, name) in cuda::NAMES.iter().enumerate() {
            let Ok(c) = CStr::from_bytes_with_nul(name.as_bytes()) else {
                continue;
            };
            let p = lookup(cu, c);
            if let Some(slot) = cuda::REAL.get(i) {
                slot.store(p, Ordering::Release);
            }
            if !p.is_null() && i < cuda::HOOKED {
                routes.push((p as usize, i as u16));
            }
        }
    }
    routes.sort_unstable();
    *ROUTES.lock() = routes;
    let nv = open(nvml_path);
    if !nv.is_null() {
        for (i, name) in nvml::NAMES.iter().enumerate() {
            let Ok(c) = CStr::from_bytes_with_nul(name.as_bytes()) else {
                continue;
            };
            if let Some(slot) = nvml::REAL.get(i) {
                slot.store(lookup(nv, c), Ordering::Release);
            }
        }
    }
    LOADED.store(if cu.is_null() { 2 } else { 1 }, Ordering::Release);
    !cu.is_null()
}

/// Our hook for the function the driver returned from `cuGetProcAddress(requested, …)`,
/// found by the pointer's identity and confirmed to be of the requested family.
pub fn route(real: *mut c_void, requested: &str) -> Option<*mut c_void> {
    let routes = ROUTES.lock();
    let key = real as usize;
    let start = routes.partition_point(|&(p, _)| p < key);
    routes
        .get(start..)?
        .iter()
        .take_while(|&&(p, _)| p == key)
        .map(|&(_, i)| usize::from(i))
        .find(|&i| {
            cuda::NAMES
                .get(i)
                .and_then(|n| n.strip_suffix('\0'))
                .is_some_and(|exact| gm_limiter_core::symbols::same_family(requested, exact))
        })
        .and_then(cuda::hook_ptr)
}

/// After fork the child keeps the tables (same mappings); only the lock must be usable.
pub fn after_fork_in_child() {
    ROUTES.force_unlock();
}
