//! The node and pod informers: kube-rs watchers (the list-then-watch machinery under kube's
//! reflectors) feeding [`ClusterState`] one event at a time.
//!
//! We keep our own compact, indexed store instead of a `reflector::Store` of full objects: the
//! extender needs per-node ledgers and per-namespace GPU pod lists, not 40,000 whole pods.
//! A relist (`Init` … `InitDone`) is followed by dropping every object it did not mention.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

use crate::state::ClusterState;

/// Pods that have finished hold nothing; the API server leaves them out and reports a pod that
/// finishes as deleted.
pub const POD_FIELD_SELECTOR: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Watch nodes forever, keeping `state` up to date.
pub async fn run_nodes(state: Arc<ClusterState>, client: Client) {
    let api: Api<Node> = Api::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut seen: Option<HashSet<String>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => seen = Some(HashSet::new()),
            Ok(Event::InitApply(node)) => {
                if let (Some(s), Some(n)) = (seen.as_mut(), node.metadata.name.as_ref()) {
                    s.insert(n.clone());
                }
                state.apply_node(&node);
            }
            Ok(Event::InitDone) => {
                if let Some(s) = seen.take() {
                    state.retain_nodes(&s);
                }
                if !state.is_synced() {
                    tracing::info!("node informer synced");
                }
                state.mark_nodes_synced();
            }
            Ok(Event::Apply(node)) => state.apply_node(&node),
            Ok(Event::Delete(node)) => {
                if let Some(n) = node.metadata.name.as_deref() {
                    state.delete_node(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "node watch failed; retrying"),
        }
    }
}

/// Watch pods (all namespaces, not finished) forever, keeping `state` up to date.
pub async fn run_pods(state: Arc<ClusterState>, client: Client) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(POD_FIELD_SELECTOR);
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut seen: Option<HashSet<String>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => seen = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(s), Some(u)) = (seen.as_mut(), pod.metadata.uid.as_ref()) {
                    s.insert(u.clone());
                }
                state.apply_pod(&pod);
            }
            Ok(Event::InitDone) => {
                if let Some(s) = seen.take() {
                    state.retain_pods(&s);
                }
                if !state.is_synced() {
                    tracing::info!("pod informer synced");
                }
                state.mark_pods_synced();
            }
            Ok(Event::Apply(pod)) => state.apply_pod(&pod),
            Ok(Event::Delete(pod)) => {
                if let Some(u) = pod.metadata.uid.as_deref() {
                    state.delete_pod(u);
                }
            }
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
    }
}
