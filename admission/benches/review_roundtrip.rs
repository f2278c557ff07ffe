//! One AdmissionReview round trip over TLS on a keep-alive connection (127.0.0.1):
//! serialise, encrypt, send, parse, decide, answer, decrypt. Target p99 <= 1 ms.
//!
//! Prints p50/p99 of the individual round trips after criterion's own report.
//! Run: `cargo bench -p gm-admission --bench review_roundtrip`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use gm_admission::{start_webhook, ClusterView, InMemoryCluster, Settings, Webhook, WebhookArgs};
use gm_core::inventory::Link;
use gm_core::NodeInventory;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::ServerName;
use tokio::runtime::Runtime;
use tokio_rustls::TlsConnector;

const POD: &str = include_str!("../tests/fixtures/pod_create.json");
const DEPLOYMENT: &str = include_str!("../tests/fixtures/deployment_create.json");

struct Setup {
    rt: Runtime,
    sender: SendRequest<Full<Bytes>>,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    // One thread runs both ends: the measurement is the work of a round trip, not the wake-up
    // latency between threads of a loaded 2-core machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, leaf.pem()).expect("write cert");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("write key");

    // A cluster of 500 GPU nodes in 4 models, so the card-memory rule has work to do.
    let cluster = InMemoryCluster::new();
    let models = [
        ("Tesla T4", 15360),
        ("NVIDIA A100-SXM4-40GB", 40960),
        ("Tesla V100-SXM2-32GB", 32768),
        ("NVIDIA H100 80GB HBM3", 81559),
    ];
    for i in 0..500 {
        let (model, mib) = models[i % models.len()];
        let labels = [(
            "tkestack.io/gpu-pool".to_string(),
            format!("pool-{}", i % 3),
        )]
        .into_iter()
        .collect();
        cluster.upsert_node(
            &format!("node-{i}"),
            labels,
            NodeInventory::uniform(8, model, mib, Link::NvLink(12)),
        );
    }
    let cluster: Arc<dyn ClusterView> = Arc::new(cluster);
    let args = WebhookArgs::try_from_flags([
        "--webhook-addr",
        "127.0.0.1:0",
        "--quota-crd=false",
        "--set-scheduler-name",
        "gpu-scheduler",
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
    ])
    .expect("flags");
    let ca_der = ca.der().clone();
    let sender = rt.block_on(async move {
        let webhook = start_webhook(args, None, Some(cluster), std::future::pending())
            .await
            .expect("webhook starts");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der).expect("ca");
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(webhook.local_addr())
            .await
            .expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
            .await
            .expect("handshake");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http handshake");
        tokio::spawn(conn);
        std::mem::forget(webhook);
        sender
    });
    Setup {
        rt,
        sender,
        _dir: dir,
    }
}

async fn round_trip(sender: &mut SendRequest<Full<Bytes>>, path: &str, body: &Bytes) -> usize {
    let req = http::Request::post(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    resp.into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .len()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The decision alone (parse, rules, encode) without TLS or HTTP, for comparison.
fn bench_in_process(c: &mut Criterion) {
    let args = WebhookArgs::try_from_flags([
        "--standalone",
        "--tls-cert",
        "unused",
        "--tls-key",
        "unused",
    ])
    .expect("flags");
    let webhook = Webhook::standalone(Settings::from_args(&args).expect("settings"));
    let body = POD.as_bytes();
    c.bench_function("validate_pod_in_process", |b| {
        b.iter(|| std::hint::black_box(webhook.validate_body(body).expect("review")))
    });
}

fn bench(c: &mut Criterion) {
    bench_in_process(c);
    let mut s = setup();
    for (name, path, body) in [
        ("validate_pod_tls_keepalive", "/validate", POD),
        ("mutate_pod_tls_keepalive", "/mutate", POD),
        ("validate_deployment_tls_keepalive", "/validate", DEPLOYMENT),
    ] {
        let body = Bytes::from(body.as_bytes().to_vec());
        let samples = Arc::new(Mutex::new(Vec::<Duration>::new()));
        let (rt, sender) = (&s.rt, &mut s.sender);
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    let mut local = Vec::with_capacity(iters as usize);
                    for _ in 0..iters {
                        let t = Instant::now();
                        std::hint::black_box(round_trip(sender, path, &body).await);
                        let d = t.elapsed();
                        total += d;
                        local.push(d);
                    }
                    if let Ok(mut all) = samples.lock() {
                        all.extend(local);
                    }
                    total
                })
            })
        });
        let mut all = samples.lock().map(|v| v.clone()).unwrap_or_default();
        all.sort_unstable();
        if !all.is_empty() {
            println!(
                "{name}: {} round trips, p50 {:?}, p99 {:?}, max {:?}",
                all.len(),
                percentile(&all, 0.50),
                percentile(&all, 0.99),
                all[all.len() - 1]
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
