//! Command-line flags of the extender (mounted into `gpu-admission serve`), every one also an
//! environment variable `GPU_ADMISSION_<FLAG>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gm_core::annotations::Keys;
use gm_core::duration::{format_duration, parse_duration};
use gm_core::fgd::TargetWorkload;
use gm_core::fgd_plus::PlusConfig;
use gm_core::ResourceNames;

use crate::error::ExtenderError;
use crate::fgd::FgdSettings;
use crate::policy::ExtenderPolicy;

/// Flags of the scheduler extender.
#[derive(Debug, Clone, clap::Args)]
pub struct ExtenderArgs {
    /// Address the extender HTTP API (filter, prioritize, bind, predicates, healthz, readyz,
    /// metrics) listens on.
    #[arg(
        long,
        env = "GPU_ADMISSION_EXTENDER_ADDR",
        default_value = "0.0.0.0:3456"
    )]
    pub extender_addr: SocketAddr,

    /// Default placement policy: binpack, spread, topology, fgd or fgd+. A pod may pick
    /// another with the `<domain>/gpu-policy` annotation.
    #[arg(long, env = "GPU_ADMISSION_POLICY", default_value = "binpack")]
    pub policy: ExtenderPolicy,

    /// FGD's target workload as a JSON file (`{"coverage": 1.0, "types": [{"cpuMilli": 4000,
    /// "gpus": 1, "gpuCores": 50, "models": ["T4"], "weight": 3}, ...]}`, see
    /// docs/simulator.md); also fgd+'s capability workload. Without it the workload is learned
    /// from the GPU pods the cluster runs.
    #[arg(long, env = "GPU_ADMISSION_FGD_WORKLOAD")]
    pub fgd_workload: Option<PathBuf>,

    /// Share of the learned GPU pods FGD's target workload covers (the most popular task types
    /// first; the paper: 0.95). Ignored with --fgd-workload, whose file sets its own.
    #[arg(long, env = "GPU_ADMISSION_FGD_COVERAGE", default_value_t = gm_core::fgd::PAPER_COVERAGE)]
    pub fgd_coverage: f64,

    /// fgd+ settings, comma-separated key=value (e.g. `primary=10,cap-weight=1`; see
    /// docs/simulator.md); empty = the published policy.
    #[arg(long, env = "GPU_ADMISSION_FGD_PLUS_CONFIG", default_value = "")]
    pub fgd_plus_config: String,

    /// Domain of the extended resources and annotations (`<domain>/vcuda-core`, ...).
    #[arg(
        long,
        env = "GPU_ADMISSION_RESOURCE_DOMAIN",
        default_value = "tencent.com"
    )]
    pub resource_domain: String,

    /// How long an in-flight reservation made at bind holds its cards if the pod informer never
    /// shows the pod's annotations (e.g. 30s, 2m).
    #[arg(long, env = "GPU_ADMISSION_RESERVATION_TTL", default_value = "60s", value_parser = parse_duration)]
    pub reservation_ttl: Duration,

    /// Time budget of all API calls of one bind or predicates request; keep it below the
    /// scheduler's extender `httpTimeout`.
    #[arg(long, env = "GPU_ADMISSION_API_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_timeout: Duration,

    /// Longest a bind waits at the admission gate: a pod is bound to a node only once no pod
    /// placed there before it, still waiting for the kubelet's device allocation, has a request
    /// of the same size on other cards (the device plugin could not tell the two apart). On
    /// timeout the bind fails and kube-scheduler retries the pod. Keep this plus --api-timeout
    /// below the scheduler's extender `httpTimeout` (15s in deploy/).
    #[arg(long, env = "GPU_ADMISSION_BIND_GATE_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub bind_gate_timeout: Duration,

    /// How long after its placement a pod the device plugin has not confirmed can still hold
    /// up the admission gate. The kubelet admits a bound pod within seconds but the device
    /// plugin confirms it only at container start, after the image pull; past this window the
    /// pod is taken as admitted (so one pod stuck pulling its image cannot block a node).
    #[arg(long, env = "GPU_ADMISSION_BIND_GATE_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub bind_gate_window: Duration,

    /// Largest request body accepted, in bytes (`Nodes` mode sends whole node objects).
    #[arg(long, env = "GPU_ADMISSION_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Run several replicas and let only the holder of a coordination.k8s.io Lease decide.
    #[arg(long, env = "GPU_ADMISSION_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "GPU_ADMISSION_LEASE_NAME",
        default_value = "gpu-admission"
    )]
    pub lease_name: String,

    /// Namespace of the Lease [default: $POD_NAMESPACE, else kube-system].
    #[arg(long, env = "GPU_ADMISSION_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a leader's Lease stays valid without renewal; a follower takes over after it.
    #[arg(long, env = "GPU_ADMISSION_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How often the Lease is renewed or its acquisition retried.
    #[arg(long, env = "GPU_ADMISSION_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry_period: Duration,

    /// This replica's identity in the Lease [default: $POD_NAME, else the hostname].
    #[arg(long, env = "GPU_ADMISSION_IDENTITY")]
    pub identity: Option<String>,
}

impl Default for ExtenderArgs {
    fn default() -> Self {
        Self {
            extender_addr: SocketAddr::from(([0, 0, 0, 0], 3456)),
            policy: ExtenderPolicy::Core(gm_core::Policy::Binpack),
            fgd_workload: None,
            fgd_coverage: gm_core::fgd::PAPER_COVERAGE,
            fgd_plus_config: String::new(),
            resource_domain: gm_core::resources::DEFAULT_DOMAIN.to_string(),
            reservation_ttl: Duration::from_secs(60),
            api_timeout: Duration::from_secs(10),
            bind_gate_timeout: Duration::from_secs(4),
            bind_gate_window: Duration::from_secs(30),
            max_body_bytes: 64 * 1024 * 1024,
            leader_elect: false,
            lease_name: "gpu-admission".into(),
            lease_namespace: None,
            lease_duration: Duration::from_secs(15),
            lease_retry_period: Duration::from_secs(2),
            identity: None,
        }
    }
}

/// The flags checked and with every default resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    pub policy: ExtenderPolicy,
    pub names: ResourceNames,
    pub keys: Keys,
    pub reservation_ttl: Duration,
    pub api_timeout: Duration,
    /// Longest wait at the admission gate of bind.
    pub bind_gate_timeout: Duration,
    /// How long a placed, unconfirmed pod can hold up the gate.
    pub bind_gate_window: Duration,
    pub max_body_bytes: usize,
    /// `Some` with `--leader-elect`.
    pub lease: Option<LeaseSettings>,
    /// FGD's and fgd+'s workload and knobs.
    pub fgd: FgdSettings,
}

/// Leader-election settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub retry_period: Duration,
}

impl ExtenderArgs {
    /// Check the flags and resolve defaults that come from the environment (`POD_NAMESPACE`,
    /// `POD_NAME`, the hostname).
    pub fn settings(&self) -> Result<Settings, ExtenderError> {
        self.settings_with_env(|k| std::env::var(k).ok())
    }

    fn settings_with_env(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ExtenderError> {
        let bad = |flag: &'static str, problem: String| ExtenderError::Flag { flag, problem };
        let names = ResourceNames::new(&self.resource_domain)
            .map_err(|e| bad("--resource-domain", e.to_string()))?;
        if self.reservation_ttl < Duration::from_secs(1) {
            return Err(bad(
                "--reservation-ttl",
                "must be at least 1s: it has to outlast the informer's lag".into(),
            ));
        }
        if self.api_timeout < Duration::from_millis(100) {
            return Err(bad("--api-timeout", "must be at least 100ms".into()));
        }
        if self.max_body_bytes < 1024 {
            return Err(bad("--max-body-bytes", "must be at least 1024".into()));
        }
        if !(self.fgd_coverage > 0.0 && self.fgd_coverage <= 1.0) {
            return Err(bad(
                "--fgd-coverage",
                format!(
                    "{} is out of range: use a share in (0, 1], e.g. 0.95",
                    self.fgd_coverage
                ),
            ));
        }
        let plus: PlusConfig =
            self.fgd_plus_config
                .parse()
                .map_err(|e: gm_core::fgd_plus::PlusConfigError| {
                    bad("--fgd-plus-config", e.to_string())
                })?;
        let workload = match &self.fgd_workload {
            None => None,
            Some(path) => Some(read_workload(path).map_err(|p| bad("--fgd-workload", p))?),
        };
        let lease = if self.leader_elect {
            if self.lease_retry_period.is_zero()
                || self.lease_retry_period * 2 > self.lease_duration
            {
                return Err(bad(
                    "--lease-retry-period",
                    format!(
                        "{} must be positive and at most half of --lease-duration ({})",
                        format_duration(self.lease_retry_period),
                        format_duration(self.lease_duration)
                    ),
                ));
            }
            if self.lease_duration < Duration::from_secs(1) {
                return Err(bad("--lease-duration", "must be at least 1s".into()));
            }
            let non_empty =
                |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
            let namespace = non_empty(self.lease_namespace.clone())
                .or_else(|| non_empty(env("POD_NAMESPACE")))
                .unwrap_or_else(|| "kube-system".to_string());
            let identity = non_empty(self.identity.clone())
                .or_else(|| non_empty(env("POD_NAME")))
                .or_else(|| non_empty(env("HOSTNAME")))
                .or_else(|| non_empty(std::fs::read_to_string("/etc/hostname").ok()))
                .ok_or_else(|| {
                    bad(
                        "--identity",
                        "is required with --leader-elect when neither POD_NAME nor the hostname is known".into(),
                    )
                })?;
            if self.lease_name.trim().is_empty() {
                return Err(bad("--lease-name", "must not be empty".into()));
            }
            Some(LeaseSettings {
                name: self.lease_name.trim().to_string(),
                namespace,
                identity,
                duration: self.lease_duration,
                retry_period: self.lease_retry_period,
            })
        } else {
            None
        };
        Ok(Settings {
            addr: self.extender_addr,
            policy: self.policy,
            keys: Keys::new(&names),
            names,
            reservation_ttl: self.reservation_ttl,
            api_timeout: self.api_timeout,
            bind_gate_timeout: self.bind_gate_timeout,
            bind_gate_window: self.bind_gate_window,
            max_body_bytes: self.max_body_bytes,
            lease,
            fgd: FgdSettings {
                workload,
                coverage: self.fgd_coverage,
                plus,
            },
        })
    }
}

/// The format of `--fgd-workload`, for error messages.
const WORKLOAD_FORM: &str = r#"expected {"coverage": <share in (0, 1], default 1>, "types": [{"cpuMilli": <milli-cores>, "gpus": <cards, 0 = CPU-only>, "gpuCores": <vcuda-core per card: 1-99 a share of one card, 100 whole cards>, "models": [<allowed GPU models>], "weight": <positive number>}, ...]} (see docs/simulator.md)"#;

/// Read a configured target workload; the error names the file, the problem and the format.
fn read_workload(path: &Path) -> Result<TargetWorkload, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    TargetWorkload::from_config_json(&text)
        .map_err(|e| format!("{}: {e}; {WORKLOAD_FORM}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ext: ExtenderArgs,
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.ext.extender_addr.to_string(), "0.0.0.0:3456");
        assert_eq!(cli.ext.policy.name(), "binpack");
        assert_eq!(cli.ext.reservation_ttl, Duration::from_secs(60));
        let s = cli.ext.settings_with_env(|_| None).unwrap();
        assert!(s.lease.is_none());
        assert_eq!(s.keys.predicate_node, "tencent.com/predicate-node");
    }

    #[test]
    fn lease_defaults_come_from_the_pod_environment() {
        let cli = Cli::try_parse_from(["x", "--leader-elect"]).unwrap();
        let env = |k: &str| match k {
            "POD_NAMESPACE" => Some("gpu-system".to_string()),
            "POD_NAME" => Some("gpu-admission-7d9f".to_string()),
            _ => None,
        };
        let lease = cli.ext.settings_with_env(env).unwrap().lease.unwrap();
        assert_eq!(lease.namespace, "gpu-system");
        assert_eq!(lease.identity, "gpu-admission-7d9f");
        let lease = cli
            .ext
            .settings_with_env(|k| (k == "HOSTNAME").then(|| "h1".into()))
            .unwrap()
            .lease
            .unwrap();
        assert_eq!(
            (lease.namespace.as_str(), lease.identity.as_str()),
            ("kube-system", "h1")
        );
    }

    #[test]
    fn bad_flags_name_the_flag_and_the_rule() {
        let e = Cli::try_parse_from(["x", "--policy", "fastest"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("use one of binpack, spread, topology, fgd, fgd+"),
            "{e}"
        );
        let e = Cli::try_parse_from(["x", "--reservation-ttl", "5 parsecs"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("use a positive duration such as"), "{e}");
        let cli = Cli::try_parse_from(["x", "--resource-domain", "Bad_Domain"]).unwrap();
        let e = cli.ext.settings_with_env(|_| None).unwrap_err().to_string();
        assert!(
            e.starts_with("--resource-domain: invalid resource domain"),
            "{e}"
        );
        let cli = Cli::try_parse_from([
            "x",
            "--leader-elect",
            "--lease-duration",
            "4s",
            "--lease-retry-period",
            "3s",
        ])
        .unwrap();
        let e = cli
            .ext
            .settings_with_env(|_| Some("p".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most half of --lease-duration (4s)"), "{e}");
    }

    #[test]
    fn duration_flags_take_compound_forms_and_name_the_flag_when_refused() {
        let cli =
            Cli::try_parse_from(["x", "--reservation-ttl", "1m30s", "--api-timeout", "500ms"])
                .unwrap();
        assert_eq!(cli.ext.reservation_ttl, Duration::from_secs(90));
        assert_eq!(cli.ext.api_timeout, Duration::from_millis(500));
        let e = Cli::try_parse_from(["x", "--api-timeout", "1.5s"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--api-timeout") && e.contains("not a duration"),
            "{e}"
        );
    }

    fn fgd_settings(flags: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(flags);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.ext
            .settings_with_env(|_| None)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn fgd_and_fgd_plus_are_policies_with_a_coverage_and_a_plus_config() {
        let s = fgd_settings(&["--policy", "fgd"]).unwrap();
        assert_eq!(s.policy, ExtenderPolicy::Fgd);
        assert_eq!(s.fgd.coverage, 0.95);
        assert!(s.fgd.workload.is_none(), "learned by default");
        let s = fgd_settings(&[
            "--policy",
            "fgd+",
            "--fgd-coverage",
            "0.9",
            "--fgd-plus-config",
            "primary=20,cap-weight=0.5",
        ])
        .unwrap();
        assert_eq!(s.policy, ExtenderPolicy::FgdPlus);
        assert_eq!(s.fgd.coverage, 0.9);
        assert_eq!(s.fgd.plus.cap_weight, 0.5);
        for bad in ["0", "1.5", "-1"] {
            let flag = format!("--fgd-coverage={bad}");
            let e = fgd_settings(&[&flag]).unwrap_err();
            assert!(
                e.starts_with("--fgd-coverage: ") && e.contains("use a share in (0, 1]"),
                "{e}"
            );
        }
        let e = fgd_settings(&["--fgd-plus-config", "primary=fast"]).unwrap_err();
        assert!(
            e.starts_with("--fgd-plus-config: invalid fgd+ setting \"primary=fast\"")
                && e.contains("use comma-separated key=value"),
            "{e}"
        );
    }

    #[test]
    fn a_configured_workload_file_is_read_and_its_errors_name_file_problem_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let good = write(
            "good.json",
            r#"{"types": [{"cpuMilli": 4000, "gpus": 1, "gpuCores": 50, "models": ["T4"], "weight": 3},
                         {"cpuMilli": 8000, "gpus": 2, "gpuCores": 100, "weight": 1}]}"#,
        );
        let s = fgd_settings(&["--policy", "fgd", "--fgd-workload", &good]).unwrap();
        let w = s.fgd.workload.unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w.types()[0].probability, 0.75);

        let missing = dir.path().join("nope.json").display().to_string();
        let e = fgd_settings(&["--fgd-workload", &missing]).unwrap_err();
        assert!(
            e.starts_with(&format!("--fgd-workload: cannot read {missing}: ")),
            "{e}"
        );
        let not_json = write("bad.json", "{\"types\": [");
        let e = fgd_settings(&["--fgd-workload", &not_json]).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "--fgd-workload: {not_json}: workload configuration is not valid JSON"
            )) && e.contains(r#"expected {"coverage""#)
                && e.contains("docs/simulator.md"),
            "{e}"
        );
        let bad_entry = write(
            "entry.json",
            r#"{"types": [{"weight": 1}, {"gpus": 2, "gpuCores": 50, "weight": 1}]}"#,
        );
        let e = fgd_settings(&["--fgd-workload", &bad_entry]).unwrap_err();
        assert!(
            e.contains(&format!(
                "{bad_entry}: workload type #1: gpus 2 with gpuCores 50: a share (gpuCores 1-99) uses exactly one card"
            )),
            "{e}"
        );
        let unknown = write("unknown.json", r#"{"types": [{"gpu": 1, "weight": 1}]}"#);
        let e = fgd_settings(&["--fgd-workload", &unknown]).unwrap_err();
        assert!(
            e.contains("unknown field `gpu`") && e.contains("gpuCores"),
            "{e}"
        );
        let empty = write("empty.json", r#"{"types": []}"#);
        let e = fgd_settings(&["--fgd-workload", &empty]).unwrap_err();
        assert!(e.contains("the workload is empty"), "{e}");
    }
}
