//! The local ClickHouse cluster of `scripts/stack up --cluster`: ZooKeeper
//! and three ClickHouse 18.16 nodes, shard 1 with one replica and shard 2
//! with two, in the cluster `telemetry` (`remote_servers`, with
//! `internal_replication`). Reached through the variables `scripts/stack env`
//! prints after `up --cluster` (defaults equal to the stack's defaults).
//!
//! A test that needs the cluster **fails** when it does not answer, like any
//! other missing service (unless [`crate::skips_allowed`]).

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::{repo_root, require};

/// One ClickHouse node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its `scripts/stack` service name, `ch-s<shard>r<replica>` (also its
    /// `{replica}` macro).
    pub name: String,
    /// Its shard number (the `{shard}` macro), from 1.
    pub shard: u32,
    /// Its replica number within the shard, from 1.
    pub replica: u32,
    /// Its HTTP URL.
    pub url: String,
}

impl ClusterNode {
    fn http_addr(&self) -> Option<SocketAddr> {
        let port = self.url.rsplit_once(':')?.1.trim_end_matches('/').parse().ok()?;
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

/// The cluster as described by the environment (or the stack's defaults).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Its name in `remote_servers` (for `ON CLUSTER` and `Distributed`).
    pub name: String,
    /// Its nodes, in `TELEMETRY_CH_CLUSTER_NODES` order (shard by shard,
    /// replicas in order).
    pub nodes: Vec<ClusterNode>,
    /// ZooKeeper's `host:port`.
    pub zk_addr: String,
}

/// `ch-s2r1` -> (2, 1).
fn parse_node_name(name: &str) -> Option<(u32, u32)> {
    let (shard, replica) = name.strip_prefix("ch-s")?.split_once('r')?;
    Some((shard.parse().ok()?, replica.parse().ok()?))
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Cluster {
    /// The cluster of `TELEMETRY_CH_CLUSTER`, `TELEMETRY_CH_CLUSTER_NODES`,
    /// `TELEMETRY_CH_CLUSTER_URLS` and `TELEMETRY_ZK_ADDR`; without them,
    /// the stack's defaults (ports from `TELEMETRY_CH_CLUSTER_BASE_PORT`,
    /// default 28130, and `TELEMETRY_ZK_PORT`, default 22181).
    ///
    /// # Errors
    /// The variables do not describe a cluster (malformed names, lists of
    /// different lengths).
    pub fn from_env() -> Result<Self, String> {
        let names: Vec<String> = var("TELEMETRY_CH_CLUSTER_NODES")
            .unwrap_or_else(|| "ch-s1r1,ch-s2r1,ch-s2r2".to_owned())
            .split(',')
            .map(str::to_owned)
            .collect();
        let urls: Vec<String> = match var("TELEMETRY_CH_CLUSTER_URLS") {
            Some(urls) => urls.split(',').map(str::to_owned).collect(),
            None => {
                let base: u16 = var("TELEMETRY_CH_CLUSTER_BASE_PORT").and_then(|v| v.parse().ok()).unwrap_or(28130);
                (1..=names.len()).map(|n| format!("http://127.0.0.1:{}", usize::from(base) + n)).collect()
            }
        };
        if urls.len() != names.len() {
            return Err(format!("{} cluster node names but {} URLs", names.len(), urls.len()));
        }
        let nodes = names
            .into_iter()
            .zip(urls)
            .map(|(name, url)| {
                let (shard, replica) = parse_node_name(&name)
                    .ok_or_else(|| format!("cluster node name {name:?} is not ch-s<shard>r<replica>"))?;
                Ok(ClusterNode { name, shard, replica, url })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let zk_addr = var("TELEMETRY_ZK_ADDR").unwrap_or_else(|| {
            format!("127.0.0.1:{}", var("TELEMETRY_ZK_PORT").and_then(|v| v.parse::<u16>().ok()).unwrap_or(22181))
        });
        Ok(Self { name: var("TELEMETRY_CH_CLUSTER").unwrap_or_else(|| "telemetry".to_owned()), nodes, zk_addr })
    }

    /// Why the cluster does not answer (the first node or ZooKeeper that
    /// refuses TCP connections), or `None` if all do.
    #[must_use]
    pub fn not_answering(&self) -> Option<String> {
        let answers = |addr: SocketAddr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok();
        match self.zk_addr.parse::<SocketAddr>() {
            Ok(addr) if answers(addr) => {}
            _ => return Some(format!("ZooKeeper does not answer on {}", self.zk_addr)),
        }
        self.nodes.iter().find_map(|node| match node.http_addr() {
            Some(addr) if answers(addr) => None,
            _ => Some(format!("cluster node {} does not answer on {}", node.name, node.url)),
        })
    }

    /// The node of `shard` and `replica` (both from 1).
    ///
    /// # Panics
    /// When the cluster has no such node.
    #[must_use]
    pub fn node(&self, shard: u32, replica: u32) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.shard == shard && n.replica == replica)
            .unwrap_or_else(|| panic!("the cluster has no shard {shard} replica {replica}"))
    }

    /// The shard numbers, ascending.
    #[must_use]
    pub fn shards(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = self.nodes.iter().map(|n| n.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// The nodes of `shard`.
    pub fn replicas(&self, shard: u32) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(move |n| n.shard == shard)
    }

    /// SIGKILLs `node` (`scripts/stack kill`): a crash, its ZooKeeper
    /// session left to expire.
    pub fn kill(&self, node: &ClusterNode) {
        stack_command("kill", &node.name);
    }

    /// Starts `node` again on its data and waits until it answers
    /// (`scripts/stack start`).
    pub fn start(&self, node: &ClusterNode) {
        stack_command("start", &node.name);
    }
}

/// Runs `scripts/stack <command> <service>` in this environment (the same
/// `TELEMETRY_STACK_DIR` and ports as the test's).
fn stack_command(command: &str, service: &str) {
    let out =
        Command::new(repo_root().join("scripts/stack")).arg(command).arg(service).output().expect("run scripts/stack");
    assert!(out.status.success(), "scripts/stack {command} {service} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The cluster, if ZooKeeper and every node answer. Otherwise a failure, or
/// with [`crate::skips_allowed`] `None` and a message (the test skips,
/// visibly).
///
/// # Panics
/// When the cluster does not answer and skips are not allowed, or the
/// environment describes no cluster.
#[must_use]
pub fn cluster() -> Option<Cluster> {
    let cluster = Cluster::from_env().unwrap_or_else(|e| panic!("TELEMETRY_CH_CLUSTER_*: {e}"));
    match cluster.not_answering() {
        None => Some(cluster),
        Some(why) => {
            let what = format!("the ClickHouse cluster is not up: {why}; run `scripts/stack up --cluster`");
            require(false, &what).then_some(cluster)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_node_name;

    #[test]
    fn node_names_carry_shard_and_replica() {
        assert_eq!(parse_node_name("ch-s1r1"), Some((1, 1)));
        assert_eq!(parse_node_name("ch-s2r2"), Some((2, 2)));
        assert_eq!(parse_node_name("ch-s12r3"), Some((12, 3)));
        assert_eq!(parse_node_name("clickhouse"), None);
        assert_eq!(parse_node_name("ch-s1"), None);
    }
}
