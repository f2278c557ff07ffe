//! Command-line flags (each also an environment variable `GPU_MANAGER_<FLAG>`, except
//! `NODE_NAME`), their validation, and logging set-up.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gm_backend::{BackendChoice, NvmlConfig};
use gm_core::duration::parse_duration;
use gm_core::health::XidPolicy;
use gm_core::{Policy, ResourceNames};

use crate::config::DaemonConfig;

/// Which GPU backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The real GPUs, through NVML (libnvidia-ml.so.1, loaded at run time).
    Nvml,
    /// A node described in a YAML file (`--node-file`): for demos and tests without GPUs.
    Simulated,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// gpu-manager: serves the kubelet device plugins for vcuda-core and vcuda-memory, so that
/// pods can share NVIDIA GPUs.
#[derive(Debug, Clone, Parser)]
#[command(name = "gpu-manager", version, about, long_about = None)]
pub struct Args {
    /// Name of this node (its Node object). Default: the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// GPU backend.
    #[arg(long, env = "GPU_MANAGER_BACKEND", value_enum, default_value = "nvml")]
    pub backend: BackendKind,

    /// Node description for `--backend simulated` (see deploy/examples/nodes/README.md).
    #[arg(long, env = "GPU_MANAGER_NODE_FILE")]
    pub node_file: Option<PathBuf>,

    /// Path of the NVML library (default: libnvidia-ml.so.1 through the dynamic loader).
    #[arg(long, env = "GPU_MANAGER_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,

    /// Root of sysfs, for the NUMA node of each card when NVML does not know it.
    #[arg(long, env = "GPU_MANAGER_SYSFS_ROOT", default_value = "/sys")]
    pub sysfs_root: PathBuf,

    /// The kubelet's device-plugin directory (holds kubelet.sock and our sockets).
    #[arg(
        long,
        env = "GPU_MANAGER_KUBELET_DIR",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    pub kubelet_dir: PathBuf,

    /// The kubelet's pod-resources socket.
    #[arg(
        long,
        env = "GPU_MANAGER_POD_RESOURCES_SOCKET",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pub pod_resources_socket: PathBuf,

    /// Directory of gpu-manager's own checkpoint (never the kubelet's directory).
    #[arg(
        long,
        env = "GPU_MANAGER_CHECKPOINT_DIR",
        default_value = "/var/lib/gpu-manager"
    )]
    pub checkpoint_dir: PathBuf,

    /// Host directory holding one limiter config directory per container.
    #[arg(
        long,
        env = "GPU_MANAGER_LIMITER_DIR",
        default_value = "/var/lib/gpu-manager/vcuda"
    )]
    pub limiter_dir: PathBuf,

    /// The in-container limiter shipped with gpu-manager (copied into --limiter-install-dir at
    /// start). Without it, share containers are refused.
    #[arg(
        long,
        env = "GPU_MANAGER_LIMITER_LIBRARY",
        default_value = "/usr/lib/gpu-manager/libvcuda.so"
    )]
    pub limiter_library: PathBuf,

    /// Host directory where the limiter library is installed under a versioned, never
    /// rewritten name, with the ld.so.preload file mounted into share containers.
    #[arg(
        long,
        env = "GPU_MANAGER_LIMITER_INSTALL_DIR",
        default_value = "/var/lib/gpu-manager/lib"
    )]
    pub limiter_install_dir: PathBuf,

    /// Host directory holding one read-write limiter state directory per share container
    /// (mounted at /run/vcuda).
    #[arg(
        long,
        env = "GPU_MANAGER_LIMITER_STATE_DIR",
        default_value = "/var/lib/gpu-manager/vcuda-state"
    )]
    pub limiter_state_dir: PathBuf,

    /// Honour the pod annotation <domain>/vcuda-limiter=disabled (its share containers then run
    /// without a memory cap or compute share). false: the annotation is ignored with a warning.
    #[arg(
        long,
        env = "GPU_MANAGER_LIMITER_ALLOW_OPT_OUT",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    pub limiter_allow_opt_out: bool,

    /// How often the host pids of each share container's GPU processes are published to its
    /// limiter (<--limiter-state-dir>/<record-id>/hostpids), e.g. 1s, 500ms.
    #[arg(long, env = "GPU_MANAGER_LIMITER_PIDS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub limiter_pids_interval: Duration,

    /// Host directory of the NVIDIA device nodes (/dev/nvidia*).
    #[arg(long, env = "GPU_MANAGER_DEV_ROOT", default_value = "/dev")]
    pub dev_root: PathBuf,

    /// Run without an API server: no pod watch, no annotations, no node labels; cards are
    /// chosen by the node-local policy.
    #[arg(long, env = "GPU_MANAGER_STANDALONE")]
    pub standalone: bool,

    /// Kubeconfig file (default: in-cluster configuration, then $KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "GPU_MANAGER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Domain of the resource names and annotations.
    #[arg(long, env = "GPU_MANAGER_RESOURCE_DOMAIN", default_value = "tencent.com", value_parser = parse_domain)]
    pub resource_domain: ResourceNames,

    /// Node-local placement policy, used when the scheduler assigned no cards: binpack, spread
    /// or topology.
    #[arg(long, env = "GPU_MANAGER_POLICY", default_value = "topology", value_parser = parse_policy)]
    pub policy: Policy,

    /// Metrics, usage and health endpoints.
    #[command(flatten)]
    pub metrics: gm_metrics::MetricsArgs,

    /// Log format.
    #[arg(
        long,
        env = "GPU_MANAGER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log level or filter (error, warn, info, debug, trace, or e.g. "info,gm_device_plugin=debug").
    #[arg(long, env = "GPU_MANAGER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// XIDs to ignore besides the default application XIDs 13,31,43,45,68,109 (`all`: no XID
    /// makes a card unhealthy).
    #[arg(long, env = "GPU_MANAGER_XID_IGNORE", default_value = "")]
    pub xid_ignore: String,

    /// XIDs that always make a card unhealthy, even if ignored by default (`all`: every XID).
    #[arg(long, env = "GPU_MANAGER_XID_CRITICAL", default_value = "")]
    pub xid_critical: String,

    /// How often unhealthy cards are probed again (e.g. 30s, 500ms, 2m).
    #[arg(long, env = "GPU_MANAGER_HEALTH_REPROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub health_reprobe_interval: Duration,

    /// How often allocations are reconciled with the kubelet and the API server.
    #[arg(long, env = "GPU_MANAGER_GC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub gc_interval: Duration,

    /// How long an allocation may be missing from the kubelet's pod-resources before it is
    /// released.
    #[arg(long, env = "GPU_MANAGER_GC_GRACE_PERIOD", default_value = "2m", value_parser = parse_duration)]
    pub gc_grace_period: Duration,
}

/// A flag combination or value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("--backend simulated needs --node-file (a node description such as deploy/examples/nodes/h100-sxm-8.yaml)")]
    MissingNodeFile,
    #[error(
        "--node-file is only used with --backend simulated; drop it or add --backend simulated"
    )]
    NodeFileWithoutSimulated,
    #[error("invalid --node-name {name:?}: {problem}; use the Node's name (lowercase letters, digits, '-' and '.', at most 253 characters)")]
    NodeName { name: String, problem: &'static str },
    #[error("cannot determine the node name: set --node-name or NODE_NAME (the hostname is not readable)")]
    NoNodeName,
    #[error("{0}")]
    Xid(String),
    #[error("invalid --log-level {value:?}: {problem}; use error, warn, info, debug or trace (optionally per module, e.g. info,gm_device_plugin=debug)")]
    LogLevel { value: String, problem: String },
    #[error("--checkpoint-dir and --kubelet-dir are both {0}; the kubelet deletes files in its directory, so use a directory of its own such as /var/lib/gpu-manager")]
    CheckpointInKubeletDir(String),
    #[error("{0}")]
    Metrics(String),
}

fn parse_domain(s: &str) -> Result<ResourceNames, String> {
    ResourceNames::new(s).map_err(|e| e.to_string())
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse::<Policy>().map_err(|e| e.to_string())
}

fn validate_node_name(name: &str) -> Result<(), CliError> {
    let bad = |problem| {
        Err(CliError::NodeName {
            name: name.to_string(),
            problem,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return bad("it contains characters other than lowercase letters, digits, '-' and '.'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric()
        || !name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
    {
        return bad("it must start and end with a letter or digit");
    }
    Ok(())
}

fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
}

/// Everything the binary needs from the flags.
#[derive(Debug, Clone)]
pub struct Setup {
    pub config: DaemonConfig,
    pub backend: BackendChoice,
    pub kubeconfig: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl Args {
    /// Validate the flags and build the daemon's configuration.
    pub fn into_setup(self) -> Result<Setup, CliError> {
        let node_name = match self.node_name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => hostname().ok_or(CliError::NoNodeName)?,
        };
        validate_node_name(&node_name)?;
        let backend = match (self.backend, self.node_file) {
            (BackendKind::Simulated, Some(node_file)) => BackendChoice::Simulated { node_file },
            (BackendKind::Simulated, None) => return Err(CliError::MissingNodeFile),
            (BackendKind::Nvml, Some(_)) => return Err(CliError::NodeFileWithoutSimulated),
            (BackendKind::Nvml, None) => BackendChoice::Nvml(NvmlConfig {
                lib_path: self.nvml_lib,
                sysfs_root: self.sysfs_root,
            }),
        };
        if self.checkpoint_dir == self.kubelet_dir {
            return Err(CliError::CheckpointInKubeletDir(
                self.checkpoint_dir.display().to_string(),
            ));
        }
        let xid_policy = XidPolicy::new(&self.xid_ignore, &self.xid_critical)
            .map_err(|e| CliError::Xid(format!("--xid-ignore/--xid-critical: {e}")))?;
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            CliError::LogLevel {
                value: self.log_level.clone(),
                problem: e.to_string(),
            }
        })?;
        let metrics = self
            .metrics
            .into_config(env!("CARGO_PKG_VERSION"))
            .map_err(|e| CliError::Metrics(e.to_string()))?;
        let config = DaemonConfig {
            node_name,
            kubelet_dir: self.kubelet_dir,
            pod_resources_socket: self.pod_resources_socket,
            checkpoint_dir: self.checkpoint_dir,
            limiter_dir: self.limiter_dir,
            limiter_library: self.limiter_library,
            limiter_install_dir: self.limiter_install_dir,
            limiter_state_dir: self.limiter_state_dir,
            limiter_allow_opt_out: self.limiter_allow_opt_out,
            limiter_pids_interval: self.limiter_pids_interval,
            dev_root: self.dev_root,
            names: self.resource_domain,
            policy: self.policy,
            xid_policy,
            health_reprobe_interval: self.health_reprobe_interval,
            gc_interval: self.gc_interval,
            gc_grace: self.gc_grace_period,
            pending_ttl: Duration::from_secs(30),
            watch_poll_interval: Duration::from_millis(300),
            metrics: Some(metrics),
            standalone: self.standalone,
        };
        Ok(Setup {
            config,
            backend,
            kubeconfig: self.kubeconfig,
            log_format: self.log_format,
            log_level: self.log_level,
        })
    }
}

/// Install the global tracing subscriber (stderr).
pub fn init_logging(format: LogFormat, level: &str) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| CliError::LogLevel {
        value: level.to_string(),
        problem: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["gpu-manager"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
    }

    #[test]
    fn duration_flags_take_units_and_name_the_flag_when_refused() {
        let a = parse(&["--gc-interval", "1m30s", "--gc-grace-period", "45"]).unwrap();
        assert_eq!(a.gc_interval, Duration::from_secs(90));
        assert_eq!(a.gc_grace_period, Duration::from_secs(45));
        let e = parse(&["--gc-interval", "soon"]).unwrap_err().to_string();
        assert!(
            e.contains("--gc-interval") && e.contains("\"soon\" is not a duration"),
            "{e}"
        );
        let e = parse(&["--health-reprobe-interval", "0s"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is zero"), "{e}");
    }

    #[test]
    fn the_quick_start_flags_give_a_standalone_simulated_config() {
        let a = parse(&[
            "--node-name",
            "gpu-node-1",
            "--backend",
            "simulated",
            "--node-file",
            "deploy/examples/nodes/h100-sxm-8.yaml",
            "--standalone",
            "--kubelet-dir",
            "/tmp/k",
        ])
        .unwrap();
        let s = a.into_setup().unwrap();
        assert!(s.config.standalone);
        assert_eq!(s.config.kubelet_dir, PathBuf::from("/tmp/k"));
        assert_eq!(s.config.names.core(), "tencent.com/vcuda-core");
        assert_eq!(s.config.policy, Policy::Topology);
        assert_eq!(s.config.gc_grace, Duration::from_secs(120));
        assert_eq!(
            s.config.metrics.as_ref().map(|m| m.addr),
            Some("0.0.0.0:5678".parse().unwrap())
        );
        assert!(matches!(s.backend, BackendChoice::Simulated { .. }));
        assert_eq!(
            s.config.limiter_library,
            PathBuf::from("/usr/lib/gpu-manager/libvcuda.so")
        );
        assert_eq!(
            s.config.limiter_install_dir,
            PathBuf::from("/var/lib/gpu-manager/lib")
        );
        assert_eq!(
            s.config.limiter_state_dir,
            PathBuf::from("/var/lib/gpu-manager/vcuda-state")
        );
        assert!(s.config.limiter_allow_opt_out);
        assert_eq!(s.config.limiter_pids_interval, Duration::from_secs(1));
    }

    #[test]
    fn the_limiter_flags_are_read() {
        let a = parse(&[
            "--node-name",
            "n",
            "--limiter-library",
            "/opt/libvcuda.so",
            "--limiter-install-dir",
            "/host/lib",
            "--limiter-state-dir",
            "/host/state",
            "--limiter-allow-opt-out=false",
            "--limiter-pids-interval",
            "250ms",
        ])
        .unwrap();
        let c = a.into_setup().unwrap().config;
        assert_eq!(c.limiter_pids_interval, Duration::from_millis(250));
        assert_eq!(c.limiter_library, PathBuf::from("/opt/libvcuda.so"));
        assert_eq!(c.limiter_install_dir, PathBuf::from("/host/lib"));
        assert_eq!(c.limiter_state_dir, PathBuf::from("/host/state"));
        assert!(!c.limiter_allow_opt_out);
        let e = parse(&["--limiter-allow-opt-out", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--limiter-allow-opt-out"), "{e}");
        let e = parse(&["--limiter-pids-interval", "0s"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--limiter-pids-interval") && e.contains("is zero"),
            "{e}"
        );
    }

    #[test]
    fn bad_flag_values_name_the_flag_and_the_allowed_values() {
        let e = parse(&["--backend", "cuda"]).unwrap_err().to_string();
        assert!(e.contains("nvml") && e.contains("simulated"), "{e}");
        let e = parse(&["--policy", "random"]).unwrap_err().to_string();
        assert!(e.contains("binpack, spread or topology"), "{e}");
        let e = parse(&["--resource-domain", "Bad_Domain"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DNS subdomain"), "{e}");
        let e = parse(&["--gc-interval", "often"]).unwrap_err().to_string();
        assert!(e.contains("500ms, 30s, 2m, 1h or 1m30s"), "{e}");
    }

    #[test]
    fn inconsistent_flags_are_refused_with_what_to_do() {
        let e = parse(&["--node-name", "n", "--backend", "simulated"])
            .unwrap()
            .into_setup()
            .unwrap_err();
        assert_eq!(e, CliError::MissingNodeFile);
        let e = parse(&["--node-name", "n", "--node-file", "x.yaml"])
            .unwrap()
            .into_setup()
            .unwrap_err();
        assert_eq!(e, CliError::NodeFileWithoutSimulated);
        let e = parse(&["--node-name", "Node_1"])
            .unwrap()
            .into_setup()
            .unwrap_err();
        assert!(e.to_string().contains("lowercase letters"), "{e}");
        let e = parse(&["--node-name", "n", "--xid-ignore", "13,x"])
            .unwrap()
            .into_setup()
            .unwrap_err();
        assert!(e.to_string().contains("\"x\" is not a number"), "{e}");
        let e = parse(&["--node-name", "n", "--log-level", "loud=="])
            .unwrap()
            .into_setup()
            .unwrap_err();
        assert!(e.to_string().contains("--log-level"), "{e}");
        let e = parse(&[
            "--node-name",
            "n",
            "--checkpoint-dir",
            "/var/lib/kubelet/device-plugins",
        ])
        .unwrap()
        .into_setup()
        .unwrap_err();
        assert!(matches!(e, CliError::CheckpointInKubeletDir(_)));
    }
}
