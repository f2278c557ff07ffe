//! The production pod source: a watch on the API server for the pods bound to this node
//! (field selector `spec.nodeName=<node>`), reflected into a store of [`PodInfo`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use gm_core::annotations::Keys;
use gm_core::ResourceNames;
use k8s_openapi::api::core::v1::Pod;
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
}

impl KubePods {
    /// Start watching the pods of `node`. The returned task runs until aborted; the watch
    /// re-lists and retries with backoff on its own when the API server is unreachable.
    pub fn spawn(
        client: kube::Client,
        node: &str,
        names: ResourceNames,
        keys: Keys,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let me = Arc::new(Self {
            pods: RwLock::new(BTreeMap::new()),
            synced: AtomicBool::new(false),
        });
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
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
}
