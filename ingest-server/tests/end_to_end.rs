//! End to end: emulator → edge agent (`confirm = "ingest"`) → Mosquitto →
//! ingest server → ClickHouse, with the ingest server SIGKILLed while it
//! holds received but not yet inserted messages.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use edge_agent::config::{ConfirmMode, ListenAddr};
use edge_agent::Agent;
use emulators::stream::{Endpoint, Progress, Rate, StreamConfig};
use emulators::SensorKind;
use harness::{Binary, World};
use tokio_util::sync::CancellationToken;

/// An agent of `client_id` on `world`'s broker and prefix, its outbox in
/// `pg`, confirming by `confirm`.
fn agent_config(world: &World, pg: &str, client_id: &str, confirm: ConfirmMode) -> edge_agent::Config {
    edge_agent::Config {
        client_id: client_id.into(),
        mqtt_client_id: test_support::unique_name("agent"),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: pg.to_owned(),
        mqtt_port: world.stack.mqtt_port,
        topic_prefix: world.prefix.clone(),
        http_listen: String::new(),
        confirm,
        ..edge_agent::Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_between_receive_and_insert_loses_nothing_end_to_end() {
    let Some(world) = World::new() else { return };
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let pg = test_support::fresh_pg_database(&stack).await;

    let mut ingest_config = world.config();
    // A long flush delay: the kill lands while messages wait in the batch.
    ingest_config.batch_max_delay_ms = 1500;
    let ingest = Binary::start(&ingest_config).await;

    let agent_config =
        edge_agent::Config { confirm_timeout_ms: 10_000, ..agent_config(&world, &pg, "e2e-1", ConfirmMode::Ingest) };
    let agent = Agent::start(agent_config, CancellationToken::new()).await.expect("agent starts");
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };

    let n = 20_000u64;
    let mut emu = StreamConfig::new(SensorKind::Pressure, Endpoint::Tcp(addr));
    emu.count = Some(n);
    emu.rate = Rate::PerSecond(5000);
    emu.sensors = 4;
    emu.reliable = true;
    emu.synthetic_ts = Some((harness::BASE_TS, 1000));
    let progress = Arc::new(Progress::default());
    let emu_task = tokio::spawn(emulators::run(emu, progress.clone(), CancellationToken::new()));

    // Let some data be stored, then kill the ingest server while a batch is
    // pending (received, PUBACK withheld, not inserted): the fault window
    // this test is named for, read from one /metrics answer just before the
    // SIGKILL.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (received, inserted) = loop {
        let (received, inserted) = ingest.received_and_inserted().await;
        if inserted > 0.0 && received > inserted {
            break (received, inserted);
        }
        assert!(std::time::Instant::now() < deadline, "no moment with a batch received but not inserted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ingest.kill();
    eprintln!("killed the ingest server: received {received}, inserted {inserted}");
    assert!(received > inserted, "killed with readings received but not inserted");
    assert!(agent.shared.outbox_size().0 > 0, "unconfirmed rows wait in the outbox");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let ingest = Binary::start(&ingest_config).await;
    assert_eq!(emu_task.await.unwrap().acked, n, "every reading acked by the agent");

    world.wait_stored(n, Duration::from_secs(90)).await;
    world.assert_rollup_exact().await;
    harness::wait_for("the agent's outbox drained by ingest acks", Duration::from_secs(60), || {
        agent.shared.outbox_size().0 == 0
    })
    .await;
    assert!(agent.shared.metrics.readings_ingest_acked.get() > 0);
    assert_eq!(agent.shared.metrics.readings_echoed.get(), 0, "ingest mode ignores echoes");
    agent.shutdown().await;
    assert!(ingest.terminate().success());
}

/// Streams `n` readings (4 sensors, timestamps from `first_ts`) to `agent`
/// and waits until every one is acked to the sensor.
async fn send(agent: &Agent, n: u64, first_ts: i64) {
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let mut emu = StreamConfig::new(SensorKind::Temperature, Endpoint::Tcp(addr));
    emu.count = Some(n);
    emu.rate = Rate::Max;
    emu.sensors = 4;
    emu.reliable = true;
    emu.synthetic_ts = Some((first_ts, 1000));
    let stats = emulators::run(emu, Arc::new(Progress::default()), CancellationToken::new()).await;
    assert_eq!(stats.acked, n);
}

/// Issue 12: an outbox restored from an older dump gives out seqs again that
/// the ingest server already stored. Neither a restore under the running
/// agent nor one while it is stopped may make new readings look like
/// duplicates (which the server would ack unstored, and the agent delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_restored_from_an_older_dump_loses_nothing() {
    let Some(world) = World::new() else { return };
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let pg = test_support::fresh_pg_database(&stack).await;
    let server = harness::Server::start(world.config()).await;
    let agent_config = agent_config(&world, &pg, "rollback-1", ConfirmMode::Ingest);
    let drained = |agent: &Agent| agent.shared.outbox_size().0 == 0;
    let dump = std::env::temp_dir().join(format!("{}.sql", test_support::unique_name("outbox")));
    let dump_path = dump.to_str().expect("utf-8 path");
    let restore = || test_support::pg_restore(&pg, dump_path).expect("restore the dump");

    let agent = Agent::start(agent_config.clone(), CancellationToken::new()).await.expect("agent starts");
    let first_epoch = agent.epoch;
    send(&agent, 1000, harness::BASE_TS).await;
    world.wait_stored(1000, Duration::from_secs(60)).await;
    harness::wait_for("outbox drained", Duration::from_secs(30), || drained(&agent)).await;
    // The backup: next_seq 1001.
    test_support::pg_tool("pg_dump", &pg, &["-n", "edge_agent", "--clean", "--if-exists", "-f", dump_path])
        .expect("dump the outbox");
    send(&agent, 1000, harness::BASE_TS + 10_000_000).await;
    world.wait_stored(2000, Duration::from_secs(60)).await;
    harness::wait_for("outbox drained", Duration::from_secs(30), || drained(&agent)).await;

    // Restored under the running agent: its next commit finds next_seq 1001
    // behind its own 2001 and moves the table forward.
    restore();
    send(&agent, 1000, harness::BASE_TS + 20_000_000).await;
    world.wait_stored(3000, Duration::from_secs(60)).await;
    harness::wait_for("outbox drained", Duration::from_secs(30), || drained(&agent)).await;
    assert!(agent.shared.metrics.outbox_rollbacks.get() >= 1, "the rollback under the agent was seen");
    agent.shutdown().await;

    // Restored while the agent is stopped: a new start is a new epoch.
    restore();
    let agent = Agent::start(agent_config, CancellationToken::new()).await.expect("agent restarts");
    assert_ne!(agent.epoch, first_epoch, "every start is a new epoch");
    send(&agent, 1000, harness::BASE_TS + 30_000_000).await;
    world.wait_stored(4000, Duration::from_secs(60)).await;
    harness::wait_for("outbox drained", Duration::from_secs(30), || drained(&agent)).await;
    assert_eq!(world.distinct_readings().await, 4000, "every reading of the four runs is stored once");
    assert_eq!(world.final_readings().await, 4000);
    world.assert_rollup_exact().await;
    agent.shutdown().await;
    server.stop().await;
    let _ = std::fs::remove_file(&dump);
}

/// Issue 12: an echo-mode agent that runs before any ingest server has
/// subscribed (a first deployment, a new prefix, an expired ingest session)
/// sees its batches echoed although the broker routed them to no durable
/// subscriber. It must keep them until a server announces its subscription,
/// then publish them again: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_mode_agent_started_before_any_ingest_server_loses_nothing() {
    let Some(world) = World::new() else { return };
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let agent_config =
        agent_config(&world, &test_support::fresh_pg_database(&stack).await, "early-1", ConfirmMode::Echo);
    let agent = Agent::start(agent_config, CancellationToken::new()).await.expect("agent starts");
    let m = agent.shared.metrics.clone();
    send(&agent, 5000, harness::BASE_TS).await;
    harness::wait_for("every batch echoed and held", Duration::from_secs(30), || {
        m.readings_published.get() >= 5000
            && m.echo_held_batches.get() > 0
            && m.inflight_batches.get() == m.echo_held_batches.get()
    })
    .await;
    assert_eq!(agent.shared.outbox_size().0, 5000, "echoes with no ingest server announced delete nothing");
    assert_eq!(m.ingest_present.get(), 0);
    assert_eq!(m.readings_echoed.get(), 0);

    // The first ingest server: its subscription is new, so the batches
    // published so far are not in its session; the agent publishes them again.
    let server_config = world.config();
    let server = harness::Server::start(server_config.clone()).await;
    world.wait_stored(5000, Duration::from_secs(60)).await;
    harness::wait_for("outbox drained", Duration::from_secs(30), || agent.shared.outbox_size().0 == 0).await;
    assert_eq!(m.ingest_present.get(), 1);
    assert_eq!(m.echo_held_batches.get(), 0);

    // A graceful stop withdraws the announcement: echoes are held again.
    server.stop().await;
    harness::wait_for("presence withdrawn", Duration::from_secs(10), || m.ingest_present.get() == 0).await;
    send(&agent, 1000, harness::BASE_TS + 10_000_000).await;
    harness::wait_for("held again", Duration::from_secs(30), || m.echo_held_batches.get() > 0).await;
    assert_eq!(agent.shared.outbox_size().0, 1000);
    let server = harness::Server::start(server_config).await; // the same server, restarted
    world.wait_stored(6000, Duration::from_secs(60)).await;
    harness::wait_for("outbox drained again", Duration::from_secs(30), || agent.shared.outbox_size().0 == 0).await;
    world.assert_rollup_exact().await;
    agent.shutdown().await;
    server.stop().await;
}

/// Issue 12: an agent with `compression = "zstd"` (batch version 2) is
/// stored exactly by the same ingest server that reads version 1, end to
/// end (its ingest acks and its echoes match compressed batches too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressing_agent_is_stored_exactly_and_sends_fewer_bytes() {
    let Some(world) = World::new() else { return };
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let server = harness::Server::start(world.config()).await;
    let mut agents = Vec::new();
    for (id, compression, confirm) in [
        ("zstd-ingest", edge_agent::config::Compression::Zstd, ConfirmMode::Ingest),
        ("zstd-echo", edge_agent::config::Compression::Zstd, ConfirmMode::Echo),
        ("plain-echo", edge_agent::config::Compression::None, ConfirmMode::Echo),
    ] {
        let config = edge_agent::Config {
            compression,
            ..agent_config(&world, &test_support::fresh_pg_database(&stack).await, id, confirm)
        };
        let agent = Agent::start(config, CancellationToken::new()).await.expect("agent starts");
        send(&agent, 5000, harness::BASE_TS).await;
        agents.push(agent);
    }
    world.wait_stored(15_000, Duration::from_secs(60)).await;
    for agent in &agents {
        harness::wait_for("outbox drained", Duration::from_secs(30), || agent.shared.outbox_size().0 == 0).await;
    }
    world.assert_rollup_exact().await;
    let per_reading =
        |a: &Agent| a.shared.metrics.bytes_published.get() as f64 / a.shared.metrics.readings_published.get() as f64;
    let (zstd, plain) = (per_reading(&agents[1]), per_reading(&agents[2]));
    eprintln!("bytes on the wire per reading: zstd {zstd:.1}, plain {plain:.1}");
    assert!(zstd < plain / 2.0, "zstd {zstd:.1} vs plain {plain:.1} bytes per reading");
    assert_eq!(
        server
            .metrics
            .dead_letters
            .get_or_create(&ingest_server::metrics::ReasonLabel { reason: "bad_compression".into() })
            .get(),
        0
    );
    for agent in agents {
        agent.shutdown().await;
    }
    server.stop().await;
}
