//! What one claim costs as the queue grows, and what pending jobs no agent can run cost a claim.
//! Real Postgres, the store's own claim statement; each claim is handed straight back so the
//! queue stays the same size while it is measured.
//!
//!     cargo bench -p fleetmark-coordinator --bench claim_cost
//!
//! Prints a Markdown table: pending jobs (claimable by the agent / for a GPU kind no agent
//! has) and the mean and p99 time of claim + hand-back, from the client's clock.

use std::time::{Duration, Instant};

use fleetmark_coordinator::{
    store::{AgentDevice, AgentRegistration},
    Store,
};
use fleetmark_core::{HostInventory, SweepSpec};
use fleetmark_testkit::TestDb;
use uuid::Uuid;

const CLAIMS: usize = 300;
const LEASE: Duration = Duration::from_secs(60);

async fn queue(store: &Store, target: &str, n: usize) {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(10_000);
        let toml = format!(
            "batch_sizes = [1,2,3,4,5,6,7,8,9,10]\nprecisions = [\"f32\"]\ngpus = [\"{target}\"]\n\
             repetitions = {}\n",
            chunk / 10
        );
        store
            .create_sweep(&SweepSpec::from_toml(&toml).unwrap(), "")
            .await
            .unwrap();
        left -= chunk;
    }
}

async fn measure(store: &Store, agent: Uuid) -> (f64, f64) {
    let mut ms = Vec::with_capacity(CLAIMS);
    for _ in 0..CLAIMS {
        let t = Instant::now();
        let job = store
            .claim_job(agent, "cpu", "cpu", LEASE)
            .await
            .unwrap()
            .expect("a claimable job");
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        store
            .hand_back(agent, job.id, job.attempt, "bench")
            .await
            .unwrap();
        // The bound on hand-backs is not what is measured here.
        sqlx::query("UPDATE jobs SET handbacks = 0 WHERE id = $1 AND state = 'pending'")
            .bind(job.id)
            .execute(store.pool())
            .await
            .ok();
    }
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    (mean, ms[ms.len() * 99 / 100])
}

#[tokio::main]
async fn main() {
    println!("| claimable pending | unmatched pending (h100) | claim mean ms | claim p99 ms |");
    println!("|---:|---:|---:|---:|");
    for (claimable, unmatched) in [(1_000, 0), (10_000, 0), (100_000, 0), (1_000, 200_000)] {
        let db = TestDb::new().await;
        let store = Store::connect(&db.url, 4).await.unwrap();
        store.migrate().await.unwrap();
        let agent = store
            .register_agent(&AgentRegistration {
                name: "bench".into(),
                labels: Default::default(),
                price_per_hour: None,
                inventory: HostInventory::default(),
                devices: vec![AgentDevice {
                    device: "cpu".into(),
                    kind: "cpu".into(),
                    name: "bench cpu".into(),
                    precisions: None,
                    health: None,
                }],
            })
            .await
            .unwrap();
        queue(&store, "h100", unmatched).await;
        queue(&store, "any", claimable).await;
        sqlx::query("ANALYZE jobs")
            .execute(store.pool())
            .await
            .unwrap();
        let (mean, p99) = measure(&store, agent).await;
        println!("| {claimable} | {unmatched} | {mean:.2} | {p99:.2} |");
    }
}
