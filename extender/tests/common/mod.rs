//! Test support: an in-process fake Kubernetes API server (enough of the REST API for pods and
//! nodes list+watch, pod get/patch, pods/binding and Leases, on 127.0.0.1), a plain HTTP
//! client for the extender, and a stand-in for kube-scheduler's filter → prioritize → bind.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use gm_core::NodeInventory;
use gm_extender::{ClusterState, Extender, ExtenderArgs};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Node,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    typ: &'static str,
    object: Value,
    at: Instant,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    uid: u64,
    pods: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<String, Value>,
    leases: BTreeMap<(String, String), Value>,
    events: Vec<Event>,
}

/// Failures to inject.
#[derive(Debug, Default)]
pub struct Faults {
    /// Pod names whose Binding creation fails with 500.
    pub fail_binding: HashSet<String>,
    /// Pod names whose annotation patches (any) fail with 500.
    pub fail_patch: HashSet<String>,
    /// Lease operations fail with 503 while set.
    pub leases_down: bool,
    /// While set, a "kubelet" admits a GPU pod the moment it is bound (its device plugin writes
    /// `gpu-assigned=true`); otherwise bound pods wait for devices until [`FakeApi::admit`].
    pub kubelet_admits: bool,
}

/// Counters of requests served.
#[derive(Debug, Default, Clone)]
pub struct Calls {
    pub patches: usize,
    pub bindings: usize,
    pub gets: usize,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    lag: Mutex<Duration>,
    faults: Mutex<Faults>,
    calls: Mutex<Calls>,
}

/// The fake API server.
#[derive(Debug, Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Store {
    fn bump(&mut self, kind: Kind, typ: &'static str, obj: &mut Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.events.push(Event {
            rv: self.rv,
            kind,
            typ,
            object: obj.clone(),
            at: Instant::now(),
        });
    }
}

impl FakeApi {
    /// Start serving on an ephemeral port.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            lag: Mutex::new(Duration::ZERO),
            faults: Mutex::new(Faults::default()),
            calls: Mutex::new(Calls::default()),
        });
        let app = Router::new()
            .route("/api/v1/pods", get(list_pods))
            .route("/api/v1/nodes", get(list_nodes))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).patch(patch_pod),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/binding",
                axum::routing::post(bind_pod),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                axum::routing::post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                get(get_lease).put(replace_lease),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared }
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        gm_extender::ensure_crypto_provider();
        let url: http::Uri = format!("http://{}", self.addr).parse().unwrap();
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        kube::Client::try_from(config).unwrap()
    }

    /// Delay every watch event by this much (informer lag).
    pub fn set_lag(&self, lag: Duration) {
        *self.shared.lag.lock().unwrap() = lag;
    }

    pub fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.shared.faults.lock().unwrap()
    }

    pub fn calls(&self) -> Calls {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Store a node object as given (it gets a resourceVersion).
    pub fn put_node(&self, mut node: Value) {
        let name = node["metadata"]["name"].as_str().unwrap().to_string();
        let mut st = self.shared.store.lock().unwrap();
        let typ = if st.nodes.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.bump(Kind::Node, typ, &mut node);
        st.nodes.insert(name, node);
    }

    /// A GPU node publishing `inv` (or no inventory with `None`).
    pub fn add_node(&self, name: &str, inv: Option<&NodeInventory>) {
        let mut annotations = serde_json::Map::new();
        if let Some(inv) = inv {
            annotations.insert("tencent.com/gpu-inventory".into(), json!(inv.to_json()));
        }
        let cores = inv.map_or(0, |i| i.len() * 100);
        self.put_node(json!({
            "metadata": {"name": name, "uid": format!("node-uid-{name}"), "annotations": annotations,
                          "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"capacity": {"cpu": "64", "tencent.com/vcuda-core": cores.to_string()}},
        }));
    }

    pub fn delete_node(&self, name: &str) {
        let mut st = self.shared.store.lock().unwrap();
        if let Some(mut n) = st.nodes.remove(name) {
            st.bump(Kind::Node, "DELETED", &mut n);
        }
    }

    /// Store a pod object as given; a missing uid is filled in. Returns the uid.
    pub fn put_pod(&self, mut pod: Value) -> String {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let mut st = self.shared.store.lock().unwrap();
        if pod["metadata"]["uid"].as_str().is_none() {
            st.uid += 1;
            pod["metadata"]["uid"] = json!(format!("uid-{}-{}", name, st.uid));
        }
        pod["metadata"]["namespace"] = json!(ns);
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        let key = (ns, name);
        let typ = if st.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.bump(Kind::Pod, typ, &mut pod);
        st.pods.insert(key, pod);
        uid
    }

    /// A pending pod whose containers ask for (vcuda-core, vcuda-memory) each.
    pub fn add_pod(&self, ns: &str, name: &str, containers: &[(u32, u32)]) -> String {
        self.put_pod(pod_json(ns, name, containers, &[]))
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        let st = self.shared.store.lock().unwrap();
        st.pods.get(&(ns.to_string(), name.to_string())).cloned()
    }

    pub fn pods(&self) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .pods
            .values()
            .cloned()
            .collect()
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let mut st = self.shared.store.lock().unwrap();
        if let Some(mut p) = st.pods.remove(&(ns.to_string(), name.to_string())) {
            st.bump(Kind::Pod, "DELETED", &mut p);
        }
    }

    /// Set a pod's phase (e.g. Succeeded).
    pub fn set_phase(&self, ns: &str, name: &str, phase: &str) {
        let mut p = self.pod(ns, name).unwrap();
        p["status"]["phase"] = json!(phase);
        self.put_pod(p);
    }

    /// The "kubelet" admits a bound pod: its device plugin writes `gpu-assigned=true`.
    pub fn admit(&self, ns: &str, name: &str) {
        let mut p = self.pod(ns, name).unwrap();
        p["metadata"]["annotations"]["tencent.com/gpu-assigned"] = json!("true");
        self.put_pod(p);
    }

    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        let st = self.shared.store.lock().unwrap();
        st.leases.get(&(ns.to_string(), name.to_string())).cloned()
    }
}

/// A pod object as the API server stores it.
pub fn pod_json(
    ns: &str,
    name: &str,
    containers: &[(u32, u32)],
    annotations: &[(&str, &str)],
) -> Value {
    let containers: Vec<Value> = containers
        .iter()
        .enumerate()
        .map(|(i, &(c, m))| {
            let mut limits = serde_json::Map::new();
            if c > 0 {
                limits.insert("tencent.com/vcuda-core".into(), json!(c.to_string()));
            }
            if m > 0 {
                limits.insert("tencent.com/vcuda-memory".into(), json!(m.to_string()));
            }
            json!({"name": format!("c{i}"), "image": "busybox", "resources": {"limits": limits}})
        })
        .collect();
    let ann: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": ns, "annotations": ann},
        "spec": {"containers": containers, "schedulerName": "default-scheduler"},
        "status": {"phase": "Pending"},
    })
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    watch: Option<String>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
}

async fn list_pods(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    list_or_watch(s, Kind::Pod, q).await
}

async fn list_nodes(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    list_or_watch(s, Kind::Node, q).await
}

async fn list_or_watch(s: Arc<Shared>, kind: Kind, q: ListQuery) -> Response {
    let watching = q.watch.as_deref().is_some_and(|w| w == "true" || w == "1");
    if !watching {
        let st = s.store.lock().unwrap();
        let items: Vec<Value> = match kind {
            Kind::Pod => st.pods.values().cloned().collect(),
            Kind::Node => st.nodes.values().cloned().collect(),
        };
        let list_kind = if kind == Kind::Pod {
            "PodList"
        } else {
            "NodeList"
        };
        return ok_json(&json!({
            "kind": list_kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }));
    }
    let from: u64 = q
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = futures::stream::unfold((s, from), move |(s, mut cursor)| async move {
        loop {
            let lag = *s.lag.lock().unwrap();
            let ready: Vec<Event> = {
                let st = s.store.lock().unwrap();
                st.events
                    .iter()
                    .filter(|e| e.rv > cursor && e.kind == kind)
                    .take_while(|e| e.at + lag <= Instant::now())
                    .cloned()
                    .collect()
            };
            // Keep order: stop at the first event still held back by the lag.
            if let Some(last) = ready.last() {
                cursor = last.rv;
                let mut chunk = String::new();
                for e in &ready {
                    chunk.push_str(&json!({"type": e.typ, "object": e.object}).to_string());
                    chunk.push('\n');
                }
                return Some((Ok::<_, Infallible>(Bytes::from(chunk)), (s, cursor)));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn get_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    s.calls.lock().unwrap().gets += 1;
    let st = s.store.lock().unwrap();
    match st.pods.get(&(ns.clone(), name.clone())) {
        Some(p) => ok_json(p),
        None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

async fn patch_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.calls.lock().unwrap().patches += 1;
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            &format!("this fake takes merge patches, not {ct}"),
        );
    }
    if s.faults.lock().unwrap().fail_patch.contains(&name) {
        return status(500, "InternalError", "injected patch failure");
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch is not JSON");
    };
    let mut st = s.store.lock().unwrap();
    let Some(mut pod) = st.pods.get(&(ns.clone(), name.clone())).cloned() else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    if let Some(want) = patch["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"].as_str() != Some(want) {
            return status(
                409,
                "Conflict",
                &format!("Precondition failed: UID in precondition: {want}"),
            );
        }
    }
    merge(&mut pod, &patch);
    st.bump(Kind::Pod, "MODIFIED", &mut pod);
    st.pods.insert((ns, name), pod.clone());
    ok_json(&pod)
}

async fn bind_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    s.calls.lock().unwrap().bindings += 1;
    if s.faults.lock().unwrap().fail_binding.contains(&name) {
        return status(500, "InternalError", "injected binding failure");
    }
    let Ok(binding) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "binding is not JSON");
    };
    let Some(node) = binding["target"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "binding has no target.name");
    };
    let mut st = s.store.lock().unwrap();
    let Some(mut pod) = st.pods.get(&(ns.clone(), name.clone())).cloned() else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    if let Some(want) = binding["metadata"]["uid"].as_str() {
        if pod["metadata"]["uid"].as_str() != Some(want) {
            return status(409, "Conflict", "Precondition failed: UID");
        }
    }
    if let Some(bound) = pod["spec"]["nodeName"].as_str() {
        return status(
            409,
            "Conflict",
            &format!("pod {name} is already assigned to node \"{bound}\""),
        );
    }
    pod["spec"]["nodeName"] = json!(node);
    if s.faults.lock().unwrap().kubelet_admits
        && pod["metadata"]["annotations"]["tencent.com/predicate-node"].is_string()
    {
        pod["metadata"]["annotations"]["tencent.com/gpu-assigned"] = json!("true");
    }
    st.bump(Kind::Pod, "MODIFIED", &mut pod);
    st.pods.insert((ns, name), pod);
    status(201, "", "")
}

async fn get_lease(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    if s.faults.lock().unwrap().leases_down {
        return status(503, "ServiceUnavailable", "injected outage");
    }
    let st = s.store.lock().unwrap();
    match st.leases.get(&(ns, name.clone())) {
        Some(l) => ok_json(l),
        None => status(
            404,
            "NotFound",
            &format!("leases.coordination.k8s.io \"{name}\" not found"),
        ),
    }
}

async fn create_lease(
    State(s): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    if s.faults.lock().unwrap().leases_down {
        return status(503, "ServiceUnavailable", "injected outage");
    }
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let name = lease["metadata"]["name"].as_str().unwrap_or("").to_string();
    let mut st = s.store.lock().unwrap();
    if st.leases.contains_key(&(ns.clone(), name.clone())) {
        return status(
            409,
            "AlreadyExists",
            &format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    st.rv += 1;
    lease["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    lease["metadata"]["namespace"] = json!(ns.clone());
    st.leases.insert((ns, name), lease.clone());
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        lease.to_string(),
    )
        .into_response()
}

async fn replace_lease(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if s.faults.lock().unwrap().leases_down {
        return status(503, "ServiceUnavailable", "injected outage");
    }
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let mut st = s.store.lock().unwrap();
    let key = (ns, name.clone());
    let Some(current) = st.leases.get(&key) else {
        return status(404, "NotFound", "lease not found");
    };
    if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status(409, "Conflict", &format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified"));
    }
    st.rv += 1;
    lease["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    st.leases.insert(key, lease.clone());
    ok_json(&lease)
}

// ---- the extender under test ----

/// A running extender against a fake API.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<ClusterState>,
    pub leadership: Arc<gm_extender::Leadership>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gm_extender::ExtenderError>>,
}

impl Running {
    /// Stop it gracefully and wait.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// Start an extender with `args` (its address is ignored: port 0 on 127.0.0.1) and, unless it
/// elects a leader, wait until its caches have synced.
pub async fn start_extender(api: &FakeApi, args: ExtenderArgs) -> Running {
    let ext = Extender::new(&args).unwrap();
    let state = ext.state();
    let leadership = ext.leadership();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ext.serve(listener, api.client(), async move {
        let _ = rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.is_synced() {
        assert!(Instant::now() < deadline, "caches did not sync");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Running {
        addr,
        state,
        leadership,
        stop: Some(tx),
        task,
    }
}

/// Poll until `f` holds (or fail after `within`).
pub async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- a plain HTTP/1.1 client ----

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender }
    }

    /// Send a request; returns the status and the body.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (u16, String) {
        use http_body_util::BodyExt;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "extender")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body.into()))
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (code, String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// One request on a fresh connection.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> (u16, String) {
    Conn::open(addr).await.send(method, path, body).await
}

/// POST JSON and parse the JSON answer (asserting HTTP 200).
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let (code, text) = call(addr, "POST", path, body.to_string()).await;
    assert_eq!(code, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// What kube-scheduler does with a node-cache-capable extender: filter, prioritize the nodes
/// that pass, bind the best (highest score, ties to the lowest name). Returns the node, or the
/// error of the step that failed.
pub async fn schedule(conn: &mut Conn, pod: &Value, nodes: &[String]) -> Result<String, String> {
    let args = json!({"Pod": pod, "Nodes": null, "NodeNames": nodes});
    let (code, text) = conn
        .send("POST", "/scheduler/filter", args.to_string())
        .await;
    if code != 200 {
        return Err(format!("filter: HTTP {code}: {text}"));
    }
    let f: Value = serde_json::from_str(&text).unwrap();
    if f["Error"].as_str().is_some_and(|e| !e.is_empty()) {
        return Err(format!("filter: {}", f["Error"]));
    }
    let passing: Vec<String> = f["NodeNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if passing.is_empty() {
        return Err(format!("no node fits: {}", f["FailedNodes"]));
    }
    let args = json!({"Pod": pod, "Nodes": null, "NodeNames": passing});
    let (code, text) = conn
        .send("POST", "/scheduler/prioritize", args.to_string())
        .await;
    if code != 200 {
        return Err(format!("prioritize: HTTP {code}: {text}"));
    }
    let scores: Vec<(i64, String)> = serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["Score"].as_i64().unwrap(),
                h["Host"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let best = scores
        .iter()
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)))
        .unwrap()
        .1
        .clone();
    let bind = json!({
        "PodName": pod["metadata"]["name"], "PodNamespace": pod["metadata"]["namespace"],
        "PodUID": pod["metadata"]["uid"], "Node": best,
    });
    let (code, text) = conn.send("POST", "/scheduler/bind", bind.to_string()).await;
    if code != 200 {
        return Err(format!("bind: HTTP {code}: {text}"));
    }
    let r: Value = serde_json::from_str(&text).unwrap();
    match r["Error"].as_str() {
        Some(e) if !e.is_empty() => Err(format!("bind: {e}")),
        _ => Ok(best),
    }
}

/// Uniform test node inventory: `n` cards of `mib` MiB.
pub fn cards(n: usize, mib: u64) -> NodeInventory {
    NodeInventory::uniform(n, "Tesla T4", mib, gm_core::Link::Phb)
}

/// Default extender flags for tests.
pub fn args() -> ExtenderArgs {
    ExtenderArgs::default()
}
