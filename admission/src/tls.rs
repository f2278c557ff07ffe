//! TLS for the webhook: rustls with the certificate and key read from PEM files and reloaded
//! when they change, without a restart.
//!
//! The files are polled (content, not just mtime, so Kubernetes' symlink swaps of Secret
//! volumes are seen). A new pair is used only when it parses and the key matches the
//! certificate; otherwise the webhook keeps serving the previous one and logs why, once per
//! bad content. Each handshake picks the current certificate, so new connections see a new
//! certificate as soon as it is loaded; open keep-alive connections keep theirs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate PEM is malformed: {problem}")]
    BadCertificate { path: PathBuf, problem: String },
    #[error(
        "{path} holds no usable private key: {problem} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)"
    )]
    BadKey { path: PathBuf, problem: String },
    #[error("the key in {key} does not belong to the certificate in {cert}: {problem}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

/// The crypto provider the webhook uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parse a PEM certificate chain and private key into a key rustls can serve.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            problem: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: key_path.to_path_buf(),
            problem: e.to_string(),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(e) => Err(TlsError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            problem: e.to_string(),
        }),
    }
}

/// What a reload check did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files did not change (or changed to content already rejected).
    Unchanged,
    /// A new certificate is in use.
    Reloaded,
    /// The files changed but cannot be used; the previous certificate stays.
    Rejected(String),
}

/// Serves the current certificate and reloads it from its files.
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Content last tried (loaded or rejected).
    last: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl CertReloader {
    /// Load the certificate and key; fails when they cannot be used.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let (cert, key) = (read(cert_path)?, read(key_path)?);
        let ck = certified_key(&cert, &key, cert_path, key_path, &provider)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(ck)),
            last: Mutex::new((cert, key)),
        }))
    }

    /// Re-read the files and switch to them if they changed and are usable.
    pub fn reload(&self) -> Reload {
        let read_both = read(&self.cert_path).and_then(|c| Ok((c, read(&self.key_path)?)));
        let (cert, key) = match read_both {
            Ok(v) => v,
            // A file missing for a moment (mid-swap) is not worth a reload attempt.
            Err(e) => return self.reject_once(format!("{e}"), Vec::new(), Vec::new()),
        };
        if let Ok(last) = self.last.lock() {
            if last.0 == cert && last.1 == key {
                return Reload::Unchanged;
            }
        }
        match certified_key(&cert, &key, &self.cert_path, &self.key_path, &self.provider) {
            Ok(ck) => {
                if let Ok(mut cur) = self.current.write() {
                    *cur = Arc::new(ck);
                }
                if let Ok(mut last) = self.last.lock() {
                    *last = (cert, key);
                }
                tracing::info!(cert = %self.cert_path.display(), "reloaded the webhook TLS certificate");
                Reload::Reloaded
            }
            Err(e) => self.reject_once(e.to_string(), cert, key),
        }
    }

    fn reject_once(&self, why: String, cert: Vec<u8>, key: Vec<u8>) -> Reload {
        if let Ok(mut last) = self.last.lock() {
            if last.0 == cert && last.1 == key {
                return Reload::Unchanged;
            }
            *last = (cert, key);
        }
        tracing::warn!(error = %why, "new webhook TLS certificate rejected; keeping the previous one");
        Reload::Rejected(why)
    }

    /// A rustls server configuration that always serves the current certificate (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Poll the files every `interval` until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, interval: std::time::Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let me = self.clone();
            // File reads are blocking; keep them off the async workers.
            if tokio::task::spawn_blocking(move || me.reload())
                .await
                .is_err()
            {
                tracing::warn!("TLS reload check did not finish");
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn pair(cn: &str) -> (String, String) {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn reload_switches_only_to_usable_new_content_and_reports_a_rejection_once() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair("one");
        std::fs::write(&c, &c1).unwrap();
        std::fs::write(&k, &k1).unwrap();
        let r = CertReloader::load(&c, &k).unwrap();
        assert_eq!(r.reload(), Reload::Unchanged);

        let (c2, _k2) = pair("two");
        std::fs::write(&c, &c2).unwrap();
        let Reload::Rejected(why) = r.reload() else {
            panic!("a certificate without its key was accepted");
        };
        assert!(why.contains("does not belong to the certificate"), "{why}");
        assert_eq!(
            r.reload(),
            Reload::Unchanged,
            "the same bad content is reported once"
        );

        let (c3, k3) = pair("three");
        std::fs::write(&c, &c3).unwrap();
        std::fs::write(&k, &k3).unwrap();
        assert_eq!(r.reload(), Reload::Reloaded);
    }

    #[test]
    fn unusable_files_are_named_with_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair("one");
        std::fs::write(&c, "hello").unwrap();
        std::fs::write(&k, &k1).unwrap();
        let e = CertReloader::load(&c, &k).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        std::fs::write(&c, &c1).unwrap();
        std::fs::write(&k, "nope").unwrap();
        let e = CertReloader::load(&c, &k).unwrap_err().to_string();
        assert!(
            e.contains("no usable private key") && e.contains("PKCS#8"),
            "{e}"
        );
        let e = CertReloader::load(&dir.path().join("missing"), &k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
    }
}
