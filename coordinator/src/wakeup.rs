//! Wakes waiting claims when any coordinator on the database queues work, through Postgres
//! `LISTEN`/`NOTIFY`. Notifications can be lost while the database restarts, so waiting claims
//! also re-check on a timer; this only makes the common case fast. The same connection hears
//! other coordinators' sweep changes for watchers (`sweep_events`).

use std::{sync::Arc, time::Duration};

use sqlx::postgres::PgListener;
use tracing::{debug, warn};

use crate::{
    store::JOBS_CHANNEL,
    sweep_events::{parse_payload, SWEEPS_CHANNEL},
    State,
};

pub(crate) async fn listen(state: Arc<State>) {
    loop {
        let mut listener = match PgListener::connect_with(state.store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot listen for job notifications, retrying");
                if wait_or_stop(&state, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen_all([JOBS_CHANNEL, SWEEPS_CHANNEL]).await {
            warn!(error = %e, "cannot listen for job notifications, retrying");
            if wait_or_stop(&state, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                msg = listener.try_recv() => match msg {
                    Ok(Some(n)) if n.channel() == SWEEPS_CHANNEL => {
                        for id in parse_payload(n.payload()) {
                            state.sweep_events.heard(id);
                        }
                    }
                    Ok(Some(_)) => state.wakeup.notify_waiters(),
                    Ok(None) => {
                        // The connection dropped and was re-established: anything sent in
                        // between is lost, so wake everyone to re-check.
                        debug!("job notification connection re-established");
                        state.wakeup.notify_waiters();
                        state.sweep_events.heard(uuid::Uuid::nil());
                    }
                    Err(e) => {
                        warn!(error = %e, "job notifications interrupted");
                        state.wakeup.notify_waiters();
                        state.sweep_events.heard(uuid::Uuid::nil());
                        break;
                    }
                }
            }
        }
        if wait_or_stop(&state, Duration::from_millis(500)).await {
            return;
        }
    }
}

/// Sleeps for `d`; true if shutdown came first.
async fn wait_or_stop(state: &State, d: Duration) -> bool {
    tokio::select! {
        _ = state.shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
