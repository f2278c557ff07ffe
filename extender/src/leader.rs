//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Written by hand on `kube::Api<Lease>`: the maintained crate (`kube-leader-election`) depends
//! on kube 4 and cannot share our kube 5 client. The protocol is client-go's:
//!
//! * every `retry_period` a replica reads the Lease; a free, released or expired Lease is taken
//!   by writing our identity with the `resourceVersion` we read, so two replicas racing for it
//!   cannot both win (the loser gets 409 Conflict);
//! * expiry is judged on *this* replica's clock: the Lease is expired when its record has not
//!   changed for `leaseDurationSeconds` since we first saw it, so clock skew between replicas
//!   does not matter;
//! * the leader renews every `retry_period`, and steps down by itself when it has not renewed
//!   for `renew_deadline` (two thirds of the lease duration), before anyone else may take over;
//! * on shutdown the leader releases the Lease (empty holder), so a follower takes over at its
//!   next retry instead of waiting for expiry.
//!
//! A follower therefore takes over at most `lease duration + 2 × retry period` after the leader
//! died, and within one retry period after it shut down cleanly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::args::LeaseSettings;

/// Whether this replica may serve decisions.
#[derive(Debug)]
pub struct Leadership {
    elect: bool,
    leader: AtomicBool,
}

impl Leadership {
    /// No election: this replica always leads.
    pub fn always() -> Self {
        Self {
            elect: false,
            leader: AtomicBool::new(true),
        }
    }

    /// Elected: a follower until the Lease is won.
    pub fn elected() -> Self {
        Self {
            elect: true,
            leader: AtomicBool::new(false),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// True when leadership comes from an election.
    pub fn uses_election(&self) -> bool {
        self.elect
    }

    fn set(&self, leader: bool, identity: &str) {
        let was = self.leader.swap(leader, Ordering::AcqRel);
        if was != leader {
            if leader {
                tracing::info!(identity, "became the leader");
            } else {
                tracing::warn!(identity, "stopped being the leader");
            }
        }
    }
}

/// What we last saw of the Lease, and when (our clock).
#[derive(Debug)]
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<String>),
    at: Instant,
}

/// Run the election until `stop` turns true; then release the Lease if we hold it.
pub async fn run_election(
    client: Client,
    cfg: LeaseSettings,
    leadership: Arc<Leadership>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let renew_deadline = cfg.duration * 2 / 3;
    let mut observed: Option<Observed> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            renew_deadline,
            try_acquire_or_renew(&api, &cfg, &mut observed),
        )
        .await;
        match attempt {
            Ok(Ok(true)) => {
                last_renew = Some(started);
                leadership.set(true, &cfg.identity);
            }
            Ok(Ok(false)) => leadership.set(false, &cfg.identity),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease = %cfg.name, "cannot read or write the leader Lease")
            }
            Err(_) => tracing::warn!(lease = %cfg.name, "leader Lease request timed out"),
        }
        if leadership.is_leader() && last_renew.is_none_or(|t| t.elapsed() >= renew_deadline) {
            leadership.set(false, &cfg.identity);
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.retry_period) => {}
            _ = stop.changed() => {}
        }
    }
    if leadership.is_leader() {
        leadership.set(false, &cfg.identity);
        match tokio::time::timeout(cfg.retry_period, release(&api, &cfg)).await {
            Ok(Ok(())) => tracing::info!(lease = %cfg.name, "released the leader Lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot release the leader Lease; followers wait for it to expire")
            }
            Err(_) => tracing::warn!(
                "releasing the leader Lease timed out; followers wait for it to expire"
            ),
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

/// One round: take or renew the Lease. `Ok(true)` = we hold it now.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseSettings,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let seconds = i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let record = (
        spec.holder_identity.clone(),
        spec.renew_time.clone(),
        lease.metadata.resource_version.clone(),
    );
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record,
            at: Instant::now(),
        });
    }
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    let mine = holder == Some(cfg.identity.as_str());
    let their_duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(cfg.duration, Duration::from_secs);
    let seen_for = observed.as_ref().map_or(Duration::ZERO, |o| o.at.elapsed());
    if holder.is_some() && !mine && seen_for < their_duration {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(seconds),
        acquire_time: if mine {
            spec.acquire_time.clone()
        } else {
            Some(now())
        },
        renew_time: Some(now()),
        lease_transitions: Some(if mine {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..spec
    });
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Give the Lease up: empty holder, so the next follower round takes it.
async fn release(api: &Api<Lease>, cfg: &LeaseSettings) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    lease.spec = Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(now()),
        ..spec
    });
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}
