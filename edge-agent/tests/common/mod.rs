//! Harness for the agent's integration tests: an agent on a fresh database
//! and topic prefix, an independent MQTT subscriber that counts every reading
//! the broker routes, and in-process emulators.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::config::{Config, ListenAddr};
use emulators::stream::{Codec, Endpoint, Progress, Rate, StreamConfig, StreamStats};
use emulators::SensorKind;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use telemetry_wire::Batch;
use test_support::Stack;
use tokio_util::sync::CancellationToken;

/// Logs of the agent under test (RUST_LOG, default warn), captured per test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub const START_TS: i64 = 1_700_000_000_000_000;

/// A config for a test agent: fresh outbox database, private topic prefix,
/// an ephemeral TCP port, no HTTP listener.
pub fn agent_config(pg_url: &str, mqtt_port: u16, prefix: &str) -> Config {
    Config {
        client_id: "dev-1".into(),
        // Unique per test: agents sharing an MQTT client id on one broker
        // would take each other's connection over in a loop.
        mqtt_client_id: test_support::unique_name("agent"),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: pg_url.to_owned(),
        mqtt_port,
        topic_prefix: prefix.to_owned(),
        http_listen: String::new(),
        status_interval_secs: 1,
        confirm_timeout_ms: 2000,
        shutdown_timeout_secs: 5,
        // These tests judge the agent alone, with no ingest server on the
        // broker: echoes delete without a presence announcement and without
        // ingest acks. The tests of those two rules set them back.
        echo_wait_for_ingest: false,
        echo_ahead_max_readings: 0,
        echo_ahead_max_bytes: 0,
        ..Config::default()
    }
}

pub fn endpoint(addr: &ListenAddr) -> Endpoint {
    match addr {
        ListenAddr::Tcp(a) => Endpoint::Tcp(a.clone()),
        ListenAddr::Unix(p) => Endpoint::Unix(p.clone()),
    }
}

/// An emulator config with synthetic, predictable timestamps.
pub fn emulator(endpoint: Endpoint, count: u64, rate: Rate, prefix: &str) -> StreamConfig {
    let mut c = StreamConfig::new(SensorKind::Temperature, endpoint);
    c.count = Some(count);
    c.rate = rate;
    c.sensors = 4;
    c.frame = 50;
    c.reliable = true;
    c.prefix = prefix.to_owned();
    c.synthetic_ts = Some((START_TS, 1000));
    c.codec = Codec::Bincode;
    c
}

/// Runs an emulator to completion in the background.
pub fn spawn_emulator(
    config: StreamConfig,
) -> (Arc<Progress>, tokio::task::JoinHandle<StreamStats>, CancellationToken) {
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(emulators::run(config, progress.clone(), cancel.clone()));
    (progress, handle, cancel)
}

/// Every (sensor, ts) the emulator config generates.
pub fn expected_ids(sensors: usize, prefix: &str, count: u64) -> HashSet<(String, i64)> {
    (0..count)
        .map(|i| {
            let sensor = i as usize % sensors;
            let nth = i / sensors as u64;
            (format!("{prefix}-{sensor}"), START_TS + nth as i64 * 1000)
        })
        .collect()
}

/// An independent subscriber on `<prefix>/client/+` with a persistent
/// session, collecting the identity of every reading the broker routes.
#[derive(Clone)]
pub struct Collector {
    pub ids: Arc<Mutex<HashSet<(String, i64)>>>,
    pub readings: Arc<Mutex<u64>>,
}

impl Collector {
    pub async fn start(host: &str, port: u16, prefix: &str) -> Self {
        let ids = Arc::new(Mutex::new(HashSet::new()));
        let readings = Arc::new(Mutex::new(0));
        let mut options = MqttOptions::new(test_support::unique_name("collector"), host, port);
        options.set_clean_session(false);
        options.set_max_packet_size(16 << 20, 16 << 20);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let topic = format!("{prefix}/client/+");
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let (i2, r2) = (ids.clone(), readings.clone());
        tokio::spawn(async move {
            let _keep = client.clone();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(batch) = Batch::decode(&p.payload, 16 << 20) {
                            let mut ids = i2.lock().unwrap();
                            *r2.lock().unwrap() += batch.readings.len() as u64;
                            for r in batch.readings {
                                ids.insert((r.sensor, r.ts));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx).await.expect("collector subscribed").ok();
        Self { ids, readings }
    }

    pub fn distinct(&self) -> usize {
        self.ids.lock().unwrap().len()
    }

    pub fn missing_from(&self, expected: &HashSet<(String, i64)>) -> usize {
        let ids = self.ids.lock().unwrap();
        expected.iter().filter(|id| !ids.contains(*id)).count()
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows in the outbox table, read straight from Postgres.
pub async fn outbox_rows(pg_url: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.query_one("SELECT count(*) FROM edge_agent.outbox", &[]).await.expect("count").get(0)
}

pub fn stack_or_skip(needs: &[test_support::Service]) -> Option<Stack> {
    init_tracing();
    test_support::stack(needs)
}

/// Plays the ingest server for an agent `dev-1` under `prefix`: sees every
/// batch the agent publishes (its exact range, in arrival order) and sends
/// acks and presence announcements.
pub struct FakeIngest {
    /// Its MQTT client.
    pub client: AsyncClient,
    /// The ranges of the batches seen, in arrival order.
    pub seen: Arc<Mutex<Vec<telemetry_wire::SeqRange>>>,
    prefix: String,
}

impl FakeIngest {
    /// Connects, subscribes to the agent's data topic and waits for the SUBACK.
    pub async fn start(stack: &Stack, prefix: &str) -> Self {
        let mut options = MqttOptions::new(test_support::unique_name("fake-ingest"), "127.0.0.1", stack.mqtt_port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (seen, subscribed) = (seen.clone(), subscribed.clone());
            tokio::spawn(async move {
                while let Ok(event) = eventloop.poll().await {
                    match event {
                        Event::Incoming(Packet::Publish(p)) => {
                            if let Ok((_, range)) = Batch::decode_header(&p.payload, 1 << 20) {
                                seen.lock().unwrap().push(range);
                            }
                        }
                        Event::Incoming(Packet::SubAck(_)) => {
                            subscribed.store(true, std::sync::atomic::Ordering::SeqCst)
                        }
                        _ => {}
                    }
                }
            });
        }
        client.subscribe(format!("{prefix}/client/dev-1"), QoS::AtLeastOnce).await.unwrap();
        eventually(Duration::from_secs(10), "fake ingest subscribed", || {
            subscribed.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        Self { client, seen, prefix: prefix.to_owned() }
    }

    /// Sends `ack` to the agent.
    pub async fn ack(&self, ack: &telemetry_wire::IngestAck) {
        self.client.publish(format!("{}/ack/dev-1", self.prefix), QoS::AtLeastOnce, false, ack.encode()).await.unwrap();
    }

    /// Sets (or, with `None`, clears) a retained presence announcement.
    pub async fn announce(&self, payload: Option<&str>) {
        let payload = payload.map(|p| p.as_bytes().to_vec()).unwrap_or_default();
        let topic = format!("{}/ingest/fake", self.prefix);
        self.client.publish(topic, QoS::AtLeastOnce, true, payload).await.unwrap();
    }
}
