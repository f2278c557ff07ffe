//! Kubelet gRPC APIs used by gpu-manager-rs, generated at build time from the `.proto` files
//! in `proto/` (no system `protoc` needed).
//!
//! * [`deviceplugin::v1beta1`]: the device plugin API (`package v1beta1`): services
//!   `Registration` (served by the kubelet) and `DevicePlugin` (served by a plugin), with
//!   clients and servers for both, plus the protocol constants.
//! * [`podresources::v1`]: the pod-resources API (`package v1`): service
//!   `PodResourcesLister` (served by the kubelet), client and server.
//! * [`uds`]: tonic over a Unix domain socket (h2c), the transport both APIs use.
//!
//! prost turns proto names into Rust names with snake_case fields and CamelCase types:
//! `NUMANode` becomes [`deviceplugin::v1beta1::NumaNode`], `CDIDevice` becomes
//! [`deviceplugin::v1beta1::CdiDevice`], a field `ID` becomes `id` and `deviceIDs` becomes
//! `device_i_ds`.

pub mod uds;

/// The kubelet device plugin API.
pub mod deviceplugin {
    /// Device plugin API `v1beta1`: messages, `registration_{client,server}` and
    /// `device_plugin_{client,server}`, and the protocol constants.
    pub mod v1beta1 {
        include!(concat!(env!("OUT_DIR"), "/deviceplugin/v1beta1.rs"));

        use std::time::Duration;

        /// API version a plugin sends in `RegisterRequest.version`.
        pub const VERSION: &str = "v1beta1";
        /// Every API version the kubelet accepts.
        pub const SUPPORTED_VERSIONS: &[&str] = &[VERSION];
        /// `Device.health` of a usable device (exact, case-sensitive).
        pub const HEALTHY: &str = "Healthy";
        /// `Device.health` of a device that must not be allocated.
        pub const UNHEALTHY: &str = "Unhealthy";
        /// Default directory holding `kubelet.sock` and the plugins' sockets.
        pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
        /// File name of the kubelet's registration socket inside [`DEVICE_PLUGIN_DIR`].
        pub const KUBELET_SOCKET: &str = "kubelet.sock";
        /// Deadline the kubelet puts on `PreStartContainer`.
        pub const PRE_START_TIMEOUT: Duration = Duration::from_secs(30);
    }
}

/// The kubelet pod-resources API.
pub mod podresources {
    /// Pod-resources API `v1`: messages, `pod_resources_lister_{client,server}` and the
    /// default socket path.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/podresources/v1.rs"));

        /// Default path of the kubelet's pod-resources socket.
        pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
    }
}
