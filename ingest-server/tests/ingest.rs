//! Integration tests against the real Mosquitto and ClickHouse of
//! `scripts/stack` (a test fails when a service does not answer).

mod harness;

use std::time::Duration;

use harness::{batch, batches, range, Agent, Server, World};
use telemetry_wire::{Batch, Reading};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_stores_each_reading_once_and_acks_exact_ranges() {
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert_eq!(server.metrics.last_insert_timestamp_seconds.get(), 0.0, "no insert yet");
    let before = unix_now();

    let mut all = batches("dev-a", 7, 1, 1000, 200);
    all.extend(batches("dev-b", 9, 101, 500, 100));
    agent.publish(&all).await;
    agent.flushed().await;

    world.wait_stored(1500, Duration::from_secs(30)).await;
    assert_eq!(world.count("SELECT count() FROM DB.readings").await, 1500, "no raw duplicates either");
    world.assert_rollup_exact().await;
    agent.wait_acked("dev-a", &[range(7, 1, 1000)], Duration::from_secs(10)).await;
    agent.wait_acked("dev-b", &[range(9, 101, 600)], Duration::from_secs(10)).await;

    let m = &server.metrics;
    assert_eq!(m.received_readings.get(), 1500);
    assert_eq!(m.inserted_readings.get(), 1500);
    assert_eq!(m.duplicate_readings.get(), 0);
    assert_eq!(m.dead_letters_total(), 0);
    assert!(m.rollup_minutes.get() > 0);
    assert_eq!(m.rollup_duplicate_minutes.get(), 0, "no copies: every minute folded without FINAL");
    harness::wait_for("all acked", Duration::from_secs(10), || m.unacked_messages.get() == 0).await;
    assert_eq!(m.acked_messages.get(), all.len() as u64);
    assert!(m.render().contains("telemetry_ingest_inserted_readings_total 1500"));
    let last = m.last_insert_timestamp_seconds.get();
    assert!((before..=unix_now()).contains(&last), "last insert at {last}, run began at {before}");
    assert!(m.render().contains("telemetry_ingest_last_insert_timestamp_seconds "));
    // Epoch and seq are kept with each reading.
    assert_eq!(
        world
            .count(
                "SELECT count() FROM DB.readings WHERE client_id = 'dev-a' AND seq = 500 AND epoch = 7 AND value = 500"
            )
            .await,
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_recut_batches_are_not_stored_twice() {
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;

    let first = batches("dev-r", 1, 1, 400, 200);
    agent.publish(&first).await;
    agent.flushed().await;
    world.wait_stored(400, Duration::from_secs(30)).await;

    // The same batches again (a replay), and a re-cut batch overlapping both
    // and reaching 50 seqs further.
    agent.publish(&first).await;
    agent.publish(&[batch("dev-r", 1, 150, 450)]).await;
    agent.flushed().await;
    let m = &server.metrics;
    harness::wait_for("duplicates counted", Duration::from_secs(30), || m.duplicate_readings.get() == 400 + 251).await;
    world.wait_stored(450, Duration::from_secs(30)).await;
    assert_eq!(world.count("SELECT count() FROM DB.readings").await, 450, "duplicates never reached the raw table");
    assert_eq!(m.duplicate_messages.get(), 2);
    assert_eq!(m.inserted_readings.get(), 450);
    world.assert_rollup_exact().await;
    agent.wait_acked("dev-r", &[range(1, 1, 450)], Duration::from_secs(10)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_arriving_after_a_later_one_is_stored() {
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;

    agent.publish(&[batch("dev-o", 3, 201, 400)]).await;
    agent.flushed().await;
    world.wait_stored(200, Duration::from_secs(30)).await;
    agent.publish(&[batch("dev-o", 3, 1, 200)]).await;
    agent.flushed().await;
    world.wait_stored(400, Duration::from_secs(30)).await;
    agent.wait_acked("dev-o", &[range(3, 1, 400)], Duration::from_secs(10)).await;
    assert_eq!(server.metrics.duplicate_readings.get(), 0);
    world.assert_rollup_exact().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_dead_lettered_and_ingest_continues() {
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;
    let topic = format!("{}/client/dev-m", world.prefix);

    harness::mosquitto_pub(&world, &topic, &["-m", "garbage"]);
    harness::mosquitto_pub(&world, &topic, &["-n"]);
    let dir = std::env::temp_dir().join(test_support::unique_name("payloads"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let truncated = dir.join("truncated");
    std::fs::write(&truncated, &batch("dev-m", 1, 1, 10).encode()[..40]).expect("write payload");
    harness::mosquitto_pub(&world, &topic, &["-f", truncated.to_str().expect("utf-8 path")]);
    let mismatch = dir.join("mismatch");
    std::fs::write(&mismatch, batch("someone-else", 1, 1, 10).encode()).expect("write payload");
    harness::mosquitto_pub(&world, &topic, &["-f", mismatch.to_str().expect("utf-8 path")]);
    harness::mosquitto_pub(&world, &format!("{}/status/dev-m", world.prefix), &["-m", "{not json"]);
    let _ = std::fs::remove_dir_all(&dir);

    // Good data after the bad keeps flowing.
    agent.publish(&batches("dev-m", 1, 1, 300, 100)).await;
    agent.flushed().await;
    world.wait_stored(300, Duration::from_secs(30)).await;

    let m = &server.metrics;
    harness::wait_for("dead letters counted", Duration::from_secs(10), || m.dead_letters_total() == 5).await;
    assert_eq!(world.count("SELECT count() FROM DB.ingest_errors").await, 5);
    for reason in ["unknown_version", "empty", "truncated", "client_id_mismatch", "bad_status"] {
        let n = world.count(&format!("SELECT count() FROM DB.ingest_errors WHERE reason = '{reason}'")).await;
        assert_eq!(n, 1, "dead letters with reason {reason}");
        assert_eq!(m.dead_letters.get_or_create(&ingest_server::metrics::reason(reason)).get(), 1, "{reason}");
    }
    assert_eq!(
        world
            .count("SELECT count() FROM DB.ingest_errors WHERE payload = 'garbage' AND topic LIKE '%/client/dev-m'")
            .await,
        1,
        "raw bytes and topic are kept"
    );
    // Dead letters are PUBACKed too: nothing stays unacked.
    harness::wait_for("all acked", Duration::from_secs(10), || m.unacked_messages.get() == 0).await;
    agent.wait_acked("dev-m", &[range(1, 1, 300)], Duration::from_secs(10)).await;
    server.stop().await;
}

/// An `agent_status` row with the fields an agent may leave out.
#[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
struct StoredStatus {
    client_id: String,
    outbox_rows: u64,
    connected: u8,
    drain_per_s: Option<f64>,
    drain_eta_s: Option<f64>,
    bytes_per_reading: Option<f64>,
    ingest_present: Option<u8>,
    echo_held_batches: Option<u64>,
    echo_ahead_readings: Option<u64>,
    last_command_id: Option<String>,
    last_command_name: Option<String>,
    last_command_ok: Option<u8>,
    last_command_ts_ms: Option<i64>,
    last_command_summary: Option<String>,
}

impl StoredStatus {
    /// What an agent status without the optional fields is stored as.
    fn old(client_id: &str, outbox_rows: u64, connected: u8) -> Self {
        Self {
            client_id: client_id.into(),
            outbox_rows,
            connected,
            drain_per_s: None,
            drain_eta_s: None,
            bytes_per_reading: None,
            ingest_present: None,
            echo_held_batches: None,
            echo_ahead_readings: None,
            last_command_id: None,
            last_command_name: None,
            last_command_ok: None,
            last_command_ts_ms: None,
            last_command_summary: None,
        }
    }

    /// What [`echo_status`] is stored as.
    fn echo(client_id: &str) -> Self {
        let last = last_command();
        Self {
            client_id: client_id.into(),
            outbox_rows: 42,
            connected: 1,
            drain_per_s: Some(12.5),
            drain_eta_s: Some(3.36),
            bytes_per_reading: Some(9.75),
            ingest_present: Some(0),
            echo_held_batches: Some(3),
            echo_ahead_readings: Some(6000),
            last_command_id: Some(last.id),
            last_command_name: Some(last.name),
            last_command_ok: Some(0),
            last_command_ts_ms: Some(last.ts_ms),
            last_command_summary: Some(last.summary),
        }
    }

    /// The latest row per agent.
    async fn all(world: &World) -> Vec<Self> {
        let sql = format!(
            "SELECT client_id, outbox_rows, connected, drain_per_s, drain_eta_s, bytes_per_reading, ingest_present,
                    echo_held_batches, echo_ahead_readings, last_command_id, last_command_name, last_command_ok,
                    last_command_ts_ms, last_command_summary
             FROM `{}`.agent_status FINAL ORDER BY client_id",
            world.database
        );
        world.ch().query(&sql).fetch_all().await.expect("read agent_status")
    }
}

/// A status of a current agent in echo mode, with every optional field.
fn echo_status(client_id: &str) -> telemetry_wire::AgentStatus {
    telemetry_wire::AgentStatus {
        version: telemetry_wire::status::STATUS_VERSION,
        client_id: client_id.into(),
        ts: harness::BASE_TS,
        outbox_rows: 42,
        outbox_bytes: 4200,
        oldest_age_s: 1.5,
        received_per_s: 100.0,
        confirmed_per_s: 99.0,
        connected: true,
        drain_per_s: Some(12.5),
        drain_eta_s: Some(3.36),
        bytes_per_reading: Some(9.75),
        ingest_present: Some(false),
        echo_held_batches: Some(3),
        echo_ahead_readings: Some(6000),
        last_command: Some(last_command()),
    }
}

/// The last command in [`echo_status`]: one that failed, with markup in its
/// summary (stored as sent; the dashboard shows it as text).
fn last_command() -> telemetry_wire::LastCommand {
    telemetry_wire::LastCommand {
        id: "cmd-7".into(),
        name: "set_log_level".into(),
        ok: false,
        ts_ms: 1_700_000_000_123,
        summary: "bad_arguments: level <img src=x onerror=alert(1)>".into(),
    }
}

/// Publishes `json` as `client_id`'s retained status.
fn publish_status(world: &World, client_id: &str, json: &str) {
    harness::mosquitto_pub(world, &format!("{}/status/{client_id}", world.prefix), &["-r", "-m", json]);
}

/// Clears `client_id`'s retained status so the broker does not keep it.
fn clear_status(world: &World, client_id: &str) {
    harness::mosquitto_pub(world, &format!("{}/status/{client_id}", world.prefix), &["-r", "-n"]);
}

/// Waits until `agent_status` holds exactly `want` (latest row per agent).
async fn wait_statuses(world: &World, want: &[StoredStatus]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored = StoredStatus::all(world).await;
        if stored == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "statuses stored: {stored:#?}, want {want:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_messages_are_stored() {
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    // A current agent in echo mode sends every field; an older agent (its
    // JSON as such an agent wrote it) none of the optional ones: NULL.
    publish_status(&world, "dev-s", &String::from_utf8(echo_status("dev-s").encode()).expect("json is utf-8"));
    let old = r#"{"version":1,"client_id":"dev-o","ts":1700000000000000,"outbox_rows":7,"outbox_bytes":336,
        "oldest_age_s":0.8,"received_per_s":10.0,"confirmed_per_s":9.0,"connected":false}"#;
    publish_status(&world, "dev-o", old);
    // A command that succeeded, with a summary longer than is stored.
    let mut long = echo_status("dev-t");
    long.last_command = Some(telemetry_wire::LastCommand {
        id: "cmd-8".into(),
        name: "flush".into(),
        ok: true,
        ts_ms: 1_700_000_000_456,
        summary: "é".repeat(300),
    });
    publish_status(&world, "dev-t", &String::from_utf8(long.encode()).expect("json is utf-8"));
    let clipped = StoredStatus {
        client_id: "dev-t".into(),
        last_command_id: Some("cmd-8".into()),
        last_command_name: Some("flush".into()),
        last_command_ok: Some(1),
        last_command_ts_ms: Some(1_700_000_000_456),
        last_command_summary: Some("é".repeat(ingest_server::writer::LAST_COMMAND_TEXT_MAX)),
        ..StoredStatus::echo("dev-t")
    };
    wait_statuses(&world, &[StoredStatus::old("dev-o", 7, 0), StoredStatus::echo("dev-s"), clipped]).await;
    assert_eq!(server.metrics.dead_letters_total(), 0);
    clear_status(&world, "dev-s");
    clear_status(&world, "dev-o");
    clear_status(&world, "dev-t");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_table_from_an_older_release_gains_the_new_columns_at_start() {
    use ingest_server::schema::{self, Flavor, Tables, ADDED_STATUS_COLUMNS};
    let Some(world) = World::new() else { return };
    let ch = world.ch();
    let db = &world.database;
    // The table as the release before created it, with a row of that time.
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS `{db}`")).execute().await.expect("create database");
    ch.query(&format!(
        "CREATE TABLE `{db}`.agent_status (client_id String, ts Int64, outbox_rows UInt64, outbox_bytes UInt64,
         oldest_age_s Float64, received_per_s Float64, confirmed_per_s Float64, connected UInt8, received_at DateTime)
         ENGINE = ReplacingMergeTree(ts) ORDER BY client_id"
    ))
    .execute()
    .await
    .expect("the old table");
    ch.query(&format!("INSERT INTO `{db}`.agent_status VALUES ('dev-before', 1, 5, 240, 2.0, 1.0, 1.0, 1, now())"))
        .execute()
        .await
        .expect("an old row");
    // Two servers' schema steps at once, as when servers are upgraded
    // together: both succeed, whichever adds the columns.
    let client = ingest_server::store::client(&world.config());
    let (_, flavor) = schema::detect(&client).await.expect("version");
    assert_eq!(flavor, Flavor::Legacy, "the stack runs 18.16, which has no ADD COLUMN IF NOT EXISTS");
    let tables = Tables::new(db);
    let (a, b) = tokio::join!(schema::ensure(&client, flavor, &tables, 0), schema::ensure(&client, flavor, &tables, 0));
    a.expect("first schema step");
    b.expect("second schema step");
    let columns: Vec<(String, String)> = ch
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = 'agent_status'")
        .bind(db.as_str())
        .fetch_all()
        .await
        .expect("columns");
    for (name, ty) in ADDED_STATUS_COLUMNS {
        assert!(columns.contains(&(name.to_owned(), ty.to_owned())), "{name} {ty} added: {columns:?}");
    }
    assert_eq!(columns.len(), 9 + ADDED_STATUS_COLUMNS.len(), "{columns:?}");
    // The old row reads as "not sent"; a server (a third start: nothing to
    // add) stores a current agent's fields beside it.
    wait_statuses(&world, &[StoredStatus::old("dev-before", 5, 1)]).await;
    let server = Server::start(world.config()).await;
    publish_status(&world, "dev-new", &String::from_utf8(echo_status("dev-new").encode()).expect("json is utf-8"));
    wait_statuses(&world, &[StoredStatus::old("dev-before", 5, 1), StoredStatus::echo("dev-new")]).await;
    clear_status(&world, "dev-new");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_loses_nothing_and_counts_retries() {
    let Some(world) = World::new() else { return };
    let clickhouse = test_support::PrivateService::start(test_support::Service::ClickHouse);
    let world = World { ch_url: clickhouse.http_url(), ..world };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;

    let all = batches("dev-c", 5, 1, 2000, 100);
    agent.publish(&all[..10]).await;
    agent.flushed().await;
    world.wait_stored(1000, Duration::from_secs(30)).await;
    let m = &server.metrics;
    harness::wait_for("first half acked", Duration::from_secs(10), || m.acked_messages.get() == 10).await;

    clickhouse.stop();
    for chunk in all[10..].chunks(2) {
        agent.publish(chunk).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.flushed().await;
    // Down long enough for the backoff to reach its ceiling (1 s here).
    harness::wait_for("retries while ClickHouse is down", Duration::from_secs(60), || m.insert_retries_total() >= 8)
        .await;
    assert!(m.unacked_messages.get() > 0, "nothing acked while ClickHouse is down");
    assert_eq!(m.acked_messages.get(), 10, "only the batches stored before the outage are acked");
    clickhouse.restart();

    world.wait_stored(2000, Duration::from_secs(60)).await;
    world.assert_rollup_exact().await;
    agent.wait_acked("dev-c", &[range(5, 1, 2000)], Duration::from_secs(20)).await;
    harness::wait_for("all acked", Duration::from_secs(10), || m.unacked_messages.get() == 0).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_clickhouse_never_costs_the_mqtt_connection() {
    // ClickHouse frozen (SIGSTOP) for three keep-alive periods while 6,000
    // messages arrive: the server keeps polling (PINGREQ goes out), so the
    // broker never drops it; everything is stored after the thaw without a
    // reconnect. Checked against the code before the fix (410b471): its poll
    // task waited on a full channel, the broker dropped it, and the count of
    // connection errors after the thaw was 1.
    let Some(world) = World::new() else { return };
    let clickhouse = test_support::PrivateService::start(test_support::Service::ClickHouse);
    let world = World { ch_url: clickhouse.http_url(), ..world };
    let config = ingest_server::Config { mqtt_keep_alive_secs: 5, insert_timeout_secs: 5, ..world.config() };
    let server = Server::start(config).await;
    let agent = Agent::connect(&world).await;
    let m = server.metrics.clone();

    clickhouse.freeze();
    let all = batches("dev-hang", 3, 1, 12_000, 2);
    for chunk in all.chunks(100) {
        agent.publish(chunk).await;
    }
    agent.flushed().await;
    harness::wait_for("every message received", Duration::from_secs(20), || {
        m.received_messages.get_or_create(&ingest_server::metrics::KindLabel { kind: "batch".into() }).get() >= 6000
    })
    .await;
    tokio::time::sleep(Duration::from_secs(16)).await; // > 3 keep-alives (5 s): the broker's limit is 1.5
    assert_eq!(m.inserted_readings.get(), 0, "ClickHouse was frozen: the fault window was hit");
    assert_eq!(m.mqtt_connection_errors.get(), 0, "the broker never dropped the server");
    assert_eq!(m.insert_stalled.get(), 1, "the stall is reported (log, /healthz)");
    assert!(m.insert_stalls.get() >= 1);
    clickhouse.thaw();

    world.wait_stored(12_000, Duration::from_secs(60)).await;
    world.assert_rollup_exact().await;
    agent.wait_acked("dev-hang", &[range(3, 1, 12_000)], Duration::from_secs(20)).await;
    assert_eq!(m.mqtt_connection_errors.get(), 0, "no reconnect after the thaw either");
    assert_eq!(m.stale_pubacks.get(), 0);
    assert_eq!(m.insert_stalled.get(), 0, "healthy again");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_mid_stream_then_restarted_stores_each_reading_once() {
    let Some(world) = World::new() else { return };
    // A long batch delay: at the kill, the last half second of messages is
    // received but neither inserted nor acked.
    let config = ingest_server::Config { batch_max_delay_ms: 500, ..world.config() };
    let ingest = harness::Binary::start(&config).await;
    let agent = Agent::connect(&world).await;

    let all: Vec<_> = (0..4).flat_map(|c| batches(&format!("dev-k{c}"), 11, 1, 1500, 50)).collect();
    let (before, after) = all.split_at(all.len() / 2);
    for chunk in before.chunks(4) {
        agent.publish(chunk).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.flushed().await;
    let stored_before_kill = ingest.metric("telemetry_ingest_inserted_readings_total").await.unwrap_or(0.0);
    ingest.kill();
    assert!(stored_before_kill < 3000.0, "the kill came mid-stream ({stored_before_kill} of 3000 stored)");
    for chunk in after.chunks(4) {
        agent.publish(chunk).await;
    }
    agent.flushed().await;
    // Same client id: the broker kept the session and what was not acked.
    let ingest = harness::Binary::start(&config).await;
    world.wait_stored(6000, Duration::from_secs(60)).await;
    world.assert_rollup_exact().await;
    for c in 0..4 {
        agent.wait_acked(&format!("dev-k{c}"), &[range(11, 1, 1500)], Duration::from_secs(20)).await;
    }
    let raw = world.count("SELECT count() FROM DB.readings").await;
    let received = ingest.metric("telemetry_ingest_received_messages_total{kind=\"batch\"}").await.unwrap_or(0.0);
    eprintln!("stored before the kill {stored_before_kill}; raw rows {raw} (6000 distinct); restarted server received {received} messages ({} published after the kill)", after.len());
    assert!(received > after.len() as f64, "messages unacked at the kill were redelivered");
    let status = ingest.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_in_a_shared_group_split_the_load() {
    let Some(world) = World::new() else { return };
    let group = test_support::unique_name("g");
    let config = |w: &World| ingest_server::Config { shared_group: group.clone(), ..w.config() };
    let a = Server::start(config(&world)).await;
    let b = Server::start(config(&world)).await;
    let agent = Agent::connect(&world).await;

    let all: Vec<_> = (0..10).flat_map(|c| batches(&format!("dev-g{c}"), 2, 1, 500, 50)).collect();
    agent.publish(&all).await;
    agent.flushed().await;
    world.wait_stored(5000, Duration::from_secs(60)).await;
    world.assert_rollup_exact().await;
    let (ia, ib) = (a.metrics.inserted_readings.get(), b.metrics.inserted_readings.get());
    eprintln!("server a inserted {ia}, server b inserted {ib}");
    assert!(ia > 0 && ib > 0, "both servers took a share: {ia} + {ib}");
    assert_eq!(ia + ib, 5000);
    for c in 0..10 {
        agent.wait_acked(&format!("dev-g{c}"), &[range(2, 1, 500)], Duration::from_secs(20)).await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_inserted_before_a_crash_are_not_counted_twice() {
    // The crash window: a server inserted readings and died before recording
    // their ranges and acking. The redelivered batch is inserted again.
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;
    // No merge may collapse the two copies before the pass folds them: the
    // fold must find the copy itself and recompute the minute under FINAL.
    world.ch().query(&format!("SYSTEM STOP MERGES `{}`.readings", world.database)).execute().await.unwrap();
    let b = batch("dev-w", 4, 1, 120);
    let values: Vec<String> = b
        .readings_with_seq()
        .map(|(seq, r)| format!("('dev-w', '{}', {}, {}, 4, {seq})", r.sensor, r.ts, r.value))
        .collect();
    let sql = format!(
        "INSERT INTO `{}`.readings (client_id, sensor, ts, value, epoch, seq) VALUES {}",
        world.database,
        values.join(", ")
    );
    world.ch().query(&sql).execute().await.expect("insert the crashed server's rows");

    agent.publish(&[b]).await;
    agent.flushed().await;
    world.wait_stored(120, Duration::from_secs(30)).await;
    assert_eq!(world.count("SELECT count() FROM DB.readings").await, 240, "two physical copies (merges stopped)");
    world.assert_rollup_exact().await;
    assert!(server.metrics.rollup_duplicate_minutes.get() > 0, "the fold found the copies");
    agent.wait_acked("dev-w", &[range(4, 1, 120)], Duration::from_secs(10)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_readings_reopen_their_folded_minute_and_land_in_it() {
    // Minutes are folded into readings_1m once; readings that arrive later
    // (an agent replaying an old backlog) re-mark their minute, which is
    // answered from raw rows until the next pass folds it in again.
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;
    agent.publish(&batches("dev-late", 5, 1, 1200, 200)).await;
    agent.flushed().await;
    world.wait_stored(1200, Duration::from_secs(30)).await;
    world.assert_rollup_exact().await;
    let passes = server.metrics.rollup_passes.get();
    let folded = server.metrics.rollup_minutes.get();
    assert!(folded >= 2, "1200 readings 100 ms apart span 3 minutes: {folded} folded");

    // The same minutes again, 50 ms later each: new identities, old minutes.
    let readings: Vec<Reading> = (1..=1200u64)
        .map(|s| Reading::new(format!("s{}", s % 3), harness::BASE_TS + s as i64 * 100_000 + 50_000, -(s as f64)))
        .collect();
    let late = Batch { client_id: "dev-late".into(), epoch: 6, first_seq: 1, last_seq: 1200, readings };
    agent.publish(&[late]).await;
    agent.flushed().await;
    world.wait_stored(2400, Duration::from_secs(30)).await;
    world.assert_rollup_exact().await;
    assert!(server.metrics.rollup_passes.get() > passes);
    assert!(server.metrics.rollup_minutes.get() >= folded + 3, "the three old minutes were folded in again");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_minute_still_getting_readings_is_folded_once_when_quiet() {
    // A replayed backlog reaches one closed minute in four batches a few
    // hundred ms apart, while passes run every 200 ms: the minute is folded
    // once, after rollup_quiet_secs without new readings, not after each
    // batch (with rollup_quiet_secs = 0 it is folded two to four times).
    let Some(world) = World::new() else { return };
    let server = Server::start(ingest_server::Config { rollup_quiet_secs: 5, ..world.config() }).await;
    let agent = Agent::connect(&world).await;
    let minute_us = harness::BASE_TS - harness::BASE_TS % 60_000_000;
    for part in 0..4u64 {
        let (first, last) = (part * 150 + 1, part * 150 + 150);
        let readings: Vec<Reading> = (first..=last)
            .map(|s| Reading::new(format!("s{}", s % 3), minute_us + s as i64 * 10_000, s as f64))
            .collect();
        agent
            .publish(&[Batch { client_id: "dev-replay".into(), epoch: 1, first_seq: first, last_seq: last, readings }])
            .await;
        agent.flushed().await;
        // Stored (not yet folded: `wait_stored` would wait for the rollup).
        harness::wait_for_async("the batch stored", Duration::from_secs(30), || async {
            world.distinct_readings().await == last
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    world.assert_rollup_exact().await;
    assert_eq!(server.metrics.rollup_minutes.get(), 1, "one minute, folded once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_is_quiet_for_all_its_clients_at_once() {
    // The pass's read of pending markers (18.16): a minute is folded once
    // none of its clients had a new marker for rollup_quiet_secs, or once
    // its oldest marker waited MAX_QUIET_WAIT_SECS, for all its clients in
    // one pass (client by client, a burst's minute was read twice).
    use ingest_server::rollup::{pending_markers_sql, QueueRow};
    use ingest_server::schema::{ddl, Flavor, Tables};
    let Some(world) = World::new() else { return };
    let tables = Tables::new(&world.database);
    let ch = world.ch();
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS `{}`", world.database)).execute().await.unwrap();
    for sql in ddl(Flavor::Legacy, &tables, 0) {
        ch.query(&sql).execute().await.unwrap();
    }
    // Minute 600: a quiet for 30 s, b marked 1 s ago. Minute 660: both
    // quiet. Minute 720: a waited 70 s, b marked just now.
    let rows = [("a", 600, 30), ("b", 600, 1), ("a", 660, 30), ("b", 660, 20), ("a", 720, 70), ("b", 720, 0)];
    let values: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (c, m, age))| format!("('{c}', {m}, {i}, 'srv', subtractSeconds(now(), {age}), 1)"))
        .collect();
    ch.query(&format!(
        "INSERT INTO {} (client_id, minute, token, owner, marked_at, pending) VALUES {}",
        tables.rollup_queue,
        values.join(", ")
    ))
    .execute()
    .await
    .unwrap();
    let read = |quiet: u64| {
        let (ch, sql) = (ch.clone(), pending_markers_sql(&tables));
        async move {
            let rows = ch
                .query(&sql)
                .bind("srv")
                .bind(300)
                .bind(10_000)
                .bind(u32::MAX)
                .bind(quiet)
                .bind(0)
                .bind(100)
                .fetch_all::<QueueRow>()
                .await
                .unwrap();
            rows.into_iter().map(|r| (r.client_id, r.minute)).collect::<std::collections::BTreeSet<_>>()
        }
    };
    let pairs = |list: &[(&str, u32)]| list.iter().map(|(c, m)| ((*c).to_owned(), *m)).collect();
    assert_eq!(
        read(5).await,
        pairs(&[("a", 660), ("b", 660), ("a", 720), ("b", 720)]),
        "minute 600 waits for b; 660 is quiet; 720 waited long enough"
    );
    assert_eq!(read(0).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_minutes_are_answered_from_raw_rows_until_a_pass_folds_them() {
    // A server that never folds (rollup_after_secs far beyond any minute):
    // the live view is exact while readings_1m is still empty; a second
    // server that folds at once adopts the first one's markers only once
    // they are orphaned, and then readings_1m is exact too.
    let Some(world) = World::new() else { return };
    let holding = ingest_server::Config { rollup_after_secs: 1 << 40, ..world.config() };
    let server = Server::start(holding).await;
    let agent = Agent::connect(&world).await;
    agent.publish(&batches("dev-open", 1, 1, 900, 300)).await;
    agent.flushed().await;
    harness::wait_for("inserted", Duration::from_secs(30), || server.metrics.inserted_readings.get() == 900).await;
    assert!(world.pending_markers().await > 0);
    assert_eq!(world.rollup_count().await, 0, "nothing folded in yet");
    assert_eq!(world.count("SELECT toUInt64(sum(count)) FROM DB.readings_1m_live").await, 900);
    server.stop().await;

    let adopter = ingest_server::Config { rollup_orphan_secs: 0, ..world.config() };
    let adopter = Server::start(adopter).await;
    world.assert_rollup_exact().await;
    assert_eq!(world.rollup_count().await, 900);
    adopter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_stays_exact_while_passes_fold_minutes() {
    // Each batch is exactly one client-minute (600 readings, 200 per
    // sensor), so any row the view shows must count 200; a minute acked
    // before a query must be in it. Passes run every 50 ms and consume
    // markers while queries run: a view that reads the pending set twice
    // answers a minute consumed in between from neither side (or from both).
    let Some(world) = World::new() else { return };
    let config = ingest_server::Config { rollup_interval_ms: 50, batch_max_delay_ms: 50, ..world.config() };
    let server = Server::start(config).await;
    let agent = std::sync::Arc::new(Agent::connect(&world).await);
    // BASE_TS is 20 s into its minute: seq 400 starts the next one.
    let minute_seqs = |k: u64| (400 + 600 * k, 999 + 600 * k);
    let (clients, minutes) = (4u64, 30u64);
    let publisher = {
        let agent = agent.clone();
        tokio::spawn(async move {
            for k in 0..minutes {
                for c in 0..clients {
                    let (first, last) = minute_seqs(k);
                    agent.publish(&[batch(&format!("dev-live{c}"), 3, first, last)]).await;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let sql =
        format!("SELECT client_id, sensor, toUInt32(minute) AS m, count FROM `{}`.readings_1m_live", world.database);
    let (mut queries, mut seen_rows) = (0u64, 0usize);
    loop {
        let acked: Vec<(String, u64)> = agent
            .acked()
            .into_iter()
            .flat_map(|(c, ranges)| {
                ranges.into_iter().flat_map(move |r| {
                    let c = c.clone();
                    (0..minutes)
                        .filter(move |&k| r.first_seq <= minute_seqs(k).0 && minute_seqs(k).1 <= r.last_seq)
                        .map(move |k| (c.clone(), k))
                })
            })
            .collect();
        let rows: Vec<(String, String, u32, u64)> =
            world.ch().query(&sql).fetch_all().await.expect("query the live view");
        queries += 1;
        seen_rows = seen_rows.max(rows.len());
        for (c, sensor, m, count) in &rows {
            assert_eq!(*count, 200, "query {queries}: {c} {sensor} minute {m} counts {count}, not 200");
        }
        for (c, k) in &acked {
            let start =
                u32::try_from((harness::BASE_TS / 1_000_000) + i64::try_from(minute_seqs(*k).0 / 10).unwrap()).unwrap();
            let shown = rows.iter().filter(|(rc, _, m, _)| rc == c && *m == start).count();
            assert_eq!(
                shown, 3,
                "query {queries}: {c} minute {k} was acked before the query, the view shows {shown} of 3 sensors"
            );
        }
        let done =
            publisher.is_finished() && acked.len() as u64 == clients * minutes && world.pending_markers().await == 0;
        if done {
            break;
        }
        assert!(queries < 5_000, "not done after {queries} queries");
    }
    eprintln!("{queries} queries of the live view while passes folded; up to {seen_rows} rows");
    assert!(queries >= 20, "the queries overlapped the passes ({queries})");
    assert_eq!(seen_rows as u64, clients * minutes * 3);
    world.assert_rollup_exact().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_clickhouse_refuses_is_isolated_rejected_and_the_rest_stored() {
    // ClickHouse refuses any insert holding a reading of sensor "poison"
    // (a materialised throwIf: Code 395, a code of no known meaning here).
    // One job holds healthy batches of five clients and one poisoned batch:
    // the job is bisected, the poisoned message alone is dead-lettered and
    // reported as rejected, everything else is stored and acked.
    let Some(world) = World::new() else { return };
    let config = ingest_server::Config { batch_max_delay_ms: 1000, insert_retry_budget: 2, ..world.config() };
    let server = Server::start(config).await;
    world
        .ch()
        .query(&format!(
            "ALTER TABLE `{}`.readings ADD COLUMN poison UInt8 MATERIALIZED throwIf(sensor = 'poison')",
            world.database
        ))
        .execute()
        .await
        .expect("add the poison column");
    let agent = Agent::connect(&world).await;
    let mut all: Vec<Batch> = (0..5).flat_map(|c| batches(&format!("dev-h{c}"), 1, 1, 300, 100)).collect();
    let mut bad = batch("dev-bad", 1, 1, 100);
    bad.readings[50].sensor = "poison".to_owned();
    all.insert(7, bad);
    all.push(batch("dev-bad", 1, 101, 200));
    agent.publish(&all).await;
    agent.flushed().await;
    world.wait_stored(1600, Duration::from_secs(60)).await;
    for c in 0..5 {
        agent.wait_acked(&format!("dev-h{c}"), &[range(1, 1, 300)], Duration::from_secs(20)).await;
    }
    agent.wait_acked("dev-bad", &[range(1, 101, 200)], Duration::from_secs(20)).await;
    let rejected: Vec<_> = agent
        .acks
        .lock()
        .expect("acks lock")
        .iter()
        .filter(|(c, _)| c == "dev-bad")
        .flat_map(|(_, ack)| ack.rejected.clone())
        .collect();
    assert_eq!(rejected, vec![range(1, 1, 100)], "the poisoned batch is reported as rejected, nothing else");
    let m = &server.metrics;
    assert_eq!(m.rejected_messages.get(), 1);
    assert!(m.insert_isolations.get() >= 1);
    assert_eq!(
        world
            .count("SELECT count() FROM DB.ingest_errors WHERE reason = 'insert_rejected' AND client_id = 'dev-bad' AND error LIKE '%395%'")
            .await,
        1,
        "one dead letter, with ClickHouse's error"
    );
    assert_eq!(world.count("SELECT count() FROM DB.readings WHERE client_id = 'dev-bad' AND seq <= 100").await, 0);
    harness::wait_for("all PUBACKed", Duration::from_secs(10), || m.unacked_messages.get() == 0).await;
    world.assert_rollup_exact().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_view_from_an_older_release_is_replaced_at_start() {
    let Some(world) = World::new() else { return };
    let ch = world.ch();
    let db = &world.database;
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS `{db}`")).execute().await.expect("create database");
    ch.query(&format!("CREATE VIEW `{db}`.readings_1m_live AS SELECT 1 AS outdated"))
        .execute()
        .await
        .expect("old view");
    let server = Server::start(world.config()).await;
    let definition: String = ch
        .query("SELECT create_table_query FROM system.tables WHERE database = ? AND name = 'readings_1m_live'")
        .bind(db.as_str())
        .fetch_one()
        .await
        .expect("the view exists");
    assert!(definition.contains(ingest_server::rollup::LIVE_VIEW_MARK), "replaced: {definition}");
    assert_eq!(world.count("SELECT count() FROM DB.readings_1m_live").await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_is_marked_once_per_server_until_a_pass_may_read_it() {
    // Readings of the current minute in many jobs: while no pass may read
    // that minute (rollup_after_secs = 600), one marker covers every later
    // job. A restarted server (same id, folding at once) then folds it, and
    // the rollup counts every reading of every job.
    let Some(world) = World::new() else { return };
    let config = ingest_server::Config { rollup_after_secs: 600, batch_max_delay_ms: 50, ..world.config() };
    let server = Server::start(config.clone()).await;
    let agent = Agent::connect(&world).await;
    let now_us = telemetry_wire::reading::now_micros();
    for k in 0..10u64 {
        let readings: Vec<Reading> =
            (0..50).map(|i| Reading::new("s0".to_owned(), now_us + (k * 50 + i) as i64, (k * 50 + i) as f64)).collect();
        let b =
            Batch { client_id: "dev-once".into(), epoch: 9, first_seq: k * 50 + 1, last_seq: k * 50 + 50, readings };
        agent.publish(&[b]).await;
        agent.flushed().await;
        let m = server.metrics.clone();
        harness::wait_for("batch inserted", Duration::from_secs(10), || m.inserted_readings.get() == (k + 1) * 50)
            .await;
    }
    let (written, spared) = (server.metrics.rollup_markers.get(), server.metrics.rollup_markers_spared.get());
    assert!(spared >= 8, "later jobs relied on the first marker: {written} written, {spared} spared");
    assert_eq!(world.rollup_count().await, 0, "no pass may read the current minute yet");
    server.stop().await;
    let folding = Server::start(ingest_server::Config { rollup_after_secs: 0, ..config }).await;
    world.wait_stored(500, Duration::from_secs(30)).await;
    world.assert_rollup_exact().await;
    folding.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_bad_clock_spanning_300_days_is_stored_in_bounded_inserts() {
    // One batch whose readings span 300 daily partitions, among healthy
    // batches: current ClickHouse refuses an INSERT touching more than 100
    // partitions (Code 252; 18.16 does not, so the split itself is what is
    // checked here, and chdb checks the statements). Everything is stored,
    // the job was split, and the rollup is exact for every one of its minutes.
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let agent = Agent::connect(&world).await;
    let day = 86_400_000_000i64;
    let readings: Vec<Reading> =
        (0..300i64).map(|d| Reading::new("s0".to_owned(), harness::BASE_TS + d * day, d as f64)).collect();
    let bad = Batch { client_id: "dev-clock".into(), epoch: 1, first_seq: 1, last_seq: 300, readings };
    let mut all = batches("dev-fine", 2, 1, 600, 200);
    all.insert(1, bad);
    agent.publish(&all).await;
    agent.flushed().await;
    world.wait_stored(900, Duration::from_secs(60)).await;
    assert!(server.metrics.split_inserts.get() >= 1, "the job spanning 300 days was split");
    world.assert_rollup_exact().await;
    agent.wait_acked("dev-clock", &[range(1, 1, 300)], Duration::from_secs(20)).await;
    agent.wait_acked("dev-fine", &[range(2, 1, 600)], Duration::from_secs(20)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_million_stored_ranges_reports_its_cost_and_dedups_exactly() {
    // 10^6 disjoint stored ranges (10,000 clients x 100 gaps each, none
    // mergeable) within the dedup horizon: the binary streams them in at
    // start. Its start-up time and peak RSS are printed (and bounded
    // loosely); a replay of a stored range is a duplicate, a gap is stored.
    let Some(world) = World::new() else { return };
    let tables = ingest_server::schema::Tables::new(&world.database);
    for statement in ingest_server::schema::ddl(ingest_server::schema::Flavor::Legacy, &tables, 0) {
        world.ch().query(&statement).execute().await.unwrap();
    }
    let history = format!(
        "INSERT INTO {} (client_id, epoch, first_seq, last_seq, inserted_at) \
         SELECT concat('hist-', toString(number % 10000)), 1, intDiv(number, 10000) * 200 + 1, \
                intDiv(number, 10000) * 200 + 100, now() FROM numbers(1000000)",
        tables.ingested_ranges
    );
    world.ch().query(&history).execute().await.unwrap();
    assert_eq!(world.count("SELECT count() FROM DB.ingested_ranges").await, 1_000_000);

    let started = std::time::Instant::now();
    let server = harness::Binary::start(&world.config()).await;
    let startup = started.elapsed();
    let rss = server.peak_rss_mib();
    eprintln!("start-up with 10^6 stored ranges: {startup:?} until subscribed, peak RSS {rss} MiB");
    assert!(startup < Duration::from_secs(60), "start-up {startup:?}");
    assert!(rss < 1024, "peak RSS {rss} MiB");

    let agent = Agent::connect(&world).await;
    // hist-7: seqs 1..=100 were stored (a replay), 101..=200 is a gap.
    agent.publish(&[batch("hist-7", 1, 1, 100), batch("hist-7", 1, 101, 200)]).await;
    agent.flushed().await;
    agent.wait_acked("hist-7", &[range(1, 1, 200)], Duration::from_secs(30)).await;
    assert_eq!(server.metric("telemetry_ingest_duplicate_readings_total").await, Some(100.0), "the replay");
    assert_eq!(world.count("SELECT count() FROM DB.readings").await, 100, "only the gap was inserted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_ranges_beyond_the_dedup_horizon_are_dropped_and_not_loaded() {
    // Two streams whose ranges were stored long ago (January 2023) and today.
    // At start the server drops the old month's partition and loads only the
    // recent range: a replay of the recent stream is a duplicate, a replay of
    // the old one is inserted again, and its identity still counts it once.
    let Some(world) = World::new() else { return };
    let tables = ingest_server::schema::Tables::new(&world.database);
    for statement in ingest_server::schema::ddl(ingest_server::schema::Flavor::Legacy, &tables, 0) {
        world.ch().query(&statement).execute().await.unwrap();
    }
    let ranges = format!(
        "INSERT INTO {} (client_id, epoch, first_seq, last_seq, inserted_at) VALUES \
         ('dev-old', 1, 1, 100, toDateTime('2023-01-15 00:00:00')), ('dev-new', 1, 1, 100, now())",
        tables.ingested_ranges
    );
    world.ch().query(&ranges).execute().await.unwrap();
    // The old stream's readings were stored back then, too.
    let old = batch("dev-old", 1, 1, 100);
    let values: Vec<String> = old
        .readings_with_seq()
        .map(|(seq, r)| format!("('dev-old', '{}', {}, {}, 1, {seq})", r.sensor, r.ts, r.value))
        .collect();
    let sql = format!(
        "INSERT INTO {} (client_id, sensor, ts, value, epoch, seq) VALUES {}",
        tables.readings,
        values.join(", ")
    );
    world.ch().query(&sql).execute().await.unwrap();

    let server = Server::start(world.config()).await;
    let left = "SELECT count() FROM DB.ingested_ranges WHERE client_id = 'dev-old'";
    harness::wait_for_async("the old month dropped", Duration::from_secs(20), || async {
        world.count(left).await == 0
    })
    .await;
    let agent = Agent::connect(&world).await;
    agent.publish(&[batch("dev-new", 1, 1, 100), old]).await;
    agent.flushed().await;
    let m = server.metrics.clone();
    harness::wait_for("both handled", Duration::from_secs(20), || m.acked_messages.get() == 2).await;
    assert_eq!(m.duplicate_readings.get(), 100, "the recent range was loaded: its replay is a duplicate");
    assert_eq!(m.inserted_readings.get(), 100, "the old one was not: inserted again");
    assert_eq!(world.count("SELECT count() FROM (SELECT DISTINCT client_id, sensor, ts FROM DB.readings WHERE client_id = 'dev-old')").await, 100);
    world.assert_rollup_exact().await;
    server.stop().await;
}

/// Replaces each `?` in `sql` with the next literal.
fn substitute(sql: &str, literals: &[String]) -> String {
    let mut out = String::new();
    let mut it = literals.iter();
    for ch in sql.chars() {
        if ch == '?' {
            out.push_str(it.next().expect("a literal for every placeholder"));
        } else {
            out.push(ch);
        }
    }
    assert!(it.next().is_none(), "more literals than placeholders");
    out
}

/// The cluster form of the current flavour parses on current ClickHouse.
/// chdb has no ZooKeeper, macros or `remote_servers`, so the statements
/// cannot run there: each goes through `formatQuery`, which parses it
/// (and fails on a syntax error). 18.16 runs them in `tests/cluster.rs`.
#[test]
fn current_clickhouse_cluster_schema_parses_in_chdb() {
    use ingest_server::schema::{ddl, Flavor, Tables};
    if !harness::has_chdb() {
        return;
    }
    let statements = ddl(Flavor::Current, &Tables::new("telemetry").on_cluster("telemetry"), 30);
    assert!(statements.iter().any(|s| s.contains("Distributed(telemetry, telemetry, readings_local")));
    let checks: Vec<String> = statements
        .iter()
        .map(|s| format!("SELECT formatQuery('{}')", s.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    // Every statement must parse; the last one's text is the view's, formatted.
    let out = harness::run_chdb(&checks);
    assert!(out.contains("ON CLUSTER telemetry") && out.contains("GLOBAL IN"), "{out}");
}

#[test]
fn current_clickhouse_schema_runs_in_chdb() {
    use ingest_server::schema::{ddl, Flavor, Tables};
    if !harness::has_chdb() {
        return;
    }
    // With a TTL (rows from 2023 would expire at once, so no data goes there)...
    let mut statements = ddl(Flavor::Current, &Tables::new("telemetry_ttl"), 30);
    // ...and without, twice (idempotent), for the data checks.
    let tables = Tables::new("telemetry");
    statements.extend(ddl(Flavor::Current, &tables, 0));
    statements.extend(ddl(Flavor::Current, &tables, 0));
    let ts = |us: i64| format!("fromUnixTimestamp64Micro(toInt64({us}), 'UTC')");
    let base = harness::BASE_TS;
    statements.push(format!("SYSTEM STOP MERGES {}", tables.readings));
    statements.push(format!(
        "INSERT INTO {} (client_id, sensor, ts, value, epoch, seq) VALUES
         ('a', 's', {}, 1.0, 1, 1), ('a', 's', {}, 3.0, 1, 2), ('a', 's', {}, 8.0, 1, 3)",
        tables.readings,
        ts(base),
        ts(base + 1_000_000),
        ts(base + 120_000_000),
    ));
    // The same reading again, in a part of its own (a redelivery): counts once.
    statements.push(format!(
        "INSERT INTO {} (client_id, sensor, ts, value, epoch, seq) VALUES ('a', 's', {}, 3.0, 1, 2)",
        tables.readings,
        ts(base + 1_000_000),
    ));
    statements.push(format!(
        "INSERT INTO {} (client_id, epoch, first_seq, last_seq, inserted_at) VALUES ('a', 1, 1, 3, now())",
        tables.ingested_ranges
    ));
    statements.push(format!(
        "INSERT INTO {} (received_at, topic, client_id, reason, error, payload) VALUES (now(), '/t/client/a', 'a', 'empty', 'empty payload', '')",
        tables.ingest_errors
    ));
    statements.push(format!(
        "INSERT INTO {} (client_id, ts, outbox_rows, outbox_bytes, oldest_age_s, received_per_s, confirmed_per_s, connected, received_at)
         VALUES ('a', {base}, 1, 2, 0.5, 1.0, 1.0, 1, now())",
        tables.agent_status
    ));
    // The rollup as the server runs it: markers for the two minutes, the
    // live view before any pass (raw rows answer pending minutes), the pass's
    // read, the recompute, the consumption, then the rollup and the view.
    let minute = 60_000_000;
    let first = base.div_euclid(minute) * minute;
    let first_s = first / 1_000_000;
    for m in [first_s, first_s + 120] {
        statements.push(format!(
            "INSERT INTO {} (client_id, minute, token, owner, marked_at, pending) VALUES ('a', {m}, 7, 'srv', now(), 1)",
            tables.rollup_queue
        ));
    }
    let live =
        format!("SELECT count, avg, min, max FROM {} WHERE client_id = 'a' ORDER BY minute", tables.readings_1m_live);
    let want = "2\t2\t1\t3\n1\t8\t8\t8\n";
    let mut before = statements.clone();
    before.push(live.clone());
    assert_eq!(harness::run_chdb(&before), want, "live view from raw rows (nothing folded in yet)");
    let lit = |v: i64| v.to_string();
    let mut read = statements.clone();
    read.push(substitute(
        &ingest_server::rollup::pending_markers_sql(&tables),
        &["'srv'".to_owned(), lit(0), lit(first_s + 3600), lit(first_s + 7200), lit(0), lit(0), lit(100)],
    ));
    let pending: Vec<(String, String)> = harness::run_chdb(&read)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[..4].join(" "), f[5].to_owned())
        })
        .collect();
    let want_pending = |m: i64| (format!("a {m} 7 srv"), "1".to_owned());
    assert_eq!(pending, vec![want_pending(first_s), want_pending(first_s + 120)], "pending markers");
    // The pass's fold: the first minute's rows hold a copy (3 rows, 2
    // identities), the third minute's do not.
    let mut fold = statements.clone();
    fold.push(format!(
        "SELECT minute - {first_s}, count, sum, min, max, version FROM ({}) ORDER BY minute",
        substitute(
            &ingest_server::rollup::fold_sql(&tables, Flavor::Current, 1),
            &["'a'".to_owned(), lit(first), lit(first + 3 * minute)],
        )
    ));
    assert_eq!(harness::run_chdb(&fold), "0\t3\t7\t1\t3\t2\n120\t1\t8\t8\t8\t1\n", "the fold's groups");
    // What the pass writes then: the exact group as read, the other
    // minute recomputed under FINAL.
    statements.push(format!(
        "INSERT INTO {} (client_id, sensor, minute, count, sum, avg, min, max, version) VALUES ('a', 's', {}, 1, 8, 8, 8, 8, 1)",
        tables.readings_1m,
        first_s + 120
    ));
    statements.push(substitute(
        &ingest_server::rollup::recompute_sql(&tables, Flavor::Current, 1),
        &["'a'".to_owned(), lit(first), lit(first + minute)],
    ));
    for m in [first_s, first_s + 120] {
        statements.push(format!(
            "INSERT INTO {} (client_id, minute, token, owner, marked_at, pending) VALUES ('a', {m}, 7, 'srv', now(), -1)",
            tables.rollup_queue
        ));
    }
    statements.push(format!("SELECT client_id, epoch, first_seq, last_seq FROM {}", tables.ingested_ranges));
    let mut view = statements.clone();
    view.push(live.clone());
    assert_eq!(harness::run_chdb(&view), want, "live view after the pass");
    // A late reading re-marks the folded minute: its raw rows win over the
    // (now stale) rollup row until the next pass.
    view.pop();
    view.push(format!(
        "INSERT INTO {} (client_id, sensor, ts, value, epoch, seq) VALUES ('a', 's', {}, 5.0, 1, 4)",
        tables.readings,
        ts(base + 500_000)
    ));
    view.push(format!(
        "INSERT INTO {} (client_id, minute, token, owner, marked_at, pending) VALUES ('a', {first_s}, 8, 'srv', now(), 1)",
        tables.rollup_queue
    ));
    view.push(live);
    assert_eq!(
        harness::run_chdb(&view),
        "3\t3\t1\t5\n1\t8\t8\t8\n",
        "late reading: raw rows win over the stale rollup"
    );
    statements.push(format!("SELECT count, avg, min, max, version FROM {} FINAL ORDER BY minute", tables.readings_1m));
    assert_eq!(harness::run_chdb(&statements), "2\t2\t1\t3\t2\n1\t8\t8\t8\t1\n", "rollup on current ClickHouse");
}

#[test]
fn an_older_status_table_gains_the_new_columns_on_current_clickhouse_in_chdb() {
    use ingest_server::schema::{add_status_columns, Flavor, Tables};
    if !harness::has_chdb() {
        return;
    }
    let tables = Tables::new("telemetry");
    let t = &tables.agent_status;
    let old: Vec<String> = [
        "client_id",
        "ts",
        "outbox_rows",
        "outbox_bytes",
        "oldest_age_s",
        "received_per_s",
        "confirmed_per_s",
        "connected",
        "received_at",
    ]
    .map(str::to_owned)
    .into();
    let alter = add_status_columns(Flavor::Current, &tables, &old).expect("all eleven to add");
    let statements = vec![
        "CREATE DATABASE telemetry".to_owned(),
        // The table as the current flavour's release before created it, with a row of that time.
        format!(
            "CREATE TABLE {t} (client_id String, ts Int64, outbox_rows UInt64, outbox_bytes UInt64, oldest_age_s Float64,
             received_per_s Float64, confirmed_per_s Float64, connected UInt8, received_at DateTime('UTC'))
             ENGINE = ReplacingMergeTree(ts) ORDER BY client_id"
        ),
        format!("INSERT INTO {t} VALUES ('old', 1, 5, 240, 2.0, 1.0, 1.0, 1, now())"),
        alter.clone(),
        // Again, as a server that read the columns at the same time would: a no-op.
        alter,
        format!(
            "INSERT INTO {t} (client_id, ts, outbox_rows, outbox_bytes, oldest_age_s, received_per_s, confirmed_per_s,
             connected, received_at, drain_per_s, drain_eta_s, bytes_per_reading, ingest_present, echo_held_batches,
             echo_ahead_readings, last_command_id, last_command_name, last_command_ok, last_command_ts_ms,
             last_command_summary) VALUES ('new', 2, 42, 4200, 1.5, 1.0, 1.0, 1, now(), 12.5, 3.36, 9.75, 0, 3, 6000,
             'cmd-7', 'flush', 1, 1700000000123, 'ok')"
        ),
        format!(
            "SELECT client_id, drain_per_s, drain_eta_s, bytes_per_reading, ingest_present, echo_held_batches,
             echo_ahead_readings, toTypeName(echo_ahead_readings), last_command_id, last_command_name, last_command_ok,
             last_command_ts_ms, toTypeName(last_command_ts_ms), last_command_summary
             FROM {t} FINAL ORDER BY client_id"
        ),
    ];
    assert_eq!(
        harness::run_chdb(&statements),
        "new\t12.5\t3.36\t9.75\t0\t3\t6000\tNullable(UInt64)\tcmd-7\tflush\t1\t1700000000123\tNullable(Int64)\tok\n\
         old\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\tNullable(UInt64)\t\\N\t\\N\t\\N\t\\N\tNullable(Int64)\t\\N\n"
    );
}

#[test]
fn current_clickhouse_refuses_an_insert_over_100_partitions_and_takes_the_split_ones() {
    use ingest_server::schema::{ddl, Flavor, Tables};
    use ingest_server::writer::MAX_PARTITIONS_PER_INSERT;
    if !harness::has_chdb() {
        return;
    }
    let tables = Tables::new("telemetry");
    let rows = |days: std::ops::Range<i64>| {
        let values: Vec<String> = days
            .map(|d| {
                let ts = harness::BASE_TS + d * 86_400_000_000;
                format!("('bad', 's', fromUnixTimestamp64Micro(toInt64({ts}), 'UTC'), 1.0, 1, {})", d + 1)
            })
            .collect();
        format!(
            "INSERT INTO {} (client_id, sensor, ts, value, epoch, seq) VALUES {}",
            tables.readings,
            values.join(", ")
        )
    };
    let mut whole = ddl(Flavor::Current, &tables, 0);
    whole.push(rows(0..150));
    let (ok, stderr) = harness::try_chdb(&whole);
    assert!(!ok && stderr.contains("252"), "150 partitions in one INSERT must be refused (Code 252): {stderr}");
    let limit = i64::try_from(MAX_PARTITIONS_PER_INSERT).unwrap();
    let mut split = ddl(Flavor::Current, &tables, 0);
    let mut from = 0;
    while from < 150 {
        split.push(rows(from..(from + limit).min(150)));
        from += limit;
    }
    split.push(format!("SELECT count() FROM {}", tables.readings));
    assert_eq!(harness::run_chdb(&split), "150\n", "inserts of at most {limit} partitions are taken");
}

/// Not a timed test: prints throughput. Run with
/// `cargo test --release -p ingest-server --test ingest throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn throughput_measurement() {
    let Some(world) = World::new() else { return };
    let clients: u64 = std::env::var("BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let per_client: u64 = std::env::var("BENCH_READINGS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let per_batch = 1000;
    let total = clients * per_client;
    let server = Server::start(ingest_server::Config { batch_max_delay_ms: 1000, ..world.config() }).await;
    let agent = Agent::connect(&world).await;
    let payloads: Vec<(String, Vec<u8>)> = (0..clients)
        .flat_map(|c| batches(&format!("bench-{c}"), 1, 1, per_client, per_batch))
        .map(|b| (b.client_id.clone(), b.encode()))
        .collect();
    let started = std::time::Instant::now();
    for (client_id, payload) in payloads {
        agent.publish_raw(&client_id, payload).await;
    }
    let m = &server.metrics;
    harness::wait_for("all inserted", Duration::from_secs(600), || m.inserted_readings.get() >= total).await;
    let elapsed = started.elapsed();
    eprintln!(
        "stored {total} readings from {clients} clients in {:.2} s: {:.0} readings/s; {} batches",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        m.batches.get()
    );
    world.wait_stored(total, Duration::from_secs(60)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_pending_batch_and_acks_it() {
    let Some(world) = World::new() else { return };
    // Nothing would flush on its own for a minute.
    let config = ingest_server::Config { batch_max_delay_ms: 60_000, ..world.config() };
    let server = Server::start(config).await;
    let agent = Agent::connect(&world).await;
    agent.publish(&batches("dev-z", 8, 1, 300, 100)).await;
    agent.flushed().await;
    let m = server.metrics.clone();
    harness::wait_for("messages received", Duration::from_secs(10), || m.unacked_messages.get() == 3).await;
    assert_eq!(m.inserted_readings.get(), 0);
    server.stop().await;
    assert_eq!(m.inserted_readings.get(), 300);
    assert_eq!(m.acked_messages.get(), 3);
    assert_eq!(world.final_readings().await, 300);
    agent.wait_acked("dev-z", &[range(8, 1, 300)], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_exact_rowbinary_bytes_load_into_current_clickhouse() {
    // A stand-in ClickHouse that says it is 24.8 (so the server writes the
    // current flavour), answers every other query with no rows, and keeps
    // every request as the server sent it. The INSERT bodies are then loaded
    // byte for byte into current ClickHouse (chdb) over the current DDL and
    // read back, and every other statement the server sent (DDL, the view
    // check, the dedup load, the rollup pass's read, the ranges' expiry) is
    // run there too.
    use std::sync::{Arc, Mutex};
    if !harness::has_chdb() {
        return;
    }
    let Some(world) = World::new() else { return };
    let inserts: Arc<Mutex<Vec<(String, bytes::Bytes)>>> = Arc::default();
    let others: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let (inserts, others) = (inserts.clone(), others.clone());
        axum::Router::new().fallback(
            move |axum::extract::RawQuery(raw): axum::extract::RawQuery, body: bytes::Bytes| {
                let (inserts, others) = (inserts.clone(), others.clone());
                async move {
                    let query = raw
                        .unwrap_or_default()
                        .split('&')
                        .find_map(|kv| {
                            kv.strip_prefix("query=")
                                .map(|q| ingest_server::api::params::decode(q).expect("a valid query"))
                        })
                        .unwrap_or_default();
                    let sql = if query.is_empty() { String::from_utf8_lossy(&body).into_owned() } else { query };
                    if sql.starts_with("INSERT INTO") {
                        inserts.lock().unwrap().push((sql, body));
                        return Vec::new();
                    }
                    others.lock().unwrap().push(sql.clone());
                    if sql.contains("version()") {
                        let v = b"24.8.4.13";
                        let mut out = vec![v.len() as u8];
                        out.extend_from_slice(v);
                        return out;
                    }
                    Vec::new()
                }
            },
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = ingest_server::Config {
        clickhouse_url: format!("http://{addr}"),
        clickhouse_database: "telemetry".into(),
        ..world.config()
    };
    let server = Server::start(config).await;
    let agent = Agent::connect(&world).await;
    let sent = batch("rb-1", 7, 1, 30);
    agent.publish(std::slice::from_ref(&sent)).await;
    agent.publish_raw("rb-1", b"\x01garbage".to_vec()).await;
    let status = r#"{"version":1,"client_id":"rb-1","ts":1700000000000000,"outbox_rows":3,"outbox_bytes":4,"oldest_age_s":0.5,"received_per_s":1.0,"confirmed_per_s":2.0,"connected":true}"#;
    agent
        .client
        .publish(format!("{}/status/rb-1", world.prefix), rumqttc::QoS::AtLeastOnce, false, status.as_bytes().to_vec())
        .await
        .unwrap();
    // A current agent's status: the Nullable columns, each set.
    agent
        .client
        .publish(
            format!("{}/status/rb-2", world.prefix),
            rumqttc::QoS::AtLeastOnce,
            false,
            echo_status("rb-2").encode(),
        )
        .await
        .unwrap();
    agent.flushed().await;
    agent.wait_acked("rb-1", &[range(7, 1, 30)], Duration::from_secs(20)).await;
    server.stop().await;

    let dir = std::env::temp_dir().join(test_support::unique_name("rowbinary"));
    std::fs::create_dir_all(&dir).unwrap();
    let captured: Vec<serde_json::Value> = inserts
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, (query, body))| {
            let file = dir.join(format!("{i}.bin"));
            std::fs::write(&file, body).unwrap();
            serde_json::json!({"query": query, "file": file.to_str().unwrap()})
        })
        .collect();
    let tables: Vec<String> =
        captured.iter().map(|c| c["query"].as_str().unwrap().split('(').next().unwrap().trim().to_owned()).collect();
    for t in ["readings", "rollup_queue", "ingested_ranges", "ingest_errors", "agent_status"] {
        assert!(tables.iter().any(|q| q.ends_with(&format!("`{t}`"))), "an insert into {t} was captured: {tables:?}");
    }
    let statements = others.lock().unwrap().clone();
    for (what, needle) in [
        ("the DDL", "CREATE TABLE IF NOT EXISTS"),
        ("the view check", "system.tables"),
        ("the dedup load", "FROM `telemetry`.`ingested_ranges`"),
        ("the rollup pass's read", "`telemetry`.`rollup_queue`"),
        ("the ranges' expiry", "system.parts"),
        ("the status columns' check", "system.columns"),
        // The stand-in lists no columns, so all are added; chdb runs it over the current DDL below.
        ("the status columns' upgrade", "ADD COLUMN IF NOT EXISTS last_command_summary Nullable(String)"),
    ] {
        assert!(statements.iter().any(|s| s.contains(needle)), "{what} was captured: {statements:#?}");
    }
    let spec = serde_json::json!({
        "setup": ingest_server::schema::ddl(ingest_server::schema::Flavor::Current, &ingest_server::schema::Tables::new("telemetry"), 0),
        "inserts": captured,
        "statements": others.lock().unwrap().clone(),
        "checks": [
            "SELECT client_id, sensor, toUnixTimestamp64Micro(ts), value, epoch, seq FROM telemetry.readings ORDER BY seq",
            "SELECT client_id, toUInt32(minute), pending, owner != '' FROM telemetry.rollup_queue WHERE pending != 0 ORDER BY minute",
            "SELECT client_id, epoch, first_seq, last_seq FROM telemetry.ingested_ranges",
            "SELECT client_id, reason, length(payload) FROM telemetry.ingest_errors",
            "SELECT client_id, ts, outbox_rows, outbox_bytes, oldest_age_s, connected, drain_per_s, drain_eta_s,
                    bytes_per_reading, ingest_present, echo_held_batches, echo_ahead_readings, last_command_id,
                    last_command_name, last_command_ok, last_command_ts_ms, last_command_summary
             FROM telemetry.agent_status ORDER BY client_id",
        ],
    });
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb/rowbinary.py");
    let out = std::process::Command::new("python3").arg(script).arg(&spec_file).output().expect("run python3");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "chdb: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let results: Vec<&str> = text.split("--\n").collect();
    let want_readings: String = sent
        .readings_with_seq()
        .map(|(seq, r)| format!("rb-1\t{}\t{}\t{}\t7\t{seq}\n", r.sensor, r.ts, r.value))
        .collect();
    assert_eq!(results[0], want_readings, "readings, byte for byte from the server's RowBinary");
    let minutes: std::collections::BTreeSet<i64> =
        sent.readings.iter().map(|r| r.ts.div_euclid(60_000_000) * 60).collect();
    let want_markers: String = minutes.iter().map(|m| format!("rb-1\t{m}\t1\t1\n")).collect();
    assert_eq!(results[1], want_markers, "one marker per minute touched");
    assert_eq!(results[2], "rb-1\t7\t1\t30\n", "the stored range");
    assert_eq!(results[3], "rb-1\ttruncated\t8\n", "the dead letter");
    assert_eq!(
        results[4],
        format!(
            "rb-1\t1700000000000000\t3\t4\t0.5\t1\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\n\
             rb-2\t{}\t42\t4200\t1.5\t1\t12.5\t3.36\t9.75\t0\t3\t6000\tcmd-7\tset_log_level\t0\t1700000000123\t\
             bad_arguments: level <img src=x onerror=alert(1)>\n",
            harness::BASE_TS
        ),
        "the agent statuses: an older agent's (NULLs) and a current one's"
    );
}
