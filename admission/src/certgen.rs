//! `gpu-admission certgen`: the webhook's certificates without cert-manager.
//!
//! It makes a self-signed CA and a serving certificate for the webhook Service's DNS names,
//! stores them in a `kubernetes.io/tls` Secret (with the CA as `ca.crt`), and writes the CA into
//! the `caBundle` of the validating and mutating webhook configurations. An existing complete
//! Secret is reused, so upgrades keep the same certificates. The webhook configurations may not
//! exist yet when the Job starts (plain `kubectl apply` creates everything at once), so it
//! retries until they do, up to `--wait`.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use gm_core::duration::parse_duration;

/// Flags of `gpu-admission certgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertgenArgs {
    /// Namespace of the Secret and the webhook Service.
    #[arg(long, env = "GPU_ADMISSION_CERTGEN_NAMESPACE")]
    pub namespace: String,
    /// Secret that receives tls.crt, tls.key and ca.crt.
    #[arg(
        long,
        env = "GPU_ADMISSION_CERTGEN_SECRET_NAME",
        default_value = "gpu-admission-tls"
    )]
    pub secret_name: String,
    /// Service the API server calls the webhook through; its DNS names go into the certificate.
    #[arg(
        long,
        env = "GPU_ADMISSION_CERTGEN_SERVICE",
        default_value = "gpu-admission"
    )]
    pub service: String,
    /// Name of both the ValidatingWebhookConfiguration and the MutatingWebhookConfiguration
    /// whose caBundle is set.
    #[arg(
        long,
        env = "GPU_ADMISSION_CERTGEN_WEBHOOK_CONFIG",
        default_value = "gpu-admission"
    )]
    pub webhook_config: String,
    /// Certificate lifetime in days.
    #[arg(long, env = "GPU_ADMISSION_CERTGEN_VALIDITY_DAYS", default_value_t = 3650,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub validity_days: u32,
    /// How long to wait for the webhook configurations to appear.
    #[arg(long, env = "GPU_ADMISSION_CERTGEN_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub wait: Duration,
}

/// A CA and a serving certificate, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Why certgen failed.
#[derive(Debug, thiserror::Error)]
pub enum CertgenError {
    #[error("generating certificates failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Secret {namespace}/{name} exists but lacks {missing}; delete it or fix it, certgen does not overwrite Secrets it did not make")]
    IncompleteSecret {
        namespace: String,
        name: String,
        missing: String,
    },
    #[error("Kubernetes API call failed while {doing}: {source}")]
    Api {
        doing: String,
        #[source]
        source: kube::Error,
    },
    #[error("webhook configuration {0:?} did not appear within {1:?}; is the chart (or deploy/manifests) applied?")]
    NotFound(String, Duration),
}

/// The DNS names the API server uses for `service` in `namespace`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Make a CA and a serving certificate for the Service's DNS names.
pub fn generate(
    service: &str,
    namespace: &str,
    validity_days: u32,
) -> Result<Bundle, CertgenError> {
    let now = time_now();
    let until = now + time::Duration::days(i64::from(validity_days));

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("{service}.{namespace} webhook CA"),
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now;
    ca_params.not_after = until;
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(dns_names(service, namespace))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{service}.{namespace}.svc"));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now;
    params.not_after = until;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(Bundle {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn time_now() -> time::OffsetDateTime {
    // A minute of slack for clocks that run a little behind ours.
    time::OffsetDateTime::now_utc() - time::Duration::minutes(1)
}

/// Create (or reuse) the Secret and patch both webhook configurations' caBundle.
pub async fn run(args: &CertgenArgs, client: Client) -> Result<(), CertgenError> {
    let ca_pem = ensure_secret(args, client.clone()).await?;
    let deadline = tokio::time::Instant::now() + args.wait;
    let name = &args.webhook_config;
    loop {
        match patch_bundles(&client, name, &ca_pem).await {
            Ok(()) => break,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(CertgenError::NotFound(name.clone(), args.wait));
                }
                tracing::info!(webhook = %name, reason = %e.message, "webhook configuration not ready; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(source) => {
                return Err(CertgenError::Api {
                    doing: format!("setting the caBundle of webhook configuration {name}"),
                    source,
                })
            }
        }
    }
    tracing::info!(secret = %args.secret_name, webhook = %name, "webhook certificates in place");
    Ok(())
}

async fn ensure_secret(args: &CertgenArgs, client: Client) -> Result<String, CertgenError> {
    let api: Api<Secret> = Api::namespaced(client, &args.namespace);
    let api_err = |doing: &str| {
        let doing = format!("{doing} Secret {}/{}", args.namespace, args.secret_name);
        move |source| CertgenError::Api { doing, source }
    };
    if let Some(existing) = api
        .get_opt(&args.secret_name)
        .await
        .map_err(api_err("reading"))?
    {
        return existing_ca(args, &existing);
    }
    let b = generate(&args.service, &args.namespace, args.validity_days)?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(args.secret_name.clone()),
            namespace: Some(args.namespace.clone()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "gpu-manager".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(b.cert_pem.into_bytes())),
                ("tls.key".to_string(), ByteString(b.key_pem.into_bytes())),
                (
                    "ca.crt".to_string(),
                    ByteString(b.ca_pem.clone().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %args.secret_name, "created webhook certificates");
            Ok(b.ca_pem)
        }
        // Another certgen won the race: use what it stored.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api
                .get(&args.secret_name)
                .await
                .map_err(api_err("reading"))?;
            existing_ca(args, &existing)
        }
        Err(e) => Err(api_err("creating")(e)),
    }
}

fn existing_ca(args: &CertgenArgs, s: &Secret) -> Result<String, CertgenError> {
    let data = s.data.clone().unwrap_or_default();
    let missing: Vec<&str> = ["tls.crt", "tls.key", "ca.crt"]
        .into_iter()
        .filter(|k| data.get(*k).is_none_or(|v| v.0.is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err(CertgenError::IncompleteSecret {
            namespace: args.namespace.clone(),
            name: args.secret_name.clone(),
            missing: missing.join(", "),
        });
    }
    tracing::info!(secret = %args.secret_name, "reusing existing webhook certificates");
    Ok(String::from_utf8_lossy(&data["ca.crt"].0).into_owned())
}

/// `caBundle` is bytes; k8s-openapi base64-encodes them on the wire, so it gets the PEM.
async fn patch_bundles(client: &Client, name: &str, ca_pem: &str) -> Result<(), kube::Error> {
    let vapi: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mut v = vapi.get(name).await?;
    for w in v.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
    }
    vapi.replace(name, &PostParams::default(), &v).await?;
    let mapi: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut m = mapi.get(name).await?;
    for w in m.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
    }
    mapi.replace(name, &PostParams::default(), &m).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_certificate_is_signed_by_the_ca_for_every_service_name() {
        let b = generate("gpu-admission", "kube-system", 30).unwrap();
        assert!(b.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // rustls accepts the pair, as the webhook's TLS loader will.
        let provider = crate::tls::provider();
        let p = std::path::Path::new("x");
        crate::tls::certified_key(b.cert_pem.as_bytes(), b.key_pem.as_bytes(), p, p, &provider)
            .unwrap();
        // And a client trusting only the CA verifies it for the Service's DNS name.
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let ca = CertificateDer::pem_slice_iter(b.ca_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::pem_slice_iter(b.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        for name in dns_names("gpu-admission", "kube-system") {
            let sn = ServerName::try_from(name.clone()).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &sn, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("evil.example.com").unwrap();
        assert!(verifier
            .verify_server_cert(&leaf, &[], &other, &[], UnixTime::now())
            .is_err());
    }
}
