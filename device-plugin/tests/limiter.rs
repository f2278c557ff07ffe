//! The in-container limiter from the daemon's side: the installed library, the mounts a share
//! gets, `vcuda.cfg`, the opt-out and soft-mode annotations, and shares refused without the
//! library.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gm_limiter_core::config::{Config, Mode};
use gm_proto::deviceplugin::v1beta1::ContainerAllocateResponse;
use support::*;
use tonic::Code;

const H100: &str = "h100-sxm-8.yaml";

fn mount<'a>(resp: &'a ContainerAllocateResponse, container: &str) -> Option<&'a str> {
    resp.mounts
        .iter()
        .find(|m| m.container_path == container)
        .map(|m| m.host_path.as_str())
}

fn container_paths(resp: &ContainerAllocateResponse) -> Vec<&str> {
    resp.mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect()
}

/// The container's `vcuda.cfg` once it decodes and satisfies `pred` (Allocate writes it off the
/// request path).
async fn binary_when(resp: &ContainerAllocateResponse, pred: impl Fn(&Config) -> bool) -> Config {
    let path = PathBuf::from(mount(resp, "/etc/vcuda").unwrap()).join("vcuda.cfg");
    let t = std::time::Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            assert_eq!(bytes.len(), 4096);
            let cfg = Config::decode(&bytes).unwrap();
            if pred(&cfg) {
                return cfg;
            }
        }
        assert!(t.elapsed() < STEP, "{} never matched", path.display());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_mounts_the_installed_library_the_preload_file_and_its_state_directory() {
    let h = Harness::new(example_node(H100)).await;
    let d = h.daemon(false).await;
    let cfg = h.config();
    let lib = d.handle().shared().library.clone().unwrap();
    assert!(lib.path.starts_with(&cfg.limiter_install_dir));
    let name = lib.path.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("libvcuda-0.1.0-") && name.ends_with(".so") && name.len() == 30,
        "{name}"
    );
    assert_eq!(std::fs::read(&lib.path).unwrap(), DUMMY_LIBRARY);

    let core = ids("vcore", 2, 0..25);
    let resp = h.kubelet.allocate(CORE, &core).await.unwrap();
    assert_eq!(
        mount(&resp, "/usr/local/vcuda/libvcuda.so"),
        Some(lib.path.to_str().unwrap())
    );
    let preload = mount(&resp, "/etc/ld.so.preload").unwrap();
    assert_eq!(
        std::fs::read_to_string(preload).unwrap(),
        "/usr/local/vcuda/libvcuda.so\n"
    );
    let state = PathBuf::from(mount(&resp, "/run/vcuda").unwrap());
    assert!(state.starts_with(&cfg.limiter_state_dir));
    assert!(resp
        .mounts
        .iter()
        .all(|m| m.read_only == (m.container_path != "/run/vcuda")));

    // Before the memory half: the limiter must refuse to run.
    let b = binary_when(&resp, |_| true).await;
    assert!(b.incomplete);
    assert_eq!((b.cards[0].index, b.cards[0].cores), (2, 25));
    h.kubelet
        .allocate(MEMORY, &ids("vmem", 2, 0..12))
        .await
        .unwrap();
    let b = binary_when(&resp, |c| !c.incomplete).await;
    assert_eq!(b.mode, Mode::Hard);
    assert_eq!(b.cards[0].core_limit, 25);
    assert_eq!(b.cards[0].memory_limit, 12 * 256 * 1024 * 1024);

    // PreStartContainer waits for the state directory: any user in the container may use it.
    h.kubelet.prestart(CORE, &core).await.unwrap();
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1777);

    // A restart with the same library reuses the installed file.
    d.kill();
    let d = h.daemon(false).await;
    let again = d.handle().shared().library.clone().unwrap();
    assert_eq!(again.path, lib.path);
    assert!(!again.written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_library_shares_are_refused_but_whole_cards_and_opted_out_pods_run() {
    let h = Harness::new(example_node(H100)).await;
    let cfg = h.config();
    std::fs::remove_file(&cfg.limiter_library).unwrap();
    h.pods.insert(pod_info(
        "free",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({"tencent.com/vcuda-limiter": "disabled"}),
    ));
    let d = h.daemon(true).await;
    assert!(d.handle().shared().library.is_err());

    let e = h
        .kubelet
        .allocate(CORE, &ids("vcore", 0, 0..20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let lib = cfg.limiter_library.display().to_string();
    for part in [
        "refusing to give this container a share of card 0 (20 vcuda-core) without the in-container limiter",
        lib.as_str(),
        "(--limiter-library)",
        "tencent.com/vcuda-limiter=disabled",
    ] {
        assert!(e.message().contains(part), "{part:?} in {}", e.message());
    }
    assert!(
        d.handle().snapshot().allocations.is_empty(),
        "a refused share leaves no record"
    );
    // The same IDs are refused again (nothing half-recorded turns them into a repeat).
    assert!(h
        .kubelet
        .allocate(CORE, &ids("vcore", 0, 0..20))
        .await
        .is_err());

    let whole = h
        .kubelet
        .allocate(CORE, &ids("vcore", 1, 0..100))
        .await
        .unwrap();
    assert_eq!(container_paths(&whole), ["/etc/vcuda"]);
    let free = h
        .kubelet
        .allocate(CORE, &ids("vcore", 2, 0..30))
        .await
        .unwrap();
    assert_eq!(container_paths(&free), ["/etc/vcuda"]);
    assert_eq!(d.handle().snapshot().allocations.len(), 2);
}

async fn share(h: &Harness, card: u32, cores: u32, blocks: u32) -> ContainerAllocateResponse {
    let core = ids("vcore", card, 0..cores);
    let resp = h.kubelet.allocate(CORE, &core).await.unwrap();
    let mem = ids("vmem", card, 0..blocks);
    h.kubelet.allocate(MEMORY, &mem).await.unwrap();
    resp
}

async fn confirm(h: &Harness, pod: &str, card: u32, cores: u32, blocks: u32) {
    let core = ids("vcore", card, 0..cores);
    let mem = ids("vmem", card, 0..blocks);
    let mut held = h.podres.holdings();
    held.push(Holding::new(pod, "main", core.clone(), mem.clone()));
    h.podres.set(held);
    h.kubelet.prestart(CORE, &core).await.unwrap();
    h.kubelet.prestart(MEMORY, &mem).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opt_out_and_soft_mode_annotations_shape_the_mounts_and_the_binary_config() {
    let h = Harness::new(example_node(H100)).await;
    for (name, cores, ann) in [
        (
            "free",
            30,
            serde_json::json!({"tencent.com/vcuda-limiter": "disabled"}),
        ),
        (
            "soft",
            40,
            serde_json::json!({"tencent.com/vcuda-core-limit": "80"}),
        ),
        (
            "badsoft",
            50,
            serde_json::json!({"tencent.com/vcuda-core-limit": "20"}),
        ),
    ] {
        h.pods.insert(pod_info(
            name,
            serde_json::json!([gpu_container("main", cores, 8)]),
            ann,
        ));
    }
    let _d = h.daemon(true).await;

    let free = share(&h, 0, 30, 8).await;
    assert_eq!(container_paths(&free), ["/etc/vcuda"], "opted out");
    confirm(&h, "free", 0, 30, 8).await;

    let soft = share(&h, 1, 40, 8).await;
    assert_eq!(container_paths(&soft).len(), 4);
    confirm(&h, "soft", 1, 40, 8).await;
    let b = binary_when(&soft, |c| c.namespace == "default").await;
    assert_eq!(b.mode, Mode::Soft);
    assert_eq!((b.cards[0].cores, b.cards[0].core_limit), (40, 80));
    assert_eq!(
        (b.pod_uid.as_str(), b.container.as_str()),
        ("uid-soft", "main")
    );

    // 20 is below the share's 40: ignored (logged), hard mode.
    let bad = share(&h, 2, 50, 8).await;
    confirm(&h, "badsoft", 2, 50, 8).await;
    let b = binary_when(&bad, |c| c.namespace == "default").await;
    assert_eq!(b.mode, Mode::Hard);
    assert_eq!((b.cards[0].cores, b.cards[0].core_limit), (50, 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertain_pod_or_a_refused_opt_out_keeps_the_limiter() {
    let h = Harness::new(example_node(H100)).await;
    // Two waiting pods of the same size: Allocate cannot tell which one it serves.
    h.pods.insert(pod_info(
        "a-free",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({"tencent.com/vcuda-limiter": "disabled"}),
    ));
    h.pods.insert(pod_info(
        "b-strict",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({}),
    ));
    let d = h.daemon(true).await;
    let first = share(&h, 0, 30, 8).await;
    assert_eq!(container_paths(&first).len(), 4, "enforced when in doubt");
    d.kill();

    // The admin refuses opt-outs.
    let h = Harness::new(example_node(H100)).await;
    h.pods.insert(pod_info(
        "free",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({"tencent.com/vcuda-limiter": "disabled"}),
    ));
    let mut cfg = h.config();
    cfg.limiter_allow_opt_out = false;
    let before = h.kubelet.registrations().len();
    let _d = h.daemon_with(cfg, true).await;
    h.kubelet.wait_registrations(before + 2).await;
    let resp = share(&h, 0, 30, 8).await;
    assert_eq!(container_paths(&resp).len(), 4);
}

fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_state_directories_are_swept_with_the_config_directories() {
    let h = Harness::new(example_node(H100)).await;
    let cfg = h.config();
    let orphan = cfg.limiter_state_dir.join("r-0123456789abcdef0123");
    std::fs::create_dir_all(&orphan).unwrap();
    let keep = cfg.limiter_state_dir.join("not-a-record");
    std::fs::create_dir_all(&keep).unwrap();
    let d = h.daemon(false).await;
    let resp = share(&h, 3, 10, 4).await;
    h.kubelet
        .prestart(CORE, &ids("vcore", 3, 0..10))
        .await
        .unwrap();
    let state = mount(&resp, "/run/vcuda").unwrap().to_string();
    assert!(exists(&state));
    d.handle().reconcile_now().await;
    // The removal is queued on the writer thread; a waited write after it proves it ran.
    let t = std::time::Instant::now();
    while orphan.exists() {
        assert!(t.elapsed() < STEP, "the orphan was not removed");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        keep.exists(),
        "only directories named like records are removed"
    );
    assert!(exists(&state), "a live record keeps its state directory");
}
