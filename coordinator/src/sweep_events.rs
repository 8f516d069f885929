//! Pushes "this sweep changed" to `WatchSweep` streams, so watchers re-read a sweep only when
//! something in it changed instead of polling the database every few hundred milliseconds each.
//!
//! Changes made by this coordinator reach its watchers at once, in process. Other coordinators
//! hear of them through Postgres `NOTIFY fleetmark_sweeps`, batched: at most one notification
//! per [`PUBLISH_EVERY`] per coordinator, carrying the ids of the sweeps changed meanwhile, so
//! the job transitions themselves never pay for a `NOTIFY` (which serialises committing
//! transactions). Notifications can be lost while the database restarts, so watchers also
//! re-check on a slow timer.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use tokio::sync::broadcast;
use tracing::warn;
use uuid::Uuid;

use crate::State;

/// The Postgres channel coordinators use to tell each other's watchers about changed sweeps.
pub const SWEEPS_CHANNEL: &str = "fleetmark_sweeps";
/// How often changed sweeps are announced to other coordinators.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// A notification's payload must stay under 8000 bytes: 36-character ids, comma-separated.
const IDS_PER_NOTIFY: usize = 200;
/// Undelivered events a slow watcher may fall behind by before it just re-reads its sweep.
const BACKLOG: usize = 4096;

/// Jobs whose sweep is remembered for when they finish; past this the memory starts over
/// (a finish with its sweep forgotten wakes every watcher once, nothing worse).
const REMEMBERED_JOBS: usize = 100_000;

/// Sweep-changed events. `Uuid::nil()` means "any sweep may have changed".
pub(crate) struct SweepEvents {
    local: broadcast::Sender<Uuid>,
    unpublished: Mutex<HashSet<Uuid>>,
    /// The sweep of each job this coordinator handed out or heard progress on, so a result
    /// (which names only its job) wakes the watchers of its own sweep alone.
    sweep_of: Mutex<HashMap<Uuid, Uuid>>,
}

impl SweepEvents {
    pub fn new() -> Self {
        SweepEvents {
            local: broadcast::channel(BACKLOG).0,
            unpublished: Mutex::new(HashSet::new()),
            sweep_of: Mutex::new(HashMap::new()),
        }
    }

    /// `job` belongs to `sweep`, which just changed.
    pub fn job_changed(&self, job: Uuid, sweep: Uuid) {
        {
            let mut m = self.sweep_of.lock().expect("job sweeps");
            if m.len() >= REMEMBERED_JOBS {
                m.clear();
            }
            m.insert(job, sweep);
        }
        self.changed(sweep);
    }

    /// `job` finished (or left this coordinator's hands): its sweep changed.
    pub fn job_finished(&self, job: Option<Uuid>) {
        let sweep = job.and_then(|j| self.sweep_of.lock().expect("job sweeps").remove(&j));
        self.changed(sweep.unwrap_or_else(Uuid::nil));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.local.subscribe()
    }

    /// This coordinator changed `sweep` (or, with `Uuid::nil()`, some sweeps).
    pub fn changed(&self, sweep: Uuid) {
        let _ = self.local.send(sweep);
        self.unpublished
            .lock()
            .expect("unpublished sweep events")
            .insert(sweep);
    }

    /// Another coordinator changed `sweep`: tell this one's watchers only.
    pub fn heard(&self, sweep: Uuid) {
        let _ = self.local.send(sweep);
    }

    fn take_unpublished(&self) -> Vec<Uuid> {
        self.unpublished
            .lock()
            .expect("unpublished sweep events")
            .drain()
            .collect()
    }
}

/// The ids a `fleetmark_sweeps` payload names; anything unreadable means "any sweep".
pub(crate) fn parse_payload(payload: &str) -> Vec<Uuid> {
    let ids: Vec<Uuid> = payload
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if ids.is_empty() {
        vec![Uuid::nil()]
    } else {
        ids
    }
}

/// Announces this coordinator's changed sweeps to the others, batched.
pub(crate) async fn publish(state: std::sync::Arc<State>) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let ids = state.sweep_events.take_unpublished();
        for chunk in ids.chunks(IDS_PER_NOTIFY) {
            let payload = chunk
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(",");
            if let Err(e) = state.store.notify_sweeps(&payload).await {
                // Other coordinators' watchers catch up on their slow re-check.
                warn!(error = %e, "cannot announce changed sweeps");
            }
        }
    }
}
