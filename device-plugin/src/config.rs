//! The daemon's configuration, independent of how it was given (flags, env, tests).

use std::path::PathBuf;
use std::time::Duration;

use gm_core::health::XidPolicy;
use gm_core::{Policy, ResourceNames};

/// Socket file name of the vcuda-core plugin (TKEStack's name).
pub const CORE_SOCKET: &str = "vcore.sock";
/// Socket file name of the vcuda-memory plugin (TKEStack's name).
pub const MEMORY_SOCKET: &str = "vmemory.sock";
/// File name of the daemon's own checkpoint inside the checkpoint directory.
pub const CHECKPOINT_FILE: &str = "gpu-manager.checkpoint.json";
/// Mount point of the per-container limiter directory inside the container.
pub const CONTAINER_LIMITER_DIR: &str = "/etc/vcuda";
/// Name of the limiter config file inside the limiter directory.
pub const LIMITER_FILE: &str = "limits.json";

/// Everything the daemon needs to know, already validated.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Name of this node (the Node object, and `spec.nodeName` of its pods).
    pub node_name: String,
    /// Directory holding `kubelet.sock` and our sockets.
    pub kubelet_dir: PathBuf,
    /// The kubelet's pod-resources socket.
    pub pod_resources_socket: PathBuf,
    /// Where the daemon keeps its checkpoint (never the kubelet's directory).
    pub checkpoint_dir: PathBuf,
    /// Host directory holding one limiter directory per container.
    pub limiter_dir: PathBuf,
    /// The `libvcuda.so` shipped with the daemon, copied into `limiter_install_dir` at start.
    pub limiter_library: PathBuf,
    /// Host directory of the installed, versioned libraries and the `ld.so.preload` file.
    pub limiter_install_dir: PathBuf,
    /// Host directory holding one read-write limiter state directory per share container.
    pub limiter_state_dir: PathBuf,
    /// Honour the `vcuda-limiter: disabled` pod annotation.
    pub limiter_allow_opt_out: bool,
    /// How often each share container's `hostpids` file is brought up to date.
    pub limiter_pids_interval: Duration,
    /// Host directory holding the NVIDIA device nodes.
    pub dev_root: PathBuf,
    /// Resource names (and with them every annotation key's domain).
    pub names: ResourceNames,
    /// Node-local placement policy (used when no scheduler assignment exists).
    pub policy: Policy,
    /// Which XIDs make a card unhealthy.
    pub xid_policy: XidPolicy,
    /// How often unhealthy cards are probed again.
    pub health_reprobe_interval: Duration,
    /// How often records are reconciled with pod-resources and the API server.
    pub gc_interval: Duration,
    /// How long a record may be missing from pod-resources before it is released.
    pub gc_grace: Duration,
    /// How long a container's first half (vcuda-core or vcuda-memory) waits for its other half.
    pub pending_ttl: Duration,
    /// Safety-net poll of `kubelet.sock` and our sockets (inotify does the fast path).
    pub watch_poll_interval: Duration,
    /// The metrics, usage and health server (`/metrics`, `/usage`, `/healthz`, `/readyz`);
    /// `None`: not served.
    pub metrics: Option<gm_metrics::MetricsConfig>,
    /// No API server: no pod watch, no annotations, no node publishing.
    pub standalone: bool,
}

impl DaemonConfig {
    /// A configuration with the documented defaults for everything but the paths, which are
    /// placed under `root` (handy for tests: `root/device-plugins`, `root/pod-resources/kubelet.sock`,
    /// `root/checkpoint`, `root/vcuda`, `root/dev`, the library `root/libvcuda.so` (which the
    /// caller provides), `root/lib`, `root/vcuda-state`). Standalone, no metrics server.
    pub fn under(root: impl Into<PathBuf>, node_name: &str) -> Self {
        let root = root.into();
        Self {
            node_name: node_name.to_string(),
            kubelet_dir: root.join("device-plugins"),
            pod_resources_socket: root.join("pod-resources").join("kubelet.sock"),
            checkpoint_dir: root.join("checkpoint"),
            limiter_dir: root.join("vcuda"),
            limiter_library: root.join("libvcuda.so"),
            limiter_install_dir: root.join("lib"),
            limiter_state_dir: root.join("vcuda-state"),
            limiter_allow_opt_out: true,
            limiter_pids_interval: Duration::from_secs(1),
            dev_root: root.join("dev"),
            names: ResourceNames::default(),
            policy: Policy::Topology,
            xid_policy: XidPolicy::default(),
            health_reprobe_interval: Duration::from_secs(30),
            gc_interval: Duration::from_secs(30),
            gc_grace: Duration::from_secs(120),
            pending_ttl: Duration::from_secs(30),
            watch_poll_interval: Duration::from_millis(300),
            metrics: None,
            standalone: true,
        }
    }

    /// Full path of the checkpoint file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint_dir.join(CHECKPOINT_FILE)
    }

    /// Full path of a plugin socket.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.kubelet_dir.join(name)
    }
}
