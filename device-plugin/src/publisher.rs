//! Publishes the node's card inventory on its Node object (DESIGN §3): the versioned JSON
//! annotation `<domain>/gpu-inventory` and the labels `<domain>/gpu-model`, `gpu-count` and
//! `gpu-memory-mib`, at start and whenever they change (health included).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gm_core::annotations::Keys;
use gm_core::inventory::model_label_value;
use gm_core::NodeInventory;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{with_retries, Cluster, RetryPolicy};

/// Labels and annotations describing `inv`.
pub fn node_metadata(
    inv: &NodeInventory,
    keys: &Keys,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels = BTreeMap::new();
    if let Some(first) = inv.cards.first() {
        labels.insert(keys.label_model.clone(), model_label_value(&first.model));
    }
    labels.insert(keys.label_count.clone(), inv.len().to_string());
    labels.insert(
        keys.label_memory.clone(),
        inv.largest_card_mib().to_string(),
    );
    let mut annotations = BTreeMap::new();
    annotations.insert(keys.inventory.clone(), inv.to_json());
    (labels, annotations)
}

/// Publish now and on every change of `inventory`; retry failed publications every `resync`.
pub fn spawn_publisher(
    cluster: Arc<dyn Cluster>,
    node: String,
    keys: Keys,
    mut inventory: watch::Receiver<Arc<NodeInventory>>,
    retry: RetryPolicy,
    resync: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut published: Option<Arc<NodeInventory>> = None;
        let mut failed = false;
        loop {
            let current = Arc::clone(&inventory.borrow_and_update());
            if published.as_deref() != Some(&*current) {
                let (labels, annotations) = node_metadata(&current, &keys);
                let (labels, annotations) = (Arc::new(labels), Arc::new(annotations));
                let result = with_retries(retry, || {
                    let (c, n, l, a) = (
                        Arc::clone(&cluster),
                        node.clone(),
                        Arc::clone(&labels),
                        Arc::clone(&annotations),
                    );
                    Box::pin(async move { c.patch_node(&n, &l, &a).await })
                })
                .await;
                match result {
                    Ok(()) => {
                        tracing::info!(node = %node, cards = current.len(), "node inventory published");
                        published = Some(current);
                        failed = false;
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(
                            node = %node, error = %e,
                            "could not publish the node's GPU inventory; will retry in {resync:?}"
                        )
                    }
                }
            }
            tokio::select! {
                changed = inventory.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(resync), if failed => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_core::Link;

    #[test]
    fn labels_name_the_model_count_and_largest_memory() {
        let inv = NodeInventory::uniform(4, "NVIDIA A100-SXM4-40GB", 40960, Link::NvLink(12));
        let (labels, ann) = node_metadata(&inv, &Keys::default());
        assert_eq!(labels["tencent.com/gpu-model"], "NVIDIA-A100-SXM4-40GB");
        assert_eq!(labels["tencent.com/gpu-count"], "4");
        assert_eq!(labels["tencent.com/gpu-memory-mib"], "40960");
        let back = NodeInventory::from_json(&ann["tencent.com/gpu-inventory"]).unwrap();
        assert_eq!(back, inv);
    }
}
