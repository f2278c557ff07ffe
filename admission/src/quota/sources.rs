//! Where quotas come from: GpuQuota objects (watched cluster-wide) and the old gpuquota
//! ConfigMap (watched by name).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

use gm_core::quota::Quota;

use super::legacy::{parse_legacy, DATA_KEY};
use super::NamedQuota;
use crate::crd::GpuQuota;

const PENDING: u8 = 0;
const READY: u8 = 1;
/// The GpuQuota CRD is not installed: no quotas, logged once.
const MISSING: u8 = 2;

/// The quota sources the webhook reads.
#[derive(Clone, Default)]
pub(crate) struct QuotaSources {
    crd: Option<(Store<GpuQuota>, Arc<AtomicU8>)>,
    legacy: Option<Arc<RwLock<LegacyState>>>,
}

#[derive(Default)]
struct LegacyState {
    synced: bool,
    source: String,
    quotas: BTreeMap<String, Quota>,
}

impl QuotaSources {
    /// No sources at all (standalone, or quota disabled).
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// Start watching the configured sources. The tasks end with the returned handles.
    pub(crate) fn start(
        client: &Client,
        crd: bool,
        configmap: Option<(String, String)>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let mut tasks = Vec::new();
        let mut sources = Self::default();
        if crd {
            let (store, writer) = reflector::store();
            let state = Arc::new(AtomicU8::new(PENDING));
            let api: Api<GpuQuota> = Api::all(client.clone());
            let st = state.clone();
            let stream =
                reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
                    .default_backoff();
            tasks.push(tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(Event::InitDone) => {
                            if st.swap(READY, Ordering::SeqCst) != READY {
                                tracing::info!("GpuQuota objects listed; quota enforcement is active");
                            }
                        }
                        Ok(_) => {}
                        Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                            if s.code == 404 =>
                        {
                            if st.swap(MISSING, Ordering::SeqCst) != MISSING {
                                tracing::warn!(
                                    "the GpuQuota CRD (gpuquotas.gpu.tkestack.io) is not installed: no GpuQuota limits apply; install it or pass --quota-crd=false"
                                );
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watching GpuQuota objects failed; retrying"),
                    }
                }
            }));
            sources.crd = Some((store, state));
        }
        if let Some((ns, name)) = configmap {
            let state = Arc::new(RwLock::new(LegacyState {
                source: format!("{ns}/{name}"),
                ..LegacyState::default()
            }));
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let st = state.clone();
            let stream = watcher::watcher(api, cfg).default_backoff();
            tasks.push(tokio::spawn(async move {
                futures::pin_mut!(stream);
                let mut seen_in_init = false;
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(Event::Init) => seen_in_init = false,
                        Ok(Event::InitApply(cm)) => {
                            seen_in_init = true;
                            apply_configmap(&st, Some(&cm));
                        }
                        Ok(Event::Apply(cm)) => apply_configmap(&st, Some(&cm)),
                        Ok(Event::Delete(_)) => apply_configmap(&st, None),
                        Ok(Event::InitDone) => {
                            if !seen_in_init {
                                apply_configmap(&st, None);
                            }
                            if let Ok(mut s) = st.write() {
                                s.synced = true;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watching the gpu quota ConfigMap failed; retrying"),
                    }
                }
            }));
            sources.legacy = Some(state);
        }
        (sources, tasks)
    }

    /// True when every source has been read once.
    pub(crate) fn synced(&self) -> bool {
        let crd = self
            .crd
            .as_ref()
            .is_none_or(|(_, s)| s.load(Ordering::SeqCst) != PENDING);
        let legacy = self
            .legacy
            .as_ref()
            .is_none_or(|l| l.read().map(|s| s.synced).unwrap_or(false));
        crd && legacy
    }

    /// True when any source is configured.
    pub(crate) fn enabled(&self) -> bool {
        self.crd.is_some() || self.legacy.is_some()
    }

    /// Every GpuQuota object.
    pub(crate) fn crd_objects(&self) -> Vec<Arc<GpuQuota>> {
        self.crd
            .as_ref()
            .map(|(s, _)| s.state())
            .unwrap_or_default()
    }

    /// The quotas that apply to a namespace.
    pub(crate) fn quotas_for(&self, namespace: &str) -> Vec<NamedQuota> {
        let mut out = Vec::new();
        for q in self.crd_objects() {
            if q.namespace().as_deref() == Some(namespace) {
                out.push(NamedQuota {
                    source: format!("GpuQuota {namespace}/{}", q.name_any()),
                    quota: q.spec.to_quota(),
                });
            }
        }
        if let Some(l) = &self.legacy {
            if let Ok(s) = l.read() {
                if let Some(q) = s.quotas.get(namespace) {
                    out.push(NamedQuota {
                        source: format!(
                            "gpu quota ConfigMap {} (namespace {namespace:?})",
                            s.source
                        ),
                        quota: Ok(q.clone()),
                    });
                }
            }
        }
        out
    }
}

fn apply_configmap(state: &RwLock<LegacyState>, cm: Option<&ConfigMap>) {
    let Ok(mut s) = state.write() else {
        return;
    };
    let Some(cm) = cm else {
        if !s.quotas.is_empty() {
            tracing::info!(configmap = %s.source, "gpu quota ConfigMap removed: its quotas no longer apply");
        }
        s.quotas.clear();
        return;
    };
    let data = cm.data.as_ref().and_then(|d| d.get(DATA_KEY));
    let Some(json) = data else {
        tracing::error!(
            configmap = %s.source,
            "gpu quota ConfigMap has no data key {DATA_KEY:?}; keeping the previous quotas"
        );
        return;
    };
    match parse_legacy(&s.source, json) {
        Ok(q) => {
            tracing::info!(configmap = %s.source, namespaces = q.len(), "gpu quota ConfigMap loaded");
            s.quotas = q;
        }
        Err(e) => tracing::error!(error = %e, "keeping the previous gpu quotas"),
    }
}
