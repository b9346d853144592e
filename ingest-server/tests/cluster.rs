//! The local ClickHouse cluster of `scripts/stack up --cluster` (issue 13),
//! as the ingest server's cluster mode will use it: `ON CLUSTER` DDL,
//! `ReplicatedMergeTree` tables with the `{shard}`/`{replica}` macros, a
//! `Distributed` table over both shards, and a replica that is SIGKILLed
//! and catches up after its restart. ClickHouse 18.16, as the stack runs.
//!
//! `scripts/test` starts the cluster (`scripts/stack up --cluster`) and
//! runs these one at a time (the nextest group `cluster` in
//! `.config/nextest.toml`: the first test kills a node); by hand:
//!
//! ```sh
//! scripts/stack up --cluster && eval "$(scripts/stack env)"
//! cargo nextest run -p ingest-server --test cluster
//! ```
//!
//! About 23 s for the three, 6 s of it the ingest server's test.
//!
//! It fails when the cluster does not answer (unless skips are allowed, see
//! `test_support::skips_allowed`). It SIGKILLs and restarts the shared
//! cluster's node ch-s2r2: no other test may use the cluster meanwhile.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use telemetry_wire::{Batch, Reading};
use test_support::{Cluster, ClusterNode};

mod harness;

fn client(node: &ClusterNode) -> clickhouse::Client {
    clickhouse::Client::default().with_url(&node.url).with_validation(false)
}

async fn execute(node: &ClusterNode, sql: &str) {
    if let Err(e) = client(node).query(sql).execute().await {
        panic!("on {}: {sql}: {e}", node.name);
    }
}

async fn count(node: &ClusterNode, sql: &str) -> u64 {
    match client(node).query(sql).fetch_one::<u64>().await {
        Ok(n) => n,
        Err(e) => panic!("on {}: {sql}: {e}", node.name),
    }
}

/// Waits until `sql` (a count) answers `want` on `node`.
async fn wait_count(node: &ClusterNode, sql: &str, want: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        // A node that is starting may refuse a query or two: retry them too.
        let got = client(node).query(sql).fetch_one::<u64>().await;
        if matches!(got, Ok(n) if n == want) {
            return;
        }
        assert!(Instant::now() < deadline, "on {} after {within:?}: {sql} = {got:?}, want {want}", node.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A database on every node, dropped (everywhere) at the end of the test
/// unless it failed, to look at.
struct ClusterDb<'a> {
    cluster: &'a Cluster,
    name: String,
}

impl<'a> ClusterDb<'a> {
    async fn create(cluster: &'a Cluster) -> Self {
        let name = test_support::unique_name("cluster");
        execute(&cluster.nodes[0], &format!("CREATE DATABASE {name} ON CLUSTER {}", cluster.name)).await;
        Self { cluster, name }
    }

    async fn remove(self) {
        execute(&self.cluster.nodes[0], &format!("DROP DATABASE {} ON CLUSTER {}", self.name, self.cluster.name)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_tables_a_distributed_table_and_a_killed_replica() {
    let Some(cluster) = test_support::cluster() else { return };
    assert_eq!(cluster.shards(), [1, 2], "the stack's cluster: shard 1 with one replica, shard 2 with two");
    let (s1, s2r1, s2r2) = (cluster.node(1, 1), cluster.node(2, 1), cluster.node(2, 2));
    let within = Duration::from_secs(30);

    // Every node sees the same cluster: 3 hosts, 2 shards.
    for node in &cluster.nodes {
        let sql = format!("SELECT count() FROM system.clusters WHERE cluster = '{}'", cluster.name);
        assert_eq!(count(node, &sql).await, 3, "{}: system.clusters", node.name);
        assert_eq!(
            count(
                node,
                &format!("SELECT count() FROM system.macros WHERE macro = 'shard' AND substitution = '{}'", node.shard)
            )
            .await,
            1
        );
        assert_eq!(
            count(
                node,
                &format!(
                    "SELECT count() FROM system.macros WHERE macro = 'replica' AND substitution = '{}'",
                    node.name
                )
            )
            .await,
            1
        );
    }

    // ON CLUSTER DDL (18.16: `ON CLUSTER` right after the table's name), a
    // replicated table per shard and a Distributed table sharded by key.
    let db = ClusterDb::create(&cluster).await;
    let (name, c) = (&db.name, &cluster.name);
    execute(
        s1,
        &format!(
            "CREATE TABLE {name}.t ON CLUSTER {c} (k UInt64, v String) \
             ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{name}/t', '{{replica}}') ORDER BY k"
        ),
    )
    .await;
    execute(
        s1,
        &format!("CREATE TABLE {name}.t_all ON CLUSTER {c} AS {name}.t ENGINE = Distributed({c}, {name}, t, k)"),
    )
    .await;
    for node in &cluster.nodes {
        let sql = format!("SELECT count() FROM system.tables WHERE database = '{name}'");
        assert_eq!(count(node, &sql).await, 2, "{}: the ON CLUSTER tables", node.name);
    }

    // Replication: a block inserted on s2r1 reaches s2r2, and only shard 2.
    let local = format!("SELECT count() FROM {name}.t");
    execute(s2r1, &format!("INSERT INTO {name}.t SELECT number, 'direct' FROM numbers(100)")).await;
    wait_count(s2r2, &local, 100, within).await;
    assert_eq!(count(s1, &local).await, 0, "shard 1 holds none of shard 2's rows");

    // The Distributed table: 1000 keys, k % 2 chooses the shard (weights
    // 1 and 1): shard 1 gets the even keys, shard 2 the odd ones.
    // insert_distributed_sync: the INSERT returns once every shard has its
    // block (the default queues it on the initiator and sends it later).
    // internal_replication: the block goes to one replica of shard 2, which
    // replicates it; until then a read through the Distributed table may
    // pick the other replica and miss it (no read-your-writes across
    // replicas without insert_quorum).
    let insert = format!("INSERT INTO {name}.t_all SELECT number + 1000, 'distributed' FROM numbers(1000)");
    if let Err(e) = client(s1).query(&insert).with_setting("insert_distributed_sync", "1").execute().await {
        panic!("{insert}: {e}");
    }
    let even = format!("SELECT count() FROM {name}.t WHERE v = 'distributed' AND k % 2 = 0");
    let odd = format!("SELECT count() FROM {name}.t WHERE v = 'distributed' AND k % 2 = 1");
    assert_eq!((count(s1, &even).await, count(s1, &odd).await), (500, 0), "shard 1: the even keys, at once");
    let shard2_now = (count(s2r1, &odd).await, count(s2r2, &odd).await);
    assert!(shard2_now.0 == 500 || shard2_now.1 == 500, "shard 2 (s2r1, s2r2): one replica at once: {shard2_now:?}");
    for replica in [s2r1, s2r2] {
        wait_count(replica, &odd, 500, within).await;
        assert_eq!(count(replica, &even).await, 0, "{}: no key of shard 1", replica.name);
    }
    for node in &cluster.nodes {
        let all = format!("SELECT count() FROM {name}.t_all");
        let once = format!("SELECT uniqExact(k) FROM {name}.t_all");
        assert_eq!(count(node, &all).await, 1100, "{}: every row through the Distributed table", node.name);
        assert_eq!(count(node, &once).await, 1100, "{}: each once", node.name);
    }

    // A replica SIGKILLed while its shard takes inserts catches up after its
    // restart. Its old ZooKeeper session lives on until it expires (6 s,
    // deploy/clickhouse/cluster.xml.in), and 18.16 retries every 10 s.
    cluster.kill(s2r2);
    for i in 0..5 {
        execute(
            s2r1,
            &format!("INSERT INTO {name}.t SELECT number + {}, 'while down' FROM numbers(200)", 10_000 + i * 200),
        )
        .await;
    }
    assert_eq!(count(s2r1, &local).await, 1600);
    let restarted = Instant::now();
    cluster.start(s2r2);
    wait_count(s2r2, &local, 1600, Duration::from_secs(60)).await;
    eprintln!("{} caught up {:.1} s after its restart began", s2r2.name, restarted.elapsed().as_secs_f64());
    // The same rows, not only as many.
    let digest = format!("SELECT sum(cityHash64(k, v)) FROM {name}.t");
    assert_eq!(count(s2r1, &digest).await, count(s2r2, &digest).await, "the replicas hold the same rows");
    // And it takes writes again: a block inserted on it reaches s2r1.
    execute(s2r2, &format!("INSERT INTO {name}.t SELECT number + 20000, 'after' FROM numbers(10)")).await;
    wait_count(s2r1, &local, 1610, within).await;
    assert_eq!(count(s1, &format!("SELECT count() FROM {name}.t_all")).await, 2110);

    db.remove().await;
}

/// `n` readings of `client_id` (seqs `first..first + n`, batches of
/// `per_batch`): reading `seq` has sensor `s{seq % 3}`, time `start_us +
/// seq * 100 ms` and value `seq` plus a per-client offset.
fn client_batches(client_id: &str, epoch: u64, start_us: i64, first: u64, n: u64, per_batch: u64) -> Vec<Batch> {
    let offset = f64::from(client_id.bytes().map(u32::from).sum::<u32>());
    let mut out = Vec::new();
    let mut seq = first;
    while seq < first + n {
        let last = (seq + per_batch - 1).min(first + n - 1);
        let readings = (seq..=last)
            .map(|s| Reading::new(format!("s{}", s % 3), start_us + s as i64 * 100_000, s as f64 + offset))
            .collect();
        out.push(Batch { client_id: client_id.to_owned(), epoch, first_seq: seq, last_seq: last, readings });
        seq = last + 1;
    }
    out
}

/// `sql` (a single `String` or number column) on `node`, as strings.
async fn strings(node: &ClusterNode, sql: &str) -> BTreeSet<String> {
    match client(node).query(sql).fetch_all::<String>().await {
        Ok(rows) => rows.into_iter().collect(),
        Err(e) => panic!("on {}: {sql}: {e}", node.name),
    }
}

/// The ingest server on the cluster (`clickhouse_cluster = "telemetry"`,
/// pointed at its first node): batches of several clients, with
/// redeliveries, overlapping batches and a replay under a new epoch, then
/// a restart that loads the stored ranges through the Distributed table and
/// gets everything again. Checked through the Distributed tables (every
/// reading once, the rollup exact per minute, the API's series) and on each
/// node's local tables (every client on exactly one shard, shard 2's
/// replicas equal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_server_on_the_cluster_stores_each_reading_once_on_its_clients_shard() {
    let Some(cluster) = test_support::cluster() else { return };
    let Some(mut world) = harness::World::new() else { return };
    let started = Instant::now();
    let first = &cluster.nodes[0];
    world.ch_url = first.url.clone();
    let db = world.database.clone();
    let api_port = test_support::free_port();
    let config = ingest_server::Config {
        clickhouse_cluster: cluster.name.clone(),
        cluster_replica_settle_secs: 3,
        http_address: format!("127.0.0.1:{api_port}"),
        ..world.config()
    };

    // Readings of the last few minutes (so that /api/series covers them).
    let now_us =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros()).unwrap();
    let start_us = (now_us / 60_000_000 - 8) * 60_000_000 + 7_000_000;
    let clients: Vec<String> = (0..8).map(|i| format!("cl-{i}")).collect();
    const N: u64 = 2400; // 4 minutes at 10 readings/s
    let server = harness::Server::start(config.clone()).await;
    let agent = harness::Agent::connect(&world).await;
    for c in &clients {
        agent.publish(&client_batches(c, 1, start_us, 0, N, 200)).await;
    }
    // Redeliveries of whole batches, batches overlapping two stored ones,
    // and (client 0 and 1) everything again under a new epoch: identity
    // duplicates that the seq ranges cannot catch.
    for c in &clients[..4] {
        agent.publish(&client_batches(c, 1, start_us, 0, 600, 200)).await;
        agent.publish(&client_batches(c, 1, start_us, 100, 300, 300)).await;
    }
    for c in &clients[..2] {
        agent.publish(&client_batches(c, 2, start_us, 0, N, 500)).await;
    }
    agent.flushed().await;
    for c in &clients {
        let mut want = vec![harness::range(1, 0, N - 1)];
        if c == &clients[0] || c == &clients[1] {
            want.insert(0, harness::range(2, 0, N - 1));
            want.sort_by_key(|r| r.epoch);
        }
        agent.wait_acked(c, &want, Duration::from_secs(60)).await;
    }
    let total = N * clients.len() as u64;
    world.wait_stored(total, Duration::from_secs(60)).await;

    // A restart: the schema again (idempotent ON CLUSTER), the stored ranges
    // loaded through the Distributed table, and every batch once more: all
    // duplicates by their seq ranges, nothing inserted.
    server.stop().await;
    let server = harness::Server::start(config).await;
    for c in &clients {
        agent.publish(&client_batches(c, 1, start_us, 0, N, 200)).await;
    }
    agent.flushed().await;
    harness::wait_for("the replayed batches counted as duplicates", Duration::from_secs(60), || {
        server.metrics.duplicate_readings.get() >= total
    })
    .await;
    assert_eq!(server.metrics.inserted_readings.get(), 0, "a restarted server knows every stored range");

    // Through the Distributed tables: each reading once, the rollup exact.
    assert_eq!(world.distinct_readings().await, total);
    assert_eq!(world.final_readings().await, total);
    world.assert_rollup_exact().await;
    assert_eq!(world.rollup_count().await, total);

    // Every client on exactly one shard, in every table that has clients.
    for table in ["readings", "readings_1m", "rollup_queue", "ingested_ranges"] {
        let sql = format!("SELECT DISTINCT client_id FROM `{db}`.`{table}_local` WHERE client_id != ''");
        let mut shards: Vec<BTreeSet<String>> = Vec::new();
        for shard in cluster.shards() {
            let mut replicas = cluster.replicas(shard);
            let first_replica = replicas.next().expect("a replica");
            let on_shard = strings(first_replica, &sql).await;
            for other in replicas {
                harness::wait_for_async("replicas converge", Duration::from_secs(30), || async {
                    strings(other, &sql).await == on_shard
                })
                .await;
            }
            shards.push(on_shard);
        }
        let all: BTreeSet<String> = clients.iter().cloned().collect();
        assert!(shards.iter().all(|s| !s.is_empty()), "{table}: every shard has clients: {shards:?}");
        assert_eq!(
            shards.iter().map(BTreeSet::len).sum::<usize>(),
            all.len(),
            "{table}: no client on two shards: {shards:?}"
        );
        assert_eq!(shards.into_iter().flatten().collect::<BTreeSet<_>>(), all, "{table}: every client somewhere");
    }
    // Shard 2's replicas hold the same readings and rollup, and the shards
    // together hold each reading once.
    let digest = |table: &str| {
        format!(
            "SELECT concat(toString(count()), ':', toString(sum(cityHash64(client_id, sensor, {key})))) FROM `{db}`.`{table}_local` FINAL",
            key = if table == "readings" { "ts, value" } else { "minute, count, sum" }
        )
    };
    for table in ["readings", "readings_1m"] {
        let sql = digest(table);
        let s2 = strings(cluster.node(2, 1), &sql).await;
        harness::wait_for_async("shard 2's replicas converge", Duration::from_secs(30), || async {
            strings(cluster.node(2, 2), &sql).await == s2
        })
        .await;
    }
    let count_local = format!("SELECT count() FROM `{db}`.`readings_local` FINAL");
    assert_eq!(count(cluster.node(1, 1), &count_local).await + count(cluster.node(2, 2), &count_local).await, total);

    // The API's series: the same counts per client.
    for c in &clients {
        let body = test_support::http::http_get(
            &format!("127.0.0.1:{api_port}"),
            &format!("/api/series?client_id={c}&minutes=30"),
        )
        .await
        .expect("the API answers");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let counted: u64 = answer["series"]
            .as_array()
            .unwrap_or_else(|| panic!("no series: {body}"))
            .iter()
            .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
            .map(|p| p["count"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(counted, N, "{c}: /api/series counts");
    }

    server.stop().await;
    drop(agent);
    execute(first, &format!("DROP DATABASE `{db}` ON CLUSTER {}", cluster.name)).await;
    eprintln!("cluster ingest test took {:.1} s", started.elapsed().as_secs_f64());
}

/// An `agent_status` of an older release in the cluster form (without the
/// columns added since) is upgraded at start: the columns go to the
/// replicated tables `ON CLUSTER`, and the `Distributed` table, which 18.16
/// cannot `ALTER … ON CLUSTER`, is made again with them, on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_status_table_on_the_cluster_gains_the_new_columns_on_every_node() {
    use ingest_server::schema::{self, Tables, ADDED_STATUS_COLUMNS};
    let Some(cluster) = test_support::cluster() else { return };
    let first = &cluster.nodes[0];
    let db = test_support::unique_name("cluster_upgrade");
    let tables = Tables::new(&db).on_cluster(&cluster.name);
    let ch = client(first);
    let (_, flavor) = schema::detect(&ch).await.expect("version");
    schema::ensure(&ch, flavor, &tables, 0).await.expect("the cluster schema");
    // Back to the release before: agent_status without the added columns.
    let on = format!("ON CLUSTER {}", cluster.name);
    execute(first, &format!("DROP TABLE `{db}`.agent_status {on}")).await;
    execute(first, &format!("DROP TABLE `{db}`.agent_status_local {on}")).await;
    let old_columns = "client_id String, ts Int64, outbox_rows UInt64, outbox_bytes UInt64, oldest_age_s Float64, \
                       received_per_s Float64, confirmed_per_s Float64, connected UInt8, received_at DateTime";
    execute(
        first,
        &format!(
            "CREATE TABLE `{db}`.agent_status_local {on} ({old_columns}) ENGINE = \
             ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{db}/agent_status', '{{replica}}', ts) ORDER BY client_id"
        ),
    )
    .await;
    execute(
        first,
        &format!(
            "CREATE TABLE `{db}`.agent_status {on} ({old_columns}) ENGINE = Distributed({c}, {db}, agent_status_local, cityHash64(client_id))",
            c = cluster.name
        ),
    )
    .await;
    // Synchronous: an asynchronous insert would wait in the Distributed
    // table's queue, which dropping the table discards.
    let sync = ch.clone().with_setting("insert_distributed_sync", "1");
    let insert = format!("INSERT INTO `{db}`.agent_status (client_id, ts) VALUES ('old-a', 1), ('old-b', 2)");
    sync.query(&insert).execute().await.expect("old statuses");

    schema::ensure(&ch, flavor, &tables, 0).await.expect("the upgrade");
    schema::ensure(&ch, flavor, &tables, 0).await.expect("and once more: nothing to do");
    for node in &cluster.nodes {
        for table in ["agent_status_local", "agent_status"] {
            let sql = format!("SELECT name FROM system.columns WHERE database = '{db}' AND table = '{table}'");
            let names = strings(node, &sql).await;
            for (name, _) in ADDED_STATUS_COLUMNS {
                assert!(names.contains(name), "{}: {table} lacks {name}: {names:?}", node.name);
            }
        }
    }
    let insert =
        format!("INSERT INTO `{db}`.agent_status (client_id, ts, last_command_id) VALUES ('new-c', 3, 'cmd-1')");
    sync.query(&insert).execute().await.expect("a new status");
    let sql =
        format!("SELECT count() FROM `{db}`.agent_status WHERE last_command_id IS NULL OR last_command_id = 'cmd-1'");
    for node in &cluster.nodes {
        wait_count(node, &sql, 3, Duration::from_secs(30)).await;
    }
    execute(first, &format!("DROP DATABASE `{db}` {on}")).await;
}

/// A minute is folded only from a replica that has its readings. Readings
/// of a client on shard 2 and their marker are written to `ch-s2r2`, as
/// the server's inserts are while `ch-s2r1` is down, and `ch-s2r1` cannot
/// fetch them (`SYSTEM STOP FETCHES`), as a replica that was restarted and
/// is still catching up. `ch-s2r1` is the first replica, the one the
/// server reads from (`load_balancing = 'in_order'`): a pass that read it
/// would fold the minute with no readings and consume the marker, for
/// good (checked: without the replica-delay settings this test fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_is_folded_only_from_a_replica_that_has_its_readings() {
    let Some(cluster) = test_support::cluster() else { return };
    let Some(mut world) = harness::World::new() else { return };
    let first = &cluster.nodes[0];
    world.ch_url = first.url.clone();
    let db = world.database.clone();
    let config = ingest_server::Config {
        clickhouse_cluster: cluster.name.clone(),
        cluster_replica_settle_secs: 3,
        ..world.config()
    };
    let server = harness::Server::start(config.clone()).await;
    let (behind, current) = (cluster.node(2, 1), cluster.node(2, 2));
    // A client the sharding key puts on shard 2 (remainder 1 of 2 shards).
    let mut client_id = String::new();
    for i in 0.. {
        client_id = format!("lag-{i}");
        if count(first, &format!("SELECT toUInt64(cityHash64('{client_id}') % 2)")).await == 1 {
            break;
        }
    }
    execute(behind, &format!("SYSTEM STOP FETCHES `{db}`.readings_local")).await;

    // 90 readings of a minute five minutes ago, and their marker, on the
    // replica that is up to date.
    const N: u64 = 90;
    let now_s =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap();
    let minute = (now_s / 60 - 5) * 60;
    let rows: Vec<String> = (0..N)
        .map(|i| {
            format!("('{client_id}', 't', {}, {i}, 1, {i})", minute * 1_000_000 + i64::try_from(i).unwrap() * 600_000)
        })
        .collect();
    execute(
        current,
        &format!(
            "INSERT INTO `{db}`.readings_local (client_id, sensor, ts, value, epoch, seq) VALUES {}",
            rows.join(", ")
        ),
    )
    .await;
    execute(
        current,
        &format!(
            "INSERT INTO `{db}`.rollup_queue_local (client_id, minute, token, owner, pending) \
             VALUES ('{client_id}', toDateTime({minute}), 42, '{owner}', 1)",
            owner = config.mqtt_client_id
        ),
    )
    .await;

    // The server's pass consumes the marker (it reached both replicas; only
    // the readings are held back) ...
    let pending = format!("SELECT toUInt64(greatest(sum(pending), 0)) FROM `{db}`.rollup_queue WHERE token = 42");
    wait_count(first, &format!("SELECT count() FROM `{db}`.rollup_queue WHERE token = 42"), 1, Duration::from_secs(30))
        .await;
    wait_count(first, &pending, 0, Duration::from_secs(60)).await;
    // ... having folded the minute from `ch-s2r2`, the only replica with
    // its readings (the rollup row is written through the first replica).
    let folded = format!("SELECT sum(count) FROM `{db}`.readings_1m_local FINAL WHERE client_id = '{client_id}'");
    let raw = format!("SELECT count() FROM `{db}`.readings_local WHERE client_id = '{client_id}'");
    let (folded_behind, raw_behind) = (count(behind, &folded).await, count(behind, &raw).await);
    execute(behind, &format!("SYSTEM START FETCHES `{db}`.readings_local")).await;
    assert_eq!(raw_behind, 0, "ch-s2r1 was behind while the pass ran");
    assert_eq!(folded_behind, N, "the minute is folded with all its readings");
    wait_count(behind, &raw, N, Duration::from_secs(30)).await;
    wait_count(current, &folded, N, Duration::from_secs(30)).await;

    server.stop().await;
    execute(first, &format!("DROP DATABASE `{db}` ON CLUSTER {}", cluster.name)).await;
}
