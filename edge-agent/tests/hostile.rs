//! Hostile sensors through real sockets (issue 7): garbage from many
//! connections, the fuzz-found frame, half a frame then silence, and a flood
//! of idle connections. Each is counted, the connection cap holds, memory
//! stays bounded, and a good sensor alongside loses nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use edge_agent::config::ListenAddr;
use edge_agent::metrics::family_total;
use edge_agent::Agent;
use emulators::stream::Rate;
use test_support::{fresh_pg_database, topic_prefix, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const PG_MQTT: &[Service] = &[Service::Postgres, Service::Mqtt];
const REASONS: &[&str] = &[
    "unknown_version",
    "oversize",
    "truncated",
    "malformed",
    "malformed_json",
    "trailing_bytes",
    "empty",
    "idle_timeout",
    "not_utf8",
    "invalid_header",
    "invalid_reading",
];

/// Resident memory of this process (agent included) in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

/// Reads until the peer closes (Ok(0)) or resets; panics if it stays open.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_many_sockets_is_counted_and_a_good_sensor_loses_nothing() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let mut config = agent_config(&pg, stack.mqtt_port, &topic_prefix());
    // Garbage that happens to announce a frame longer than itself waits for
    // the rest like any slow sensor, until the idle timeout closes it.
    config.idle_timeout_secs = 2;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let (_, good, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 5000, Rate::PerSecond(2500), "g"));
    let m = agent.shared.metrics.clone();

    let mut attacks: Vec<Vec<u8>> = Vec::new();
    for i in 0..40u32 {
        // Pseudo-random bytes, binary (4th byte 0: bincode path) or not.
        let mut g: Vec<u8> = (0..512u32).map(|j| ((i * 7919 + j).wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        if i % 2 == 0 {
            g[3] = 0;
        }
        attacks.push(g);
    }
    attacks.push(vec![0, 0, 0, 0x80, 1, 2, 3]); // 2 GiB length prefix
    attacks.push(vec![0xff; 4]); // 4 GiB - 1
                                 // The fuzz finding: a tiny frame whose sensor name claims ~40 MB.
    let found = include_bytes!("../../wire/tests/fuzz-regressions/sensor_frames-string-length-oom.bin");
    attacks.push(found[1..].to_vec());
    attacks.push(b"\x00\x00\x00\x00\n".to_vec()); // empty payload frame
    attacks.push(b"\xff\xfe not utf-8 \xc3\x28\n".to_vec());
    let n = attacks.len() as u64;
    let before = rss_kib();
    let mut tasks = Vec::new();
    for bytes in attacks {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let _ = s.write_all(&bytes).await;
            closed_within(&mut s, Duration::from_secs(10)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually(Duration::from_secs(10), "every attack counted", || family_total(&m.frames_rejected, REASONS) >= n)
        .await;
    assert_eq!(good.await.unwrap().acked, 5000, "the good sensor was not disturbed");
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_frame_then_silence_is_closed_by_the_idle_timeout() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let mut config = agent_config(&pg, stack.mqtt_port, &topic_prefix());
    config.idle_timeout_secs = 1;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let m = agent.shared.metrics.clone();
    // A 61-byte frame announced, 10 bytes sent, then nothing.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(&[61, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 2]).await.unwrap();
    // Two bytes of a length prefix, then nothing.
    let mut quarter = tokio::net::TcpStream::connect(&addr).await.unwrap();
    quarter.write_all(&[61, 0]).await.unwrap();
    let start = Instant::now();
    closed_within(&mut half, Duration::from_secs(5)).await;
    closed_within(&mut quarter, Duration::from_secs(5)).await;
    assert!(start.elapsed() >= Duration::from_millis(900), "closed before the timeout");
    eventually(Duration::from_secs(5), "idle timeouts counted", || {
        family_total(&m.frames_rejected, &["idle_timeout"]) == 2
    })
    .await;
    assert_eq!(m.readings_committed.get(), 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_holds_the_cap_and_memory_stays_bounded() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let mut config = agent_config(&pg, stack.mqtt_port, &topic_prefix());
    config.max_connections = 100;
    config.idle_timeout_secs = 1;
    let agent = Agent::start(config, CancellationToken::new()).await.unwrap();
    let ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let m = agent.shared.metrics.clone();
    let before = rss_kib();

    // 800 connections that never send a byte (the listen backlog holds the
    // ones beyond the cap).
    let mut idle = Vec::new();
    for _ in 0..800 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.expect("connect"));
    }
    // While they drain (100 at a time, 1 s each), the cap holds.
    let mut peak = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        peak = peak.max(m.connections.get());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(peak <= 100, "{peak} connections open at once, cap 100");
    assert!(peak >= 50, "the flood did reach the agent ({peak})");
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB with 800 idle connections");

    // A good sensor queued behind the flood is served once it has drained.
    let (_, good, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 1000, Rate::PerSecond(1000), "g"));
    let stats = tokio::time::timeout(Duration::from_secs(60), good).await.expect("good sensor served").unwrap();
    assert_eq!(stats.acked, 1000);
    eventually(Duration::from_secs(20), "every idle connection timed out", || {
        family_total(&m.frames_rejected, &["idle_timeout"]) >= 800
    })
    .await;
    drop(idle);
    agent.shutdown().await;
}
