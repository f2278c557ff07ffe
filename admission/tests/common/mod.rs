//! Test helpers: a test CA, the webhook on 127.0.0.1 over real HTTPS, a keep-alive HTTPS
//! client, fixtures, and a fake Kubernetes API server for the quota sources.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::routing::{get, patch};
use axum::{Json, Router};
use gm_admission::{start_webhook, ClusterView, InMemoryCluster, RunningWebhook, WebhookArgs};
use gm_core::inventory::Link;
use gm_core::NodeInventory;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

/// A test CA and a server certificate for 127.0.0.1 written to files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertifiedIssuer<'static, KeyPair>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gm-admission test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        let pki = Self {
            dir,
            ca,
            cert_path,
            key_path,
        };
        let (c, k) = pki.leaf("webhook-1");
        std::fs::write(&pki.cert_path, c).unwrap();
        std::fs::write(&pki.key_path, k).unwrap();
        pki
    }

    /// A fresh server certificate for 127.0.0.1 with this common name: (cert PEM, key PEM).
    pub fn leaf(&self, cn: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }
}

/// A running webhook with its PKI.
pub struct Server {
    pub pki: Pki,
    pub webhook: Option<RunningWebhook>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    /// Start with extra flags; `cluster: None` and no `--standalone` is an error the test
    /// wants to see.
    pub async fn start(
        flags: &[&str],
        client: Option<kube::Client>,
        cluster: Option<Arc<dyn ClusterView>>,
    ) -> Self {
        let pki = Pki::new();
        let mut all = vec![
            "--webhook-addr".to_string(),
            "127.0.0.1:0".to_string(),
            "--tls-cert".to_string(),
            pki.cert_path.display().to_string(),
            "--tls-key".to_string(),
            pki.key_path.display().to_string(),
            "--tls-reload-interval".to_string(),
            "100ms".to_string(),
        ];
        all.extend(flags.iter().map(|s| s.to_string()));
        let args = WebhookArgs::try_from_flags(all).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let webhook = start_webhook(args, client, cluster, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        Self {
            addr: webhook.local_addr(),
            pki,
            webhook: Some(webhook),
            stop: Some(tx),
        }
    }

    /// Webhook with an in-memory cluster and no quota sources.
    pub async fn with_cluster(flags: &[&str], cluster: Arc<InMemoryCluster>) -> Self {
        let mut f = vec!["--quota-crd=false"];
        f.extend_from_slice(flags);
        Self::start(&f, None, Some(cluster)).await
    }

    pub async fn client(&self) -> HttpsClient {
        HttpsClient::connect(self.addr, self.pki.ca_der()).await
    }

    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(w) = self.webhook.take() {
            w.wait().await.unwrap();
        }
    }
}

/// One keep-alive HTTPS connection.
pub struct HttpsClient {
    sender: SendRequest<Full<Bytes>>,
    /// The server's end-entity certificate.
    pub server_cert: CertificateDer<'static>,
}

impl HttpsClient {
    pub async fn connect(addr: SocketAddr, ca: CertificateDer<'static>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self {
            sender,
            server_cert,
        }
    }

    /// POST a body; returns the status and the body.
    pub async fn post_raw(&mut self, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let req = http::Request::post(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    /// GET a path; returns the status and the body.
    pub async fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        let req = http::Request::get(path)
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    /// POST an AdmissionReview and return its `response`.
    pub async fn review(&mut self, path: &str, review: &Value) -> Value {
        let (status, body) = self
            .post_raw(path, serde_json::to_vec(review).unwrap())
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"], review["request"]["uid"], "uid echoed");
        v["response"].clone()
    }
}

/// A fixture from tests/fixtures.
pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The denial message of a response (panics if it was allowed).
pub fn denial(resp: &Value) -> String {
    assert_eq!(resp["allowed"], false, "expected a denial: {resp}");
    resp["status"]["message"].as_str().unwrap().to_string()
}

pub fn assert_allowed(resp: &Value) {
    assert_eq!(resp["allowed"], true, "expected admission: {resp}");
}

pub fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A cluster with a T4 node (2 × 15 GiB) and an A100 node (4 × 40 GiB), pools public/private.
pub fn cluster() -> Arc<InMemoryCluster> {
    let c = InMemoryCluster::new();
    c.upsert_node(
        "t4-0",
        labels(&[("tkestack.io/gpu-pool", "public")]),
        NodeInventory::uniform(2, "Tesla T4", 15360, Link::Phb),
    );
    c.upsert_node(
        "a100-0",
        labels(&[("tkestack.io/gpu-pool", "private")]),
        NodeInventory::uniform(4, "NVIDIA A100-SXM4-40GB", 40960, Link::NvLink(12)),
    );
    Arc::new(c)
}

/// What the fake API server records.
#[derive(Default)]
pub struct ApiState {
    pub quotas: Mutex<Vec<Value>>,
    pub configmaps: Mutex<Vec<Value>>,
    pub status_patches: Mutex<Vec<(String, String, Value)>>,
}

#[derive(serde::Deserialize)]
struct WatchQuery {
    watch: Option<String>,
}

fn endless() -> Body {
    Body::from_stream(futures::stream::pending::<Result<Bytes, Infallible>>())
}

async fn list_quotas(
    State(s): State<Arc<ApiState>>,
    Query(q): Query<WatchQuery>,
) -> axum::response::Response {
    let items = s.quotas.lock().unwrap().clone();
    list_or_watch(&q, "gpu.tkestack.io/v1alpha1", "GpuQuotaList", items)
}

/// A list answer with `items`, or for a watch request a stream that never sends an event.
fn list_or_watch(
    q: &WatchQuery,
    api_version: &str,
    kind: &str,
    items: impl serde::Serialize,
) -> axum::response::Response {
    if q.watch.as_deref() == Some("true") || q.watch.as_deref() == Some("1") {
        return axum::response::Response::new(endless());
    }
    axum::response::IntoResponse::into_response(Json(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": "100"},
        "items": items,
    })))
}

async fn list_configmaps(
    State(s): State<Arc<ApiState>>,
    Path(_ns): Path<String>,
    Query(q): Query<WatchQuery>,
) -> axum::response::Response {
    let items = s.configmaps.lock().unwrap().clone();
    list_or_watch(&q, "v1", "ConfigMapList", items)
}

async fn patch_status(
    State(s): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Json<Value> {
    let patch: Value = serde_json::from_slice(&body).unwrap();
    s.status_patches
        .lock()
        .unwrap()
        .push((ns.clone(), name.clone(), patch.clone()));
    let mut obj = s
        .quotas
        .lock()
        .unwrap()
        .iter()
        .find(|q| {
            q["metadata"]["name"] == name.as_str() && q["metadata"]["namespace"] == ns.as_str()
        })
        .cloned()
        .unwrap_or(json!({}));
    obj["status"] = patch["status"].clone();
    Json(obj)
}

/// A fake API server on 127.0.0.1 serving GpuQuota list/watch + status patches and ConfigMap
/// list/watch. Returns a client pointed at it.
pub async fn fake_api(state: Arc<ApiState>) -> kube::Client {
    let app = Router::new()
        .route("/apis/gpu.tkestack.io/v1alpha1/gpuquotas", get(list_quotas))
        .route(
            "/apis/gpu.tkestack.io/v1alpha1/namespaces/{ns}/gpuquotas/{name}/status",
            patch(patch_status),
        )
        .route("/api/v1/namespaces/{ns}/configmaps", get(list_configmaps))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(cfg).unwrap()
}

/// A GpuQuota object as the API server returns it.
pub fn gpu_quota(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gpu.tkestack.io/v1alpha1",
        "kind": "GpuQuota",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "resourceVersion": "7", "generation": 1},
        "spec": spec,
    })
}

/// A live pod in the cluster cache.
pub fn live_pod(
    ns: &str,
    name: &str,
    node: Option<&str>,
    limits: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> k8s_openapi::api::core::v1::Pod {
    let limits: serde_json::Map<String, Value> = limits
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "annotations": labels(annotations)},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "x", "resources": {"limits": limits}}]
        },
        "status": {"phase": if node.is_some() { "Running" } else { "Pending" }}
    }))
    .unwrap()
}
