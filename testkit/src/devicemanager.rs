//! The kubelet device manager's side of pod admission, over a [`FakeKubelet`] and a
//! [`FakePodResources`]: one pod at a time, for each container in order and each resource it
//! asks for (vcuda-core first, then vcuda-memory):
//!
//! 1. the available IDs are the healthy devices of the resource's latest ListAndWatch list
//!    minus the IDs other containers hold; too few fails admission;
//! 2. `GetPreferredAllocation(available, size)` when the plugin offers it; the kubelet takes
//!    the preferred IDs that are available and fills up from the rest, in list order;
//! 3. `Allocate(ids)`; a failure rejects the pod and frees everything it got so far;
//! 4. the IDs are recorded, so pod-resources lists the container from then on;
//!
//! then, once every container is allocated, `PreStartContainer` for each container and
//! resource when the plugin asked for it (the kubelet calls it right before starting each
//! container). A failed PreStartContainer does not free the pod's devices: the kubelet keeps
//! them while the pod exists, and so does [`DeviceManager`].
//!
//! Not modelled: init containers handing devices on to app containers, topology alignment,
//! and the kubelet's own checkpoint.

use std::collections::{BTreeSet, HashMap};

use gm_core::devices::DeviceId;
use gm_core::ResourceNames;
use gm_proto::deviceplugin::v1beta1 as dp;
use tonic::Status;

use crate::error::TestkitError;
use crate::kubelet::FakeKubelet;
use crate::podresources::{FakePodResources, Holding};

/// One container of a pod to admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRequest {
    /// The container's name.
    pub name: String,
    /// vcuda-core devices asked for (0: none).
    pub vcuda_core: u32,
    /// vcuda-memory devices asked for (0: none).
    pub vcuda_memory: u32,
}

/// A pod to admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRequest {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its containers, in the order the kubelet admits them.
    pub containers: Vec<ContainerRequest>,
}

impl PodRequest {
    /// A pod with one container.
    pub fn single(
        namespace: &str,
        name: &str,
        container: &str,
        vcuda_core: u32,
        vcuda_memory: u32,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            containers: vec![ContainerRequest {
                name: container.into(),
                vcuda_core,
                vcuda_memory,
            }],
        }
    }

    /// `namespace/name`
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What one container got.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmittedContainer {
    /// The container's name.
    pub name: String,
    /// The vcuda-core IDs allocated.
    pub core: Vec<String>,
    /// The vcuda-memory IDs allocated.
    pub memory: Vec<String>,
    /// The plugin's answer to the vcuda-core `Allocate`.
    pub core_response: Option<dp::ContainerAllocateResponse>,
    /// The plugin's answer to the vcuda-memory `Allocate`.
    pub memory_response: Option<dp::ContainerAllocateResponse>,
}

impl AdmittedContainer {
    /// The cards of the allocated IDs, ascending (IDs of another shape are ignored).
    pub fn cards(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self
            .core
            .iter()
            .chain(&self.memory)
            .filter_map(|id| DeviceId::parse(id))
            .map(|d| d.card)
            .collect();
        set.into_iter().collect()
    }

    fn responses(&self) -> impl Iterator<Item = &dp::ContainerAllocateResponse> {
        self.core_response.iter().chain(&self.memory_response)
    }

    /// An environment variable the plugins set for the container.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.responses()
            .find_map(|r| r.envs.get(key))
            .map(String::as_str)
    }

    /// Every mount the plugins asked for.
    pub fn mounts(&self) -> Vec<&dp::Mount> {
        self.responses().flat_map(|r| &r.mounts).collect()
    }

    /// Every device node the plugins asked for.
    pub fn devices(&self) -> Vec<&dp::DeviceSpec> {
        self.responses().flat_map(|r| &r.devices).collect()
    }
}

/// A pod the device manager admitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// Its containers, in order.
    pub containers: Vec<AdmittedContainer>,
}

impl Admission {
    /// The container called `name`.
    pub fn container(&self, name: &str) -> Option<&AdmittedContainer> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// Which step of admission failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// GetPreferredAllocation.
    Preferred,
    /// Allocate.
    Allocate,
    /// PreStartContainer.
    PreStart,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Preferred => "GetPreferredAllocation",
            Step::Allocate => "Allocate",
            Step::PreStart => "PreStartContainer",
        })
    }
}

/// Why a pod was not admitted (or, for [`AdmitError::Call`] at PreStartContainer, not
/// started).
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// Fewer healthy, unallocated devices than asked for (the kubelet's
    /// `UnexpectedAdmissionError`).
    #[error("pod {pod} container {container:?}: {requested} {resource} requested but only {available} are healthy and unallocated")]
    Insufficient {
        /// `namespace/name`
        pod: String,
        /// The container.
        container: String,
        /// The resource.
        resource: String,
        /// How many were asked for.
        requested: u32,
        /// How many were available.
        available: usize,
    },
    /// The plugin for a resource is not registered (or cannot be dialled).
    #[error("pod {pod} container {container:?}: {source}")]
    Plugin {
        /// `namespace/name`
        pod: String,
        /// The container.
        container: String,
        /// Why.
        source: TestkitError,
    },
    /// A plugin call failed. At PreStartContainer the pod keeps its devices.
    #[error(
        "pod {pod} container {container:?}: {step} for {resource} failed: {code:?}: {message}"
    )]
    Call {
        /// `namespace/name`
        pod: String,
        /// The container.
        container: String,
        /// The resource.
        resource: String,
        /// The call.
        step: Step,
        /// The gRPC code.
        code: tonic::Code,
        /// The plugin's message.
        message: String,
    },
    /// The pod was admitted before and still holds its devices.
    #[error("pod {0} is already admitted")]
    AlreadyAdmitted(String),
}

/// The kubelet device manager's admission flow (see the module documentation).
#[derive(Debug)]
pub struct DeviceManager<'a> {
    kubelet: &'a FakeKubelet,
    podres: &'a FakePodResources,
    names: ResourceNames,
    /// Resource → IDs held by admitted containers.
    allocated: HashMap<String, BTreeSet<String>>,
    admitted: Vec<Admission>,
}

impl<'a> DeviceManager<'a> {
    /// A device manager over `kubelet` and `podres` for the resources in `names`.
    pub fn new(
        kubelet: &'a FakeKubelet,
        podres: &'a FakePodResources,
        names: ResourceNames,
    ) -> Self {
        Self {
            kubelet,
            podres,
            names,
            allocated: HashMap::new(),
            admitted: Vec::new(),
        }
    }

    /// The pods admitted so far (a pod whose PreStartContainer failed included).
    pub fn admitted(&self) -> &[Admission] {
        &self.admitted
    }

    /// The healthy devices of `resource` nobody holds, in the plugin's list order.
    pub fn available(&self, resource: &str) -> Vec<String> {
        let held = self.allocated.get(resource);
        self.kubelet
            .latest(resource)
            .map(|l| l.devices)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.health == dp::HEALTHY)
            .map(|d| d.id)
            .filter(|id| held.is_none_or(|h| !h.contains(id)))
            .collect()
    }

    fn options(&self, resource: &str) -> Option<dp::DevicePluginOptions> {
        self.kubelet
            .registrations()
            .into_iter()
            .rev()
            .find(|r| r.request.resource_name == resource)
            .map(|r| r.options)
    }

    /// Admit `pod`: allocate every container, list them in pod-resources, then call
    /// PreStartContainer for each. See the module documentation for the rules.
    pub async fn admit(&mut self, pod: &PodRequest) -> Result<Admission, AdmitError> {
        let key = pod.key();
        if self
            .admitted
            .iter()
            .any(|a| a.namespace == pod.namespace && a.pod == pod.name)
        {
            return Err(AdmitError::AlreadyAdmitted(key));
        }
        let mut admission = Admission {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            containers: Vec::new(),
        };
        for c in &pod.containers {
            match self.allocate_container(&key, c).await {
                Ok(done) => {
                    self.hold(&done);
                    self.podres.upsert(Holding::in_namespace(
                        &pod.namespace,
                        &pod.name,
                        &done.name,
                        done.core.clone(),
                        done.memory.clone(),
                    ));
                    admission.containers.push(done);
                }
                Err(e) => {
                    // The pod is rejected: whatever it got so far is free again.
                    for done in &admission.containers {
                        self.unhold(done);
                    }
                    self.podres.remove_pod(&pod.namespace, &pod.name);
                    return Err(e);
                }
            }
        }
        self.admitted.push(admission.clone());
        for c in &admission.containers {
            for (resource, ids) in [
                (self.names.core(), &c.core),
                (self.names.memory(), &c.memory),
            ] {
                if ids.is_empty() || !self.options(resource).is_some_and(|o| o.pre_start_required) {
                    continue;
                }
                self.kubelet
                    .prestart(resource, ids)
                    .await
                    .map_err(|s| call_error(&key, &c.name, resource, Step::PreStart, &s))?;
            }
        }
        Ok(admission)
    }

    /// Forget an admitted pod (it was deleted): its devices are free again and pod-resources
    /// no longer lists it. Returns whether it was admitted.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let Some(i) = self
            .admitted
            .iter()
            .position(|a| a.namespace == namespace && a.pod == name)
        else {
            return false;
        };
        let gone = self.admitted.remove(i);
        for c in &gone.containers {
            self.unhold(c);
        }
        self.podres.remove_pod(namespace, name);
        true
    }

    fn hold(&mut self, c: &AdmittedContainer) {
        for (resource, ids) in [
            (self.names.core(), &c.core),
            (self.names.memory(), &c.memory),
        ] {
            self.allocated
                .entry(resource.to_string())
                .or_default()
                .extend(ids.iter().cloned());
        }
    }

    fn unhold(&mut self, c: &AdmittedContainer) {
        for (resource, ids) in [
            (self.names.core(), &c.core),
            (self.names.memory(), &c.memory),
        ] {
            if let Some(held) = self.allocated.get_mut(resource) {
                for id in ids {
                    held.remove(id);
                }
            }
        }
    }

    async fn allocate_container(
        &self,
        pod: &str,
        c: &ContainerRequest,
    ) -> Result<AdmittedContainer, AdmitError> {
        let mut done = AdmittedContainer {
            name: c.name.clone(),
            core: Vec::new(),
            memory: Vec::new(),
            core_response: None,
            memory_response: None,
        };
        let core = self.names.core().to_string();
        let memory = self.names.memory().to_string();
        for (resource, count) in [
            (core.as_str(), c.vcuda_core),
            (memory.as_str(), c.vcuda_memory),
        ] {
            if count == 0 {
                continue;
            }
            let (ids, resp) = self
                .allocate_resource(pod, &c.name, resource, count)
                .await?;
            if resource == core {
                done.core = ids;
                done.core_response = Some(resp);
            } else {
                done.memory = ids;
                done.memory_response = Some(resp);
            }
        }
        Ok(done)
    }

    async fn allocate_resource(
        &self,
        pod: &str,
        container: &str,
        resource: &str,
        count: u32,
    ) -> Result<(Vec<String>, dp::ContainerAllocateResponse), AdmitError> {
        let plugin = |source| AdmitError::Plugin {
            pod: pod.to_string(),
            container: container.to_string(),
            source,
        };
        let Some(options) = self.options(resource) else {
            // Same message as a failed dial.
            return Err(plugin(match self.kubelet.try_client(resource).await {
                Err(e) => e,
                Ok(_) => TestkitError::NotRegistered {
                    resource: resource.to_string(),
                    registered: "none".into(),
                },
            }));
        };
        let available = self.available(resource);
        let needed = count as usize;
        if available.len() < needed {
            return Err(AdmitError::Insufficient {
                pod: pod.to_string(),
                container: container.to_string(),
                resource: resource.to_string(),
                requested: count,
                available: available.len(),
            });
        }
        let preferred = if options.get_preferred_allocation_available {
            self.kubelet
                .try_preferred(resource, &available, &[], needed)
                .await
                .map_err(|s| call_error(pod, container, resource, Step::Preferred, &s))?
        } else {
            Vec::new()
        };
        let ids = take(&available, &preferred, needed);
        let resp = self
            .kubelet
            .allocate(resource, &ids)
            .await
            .map_err(|s| call_error(pod, container, resource, Step::Allocate, &s))?;
        Ok((ids, resp))
    }
}

/// The kubelet's choice: the preferred IDs that are available (in the plugin's order), then
/// the rest of the available IDs, `needed` in all.
fn take(available: &[String], preferred: &[String], needed: usize) -> Vec<String> {
    let avail: BTreeSet<&String> = available.iter().collect();
    let mut chosen: Vec<String> = Vec::with_capacity(needed);
    let mut seen: BTreeSet<&String> = BTreeSet::new();
    for id in preferred.iter().chain(available) {
        if chosen.len() == needed {
            break;
        }
        if avail.contains(id) && seen.insert(id) {
            chosen.push(id.clone());
        }
    }
    chosen
}

fn call_error(pod: &str, container: &str, resource: &str, step: Step, s: &Status) -> AdmitError {
    AdmitError::Call {
        pod: pod.to_string(),
        container: container.to_string(),
        resource: resource.to_string(),
        step,
        code: s.code(),
        message: s.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::take;

    fn v(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_kubelet_takes_the_available_preferred_ids_then_fills_up_in_list_order() {
        let available = v(&["a", "b", "c", "d"]);
        assert_eq!(take(&available, &v(&["c", "d"]), 2), v(&["c", "d"]));
        // An unavailable or repeated preferred ID is skipped; the rest comes from the list.
        assert_eq!(
            take(&available, &v(&["x", "d", "d"]), 3),
            v(&["d", "a", "b"])
        );
        assert_eq!(take(&available, &[], 2), v(&["a", "b"]));
        // Never more than needed, even if the plugin preferred more.
        assert_eq!(take(&available, &available, 1), v(&["a"]));
    }
}
