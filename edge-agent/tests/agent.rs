//! The edge agent against real Postgres and Mosquitto.

mod common;

use std::time::Duration;

use common::*;
use edge_agent::config::{ConfirmMode, ListenAddr, QuotaPolicy};
use edge_agent::metrics::family_total;
use edge_agent::Agent;
use emulators::stream::{Codec, Endpoint, Rate};
use test_support::{fresh_pg_database, topic_prefix, PrivateService, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const PG_MQTT: &[Service] = &[Service::Postgres, Service::Mqtt];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_deletes_the_batches_and_the_outbox_drains_to_zero() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let collector = Collector::start(&stack.mqtt_host, stack.mqtt_port, &prefix).await;
    let agent = Agent::start(agent_config(&pg, stack.mqtt_port, &prefix), CancellationToken::new()).await.unwrap();
    let n = 20_000;
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), n, Rate::Max, "temperature"));
    let stats = emu.await.unwrap();
    assert_eq!(stats.acked, n, "every reading acked after commit");
    let m = agent.shared.metrics.clone();
    eventually(Duration::from_secs(30), "outbox drained", || agent.shared.outbox_size().0 == 0).await;
    assert_eq!(outbox_rows(&pg).await, 0);
    assert_eq!(m.readings_committed.get(), n);
    assert_eq!(m.rows_deleted.get(), n, "each committed row deleted exactly once");
    assert!(m.readings_echoed.get() >= n);
    eventually(Duration::from_secs(10), "collector saw everything", || collector.distinct() == n as usize).await;
    assert_eq!(collector.missing_from(&expected_ids(4, "temperature", n)), 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulators_stream_over_tcp_and_unix_in_both_codecs() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let sock = std::env::temp_dir().join(format!("{}.sock", test_support::unique_name("agent")));
    let mut config = agent_config(&pg, stack.mqtt_port, &prefix);
    config.listen = vec![ListenAddr::Tcp("127.0.0.1:0".into()), ListenAddr::Unix(sock.clone())];
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let mut total = 0;
    for (i, (addr, codec)) in [
        (&agent.listen_addrs[0], Codec::Bincode),
        (&agent.listen_addrs[0], Codec::Json),
        (&agent.listen_addrs[1], Codec::Bincode),
        (&agent.listen_addrs[1], Codec::Json),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = emulator(endpoint(addr), 1000, Rate::Max, &format!("s{i}"));
        c.codec = codec;
        let (_, emu, _) = spawn_emulator(c);
        let stats = emu.await.unwrap();
        assert_eq!(stats.acked, 1000, "{addr} {codec:?}");
        total += 1000;
    }
    assert_eq!(agent.shared.metrics.readings_committed.get(), total);
    eventually(Duration::from_secs(30), "outbox drained", || agent.shared.outbox_size().0 == 0).await;
    agent.shutdown().await;
    assert!(!sock.exists(), "the unix socket is removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_for_seconds_mid_stream_loses_nothing() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let broker = PrivateService::start(Service::Mqtt);
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let collector = Collector::start("127.0.0.1", broker.port, &prefix).await;
    let agent = Agent::start(agent_config(&pg, broker.port, &prefix), CancellationToken::new()).await.unwrap();
    let n = 24_000;
    let (progress, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), n, Rate::PerSecond(4000), "t"));
    let acked = || progress.acked.load(std::sync::atomic::Ordering::Relaxed);
    eventually(Duration::from_secs(20), "readings flow before the fault", || acked() > 4000).await;
    broker.stop();
    let acked_while_down = acked();
    // Down for as long as 8,000 more readings take (2 s at this rate).
    eventually(Duration::from_secs(20), "the outbox keeps accepting while the broker is down", || {
        acked() > acked_while_down + 8000
    })
    .await;
    broker.restart();
    assert_eq!(emu.await.unwrap().acked, n);
    eventually(Duration::from_secs(60), "outbox drained after the broker returned", || {
        agent.shared.outbox_size().0 == 0
    })
    .await;
    eventually(Duration::from_secs(20), "collector saw every reading", || collector.distinct() == n as usize).await;
    assert_eq!(collector.missing_from(&expected_ids(4, "t", n)), 0);
    let m = &agent.shared.metrics;
    assert!(m.mqtt_connects.get() >= 2, "reconnected");
    assert!(m.readings_replayed.get() > 0, "replayed the outbox after reconnecting");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_loses_no_acked_reading() {
    let Some(stack) = stack_or_skip(&[Service::Mqtt]) else { return };
    let pg = PrivateService::start(Service::Postgres);
    let prefix = topic_prefix();
    let collector = Collector::start(&stack.mqtt_host, stack.mqtt_port, &prefix).await;
    let agent =
        Agent::start(agent_config(&pg.pg_url(), stack.mqtt_port, &prefix), CancellationToken::new()).await.unwrap();
    let n = 20_000;
    let (progress, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), n, Rate::PerSecond(4000), "p"));
    eventually(Duration::from_secs(20), "readings flow before the fault", || {
        progress.acked.load(std::sync::atomic::Ordering::Relaxed) > 4000
    })
    .await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage's length, not a wait for a condition
    pg.restart();
    assert_eq!(emu.await.unwrap().acked, n, "the reliable emulator gets every reading acked eventually");
    eventually(Duration::from_secs(60), "collector saw every reading", || collector.distinct() == n as usize).await;
    assert_eq!(collector.missing_from(&expected_ids(4, "p", n)), 0);
    assert!(agent.shared.metrics.postgres_errors.get() > 0, "the outage was noticed");
    eventually(Duration::from_secs(30), "outbox drained", || agent.shared.outbox_size().0 == 0).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_quota_backpressure_holds_sensors_without_acking() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let pg = fresh_pg_database(&stack).await;
    // No broker on this port: nothing is ever confirmed.
    let mut config = agent_config(&pg, test_support::free_port(), &topic_prefix());
    config.quota_rows = 1000;
    config.commit_max_rows = 100;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let mut c = emulator(endpoint(&agent.listen_addrs[0]), 5000, Rate::Max, "q");
    c.reliable = false;
    c.final_ack_wait = Duration::from_millis(500);
    let (progress, emu, cancel) = spawn_emulator(c);
    let m = agent.shared.metrics.clone();
    eventually(Duration::from_secs(20), "quota reached", || m.quota_backpressure.get() > 0).await;
    // An absence check: for a second past the quota, nothing more may be acked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(agent.shared.outbox_size().0 <= 1000);
    assert!(progress.acked.load(std::sync::atomic::Ordering::Relaxed) <= 1000, "nothing beyond the quota acked");
    assert_eq!(m.rows_dropped.get(), 0);
    assert_eq!(outbox_rows(&pg).await, agent.shared.outbox_size().0 as i64);
    cancel.cancel();
    let _ = emu.await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_quota_drop_oldest_drops_and_counts() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let pg = fresh_pg_database(&stack).await;
    let mut config = agent_config(&pg, test_support::free_port(), &topic_prefix());
    config.quota_rows = 1000;
    config.quota_policy = QuotaPolicy::DropOldest;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 5000, Rate::Max, "d"));
    assert_eq!(emu.await.unwrap().acked, 5000, "drop-oldest keeps accepting");
    let m = &agent.shared.metrics;
    assert_eq!(m.readings_committed.get(), 5000);
    assert!(m.rows_dropped.get() >= 4000, "dropped {}", m.rows_dropped.get());
    let rows = outbox_rows(&pg).await;
    assert!(rows <= 1000 && rows as u64 == 5000 - m.rows_dropped.get(), "rows {rows}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_older_than_max_past_skew_are_rejected_and_counted() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let pg = fresh_pg_database(&stack).await;
    let mut config = agent_config(&pg, test_support::free_port(), &topic_prefix());
    config.max_past_skew_secs = 3600;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let now = telemetry_wire::reading::now_micros();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut lines = Vec::new();
    for ts in [now - 7_200_000_000, now - 60_000_000, now] {
        telemetry_wire::json::write_line(&telemetry_wire::Reading::new("x", ts, 1.0), &mut lines);
    }
    s.write_all(&lines).await.unwrap();
    let mut buf = vec![0; 256];
    let mut got = String::new();
    while !got.contains("{\"acked\":3}") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "connection stays open; got {got:?}");
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    let m = &agent.shared.metrics;
    assert_eq!(family_total(&m.readings_rejected, &["past_timestamp"]), 1, "the two-hour-old reading");
    assert_eq!(m.readings_committed.get(), 2);
    assert_eq!(outbox_rows(&pg).await, 2);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_that_connection() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let agent =
        Agent::start(agent_config(&pg, stack.mqtt_port, &topic_prefix()), CancellationToken::new()).await.unwrap();
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let (_, good, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 5000, Rate::PerSecond(5000), "g"));
    let m = agent.shared.metrics.clone();

    // A frame with an unknown version byte.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[5, 0, 0, 0, 9, 1, 2, 3, 4]).await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0; 64])).await.unwrap().unwrap(), 0);
    // A 2 GiB length prefix.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0, 0, 0, 0x80, 1]).await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0; 64])).await.unwrap().unwrap(), 0);
    // A JSON line that is not a reading.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"{\"sensor\": 1}\n").await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0; 64])).await.unwrap().unwrap(), 0);
    assert_eq!(family_total(&m.frames_rejected, &["unknown_version", "oversize", "malformed_json"]), 3);

    // Invalid readings inside a valid frame are rejected one by one; the
    // frame is still acked and the connection stays open.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut line = Vec::new();
    telemetry_wire::json::write_line(&telemetry_wire::Reading::new("x", START_TS, 1.0), &mut line);
    s.write_all(&line).await.unwrap();
    s.write_all(b"{\"sensor\":\"x\",\"ts\":5,\"value\":1.0}\n").await.unwrap();
    let mut buf = vec![0; 256];
    let mut got = String::new();
    while !got.contains("{\"acked\":2}") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "connection stays open; got {got:?}");
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    assert_eq!(family_total(&m.readings_rejected, &["timestamp_range"]), 1);

    assert_eq!(good.await.unwrap().acked, 5000, "the good sensor was not disturbed");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_with_sigkill_resumes_from_the_outbox() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let collector = Collector::start(&stack.mqtt_host, stack.mqtt_port, &prefix).await;
    let port = test_support::free_port();
    let mqtt_id = test_support::unique_name("agent");
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .env("EDGE_AGENT_POSTGRES_URL", &pg)
            .env("EDGE_AGENT_MQTT_PORT", stack.mqtt_port.to_string())
            .env("EDGE_AGENT_TOPIC_PREFIX", &prefix)
            .env("EDGE_AGENT_LISTEN", format!("tcp://127.0.0.1:{port}"))
            .env("EDGE_AGENT_HTTP_LISTEN", "")
            .env("EDGE_AGENT_MQTT_CLIENT_ID", &mqtt_id)
            // The agent alone (see common::agent_config).
            .env("EDGE_AGENT_ECHO_WAIT_FOR_INGEST", "false")
            .env("EDGE_AGENT_ECHO_AHEAD_MAX_READINGS", "0")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start the agent binary")
    };
    let mut agent = spawn();
    let n = 30_000;
    let (progress, emu, _) =
        spawn_emulator(emulator(Endpoint::Tcp(format!("127.0.0.1:{port}")), n, Rate::PerSecond(6000), "k"));
    eventually(Duration::from_secs(20), "some readings acked", || {
        progress.acked.load(std::sync::atomic::Ordering::Relaxed) > 6000
    })
    .await;
    agent.start_kill().unwrap(); // SIGKILL
    agent.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // the agent stays down this long
    let mut agent = spawn();
    let stats = emu.await.unwrap();
    assert_eq!(stats.acked, n, "the reliable emulator resent what was not acked");
    assert!(stats.connects >= 2);
    eventually(Duration::from_secs(30), "every acked reading reached the broker", || {
        collector.distinct() == n as usize
    })
    .await;
    assert_eq!(collector.missing_from(&expected_ids(4, "k", n)), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while outbox_rows(&pg).await > 0 {
        assert!(std::time::Instant::now() < deadline, "outbox drains after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SIGTERM: a clean, prompt exit with status 0.
    let pid = agent.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_mode_keeps_rows_until_the_ingest_ack_names_them() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let mut config = agent_config(&pg, stack.mqtt_port, &prefix);
    config.confirm = ConfirmMode::Ingest;
    config.batch_max_readings = 500;

    // Play the ingest server: see every batch the agent publishes (its
    // exact ranges), and send acks.
    let fake = FakeIngest::start(&stack, &prefix).await;

    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 3000, Rate::Max, "i"));
    assert_eq!(emu.await.unwrap().acked, 3000);
    eventually(Duration::from_secs(10), "every batch seen", || {
        fake.seen.lock().unwrap().iter().map(|r| r.last_seq).max() == Some(3000)
    })
    .await;
    // An absence check: the echoes arrive within this second and must delete nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(agent.shared.outbox_size().0, 3000, "echoes do not delete in ingest mode");
    let mut batches: Vec<(u64, u64)> = fake.seen.lock().unwrap().iter().map(|r| (r.first_seq, r.last_seq)).collect();
    batches.sort_unstable();
    batches.dedup();
    assert!(batches.len() >= 6, "batches of at most 500 readings: {batches:?}");
    let size = |(f, l): (u64, u64)| l - f + 1;

    let range = |epoch, (first_seq, last_seq)| telemetry_wire::SeqRange { epoch, first_seq, last_seq };
    let ack = |r: (u64, u64)| telemetry_wire::IngestAck::stored(vec![range(agent.epoch, r)]);
    let rejected_total = || {
        family_total(
            &agent.shared.metrics.confirmations_rejected,
            &["other_epoch", "not_in_flight", "payload_mismatch"],
        )
    };
    let mut left = 3000;

    // An exact batch from the middle: exactly its rows go.
    fake.ack(&ack(batches[2])).await;
    left -= size(batches[2]);
    eventually(Duration::from_secs(10), "middle batch deleted", || agent.shared.outbox_size().0 == left).await;

    // Forged or stale: another epoch, and ranges that are no batch in flight
    // (half of one; one already confirmed): nothing deleted, each counted.
    let before = rejected_total();
    let (f0, l0) = batches[0];
    let forged = [
        telemetry_wire::IngestAck::stored(vec![range(agent.epoch ^ 1, (1, 3000))]),
        ack((f0, f0 + size(batches[0]) / 2)),
        ack(batches[2]),
    ];
    for a in forged {
        fake.ack(&a).await;
    }
    eventually(Duration::from_secs(10), "forged acks counted", || rejected_total() == before + 3).await;
    assert_eq!(agent.shared.outbox_size().0, left, "no forged or stale ack deleted anything");

    fake.ack(&ack((f0, l0))).await;
    left -= size(batches[0]);
    eventually(Duration::from_secs(10), "first batch deleted", || agent.shared.outbox_size().0 == left).await;
    // Rejected for good by the server (dead-lettered there): deleted too,
    // and counted apart from the stored ones.
    let acked_before = agent.shared.metrics.readings_ingest_acked.get();
    let rejected = telemetry_wire::IngestAck { ranges: vec![], rejected: vec![range(agent.epoch, batches[3])] };
    fake.ack(&rejected).await;
    left -= size(batches[3]);
    eventually(Duration::from_secs(10), "rejected batch deleted", || agent.shared.outbox_size().0 == left).await;
    assert_eq!(agent.shared.metrics.readings_ingest_acked.get(), acked_before, "a rejection is not a confirmation");
    assert_eq!(agent.shared.metrics.readings_rejected_by_ingest.get(), size(batches[3]));
    let (pgc, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = pgc.query_one("SELECT count(*) FROM edge_agent.outbox", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0) as u64, left);
    let gone = pgc
        .query_one(
            "SELECT count(*) FROM edge_agent.outbox WHERE seq BETWEEN $1 AND $2 OR seq BETWEEN $3 AND $4 \
             OR seq BETWEEN $5 AND $6",
            &[
                &(batches[0].0 as i64),
                &(batches[0].1 as i64),
                &(batches[2].0 as i64),
                &(batches[2].1 as i64),
                &(batches[3].0 as i64),
                &(batches[3].1 as i64),
            ],
        )
        .await
        .unwrap();
    assert_eq!(gone.get::<_, i64>(0), 0, "exactly the confirmed batches' rows are gone");
    agent.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_are_served_over_http() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let mut config = agent_config(&pg, stack.mqtt_port, &topic_prefix());
    config.http_listen = "127.0.0.1:0".into();
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 1000, Rate::Max, "h"));
    assert_eq!(emu.await.unwrap().acked, 1000);
    let http = agent.http_addr.expect("http listener");
    let metrics = http_get(http, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("telemetry_agent_readings_committed_total 1000"), "{metrics}");
    assert!(metrics.contains("telemetry_agent_outbox_rows "), "{metrics}");
    let health = http_get(http, "/healthz").await;
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(http_get(http, "/nope").await.starts_with("HTTP/1.1 404"));
    agent.shutdown().await;
}

/// Issue 12: in echo mode the readings echoed but not yet acked by an ingest
/// server live only in the broker; `echo_ahead_max_readings` bounds them.
/// A fake ingest server announces itself but acks nothing: the agent stops
/// publishing at the bound and its outbox keeps the rest; acks release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_ahead_bound_keeps_the_backlog_in_the_outbox_until_ingest_acks() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let mut config = agent_config(&pg, stack.mqtt_port, &prefix);
    config.echo_wait_for_ingest = true;
    config.echo_ahead_max_readings = 2000;
    config.batch_max_readings = 500;

    // The fake ingest server: a retained presence announcement, and every
    // batch's range recorded for acking later.
    let fake = FakeIngest::start(&stack, &prefix).await;
    fake.announce(Some("{\"durable\":true}")).await;

    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let m = agent.shared.metrics.clone();
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 10_000, Rate::Max, "a"));
    assert_eq!(emu.await.unwrap().acked, 10_000, "sensors are acked: the outbox holds what is not published");
    eventually(Duration::from_secs(10), "the bound reached", || m.echo_ahead_readings.get() >= 2000).await;
    assert_eq!(m.ingest_present.get(), 1);
    // An absence check: at the bound, nothing more is published.
    let published = m.readings_published.get();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(m.readings_published.get(), published, "publishing stopped at the bound");
    let ahead = m.echo_ahead_readings.get() as u64;
    assert!(ahead <= 2000 + 64 * 500, "echoed-unacked readings within the bound (plus the window): {ahead}");
    assert_eq!(agent.shared.outbox_size().0, 10_000 - ahead, "the rest waits in the durable outbox");

    // Ingest acks release the bound, batch by batch, until everything went.
    let mut acked = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agent.shared.outbox_size().0 > 0 || m.echo_ahead_readings.get() > 0 {
        assert!(std::time::Instant::now() < deadline, "not drained by ingest acks");
        let ranges: Vec<_> = fake.seen.lock().unwrap()[acked..].to_vec();
        acked += ranges.len();
        if !ranges.is_empty() {
            fake.ack(&telemetry_wire::IngestAck::stored(ranges)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(m.readings_published.get() >= 10_000);
    assert_eq!(m.echo_ahead_expired_readings.get(), 0);
    fake.announce(None).await; // clear the retained announcement
    agent.shutdown().await;
}

/// Issue 12: an agent whose outbox is empty after a (re)start does not poll
/// it: one read finds nothing above its cursor, and the next waits for a
/// commit. (Before: a SELECT every 10 ms until data arrived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_outbox_is_not_polled_after_a_restart() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let config = agent_config(&pg, stack.mqtt_port, &topic_prefix());
    let agent = Agent::start(config.clone(), CancellationToken::new()).await.unwrap();
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 1000, Rate::Max, "e"));
    assert_eq!(emu.await.unwrap().acked, 1000);
    eventually(Duration::from_secs(10), "outbox drained", || agent.shared.outbox_size().0 == 0).await;
    agent.shutdown().await;

    // Again on the same, now empty, outbox (its next seq is 1001).
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let m = agent.shared.metrics.clone();
    eventually(Duration::from_secs(10), "connected", || agent.shared.connected()).await;
    eventually(Duration::from_secs(10), "the replay read the outbox", || m.outbox_reads.get() >= 1).await;
    let reads = m.outbox_reads.get();
    // An absence check: idle for a second, the outbox is not read again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(m.outbox_reads.get(), reads, "an empty outbox was polled");
    // New readings still flow (from memory: no read needed either).
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 500, Rate::Max, "f"));
    assert_eq!(emu.await.unwrap().acked, 500);
    eventually(Duration::from_secs(10), "drained again", || agent.shared.outbox_size().0 == 0).await;
    agent.shutdown().await;
}

/// Issue 12: the backlog can be seen: while the broker is down the oldest
/// reading ages and the drain ETA says "not shrinking" (-1); once it is
/// back the outbox drains, the ETA reaches 0, and the bytes on the wire per
/// reading are known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_outlook_is_reported_while_it_grows_and_drains() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let broker = PrivateService::start(Service::Mqtt);
    broker.stop();
    let pg = fresh_pg_database(&stack).await;
    let agent = Agent::start(agent_config(&pg, broker.port, &topic_prefix()), CancellationToken::new()).await.unwrap();
    let m = agent.shared.metrics.clone();
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 3000, Rate::Max, "o"));
    assert_eq!(emu.await.unwrap().acked, 3000, "committed while the broker is down");
    eventually(Duration::from_secs(10), "the oldest reading ages", || m.outbox_oldest_age_seconds.get() >= 1).await;
    assert_eq!(m.outbox_drain_eta_seconds.get(), -1, "not shrinking while the broker is down");
    assert_eq!(m.bytes_published.get(), 0);

    broker.restart();
    eventually(Duration::from_secs(30), "drained", || agent.shared.outbox_size().0 == 0).await;
    eventually(Duration::from_secs(10), "ETA 0 once empty", || {
        m.outbox_drain_eta_seconds.get() == 0 && m.outbox_oldest_age_seconds.get() == 0
    })
    .await;
    let per_reading = m.bytes_published.get() as f64 / m.readings_published.get() as f64;
    assert!((10.0..100.0).contains(&per_reading), "bytes on the wire per reading: {per_reading}");
    agent.shutdown().await;
}

/// Issue 12: with `replay_order = "live_first"` fresh readings go out at
/// once after a reconnect while the backlog drains behind them at
/// `replay_max_rate`; every reading still reaches the broker once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_first_replay_sends_fresh_readings_ahead_of_the_paced_backlog() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let broker = PrivateService::start(Service::Mqtt);
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    // Subscribed before the outage: its persistent session keeps what the
    // agent publishes while it reconnects.
    let collector = Collector::start("127.0.0.1", broker.port, &prefix).await;
    broker.stop();
    let mut config = agent_config(&pg, broker.port, &prefix);
    config.replay_order = edge_agent::config::ReplayOrder::LiveFirst;
    config.replay_max_rate = 5000;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let backlog = 20_000;
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), backlog, Rate::Max, "b"));
    assert_eq!(emu.await.unwrap().acked, backlog, "the backlog is committed while the broker is down");

    broker.restart();
    let (_, live, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 2000, Rate::PerSecond(1000), "l"));
    let saw_live = || collector.ids.lock().unwrap().iter().any(|(sensor, _)| sensor.starts_with("l-"));
    eventually(Duration::from_secs(20), "a live reading reached the broker", saw_live).await;
    let replayed = agent.shared.metrics.readings_replayed.get();
    assert!(
        replayed < backlog,
        "live readings went out while the backlog was still replaying ({replayed} of {backlog})"
    );
    assert_eq!(live.await.unwrap().acked, 2000);
    eventually(Duration::from_secs(30), "every reading reached the broker", || collector.distinct() == 22_000).await;
    assert_eq!(collector.missing_from(&expected_ids(4, "b", backlog)), 0);
    assert_eq!(collector.missing_from(&expected_ids(4, "l", 2000)), 0);
    assert!(agent.shared.metrics.readings_replayed.get() >= backlog, "the whole backlog was replayed");
    eventually(Duration::from_secs(30), "outbox drained", || agent.shared.outbox_size().0 == 0).await;
    agent.shutdown().await;
}
