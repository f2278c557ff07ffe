//! The library's ABI: exactly the intended exports (no Rust symbols), no load-time code of its
//! own, the right soname, and no direct `dlsym` calls in the source.

mod support;

use std::collections::BTreeSet;
use std::process::Command;

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .arg(support::limiter_so())
        .output()
        .unwrap_or_else(|e| panic!("{name} (binutils) is needed for the ABI tests: {e}"));
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const EXPORTS: &[&str] = &[
    "dlsym",
    "cuInit",
    "cuGetProcAddress",
    "cuGetProcAddress_v2",
    "cuMemAlloc",
    "cuMemAlloc_v2",
    "cuMemAllocPitch",
    "cuMemAllocPitch_v2",
    "cuMemAllocManaged",
    "cuMemAllocAsync",
    "cuMemAllocAsync_ptsz",
    "cuMemAllocFromPoolAsync",
    "cuMemAllocFromPoolAsync_ptsz",
    "cuMemFree",
    "cuMemFree_v2",
    "cuMemFreeAsync",
    "cuMemFreeAsync_ptsz",
    "cuArrayCreate",
    "cuArrayCreate_v2",
    "cuArray3DCreate",
    "cuArray3DCreate_v2",
    "cuArrayDestroy",
    "cuMipmappedArrayCreate",
    "cuMipmappedArrayDestroy",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemGetInfo",
    "cuMemGetInfo_v2",
    "cuDeviceTotalMem",
    "cuDeviceTotalMem_v2",
    "cuLaunchKernel",
    "cuLaunchKernel_ptsz",
    "cuLaunchKernelEx",
    "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel",
    "cuLaunchCooperativeKernel_ptsz",
    "cuLaunch",
    "cuLaunchGrid",
    "cuLaunchGridAsync",
    "cuGraphLaunch",
    "cuGraphLaunch_ptsz",
    "cuStreamBeginCapture",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuStreamEndCapture_ptsz",
    "nvmlInit",
    "nvmlInit_v2",
    "nvmlInitWithFlags",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceSetComputeMode",
];

#[test]
fn the_library_exports_exactly_its_hooks_and_no_rust_symbols() {
    let nm = tool("nm", &["-D", "--defined-only"]);
    let got: BTreeSet<&str> = nm
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let want: BTreeSet<&str> = EXPORTS.iter().copied().collect();
    assert_eq!(got, want, "nm -D --defined-only");
}

#[test]
fn the_library_has_no_constructors_of_its_own() {
    // Two .init_array entries: the toolchain's frame_dummy and Rust std's argv capture (it
    // stores argc/argv, nothing else). A constructor of ours would make it three.
    let sections = tool("readelf", &["-S", "-W"]);
    let line = sections
        .lines()
        .find(|l| l.contains(".init_array"))
        .expect("an .init_array section");
    let size = line
        .split_whitespace()
        .skip_while(|w| *w != "INIT_ARRAY")
        .nth(3)
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .expect("section size");
    assert_eq!(size, 16, "two 8-byte entries: {line}");
    let dynamic = tool("readelf", &["-d"]);
    assert!(
        dynamic.contains("Library soname: [libvcuda.so]"),
        "{dynamic}"
    );
    assert!(!dynamic.contains("libstdc++"), "no C++ runtime: {dynamic}");
}

#[test]
fn the_source_never_calls_dlsym_through_the_dynamic_linker() {
    // Our own `dlsym` is exported: a `libc::dlsym` call would resolve back into it.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("src dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("source");
                assert!(
                    !text.contains("libc::dlsym("),
                    "{} calls libc::dlsym",
                    p.display()
                );
            }
        }
    }
}
