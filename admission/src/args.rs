//! Command-line flags of the webhook (every flag also reads `GPU_ADMISSION_<FLAG>`), and the
//! checked settings built from them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use gm_core::annotations::Keys;
use gm_core::duration::parse_duration;
use gm_core::quota::QuotaKeys;
use gm_core::ResourceNames;

/// The extender's service account: it writes the placement annotations at bind.
pub const EXTENDER_SERVICE_ACCOUNT: &str = "system:serviceaccount:kube-system:gpu-admission";
/// The device plugin's service account: it marks pods assigned.
pub const DEVICE_PLUGIN_SERVICE_ACCOUNT: &str = "system:serviceaccount:kube-system:gpu-manager";

/// Flags of the admission webhook. Flatten into the `gpu-admission serve` command.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address the HTTPS webhook listens on (TLS only, no plain HTTP).
    #[arg(
        long,
        env = "GPU_ADMISSION_WEBHOOK_ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub webhook_addr: SocketAddr,

    /// PEM certificate chain of the webhook (server certificate first). Reloaded on change.
    #[arg(long, env = "GPU_ADMISSION_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the webhook certificate (PKCS#8, PKCS#1 or SEC1). Reloaded on change.
    #[arg(long, env = "GPU_ADMISSION_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// How often the certificate and key files are checked for changes (e.g. 5s, 500ms).
    #[arg(long, env = "GPU_ADMISSION_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// Run without an API server: shape rules and reserved annotations are enforced, checks
    /// that need cluster state (card memory, quota) are skipped.
    #[arg(long, env = "GPU_ADMISSION_STANDALONE")]
    pub standalone: bool,

    /// Users allowed to set or change the reserved placement annotations, comma-separated
    /// (the extender's and the device plugin's service accounts).
    #[arg(
        long,
        env = "GPU_ADMISSION_PRIVILEGED_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_values_t = [EXTENDER_SERVICE_ACCOUNT.to_string(), DEVICE_PLUGIN_SERVICE_ACCOUNT.to_string()]
    )]
    pub privileged_service_accounts: Vec<String>,

    /// Mutation: set `spec.schedulerName` of GPU pods that use the default scheduler to this
    /// name (e.g. a scheduler profile configured with the gpu-admission extender).
    #[arg(long, env = "GPU_ADMISSION_SET_SCHEDULER_NAME")]
    pub set_scheduler_name: Option<String>,

    /// Mutation: vcuda-memory (256 MiB blocks) given to a container that asks for a share of
    /// a card (vcuda-core 1-99) without vcuda-memory. Without it such requests are denied.
    #[arg(long, env = "GPU_ADMISSION_DEFAULT_VCUDA_MEMORY", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub default_vcuda_memory: Option<u32>,

    /// Domain of the extended resources and annotations (`<domain>/vcuda-core`). Not a flag of
    /// its own: `gpu-admission serve` has one `--resource-domain` for the extender and the
    /// webhook and copies it here.
    #[arg(skip = gm_core::resources::DEFAULT_DOMAIN.to_string())]
    pub resource_domain: String,

    /// Read GpuQuota objects (gpu.tkestack.io/v1alpha1) and publish their usage.
    #[arg(long, env = "GPU_ADMISSION_QUOTA_CRD", default_value_t = true, action = ArgAction::Set)]
    pub quota_crd: bool,

    /// Also read the old gpu-admission quota ConfigMap, as `<namespace>/<name>`
    /// (e.g. kube-system/gpuquota, data key `gpu_quota`).
    #[arg(long, env = "GPU_ADMISSION_QUOTA_CONFIGMAP")]
    pub quota_configmap: Option<String>,

    /// Node label whose value is the node's GPU pool.
    #[arg(
        long,
        env = "GPU_ADMISSION_QUOTA_POOL_LABEL",
        default_value = "tkestack.io/gpu-pool"
    )]
    pub quota_pool_label: String,

    /// Node label whose value is the GPU model for quota purposes (the old GPUModelLabel).
    /// Unset: the card model from the node's GPU inventory.
    #[arg(long, env = "GPU_ADMISSION_QUOTA_MODEL_LABEL")]
    pub quota_model_label: Option<String>,

    /// How often GpuQuota status (usage) is recomputed and written when it changed.
    #[arg(long, env = "GPU_ADMISSION_QUOTA_STATUS_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub quota_status_interval: Duration,

    /// How long a pod admitted under a quota is counted before it shows up in the cluster
    /// cache (covers the gap between admission and the informer event).
    #[arg(long, env = "GPU_ADMISSION_QUOTA_RESERVATION_TTL", default_value = "30s", value_parser = parse_duration)]
    pub quota_reservation_ttl: Duration,
}

#[derive(Debug, Parser)]
#[command(name = "gpu-admission-webhook", no_binary_name = true)]
struct Standalone {
    #[command(flatten)]
    args: WebhookArgs,
    /// Domain of the extended resources and annotations.
    #[arg(long, env = "GPU_ADMISSION_RESOURCE_DOMAIN", default_value = gm_core::resources::DEFAULT_DOMAIN)]
    resource_domain: String,
}

impl WebhookArgs {
    /// Parse flags (without a program name), e.g. for tests and tools.
    pub fn try_from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Standalone::try_parse_from(flags).map(|s| WebhookArgs {
            resource_domain: s.resource_domain,
            ..s.args
        })
    }
}

/// Settings that cannot be used, with what was wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// Checked settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_reload_interval: Duration,
    pub standalone: bool,
    pub names: ResourceNames,
    pub keys: Keys,
    pub privileged: BTreeSet<String>,
    pub scheduler_name: Option<String>,
    pub default_memory: Option<u32>,
    pub quota_crd: bool,
    /// (namespace, name) of the old quota ConfigMap.
    pub quota_configmap: Option<(String, String)>,
    pub quota_keys: QuotaKeys,
    pub quota_status_interval: Duration,
    pub quota_reservation_ttl: Duration,
}

impl Settings {
    /// Check the flags.
    pub fn from_args(a: &WebhookArgs) -> Result<Self, SettingsError> {
        let err = |m: String| Err(SettingsError(m));
        let (Some(tls_cert), Some(tls_key)) = (a.tls_cert.clone(), a.tls_key.clone()) else {
            return err(
                "--tls-cert and --tls-key are required: the webhook serves HTTPS only \
                 (PEM certificate chain and private key files)"
                    .into(),
            );
        };
        let names = ResourceNames::new(&a.resource_domain)
            .map_err(|e| SettingsError(format!("--resource-domain: {e}")))?;
        let keys = Keys::new(&names);
        let mut privileged = BTreeSet::new();
        for sa in &a.privileged_service_accounts {
            let sa = sa.trim();
            if sa.is_empty() || sa.contains(char::is_whitespace) {
                return err(format!(
                    "--privileged-service-accounts: {sa:?} is not a user name: use full names such as {EXTENDER_SERVICE_ACCOUNT}, comma-separated"
                ));
            }
            privileged.insert(sa.to_string());
        }
        let scheduler_name = match a.set_scheduler_name.as_deref().map(str::trim) {
            None => None,
            Some(n) if valid_dns_subdomain(n) => Some(n.to_string()),
            Some(n) => {
                return err(format!(
                    "--set-scheduler-name: {n:?} is not a scheduler name: use a DNS subdomain such as gpu-scheduler"
                ))
            }
        };
        let quota_configmap = match a.quota_configmap.as_deref() {
            None | Some("") => None,
            Some(s) => match s.split_once('/') {
                Some((ns, name))
                    if valid_dns_subdomain(ns) && valid_dns_subdomain(name) && !name.contains('/') =>
                {
                    Some((ns.to_string(), name.to_string()))
                }
                _ => {
                    return err(format!(
                        "--quota-configmap: {s:?} is not <namespace>/<name>: use e.g. kube-system/gpuquota"
                    ))
                }
            },
        };
        check_label_key("--quota-pool-label", &a.quota_pool_label)?;
        if let Some(k) = &a.quota_model_label {
            check_label_key("--quota-model-label", k)?;
        }
        Ok(Settings {
            addr: a.webhook_addr,
            tls_cert,
            tls_key,
            tls_reload_interval: a.tls_reload_interval,
            standalone: a.standalone,
            quota_keys: QuotaKeys {
                pool_label: a.quota_pool_label.clone(),
                model_label: a.quota_model_label.clone(),
                pin_labels: vec![keys.label_model.clone()],
            },
            names,
            keys,
            privileged,
            scheduler_name,
            default_memory: a.default_vcuda_memory,
            quota_crd: a.quota_crd,
            quota_configmap,
            quota_status_interval: a.quota_status_interval,
            quota_reservation_ttl: a.quota_reservation_ttl,
        })
    }
}

fn valid_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn check_label_key(flag: &str, key: &str) -> Result<(), SettingsError> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if name_ok && prefix.is_none_or(valid_dns_subdomain) {
        Ok(())
    } else {
        Err(SettingsError(format!(
            "{flag}: {key:?} is not a label key: use [prefix/]name, e.g. tkestack.io/gpu-pool"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<WebhookArgs, clap::Error> {
        let mut flags = vec!["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        flags.extend_from_slice(extra);
        WebhookArgs::try_from_flags(flags)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = args(&[]).unwrap();
        assert_eq!(a.webhook_addr.to_string(), "0.0.0.0:8443");
        assert_eq!(
            a.privileged_service_accounts,
            [EXTENDER_SERVICE_ACCOUNT, DEVICE_PLUGIN_SERVICE_ACCOUNT]
        );
        assert!(a.quota_crd);
        let s = Settings::from_args(&a).unwrap();
        assert_eq!(s.names.core(), "tencent.com/vcuda-core");
        assert_eq!(s.quota_keys.pool_label, "tkestack.io/gpu-pool");
        assert_eq!(s.tls_reload_interval, Duration::from_secs(5));
    }

    #[test]
    fn privileged_accounts_are_comma_separated() {
        let a = args(&[
            "--privileged-service-accounts",
            "system:serviceaccount:gpu:x,system:admin",
        ])
        .unwrap();
        let s = Settings::from_args(&a).unwrap();
        assert!(s.privileged.contains("system:admin"));
        assert_eq!(s.privileged.len(), 2);
    }

    #[test]
    fn bad_flags_are_rejected_with_the_allowed_form() {
        let e = args(&["--default-vcuda-memory", "0"]).unwrap_err();
        assert!(e.to_string().contains("0"), "{e}");
        let e = args(&["--tls-reload-interval", "5x"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tls-reload-interval") && e.contains("units ms, s, m, h"),
            "{e}"
        );
        for (flag, value, want) in [
            ("--quota-configmap", "gpuquota", "<namespace>/<name>"),
            ("--resource-domain", "Tencent.com", "DNS subdomain"),
            ("--set-scheduler-name", "GPU Scheduler", "scheduler name"),
            ("--quota-pool-label", "bad key!", "label key"),
        ] {
            let a = args(&[flag, value]).unwrap();
            let e = Settings::from_args(&a).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(want), "{flag}: {e}");
        }
        let a = WebhookArgs::try_from_flags(Vec::<String>::new()).unwrap();
        let e = Settings::from_args(&a).unwrap_err().to_string();
        assert!(e.contains("--tls-cert and --tls-key are required"), "{e}");
    }
}
