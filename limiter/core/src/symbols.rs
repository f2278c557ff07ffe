//! Driver symbol names and their families.
//!
//! `cuGetProcAddress(symbol, …)` takes a *base* name (`cuMemAlloc`) and the driver returns the
//! exact variant for the caller's CUDA version and stream flags (`cuMemAlloc_v2`,
//! `cuLaunchKernel_ptsz`). The limiter routes by the identity of the pointer the driver
//! returned, then confirms with [`same_family`] that the hook it found belongs to the family
//! that was asked for, so an aliased address can never hand out a hook of another function.

/// Which names the limiter intercepts in `dlsym`: the driver (`cu` + an uppercase letter, so
/// `cudaMalloc`, `cublas*` and `curl_*` stay untouched) and NVML (`nvml` + uppercase).
pub fn is_driver_or_nvml_name(name: &[u8]) -> bool {
    match name {
        [b'c', b'u', c, ..] => c.is_ascii_uppercase(),
        [b'n', b'v', b'm', b'l', c, ..] => c.is_ascii_uppercase(),
        _ => false,
    }
}

/// The base name of an exact variant: `_v<N>`, `_ptsz` and `_ptds` suffixes removed, in any
/// order (`cuMemcpyHtoDAsync_v2_ptsz` → `cuMemcpyHtoDAsync`).
pub fn base_name(exact: &str) -> &str {
    let mut s = exact;
    loop {
        if let Some(rest) = s.strip_suffix("_ptsz").or_else(|| s.strip_suffix("_ptds")) {
            s = rest;
            continue;
        }
        if let Some(pos) = s.rfind("_v") {
            let digits = &s[pos + 2..];
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                s = &s[..pos];
                continue;
            }
        }
        return s;
    }
}

/// Does the exact variant `exact` belong to the family the caller asked for as `requested`?
/// `requested` is normally a base name, but callers may ask for an exact name, which then must
/// match exactly in the parts they stated.
pub fn same_family(requested: &str, exact: &str) -> bool {
    if requested == exact {
        return true;
    }
    base_name(exact) == base_name(requested)
        && (requested == base_name(requested) || exact.starts_with(requested))
}

/// Is this the per-thread-default-stream twin of a function?
pub fn is_per_thread(exact: &str) -> bool {
    exact.ends_with("_ptsz")
        || exact.ends_with("_ptds")
        || exact.contains("_ptsz_")
        || exact.contains("_ptds_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_driver_and_nvml_names_are_intercepted() {
        for yes in ["cuInit", "cuMemAlloc_v2", "nvmlInit_v2", "cuGetProcAddress"] {
            assert!(is_driver_or_nvml_name(yes.as_bytes()), "{yes}");
        }
        for no in [
            "cudaMalloc",
            "cublasCreate_v2",
            "curl_easy_init",
            "nvmlx",
            "malloc",
            "cu",
            "",
        ] {
            assert!(!is_driver_or_nvml_name(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn version_and_stream_suffixes_are_stripped() {
        assert_eq!(base_name("cuMemAlloc_v2"), "cuMemAlloc");
        assert_eq!(base_name("cuLaunchKernel_ptsz"), "cuLaunchKernel");
        assert_eq!(base_name("cuMemcpyHtoDAsync_v2_ptsz"), "cuMemcpyHtoDAsync");
        assert_eq!(base_name("cuCtxCreate_v4"), "cuCtxCreate");
        assert_eq!(base_name("cuMemcpy2D_v2_ptds"), "cuMemcpy2D");
        assert_eq!(base_name("cuLaunchKernelEx"), "cuLaunchKernelEx");
        assert_eq!(
            base_name("cuGraphInstantiateWithFlags"),
            "cuGraphInstantiateWithFlags"
        );
        assert_eq!(base_name("cu_v"), "cu_v");
    }

    #[test]
    fn a_hook_of_another_family_never_matches() {
        assert!(same_family("cuMemAlloc", "cuMemAlloc_v2"));
        assert!(same_family("cuLaunchKernel", "cuLaunchKernel_ptsz"));
        assert!(!same_family("cuMemAlloc", "cuMemAllocAsync"));
        assert!(!same_family("cuLaunchKernel", "cuLaunchKernelEx"));
        assert!(
            !same_family("cuMemAlloc_v2", "cuMemAlloc"),
            "an exact request pins the version"
        );
        assert!(same_family("cuMemAlloc_v2", "cuMemAlloc_v2"));
    }

    #[test]
    fn per_thread_twins_are_recognised() {
        assert!(is_per_thread("cuLaunchKernel_ptsz"));
        assert!(is_per_thread("cuMemcpy_ptds"));
        assert!(!is_per_thread("cuLaunchKernel"));
    }

    proptest! {
        #[test]
        fn base_name_never_panics_and_is_a_prefix(s in "\\PC{0,40}") {
            let b = base_name(&s);
            prop_assert!(s.starts_with(b));
            prop_assert!(same_family(&s, &s));
        }
    }
}
