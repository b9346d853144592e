//! The cluster scenarios' side of the shared ClickHouse cluster of
//! `scripts/stack up --cluster` (issue 13): its faults through
//! `scripts/stack kill|stop|start <node|zookeeper>`, its restoration after
//! every cluster scenario, the choice of a client id on the shard with two
//! replicas, and the replicas' convergence, read from each replica's local
//! table.
//!
//! The cluster is shared (one per stack) and has no private instances: the
//! suite runs scenarios one at a time, and each cluster scenario leaves the
//! cluster running and answering, even when it failed.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use test_support::{Cluster, ClusterNode};

/// The cluster of the environment, if ZooKeeper and every node answer;
/// otherwise why not, with what to run.
///
/// # Errors
/// The cluster is not up (or the environment describes none).
pub fn require() -> Result<Cluster> {
    let cluster = Cluster::from_env().map_err(|e| anyhow::anyhow!("TELEMETRY_CH_CLUSTER_*: {e}"))?;
    if let Some(why) = cluster.not_answering() {
        bail!("the ClickHouse cluster is not up: {why}; run `scripts/stack up --cluster` (scripts/chaos and scripts/test do)");
    }
    Ok(cluster)
}

/// Runs `scripts/stack <command> <service>` (blocking) in this environment
/// (the same `TELEMETRY_STACK_DIR` and ports as the suite's).
///
/// # Errors
/// The script fails (its stderr).
pub fn stack(command: &str, service: &str) -> Result<()> {
    let script = test_support::repo_root().join("scripts/stack");
    let out = Command::new(&script)
        .arg(command)
        .arg(service)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("scripts/stack {command} {service} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Starts whatever of the cluster is not running (`scripts/stack start
/// cluster`: ZooKeeper first, running services left alone) and checks that
/// all of it answers. Blocking.
///
/// # Errors
/// It cannot be started, or a part of it does not answer.
pub fn restore(cluster: &Cluster) -> Result<()> {
    stack("start", "cluster")?;
    if let Some(why) = cluster.not_answering() {
        bail!("the cluster was not restored: {why}");
    }
    Ok(())
}

/// A client on `node`'s HTTP interface (its local tables, or through it the
/// `Distributed` ones).
#[must_use]
pub fn client(node: &ClusterNode) -> clickhouse::Client {
    clickhouse::Client::default().with_url(&node.url).with_validation(false)
}

/// The first of `chaos-1`, `chaos-2`, ... that the `Distributed` tables
/// (sharding key `cityHash64(client_id)`, shards of weight 1 in order) put
/// on `shard`, computed by ClickHouse itself.
///
/// # Errors
/// The node does not answer, or no candidate lands there.
pub async fn client_on_shard(ch: &clickhouse::Client, shards: u32, shard: u32) -> Result<String> {
    let remainder = shard - 1;
    let name: String = ch
        .query(&format!(
            "SELECT concat('chaos-', toString(number)) AS c FROM numbers(1, 100) \
             WHERE cityHash64(c) % {shards} = {remainder} ORDER BY number LIMIT 1"
        ))
        .fetch_one()
        .await
        .with_context(|| format!("find a client id on shard {shard}"))?;
    Ok(name)
}

/// Count and digest of a set of reading identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
struct Identities {
    count: u64,
    digest: u64,
}

/// The distinct reading identities in `node`'s local `readings_local`, or
/// why they could not be read.
async fn identities(node: &ClusterNode, db: &str) -> Result<Identities> {
    client(node)
        .query(&format!(
            "SELECT count() AS count, sum(cityHash64(client_id, sensor, ts)) AS digest FROM \
             (SELECT DISTINCT client_id, sensor, ts FROM {db}.readings_local)"
        ))
        .fetch_one()
        .await
        .with_context(|| format!("read {db}.readings_local on {}", node.name))
}

/// Waits (up to `within`) until every replica of every shard holds the same
/// distinct identities in its local `readings_local` (count and digest),
/// and the shards together hold `want`. The note says what each replica
/// held; the problem, if any, why it failed.
pub async fn converge(cluster: &Cluster, db: &str, want: u64, within: Duration) -> (String, Option<String>) {
    let started = Instant::now();
    let deadline = started + within;
    loop {
        let mut held = Vec::new();
        let mut problem = None;
        let mut total = 0;
        for shard in cluster.shards() {
            let mut first = None;
            for node in cluster.replicas(shard) {
                match identities(node, db).await {
                    Ok(ids) => {
                        held.push(format!("{} {}", node.name, ids.count));
                        match first {
                            None => {
                                first = Some(ids);
                                total += ids.count;
                            }
                            Some(f) if f != ids => {
                                problem = problem.or_else(|| {
                                    Some(format!(
                                        "shard {shard}'s replicas differ ({} vs {} identities)",
                                        f.count, ids.count
                                    ))
                                });
                            }
                            Some(_) => {}
                        }
                    }
                    Err(e) => {
                        held.push(format!("{} ?", node.name));
                        problem = problem.or_else(|| Some(format!("{e:#}")));
                    }
                }
            }
        }
        if problem.is_none() && total < want {
            problem = Some(format!("the shards hold {total} distinct identities, {want} acked"));
        }
        let note = format!(
            "replicas' local readings (distinct identities): {}{}",
            held.join(", "),
            if problem.is_none() {
                format!(", converged {:.1} s after recovery", started.elapsed().as_secs_f64())
            } else {
                String::new()
            }
        );
        if problem.is_none() || Instant::now() > deadline {
            return (note, problem.map(|p| format!("the replicas did not converge within {within:?}: {p}")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
