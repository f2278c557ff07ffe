//! `routing`: where `cuGetProcAddress_v2` sends each base name, at the driver's own version,
//! for the default, legacy-stream and per-thread-stream flags.

use std::ffi::{c_void, CString};

use crate::args::Args;
use crate::cuda::Cuda;
use crate::dl::addr_info;
use crate::error::{Error, Result};
use crate::ffi::*;
use crate::json::Line;
use crate::Global;

/// `(base name, has a _ptsz twin)`.
const BASES: &[(&str, bool)] = &[
    ("cuMemAlloc", false),
    ("cuLaunchKernel", true),
    ("cuMemGetInfo", false),
    ("cuGraphLaunch", true),
    ("cuMemAllocAsync", true),
    ("cuGetProcAddress", false),
];

const FLAGS: &[(u64, &str)] = &[
    (CU_GET_PROC_ADDRESS_DEFAULT, "default"),
    (CU_GET_PROC_ADDRESS_LEGACY_STREAM, "legacy"),
    (CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM, "per_thread"),
];

/// The exact exported name the driver should answer with (CUDA >= 12.0).
pub fn expected_name(base: &str, per_thread: bool, version: i32) -> String {
    match base {
        "cuMemAlloc" | "cuMemGetInfo" => format!("{base}_v2"),
        "cuGetProcAddress" if version >= 12000 => "cuGetProcAddress_v2".to_string(),
        "cuGetProcAddress" => "cuGetProcAddress".to_string(),
        _ if per_thread => format!("{base}_ptsz"),
        _ => base.to_string(),
    }
}

fn hex(p: *const c_void) -> String {
    format!("{:#x}", p as usize)
}

pub fn run(g: &Global, mut a: Args) -> Result<()> {
    let expect = a.opt("expect-object")?;
    let version_opt: Option<i32> = a
        .opt("cuda-version")?
        .map(|v| {
            v.parse()
                .map_err(|_| Error::Other(format!("--cuda-version: {v:?}")))
        })
        .transpose()?;
    a.finish()?;

    let cuda = Cuda::load(&g.cuda_lib)?;
    cuda.init()?;
    let version = match version_opt {
        Some(v) => v,
        None => cuda.driver_version()?,
    };
    let mut all_pass = true;
    for &(base, twin) in BASES {
        let mut ptrs: Vec<*mut c_void> = Vec::new();
        let mut base_pass = true;
        for &(flags, flags_name) in FLAGS {
            let (r, pfn, status) = cuda.get_proc_address(base, version, flags)?;
            let per_thread = flags == CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM;
            let exact = expected_name(base, per_thread, version);
            let exact_c =
                CString::new(exact.clone()).map_err(|_| Error::Other("NUL in name".into()))?;
            let via_dlsym = cuda.lib.sym_ptr(&exact_c).unwrap_or(std::ptr::null_mut());
            let info = addr_info(pfn);
            let in_expected = expect
                .as_ref()
                .map(|x| info.object.as_deref().unwrap_or("").contains(x.as_str()));
            let matches = !pfn.is_null() && pfn == via_dlsym;
            let pass = r == CUDA_SUCCESS && !pfn.is_null() && in_expected.unwrap_or(true);
            base_pass &= pass;
            Line::new("routing")
                .set("symbol", base)
                .set("flags", flags)
                .set("flags_name", flags_name)
                .set("cuda_version", version)
                .set("result", r)
                .set("status", status)
                .set("ptr", hex(pfn))
                .set("object", info.object)
                .set("object_symbol", info.symbol)
                .set("expected_name", exact)
                .set("dlsym_ptr", hex(via_dlsym))
                .set("matches_dlsym", matches)
                .set("in_expected_object", in_expected)
                .set("pass", pass)
                .emit();
            ptrs.push(pfn);
        }
        let (legacy, per_thread) = (ptrs[1], ptrs[2]);
        let differ = legacy != per_thread;
        let pass = base_pass && differ == twin;
        all_pass &= pass;
        Line::new("routing_pair")
            .set("symbol", base)
            .set("legacy_ptr", hex(legacy))
            .set("per_thread_ptr", hex(per_thread))
            .set("differ", differ)
            .set("expect_differ", twin)
            .set("expect_object", expect.clone())
            .set("pass", pass)
            .emit();
    }
    if all_pass {
        Ok(())
    } else {
        Err(Error::Reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_exact_names() {
        assert_eq!(expected_name("cuMemAlloc", true, 12080), "cuMemAlloc_v2");
        assert_eq!(
            expected_name("cuMemGetInfo", false, 12080),
            "cuMemGetInfo_v2"
        );
        assert_eq!(
            expected_name("cuLaunchKernel", false, 12080),
            "cuLaunchKernel"
        );
        assert_eq!(
            expected_name("cuLaunchKernel", true, 12080),
            "cuLaunchKernel_ptsz"
        );
        assert_eq!(
            expected_name("cuMemAllocAsync", true, 12080),
            "cuMemAllocAsync_ptsz"
        );
        assert_eq!(
            expected_name("cuGetProcAddress", false, 12080),
            "cuGetProcAddress_v2"
        );
        assert_eq!(
            expected_name("cuGetProcAddress", false, 11080),
            "cuGetProcAddress"
        );
    }
}
