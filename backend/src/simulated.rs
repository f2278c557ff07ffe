//! A simulated node: cards, links and a script over time read from a node description file.
//!
//! Time starts when the backend is built (or whenever the injected [`Clock`] says). At time
//! `t` the backend reports:
//!
//! * health events scripted at or before `t` that were not returned yet (`recovered` entries
//!   produce no event; they make later probes answer healthy);
//! * a card as lost (unhealthy in the inventory, left out of usage and processes, `Lost` on
//!   probe) between a `lost` event and the next `recovered` event;
//! * the processes whose window contains `t` and the latest usage sample of every card (see
//!   [`NodeDescription::usage_at`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gm_core::NodeInventory;

use crate::clock::{Clock, SystemClock};
use crate::error::BackendError;
use crate::node_file::{millis, NodeDescription, ScriptedEventKind};
use crate::{CardUsage, GpuBackend, HealthEvent, HealthEventKind, ProbeResult, ProcessSample};

/// A [`GpuBackend`] that plays a node description.
#[derive(Debug)]
pub struct SimulatedBackend {
    desc: NodeDescription,
    clock: Arc<dyn Clock>,
    /// Index into `desc.events` of the first event not yet returned by `wait_events`.
    next_event: Mutex<usize>,
}

impl SimulatedBackend {
    /// Read a node file; time starts now.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        Ok(Self::new(
            NodeDescription::from_file(path)?,
            Arc::new(SystemClock::new()),
        ))
    }

    /// Parse a node description (`name` stands for the file name in messages); time starts now.
    pub fn from_str(text: &str, name: &str) -> Result<Self, BackendError> {
        Ok(Self::new(
            NodeDescription::parse(text, name)?,
            Arc::new(SystemClock::new()),
        ))
    }

    /// Play `desc` on `clock` (e.g. a [`crate::ManualClock`] in tests).
    pub fn new(desc: NodeDescription, clock: Arc<dyn Clock>) -> Self {
        Self {
            desc,
            clock,
            next_event: Mutex::new(0),
        }
    }

    /// The same node on another clock (events not yet returned stay pending).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The node description being played.
    pub fn description(&self) -> &NodeDescription {
        &self.desc
    }

    /// Time since start, as this backend sees it.
    pub fn elapsed(&self) -> Duration {
        self.clock.elapsed()
    }

    fn known(&self, uuid: &str) -> Result<(), BackendError> {
        if self.desc.cards.iter().any(|c| c.uuid == uuid) {
            return Ok(());
        }
        Err(BackendError::UnknownCard {
            uuid: uuid.to_string(),
            known: self
                .desc
                .cards
                .iter()
                .map(|c| c.uuid.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Take every event due at `now_ms`; also returns when the next reportable event is due.
    fn take_due(&self, now_ms: u64) -> (Vec<HealthEvent>, Option<u64>) {
        let mut next = self.next_event.lock().unwrap_or_else(|p| p.into_inner());
        let events = &self.desc.events;
        let mut out = Vec::new();
        while let Some(e) = events.get(*next).filter(|e| e.at_ms <= now_ms) {
            let kind = match e.kind {
                ScriptedEventKind::Xid { code } => Some(HealthEventKind::Xid { code }),
                ScriptedEventKind::DoubleBitEcc => Some(HealthEventKind::DoubleBitEcc),
                ScriptedEventKind::Lost => Some(HealthEventKind::Lost),
                ScriptedEventKind::Recovered => None,
            };
            if let Some(kind) = kind {
                out.push(HealthEvent {
                    uuid: e.card.clone(),
                    kind,
                });
            }
            *next += 1;
        }
        let upcoming = events[*next..]
            .iter()
            .find(|e| e.kind != ScriptedEventKind::Recovered)
            .map(|e| e.at_ms);
        (out, upcoming)
    }
}

impl GpuBackend for SimulatedBackend {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn inventory(&self) -> Result<NodeInventory, BackendError> {
        let now = self.clock.elapsed();
        let mut inv = self.desc.inventory();
        for card in &mut inv.cards {
            card.healthy = !self.desc.lost_at(&card.uuid, now);
        }
        Ok(inv)
    }

    fn wait_events(&self, timeout: Duration) -> Result<Vec<HealthEvent>, BackendError> {
        let deadline = self.clock.elapsed().saturating_add(timeout);
        loop {
            let now = self.clock.elapsed();
            let (due, upcoming) = self.take_due(millis(now));
            if !due.is_empty() || now >= deadline {
                return Ok(due);
            }
            let wake = upcoming
                .map(Duration::from_millis)
                .map_or(deadline, |t| t.min(deadline));
            self.clock
                .sleep(wake.saturating_sub(now).max(Duration::from_millis(1)));
        }
    }

    fn probe(&self, uuid: &str) -> Result<ProbeResult, BackendError> {
        self.known(uuid)?;
        Ok(if self.desc.lost_at(uuid, self.clock.elapsed()) {
            ProbeResult::Lost
        } else {
            ProbeResult::Healthy
        })
    }

    fn processes(&self) -> Result<Vec<ProcessSample>, BackendError> {
        Ok(self.desc.processes_at(self.clock.elapsed()))
    }

    fn card_usage(&self) -> Result<Vec<CardUsage>, BackendError> {
        Ok(self.desc.usage_at(self.clock.elapsed()))
    }
}
