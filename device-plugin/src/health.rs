//! Card health: a blocking thread waits for the backend's health events (critical XIDs,
//! double-bit ECC errors, lost cards → Unhealthy), and a task re-probes unhealthy cards every
//! `--health-reprobe-interval` (a card that answers again → Healthy). Every change reaches the
//! kubelet through ListAndWatch and the Node through the inventory publisher.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gm_backend::{HealthEvent, HealthEventKind, ProbeResult};
use tokio::task::JoinHandle;

use crate::shared::Shared;

/// How long one `wait_events` call blocks before the thread checks for shutdown.
const WAIT_SLICE: Duration = Duration::from_millis(250);

/// Apply one backend event.
pub fn handle_event(shared: &Shared, event: &HealthEvent) {
    let card = shared.read_state(|st| st.inventory().card_by_uuid(&event.uuid).map(|c| c.index));
    let Some(card) = card else {
        tracing::warn!(uuid = %event.uuid, event = %event.kind, "health event for a card this node does not list");
        return;
    };
    let reason = match event.kind {
        HealthEventKind::Xid { code } => {
            shared.count_xid(card, code);
            if !shared.config.xid_policy.is_critical(code) {
                tracing::info!(card, uuid = %event.uuid, xid = code, "XID ignored by the health policy (raised by an application)");
                return;
            }
            format!("critical XID {code}")
        }
        HealthEventKind::DoubleBitEcc => "an uncorrectable (double-bit) ECC error".to_string(),
        HealthEventKind::Lost => "the card stopped answering (lost)".to_string(),
    };
    if shared.set_health(card, false, &reason) {
        tracing::warn!(card, uuid = %event.uuid, %reason, "card marked Unhealthy");
    }
}

/// Start the event thread. It runs until `stop` is set.
pub fn spawn_event_thread(
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gpu-health".into())
        .spawn(move || {
            let mut failing = false;
            while !stop.load(Ordering::SeqCst) {
                match shared.backend.wait_events(WAIT_SLICE) {
                    Ok(events) => {
                        failing = false;
                        for e in &events {
                            handle_event(&shared, e);
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(error = %e, "waiting for GPU health events failed; retrying every second");
                            failing = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
}

/// Start the re-probe task.
pub fn spawn_reprobe(shared: Arc<Shared>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let sick: Vec<(u32, String)> = shared.read_state(|st| {
                st.inventory()
                    .cards
                    .iter()
                    .filter(|c| !c.healthy)
                    .map(|c| (c.index, c.uuid.clone()))
                    .collect()
            });
            for (card, uuid) in sick {
                let backend = Arc::clone(&shared.backend);
                let probe_uuid = uuid.clone();
                let probed = tokio::task::spawn_blocking(move || backend.probe(&probe_uuid)).await;
                match probed {
                    Ok(Ok(ProbeResult::Healthy)) => {
                        if shared.set_health(card, true, "") {
                            tracing::info!(card, %uuid, "card answers again; marked Healthy");
                        }
                    }
                    Ok(Ok(other)) => {
                        tracing::debug!(card, %uuid, state = ?other, "card still unhealthy")
                    }
                    Ok(Err(e)) => tracing::debug!(card, %uuid, error = %e, "re-probe failed"),
                    Err(e) => tracing::debug!(card, error = %e, "re-probe task failed"),
                }
            }
        }
    })
}
