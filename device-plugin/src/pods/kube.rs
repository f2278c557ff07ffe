//! The production pod source: a watch on the API server for the pods bound to this node
//! (field selector `spec.nodeName=<node>`), reflected into a store of [`PodInfo`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use gm_core::annotations::Keys;
use gm_core::ResourceNames;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::task::JoinHandle;

use super::{PodInfo, PodMap, PodSource};

/// Pods of one node, kept up to date by a watch on the API server.
#[derive(Debug)]
pub struct KubePods {
    pods: RwLock<PodMap>,
    synced: AtomicBool,
    /// For [`PodSource::refresh`]: a direct list of this node's pods.
    api: Api<Pod>,
    selector: String,
    names: ResourceNames,
    keys: Keys,
}

/// Longest a refresh may hold up a kubelet request.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

impl KubePods {
    /// Start watching the pods of `node`. The returned task runs until aborted; the watch
    /// re-lists and retries with backoff on its own when the API server is unreachable.
    pub fn spawn(
        client: kube::Client,
        node: &str,
        names: ResourceNames,
        keys: Keys,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let api: Api<Pod> = Api::all(client);
        let selector = format!("spec.nodeName={node}");
        let me = Arc::new(Self {
            pods: RwLock::new(BTreeMap::new()),
            synced: AtomicBool::new(false),
            api: api.clone(),
            selector: selector.clone(),
            names: names.clone(),
            keys: keys.clone(),
        });
        let config = watcher::Config::default().fields(&selector);
        let store = Arc::clone(&me);
        let task = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, config).default_backoff().boxed();
            let mut fresh: Option<PodMap> = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => store.apply(event, &mut fresh, &names, &keys),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "watching this node's pods on the API server failed; retrying with backoff"
                    ),
                }
            }
        });
        (me, task)
    }

    fn apply(&self, event: Event<Pod>, fresh: &mut Option<PodMap>, n: &ResourceNames, k: &Keys) {
        let convert = |p: &Pod| {
            PodInfo::from_pod(p, n, k).map(|i| ((i.namespace.clone(), i.name.clone()), Arc::new(i)))
        };
        match event {
            Event::Init => *fresh = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let (Some(map), Some((key, info))) = (fresh.as_mut(), convert(&p)) {
                    map.insert(key, info);
                }
            }
            Event::InitDone => {
                if let Some(map) = fresh.take() {
                    let count = map.len();
                    *self.pods.write().unwrap_or_else(|p| p.into_inner()) = map;
                    if !self.synced.swap(true, Ordering::SeqCst) {
                        tracing::info!(
                            pods = count,
                            "pod list of this node synced from the API server"
                        );
                    }
                }
            }
            Event::Apply(p) => {
                if let Some((key, info)) = convert(&p) {
                    let mut map = self.pods.write().unwrap_or_else(|p| p.into_inner());
                    map.insert(key, info);
                }
            }
            Event::Delete(p) => {
                if let Some((key, _)) = convert(&p) {
                    let mut map = self.pods.write().unwrap_or_else(|p| p.into_inner());
                    map.remove(&key);
                }
            }
        }
    }
}

impl PodSource for KubePods {
    fn snapshot(&self) -> Vec<Arc<PodInfo>> {
        let map = self.pods.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        let map = self.pods.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn refresh(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            let params = ListParams::default().fields(&self.selector);
            let listed = match tokio::time::timeout(REFRESH_TIMEOUT, self.api.list(&params)).await {
                Ok(Ok(list)) => list,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "listing this node's pods for a kubelet request failed; deciding with the watch's view");
                    return false;
                }
                Err(_) => {
                    tracing::warn!(timeout_ms = REFRESH_TIMEOUT.as_millis() as u64, "listing this node's pods for a kubelet request timed out; deciding with the watch's view");
                    return false;
                }
            };
            let mut map = self.pods.write().unwrap_or_else(|p| p.into_inner());
            // Only pods the watch has not delivered yet are added: for the others the watch is
            // at least as fresh, and deletions stay its job. (A pod deleted in the
            // milliseconds this list was in flight would be added back and linger until the
            // watch relists; the window is small because a refresh only runs on a miss.)
            let mut added = 0usize;
            for p in &listed.items {
                let key = (
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                );
                if map.contains_key(&key) || p.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if let Some(info) = PodInfo::from_pod(p, &self.names, &self.keys) {
                    map.insert(key, Arc::new(info));
                    added += 1;
                }
            }
            tracing::debug!(
                added,
                "pods the watch had not delivered yet, listed for a kubelet request"
            );
            true
        })
    }
}
