//! Groups concurrent requests of one kind into one database statement.
//!
//! With many agents, most of a single-row statement's cost in Postgres is the statement itself
//! (the round trip, executor start-up, locks on every index of the table, the commit), not its
//! row. A [`Batcher`] runs at most `concurrency` statements of its kind at a time; requests that
//! arrive while they run wait in a queue and go together in the next one, up to `max_batch`. An
//! idle coordinator adds no latency: a lone request starts at once, in a batch of one.
//!
//! A batch is an optimisation, never the authority: the statement answers, per item, whether it
//! did the work, and an item it did not do (a stale lease, a wrong credential, a failed batch)
//! goes through the single-item path, which gives that item its precise answer.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::warn;
use uuid::Uuid;

use crate::{
    error::Result,
    store::{ProgressBySecret, ResultBySecret, Store},
};

/// Progress reports: tiny HOT updates, committed without a flush. Two statements at a time
/// leave Postgres's other connections free for claims and results.
pub(crate) const PROGRESS: BatchConfig = BatchConfig {
    max_batch: 64,
    concurrency: 2,
};

/// Delivered results: an insert into a table with six indexes and a flushed commit, the
/// heaviest statement of a job's life.
pub(crate) const RESULTS: BatchConfig = BatchConfig {
    max_batch: 64,
    concurrency: 2,
};

/// The batched statements of one coordinator.
pub(crate) struct Batches {
    /// Progress reports by agent secret: `Some((lease expiry, sweep))` when applied.
    pub progress: Batcher<ProgressBySecret, Option<(DateTime<Utc>, Uuid)>>,
    /// Results by agent secret: `Some(result id)` when stored.
    pub results: Batcher<ResultBySecret, Option<Uuid>>,
}

impl Batches {
    /// Starts the batchers; `sizes` observes each statement's item count, by statement.
    pub fn start(store: &Store, lease: Duration, sizes: &prometheus::HistogramVec) -> Self {
        Batches {
            progress: statement(
                PROGRESS,
                "progress",
                store,
                sizes,
                move |store, items| async move { store.report_progress_batch(&items, lease).await },
            ),
            results: statement(
                RESULTS,
                "results",
                store,
                sizes,
                |store, items| async move { store.submit_results_batch(&items).await },
            ),
        }
    }
}

/// A batcher over one of the store's batch statements, named `name` in the size metric and in
/// logs. When the statement fails as a whole, every item is answered `None`, so each takes the
/// single path.
fn statement<I, O, F, Fut>(
    config: BatchConfig,
    name: &'static str,
    store: &Store,
    sizes: &prometheus::HistogramVec,
    run: F,
) -> Batcher<I, Option<O>>
where
    I: Send + 'static,
    O: Clone + Send + 'static,
    F: Fn(Store, Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Option<O>>>> + Send + 'static,
{
    let store = store.clone();
    let size = sizes.with_label_values(&[name]);
    Batcher::spawn(config, move |items: Vec<I>| {
        let n = items.len();
        size.observe(n as f64);
        let answers = run(store.clone(), items);
        async move {
            answers.await.unwrap_or_else(|e| {
                warn!(statement = name, error = %e, items = n,
                      "batch statement failed; each item takes the single path");
                vec![None; n]
            })
        }
    })
}

/// How one kind of request is grouped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchConfig {
    /// Most items in one statement.
    pub max_batch: usize,
    /// Most statements of this kind running at once.
    pub concurrency: usize,
}

/// A queue in front of a statement that takes many items. Cloning shares the queue.
pub(crate) struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<(I, oneshot::Sender<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the task that forms batches and hands each to `run`, which must answer every
    /// item, in order. The task ends when every `Batcher` handle is dropped.
    pub fn spawn<F, Fut>(config: BatchConfig, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(form_batches(config, rx, Arc::new(run)));
        Batcher { tx }
    }

    /// Queues `item` and waits for its answer. `None` when the batcher has stopped (the
    /// runtime is shutting down): the caller takes its single-item path.
    pub async fn submit(&self, item: I) -> Option<O> {
        let (answer, answered) = oneshot::channel();
        self.tx.send((item, answer)).ok()?;
        answered.await.ok()
    }
}

/// Takes a slot, then everything queued (up to `max_batch`), and runs it in a task of its own;
/// items arriving meanwhile wait for the next free slot, which is what makes batches form.
async fn form_batches<I, O, F, Fut>(
    config: BatchConfig,
    mut rx: mpsc::UnboundedReceiver<(I, oneshot::Sender<O>)>,
    run: Arc<F>,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<O>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < config.max_batch.max(1) {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let run = run.clone();
        tokio::spawn(async move {
            let (items, answers): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
            let outcomes = run(items).await;
            debug_assert_eq!(outcomes.len(), answers.len(), "a batch answers every item");
            for (answer, outcome) in answers.into_iter().zip(outcomes) {
                // The caller may have given up (its deadline passed); nothing to do then.
                let _ = answer.send(outcome);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_lone_item_runs_at_once_and_concurrent_items_share_statements() {
        let statements = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let (s, g) = (statements.clone(), gate.clone());
        let batcher = Batcher::spawn(
            BatchConfig {
                max_batch: 8,
                concurrency: 1,
            },
            move |items: Vec<u32>| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    // The first statement waits until the test lets it go, so the rest queue.
                    if s.fetch_add(1, Ordering::SeqCst) == 0 {
                        g.notified().await;
                    }
                    items.into_iter().map(|i| i * 10).collect::<Vec<_>>()
                }
            },
        );
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(1).await }
        });
        // Poll with a deadline until the first statement is running.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while statements.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "first batch never ran"
            );
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (2..=20)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i).await })
            })
            .collect();
        // Let every submission reach the queue before the first statement ends.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Some(10));
        for (i, h) in (2..=20).zip(rest) {
            assert_eq!(
                h.await.unwrap(),
                Some(i * 10),
                "each item gets its own answer"
            );
        }
        // 1 alone, then 19 queued items in batches of at most 8: 3 more statements.
        assert_eq!(statements.load(Ordering::SeqCst), 4);
    }
}
