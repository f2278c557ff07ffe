//! Test fakes shared by the workspace's tests, and the `kubelet-sim` development tool.
//!
//! | module | holds |
//! |---|---|
//! | [`kubelet`] | [`FakeKubelet`]: a registration server on `kubelet.sock` that dials back like a kubelet, records every ListAndWatch message and calls the plugins |
//! | [`podresources`] | [`FakePodResources`]: a pod-resources `List` server with scripted contents ([`Holding`]) |
//! | [`devicemanager`] | [`DeviceManager`]: the kubelet device manager's admission flow (GetPreferredAllocation → Allocate → PreStartContainer) over the two fakes |
//! | [`cgroup`] | cgroup and `/proc` fixture trees (v1/v2, cgroupfs/systemd, containerd/CRI-O/Docker, QoS classes) |
//! | [`prometheus`] | a real Prometheus on a free port with a temporary storage directory, and its HTTP API |
//! | [`grafana`] | the shipped Grafana dashboard and its queries |
//!
//! The fakes are for tests: their test-facing helpers panic with a message when something a
//! test relies on does not happen. The `try_*` constructors and the [`DeviceManager`] return
//! errors instead; `kubelet-sim` only uses those.

pub mod cgroup;
pub mod devicemanager;
pub mod error;
pub mod grafana;
pub mod kubelet;
pub mod podresources;
pub mod prometheus;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use devicemanager::{
    Admission, AdmitError, AdmittedContainer, ContainerRequest, DeviceManager, PodRequest,
};
pub use error::TestkitError;
pub use kubelet::{FakeKubelet, KubeletEvent, Registered};
pub use podresources::{FakePodResources, Holding};
pub use prometheus::Prometheus;

/// Upper bound for any single wait in a test.
pub const STEP: Duration = Duration::from_secs(10);

/// The default vcuda-core resource name.
pub const CORE: &str = "tencent.com/vcuda-core";
/// The default vcuda-memory resource name.
pub const MEMORY: &str = "tencent.com/vcuda-memory";

/// The repository's root directory (where `deploy/` and `scripts/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// Path of an example node file shipped in `deploy/examples/nodes`.
pub fn example_node(name: &str) -> PathBuf {
    repo_root().join("deploy/examples/nodes").join(name)
}
