//! Command-line flags of the extender (mounted into `gpu-admission serve`), every one also an
//! environment variable `GPU_ADMISSION_<FLAG>`.

use std::net::SocketAddr;
use std::time::Duration;

use gm_core::annotations::Keys;
use gm_core::ResourceNames;

use crate::error::ExtenderError;
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

    /// Default placement policy: binpack, spread or topology. A pod may pick another with
    /// the `<domain>/gpu-policy` annotation.
    #[arg(long, env = "GPU_ADMISSION_POLICY", default_value = "binpack")]
    pub policy: ExtenderPolicy,

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
            resource_domain: gm_core::resources::DEFAULT_DOMAIN.to_string(),
            reservation_ttl: Duration::from_secs(60),
            api_timeout: Duration::from_secs(10),
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
    pub max_body_bytes: usize,
    /// `Some` with `--leader-elect`.
    pub lease: Option<LeaseSettings>,
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
        let lease = if self.leader_elect {
            if self.lease_retry_period.is_zero()
                || self.lease_retry_period * 2 > self.lease_duration
            {
                return Err(bad(
                    "--lease-retry-period",
                    format!(
                        "{} must be positive and at most half of --lease-duration ({})",
                        fmt_duration(self.lease_retry_period),
                        fmt_duration(self.lease_duration)
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
            max_body_bytes: self.max_body_bytes,
            lease,
        })
    }
}

/// Parse a duration such as `500ms`, `30s`, `2m`, `1h` or `1m30s` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let form = "use a duration such as 500ms, 30s, 2m, 1h or 1m30s";
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty duration: {form}"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is too large: {form}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?} is not a duration: {form}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is too large: {form}"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => return Err(format!("{s:?} has a number without a unit: {form}")),
            u => return Err(format!("{s:?} has the unknown unit {u:?}: {form}")),
        };
        rest = &rest[unit_len..];
        total = total.saturating_add(unit);
    }
    Ok(total)
}

/// Render a duration the way [`parse_duration`] reads it.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
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
        assert!(e.contains("use one of binpack, spread, topology"), "{e}");
        let e = Cli::try_parse_from(["x", "--reservation-ttl", "5 parsecs"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("use a duration such as"), "{e}");
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
    fn durations_parse_in_go_style() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "s", "10x", "1.5s", "-1s", "10 s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(fmt_duration(Duration::from_secs(15)), "15s");
    }
}
