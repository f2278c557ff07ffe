//! `dlopen`/`dlsym`/`dladdr` with owned strings.
//!
//! When libvcuda.so is preloaded, `dlsym` here resolves to the limiter's exported `dlsym`, which
//! hands back its hooks for driver names. That is intended: gpucheck then exercises the hooks
//! the way cudart would.

use std::ffi::{c_void, CStr, CString};

/// An open shared object; never closed (the process is short-lived, and closing the driver
/// while contexts exist is not supported).
#[derive(Debug)]
pub struct Lib {
    handle: *mut c_void,
    pub path: String,
}

/// The last `dlerror()` text, or a fallback.
fn last_dl_error() -> String {
    // SAFETY: dlerror takes no arguments; it returns NULL or a NUL-terminated string owned by
    // libc that stays valid until the next dl* call on this thread, and we copy it right away.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dlerror".to_string()
    } else {
        // SAFETY: non-NULL dlerror results are NUL-terminated C strings (see above).
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Lib {
    /// `dlopen(path, RTLD_NOW)`.
    pub fn open(path: &str) -> Result<Lib, String> {
        let c = CString::new(path).map_err(|_| format!("library path {path:?} contains NUL"))?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call; RTLD_NOW is
        // a valid flag. Loading runs the library's constructors, which is what we ask for.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() {
            return Err(format!("dlopen({path}) failed: {}", last_dl_error()));
        }
        Ok(Lib {
            handle,
            path: path.to_string(),
        })
    }

    /// `dlsym(handle, name)`; `None` when the symbol is absent.
    pub fn sym_ptr(&self, name: &CStr) -> Option<*mut c_void> {
        // SAFETY: `handle` came from a successful dlopen and is never closed; `name` is a valid
        // NUL-terminated string.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    }

    /// `dlsym` cast to a function-pointer type.
    ///
    /// # Safety
    /// `F` must be an `extern "C"` function-pointer type matching the C signature of `name`.
    pub unsafe fn sym<F: Copy>(&self, name: &CStr) -> Option<F> {
        const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
        let p = self.sym_ptr(name)?;
        // SAFETY: F is pointer-sized (checked above) and, per this function's contract, a
        // function-pointer type for this symbol; a non-NULL dlsym result is a valid address.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}

/// Where an address lives: the object path and the nearest exported symbol.
#[derive(Debug, Clone, Default)]
pub struct AddrInfo {
    pub object: Option<String>,
    pub symbol: Option<String>,
}

/// `dladdr(addr)`.
pub fn addr_info(addr: *const c_void) -> AddrInfo {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: `info` is a valid, writable Dl_info; dladdr only reads `addr` as a number.
    let ok = unsafe { libc::dladdr(addr, &mut info) };
    if ok == 0 {
        return AddrInfo::default();
    }
    let owned = |p: *const std::ffi::c_char| {
        if p.is_null() {
            None
        } else {
            // SAFETY: dladdr fills these with NULL or NUL-terminated strings owned by the
            // loader, valid while the object stays loaded (it is never unloaded here).
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        }
    };
    AddrInfo {
        object: owned(info.dli_fname),
        symbol: owned(info.dli_sname),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_library_is_an_error_not_a_panic() {
        let e = Lib::open("libgpucheck-does-not-exist.so.9").unwrap_err();
        assert!(
            e.contains("dlopen(libgpucheck-does-not-exist.so.9) failed"),
            "{e}"
        );
    }

    #[test]
    fn libc_symbols_resolve_and_dladdr_names_them() {
        let libc_lib = Lib::open("libc.so.6").expect("libc is always there");
        let p = libc_lib.sym_ptr(c"getpid").expect("getpid");
        let info = addr_info(p);
        assert!(
            info.object.unwrap_or_default().contains("libc"),
            "object of getpid"
        );
        assert!(libc_lib.sym_ptr(c"no_such_symbol_gpucheck").is_none());
    }
}
