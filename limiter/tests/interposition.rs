//! libvcuda.so loaded with LD_PRELOAD into a probe that reaches the fake driver the way the
//! CUDA runtime does (dlopen + dlsym, cuGetProcAddress): what gets intercepted, what stays
//! untouched, and what a config error does.

mod probe;
mod support;

use probe::{Probe, MIB};

#[test]
fn a_process_that_never_touches_cuda_gets_no_thread_and_no_open_file() {
    let p = Probe::new().cap(MIB * 1024).share(30);
    let bare = p.run_bare(&["idle"]);
    let loaded = p.run(&["idle"]);
    assert_eq!(loaded.get("threads"), bare.get("threads"), "{loaded:?}");
    assert_eq!(loaded.get("fds"), bare.get("fds"), "{loaded:?}");
    assert!(
        loaded.stderr.is_empty(),
        "no output from the library: {}",
        loaded.stderr
    );
}

#[test]
fn a_program_linked_against_the_driver_calls_our_hooks() {
    let p = Probe::new().cap(MIB * 128).linked();
    let out = p.run(&["direct", &(MIB * 256).to_string()]);
    assert_eq!(out.get("direct_object"), Some("libvcuda.so"), "{out:?}");
    assert_eq!(
        out.get("direct"),
        Some("2"),
        "256 MiB over a 128 MiB cap: {out:?}"
    );
    let bare = p.run_bare(&["direct", &(MIB * 256).to_string()]);
    assert_eq!(bare.get("direct"), Some("0"), "{bare:?}");
}

#[test]
fn dlsym_of_a_hooked_name_returns_our_hook_whatever_the_handle() {
    // Linked, so the driver is in the global scope and RTLD_DEFAULT / RTLD_NEXT find it.
    let p = Probe::new().cap(MIB * 1024).share(30).linked();
    let names = [
        "cuMemAlloc_v2",
        "cuLaunchKernel",
        "cuLaunchKernel_ptsz",
        "cuGetProcAddress_v2",
        "cuMemGetInfo_v2",
        "cuGraphLaunch",
    ];
    let mut args = vec!["dlsym"];
    args.extend(names);
    args.push("cuCtxCreate_v2");
    let out = p.run(&args);
    for n in names {
        for h in ["handle", "default", "next"] {
            assert_eq!(
                out.get(&format!("{n} {h}")),
                Some("libvcuda.so"),
                "{n} via {h}: {out:?}"
            );
        }
    }
    assert_eq!(
        out.get("cuCtxCreate_v2 handle"),
        Some("libcuda.so.1"),
        "unhooked names are the driver's"
    );
}

#[test]
fn get_proc_address_routes_every_variant_to_a_hook_that_runs_the_same_exact_function() {
    let p = Probe::new().cap(MIB * 1024).share(30);
    let cases: &[(&str, &str, &str)] = &[
        // base, variant for legacy/default flags, variant for per-thread flags
        ("cuMemAlloc", "cuMemAlloc_v2", "cuMemAlloc_v2"),
        ("cuMemGetInfo", "cuMemGetInfo_v2", "cuMemGetInfo_v2"),
        (
            "cuDeviceTotalMem",
            "cuDeviceTotalMem_v2",
            "cuDeviceTotalMem_v2",
        ),
        ("cuLaunchKernel", "cuLaunchKernel", "cuLaunchKernel_ptsz"),
        ("cuMemAllocAsync", "cuMemAllocAsync", "cuMemAllocAsync_ptsz"),
    ];
    for version in ["11030", "12000", "12080", "13000"] {
        for &(base, legacy, per_thread) in cases {
            for flags in ["0", "1", "2"] {
                let out = p.run(&["getproc", base, version, flags]);
                let what = format!("{base} at {version} flags {flags}: {out:?}");
                assert_eq!(out.get("v2_result"), Some("0"), "{what}");
                assert_eq!(out.get("v2_object"), Some("libvcuda.so"), "{what}");
                assert_eq!(out.get("v1_object"), Some("libvcuda.so"), "{what}");
                let expect = if flags == "2" { per_thread } else { legacy };
                assert_eq!(out.all("ran"), vec![expect], "{what}");
            }
        }
    }
}

#[test]
fn get_proc_address_keeps_the_drivers_pointer_for_functions_we_do_not_hook() {
    let p = Probe::new().cap(MIB * 1024).share(30);
    let out = p.run(&["getproc", "cuCtxCreate", "12080", "0"]);
    assert_eq!(out.get("v2_object"), Some("libcuda.so.1"), "{out:?}");
}

#[test]
fn get_proc_address_of_itself_returns_our_wrapper() {
    let p = Probe::new().cap(MIB * 1024).share(30);
    for v in ["11030", "12000", "13000"] {
        let out = p.run(&["getproc", "cuGetProcAddress", v, "0"]);
        assert_eq!(out.get("v2_object"), Some("libvcuda.so"), "{v}: {out:?}");
    }
}

#[test]
fn an_invalid_config_makes_cuinit_fail_with_one_line_naming_the_file() {
    let p = Probe::new()
        .cap(MIB * 1024)
        .share(30)
        .corrupt_config(b"not a config");
    let out = p.run(&["meminfo"]);
    assert_eq!(
        out.get("cuInit"),
        Some("3"),
        "CUDA_ERROR_NOT_INITIALIZED: {out:?}"
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {:?}", out.stderr);
    assert!(
        lines[0].contains(&p.config_path()),
        "names the file: {}",
        lines[0]
    );
    assert!(
        lines[0].contains("vcuda.cfg"),
        "says what it expected: {}",
        lines[0]
    );
}

#[test]
fn a_config_of_an_unknown_version_is_refused_too() {
    let mut bytes = Probe::new().cap(MIB * 1024).share(30).config_bytes();
    bytes[4] = 9; // version 9
    let p = Probe::new().corrupt_config(&bytes);
    let out = p.run(&["meminfo"]);
    assert_eq!(out.get("cuInit"), Some("3"), "{out:?}");
    assert!(out.stderr.contains("version"), "{}", out.stderr);
}

#[test]
fn without_a_config_the_library_is_inert() {
    let p = Probe::new().physical(2048 * MIB).no_config();
    let out = p.run(&["fill", "cuMemAlloc_v2", &(256 * MIB).to_string()]);
    assert_eq!(
        out.get("obtained"),
        Some(&*(2048 * MIB).to_string()),
        "{out:?}"
    );
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}
