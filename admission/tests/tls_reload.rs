//! Certificate reload without a restart: new connections see the new certificate, open
//! connections keep working, and a broken replacement leaves the previous one in service.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Connect until the server presents `want` (or give up after 5 s).
async fn wait_for_cert(server: &Server, want: &CertificateDer<'static>) -> HttpsClient {
    for _ in 0..100 {
        let c = server.client().await;
        if &c.server_cert == want {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the new certificate was never served");
}

/// Write a pair the way Kubernetes updates a Secret volume: a new timestamped directory, then
/// an atomic swap of the `..data` symlink the visible files point through.
fn swap_secret_volume(dir: &Path, generation: u32, cert: &str, key: &str) {
    let real = dir.join(format!("..gen_{generation}"));
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("tls.crt"), cert).unwrap();
    std::fs::write(real.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(real.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test]
async fn new_connections_get_the_replaced_certificate_and_bad_ones_are_ignored() {
    let server = Server::start(&["--standalone"], None, None).await;
    let first = std::fs::read_to_string(&server.pki.cert_path).unwrap();
    let mut old = server.client().await;
    assert_eq!(old.server_cert, der_of(&first));

    // Replace the files in place (key first, like a careless copy: for a moment they differ).
    let (cert2, key2) = server.pki.leaf("webhook-2");
    std::fs::write(&server.pki.key_path, &key2).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    std::fs::write(&server.pki.cert_path, &cert2).unwrap();
    let mut fresh = wait_for_cert(&server, &der_of(&cert2)).await;
    assert_allowed(&fresh.review("/validate", &fixture("pod_create.json")).await);
    // The keep-alive connection opened before the swap still works.
    assert_allowed(&old.review("/validate", &fixture("pod_create.json")).await);

    // Garbage, then a certificate whose key is elsewhere: both rejected, cert2 stays.
    std::fs::write(
        &server.pki.cert_path,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.client().await.server_cert, der_of(&cert2));
    let (cert3, _key3) = server.pki.leaf("webhook-3");
    std::fs::write(&server.pki.cert_path, &cert3).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut c = server.client().await;
    assert_eq!(c.server_cert, der_of(&cert2));
    assert_allowed(&c.review("/validate", &fixture("pod_create.json")).await);
    server.shutdown().await;
}

#[tokio::test]
async fn secret_volume_symlink_swaps_are_picked_up() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert1, key1) = pki.leaf("gen-1");
    swap_secret_volume(dir.path(), 1, &cert1, &key1);
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
    }
    let args = gm_admission::WebhookArgs::try_from_flags([
        "--standalone",
        "--webhook-addr",
        "127.0.0.1:0",
        "--tls-reload-interval",
        "100ms",
        "--tls-cert",
        &dir.path().join("tls.crt").display().to_string(),
        "--tls-key",
        &dir.path().join("tls.key").display().to_string(),
    ])
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let webhook = gm_admission::start_webhook(args, None, None, async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    let addr = webhook.local_addr();
    let c = HttpsClient::connect(addr, pki.ca_der()).await;
    assert_eq!(c.server_cert, der_of(&cert1));

    let (cert2, key2) = pki.leaf("gen-2");
    swap_secret_volume(dir.path(), 2, &cert2, &key2);
    let mut seen = false;
    for _ in 0..100 {
        if HttpsClient::connect(addr, pki.ca_der()).await.server_cert == der_of(&cert2) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the swapped certificate was never served");
    let _ = tx.send(());
    webhook.wait().await.unwrap();
}
