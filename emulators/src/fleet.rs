//! Fleet load generator: many simulated edge agents publishing
//! [`telemetry_wire::Batch`] payloads, QoS 1, to `<prefix>/client/<client_id>`,
//! the way real agents do, without outboxes or sensors behind them.
//!
//! Every simulated client has a valid client id (`<id_prefix>-<n>`), a random
//! epoch, contiguous seqs from 1 and sensors whose timestamps increase
//! strictly, so an ingest server stores each reading exactly once. Clients
//! share [`FleetConfig::connections`] MQTT connections (client `n` uses
//! connection `n % connections`); with as many connections as clients each
//! client has its own, like a fleet of real agents.
//!
//! Two modes:
//! - paced ([`FleetRate::PerSecond`]): each client publishes one batch every
//!   [`FleetConfig::interval`] with the readings of that interval; clients are
//!   staggered evenly across the interval, so the broker sees a steady stream.
//! - max ([`FleetRate::Max`]): every client's readings are encoded up front in
//!   batches of [`FleetConfig::batch`], then published as fast as the broker
//!   takes them (measures the receiving side, not the generator).
//!
//! Publishing starts only when every connection is up, so a benchmark can
//! measure the steady state separately from the connection storm.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use telemetry_wire::{Batch, Reading};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::signal::{now_micros, SensorKind, Signal};

/// Readings per second per client, or as fast as possible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FleetRate {
    /// Readings per second of each client (may be fractional, e.g. 0.5).
    PerSecond(f64),
    /// Pre-encoded batches, published as fast as the broker acks them.
    Max,
}

impl FromStr for FleetRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Self::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 => Ok(Self::PerSecond(r)),
            _ => Err(format!("rate {s:?} is neither a positive number nor `max`")),
        }
    }
}

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix: batches go to `<prefix>/client/<client_id>`.
    pub topic_prefix: String,
    /// Simulated clients.
    pub clients: usize,
    /// MQTT connections the clients share (clamped to `1..=clients`).
    pub connections: usize,
    /// Per-client rate.
    pub rate: FleetRate,
    /// Paced mode: one batch per client per interval.
    pub interval: Duration,
    /// Max mode: readings per batch.
    pub batch: usize,
    /// Max mode: µs between two readings of one sensor (timestamps end about now).
    pub ts_step_us: i64,
    /// Readings per client, then stop (required in max mode).
    pub count: Option<u64>,
    /// Paced mode: stop publishing after this long.
    pub duration: Option<Duration>,
    /// Client ids are `<id_prefix>-<n>`.
    pub id_prefix: String,
    /// Sensors per client.
    pub sensors: usize,
    /// QoS 1 publishes in flight per connection.
    pub inflight: u16,
    /// Connection handshakes in progress at once.
    pub connect_concurrency: usize,
    /// Give up if not every connection is up after this long.
    pub connect_timeout: Duration,
    /// After publishing, wait this long at most for the last PUBACKs.
    pub drain_timeout: Duration,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Seed of epochs and signals.
    pub seed: u64,
}

impl FleetConfig {
    /// Defaults for `clients` clients on a broker at `host:port`.
    #[must_use]
    pub fn new(host: impl Into<String>, port: u16, clients: usize) -> Self {
        Self {
            host: host.into(),
            port,
            topic_prefix: "/telemetry".into(),
            clients,
            connections: clients,
            rate: FleetRate::PerSecond(1.0),
            interval: Duration::from_secs(1),
            batch: 1000,
            ts_step_us: 1000,
            count: None,
            duration: None,
            id_prefix: "fleet".into(),
            sensors: 4,
            inflight: 100,
            connect_concurrency: 200,
            connect_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(60),
            seed: 0,
        }
    }

    fn connection_count(&self) -> usize {
        self.connections.clamp(1, self.clients.max(1))
    }
}

/// Live counters, readable while [`run`] runs.
#[derive(Debug, Default)]
pub struct FleetProgress {
    /// Connections whose first CONNACK arrived.
    pub connected: AtomicUsize,
    /// Readings handed to the MQTT client.
    pub published_readings: AtomicU64,
    /// Batches handed to the MQTT client.
    pub published_batches: AtomicU64,
    /// Batches the broker PUBACKed.
    pub acked_batches: AtomicU64,
    /// MQTT connection errors.
    pub errors: AtomicU64,
    /// Set when every connection is up (and max mode's batches are encoded):
    /// publishing starts now.
    pub publishing: std::sync::atomic::AtomicBool,
}

/// What [`run`] did.
#[derive(Debug, Clone, Default)]
pub struct FleetStats {
    /// Connections opened.
    pub connections: usize,
    /// Time until every connection was up.
    pub connect_secs: f64,
    /// Readings published.
    pub published_readings: u64,
    /// Batches published.
    pub published_batches: u64,
    /// Batches PUBACKed by the broker.
    pub acked_batches: u64,
    /// MQTT connection errors.
    pub errors: u64,
    /// From the start of publishing until the last publish was handed over.
    pub publish_secs: f64,
    /// From the start of publishing until the last PUBACK (or the drain timeout).
    pub acked_secs: f64,
}

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Not every connection came up in time.
    #[error("only {up} of {want} MQTT connections up after {secs:.0} s (raise `ulimit -n` or the broker's limits)")]
    Connect {
        /// Connections up.
        up: usize,
        /// Connections wanted.
        want: usize,
        /// Seconds waited.
        secs: f64,
    },
    /// A bad combination of settings.
    #[error("{0}")]
    Config(String),
}

/// One simulated agent.
struct SimClient {
    topic: String,
    id: String,
    epoch: u64,
    next_seq: u64,
    signals: Vec<Signal>,
    /// Offset of its publications inside the interval.
    phase: Duration,
    /// Readings owed but not yet published (fractional rates).
    owed: f64,
    /// Timestamp (µs) up to which readings were generated.
    until_us: i64,
    remaining: u64,
}

/// A client's first seq is drawn from `1..=SEQ_START_SPREAD`.
const SEQ_START_SPREAD: u64 = 1 << 30;

impl SimClient {
    fn new(config: &FleetConfig, n: usize, synthetic: Option<(i64, i64)>) -> Self {
        let mut rng = fastrand::Rng::with_seed(config.seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let id = format!("{}-{n}", config.id_prefix);
        let kinds = [SensorKind::Temperature, SensorKind::Pressure, SensorKind::Height];
        // Devices of a fleet are not in lockstep: each samples at its own
        // phase within the step, and its seq counter started long before this
        // run. Clients sharing timestamps and seqs byte for byte made inserts
        // that line them up (the bench's raw insert ceiling) compress far
        // better than any real fleet's.
        let synthetic = synthetic.map(|(start, step)| (start + rng.i64(0..step.max(1)), step));
        let first_seq = 1 + rng.u64(0..SEQ_START_SPREAD);
        let signals = (0..config.sensors.max(1))
            .map(|s| {
                let kind = kinds[s % kinds.len()];
                Signal::new(kind, format!("{}-{s}", kind.name()), rng.u64(..), synthetic)
            })
            .collect();
        let slot = config.interval.as_secs_f64() * n as f64 / config.clients.max(1) as f64;
        Self {
            topic: format!("{}/client/{id}", config.topic_prefix),
            id,
            epoch: rng.u64(1..),
            next_seq: first_seq,
            signals,
            phase: Duration::from_secs_f64(slot),
            owed: 0.0,
            until_us: now_micros() - i64::try_from(config.interval.as_micros()).unwrap_or(1_000_000),
            remaining: config.count.unwrap_or(u64::MAX),
        }
    }

    /// The next `n` readings as a batch payload, timestamps spread over
    /// `(self.until_us, to_us]` (synthetic signals use their own clock).
    fn next_batch(&mut self, n: usize, to_us: i64, readings: &mut Vec<Reading>) -> Bytes {
        readings.clear();
        let from = self.until_us;
        let span = (to_us - from).max(1);
        let sensors = self.signals.len() as u64;
        for i in 0..n {
            let t = from + span * (i as i64 + 1) / n as i64;
            let sensor = ((self.next_seq + i as u64) % sensors) as usize;
            readings.push(self.signals[sensor].next_reading(t));
        }
        self.until_us = to_us.max(from);
        let mut payload = Vec::new();
        Batch::encode_parts(&self.id, self.epoch, self.next_seq, readings, &mut payload);
        self.next_seq += n as u64;
        self.remaining -= n as u64;
        Bytes::from(payload)
    }
}

/// Per-connection counters, for waiting on the last PUBACKs.
#[derive(Default)]
struct ConnCounters {
    published: AtomicU64,
    acked: AtomicU64,
}

/// Runs the fleet until every client published `count` readings, `duration`
/// passed, or `cancel` fires; then waits for the outstanding PUBACKs.
///
/// # Errors
/// [`FleetError::Connect`] when not every connection comes up in time;
/// [`FleetError::Config`] for max mode without a count.
pub async fn run(
    config: FleetConfig,
    progress: Arc<FleetProgress>,
    cancel: CancellationToken,
) -> Result<FleetStats, FleetError> {
    if config.rate == FleetRate::Max && config.count.is_none() {
        return Err(FleetError::Config("rate max needs a count per client".into()));
    }
    let config = Arc::new(config);
    let conns = config.connection_count();
    // Max mode: synthetic timestamps `ts_step_us` apart per sensor, ending about now.
    let synthetic = (config.rate == FleetRate::Max).then(|| {
        let step = config.ts_step_us.max(1);
        let per_sensor = config.count.unwrap_or(0) / config.sensors.max(1) as u64 + 1;
        (now_micros() - i64::try_from(per_sensor).unwrap_or(0).saturating_mul(step), step)
    });
    let mut groups: Vec<Vec<SimClient>> = (0..conns).map(|_| Vec::new()).collect();
    for n in 0..config.clients {
        groups[n % conns].push(SimClient::new(&config, n, synthetic));
    }
    let gate = Semaphore::new(config.connect_concurrency.max(1));
    let gate = Arc::new(gate);
    let go = CancellationToken::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let go_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for (c, clients) in groups.into_iter().enumerate() {
        let ctx = ConnCtx {
            config: config.clone(),
            index: c,
            progress: progress.clone(),
            gate: gate.clone(),
            go: go.clone(),
            go_at: go_at.clone(),
            ready: ready.clone(),
            cancel: cancel.clone(),
        };
        tasks.push(tokio::spawn(ctx.run(clients)));
    }
    // Wait for every connection (and max mode's encoding), then open the gate.
    let deadline = started + config.connect_timeout;
    loop {
        let up = progress.connected.load(Ordering::Relaxed);
        if up >= conns && ready.load(Ordering::Relaxed) >= conns {
            break;
        }
        if Instant::now() >= deadline || cancel.is_cancelled() {
            cancel.cancel();
            for t in tasks {
                let _ = t.await;
            }
            return Err(FleetError::Connect { up, want: conns, secs: started.elapsed().as_secs_f64() });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let _ = go_at.set(Instant::now());
    progress.publishing.store(true, Ordering::SeqCst);
    go.cancel();
    let mut publish_secs: f64 = 0.0;
    let mut acked_secs: f64 = 0.0;
    for t in tasks {
        if let Ok((p, a)) = t.await {
            publish_secs = publish_secs.max(p);
            acked_secs = acked_secs.max(a);
        }
    }
    Ok(FleetStats {
        connections: conns,
        connect_secs,
        published_readings: progress.published_readings.load(Ordering::Relaxed),
        published_batches: progress.published_batches.load(Ordering::Relaxed),
        acked_batches: progress.acked_batches.load(Ordering::Relaxed),
        errors: progress.errors.load(Ordering::Relaxed),
        publish_secs,
        acked_secs,
    })
}

struct ConnCtx {
    config: Arc<FleetConfig>,
    index: usize,
    progress: Arc<FleetProgress>,
    gate: Arc<Semaphore>,
    go: CancellationToken,
    go_at: Arc<std::sync::OnceLock<Instant>>,
    /// Connections done encoding (max mode) and waiting for the gate.
    ready: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl ConnCtx {
    /// One connection's life; returns (publish secs, acked secs) since the go.
    async fn run(self, mut clients: Vec<SimClient>) -> (f64, f64) {
        let config = &self.config;
        let mqtt_id = if config.connection_count() == config.clients {
            format!("{}-{}", config.id_prefix, self.index)
        } else {
            format!("{}-mux-{}", config.id_prefix, self.index)
        };
        let mut options = MqttOptions::new(mqtt_id, &config.host, config.port);
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_session(true)
            .set_inflight(config.inflight.max(1))
            .set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(config.inflight.max(1)) * 2);
        eventloop.network_options.set_connection_timeout(30);
        let counters = Arc::new(ConnCounters::default());
        let poller_stop = CancellationToken::new();
        let poller = {
            let (progress, counters, gate, stop) =
                (self.progress.clone(), counters.clone(), self.gate.clone(), poller_stop.clone());
            tokio::spawn(async move {
                let mut permit = gate.clone().acquire_owned().await.ok();
                let mut ever_connected = false;
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return,
                        e = eventloop.poll() => e,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            permit = None;
                            if !ever_connected {
                                ever_connected = true;
                                progress.connected.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                            progress.acked_batches.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(error) => {
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%error, "mqtt connection error");
                            drop(permit.take());
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            if !ever_connected {
                                permit = gate.clone().acquire_owned().await.ok();
                            }
                        }
                    }
                }
            })
        };
        // Max mode: encode everything before the gate opens.
        let mut readings = Vec::new();
        let prepared: Vec<(usize, Bytes, u64)> = if config.rate == FleetRate::Max {
            let mut out = Vec::new();
            let batch = config.batch.max(1) as u64;
            loop {
                let mut any = false;
                for (i, c) in clients.iter_mut().enumerate() {
                    let n = c.remaining.min(batch);
                    if n > 0 {
                        any = true;
                        out.push((i, c.next_batch(n as usize, 0, &mut readings), n));
                    }
                }
                if !any {
                    break;
                }
            }
            out
        } else {
            Vec::new()
        };
        self.ready.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            () = self.go.cancelled() => {}
            () = self.cancel.cancelled() => {
                poller_stop.cancel();
                let _ = poller.await;
                return (0.0, 0.0);
            }
        }
        let go_at = *self.go_at.get().unwrap_or(&Instant::now());
        let publish = |topic: String, payload: Bytes, n: u64| {
            let (client, counters, progress) = (&client, &counters, &self.progress);
            async move {
                if client.publish_bytes(topic, QoS::AtLeastOnce, false, payload).await.is_ok() {
                    counters.published.fetch_add(1, Ordering::Relaxed);
                    progress.published_batches.fetch_add(1, Ordering::Relaxed);
                    progress.published_readings.fetch_add(n, Ordering::Relaxed);
                }
            }
        };
        if config.rate == FleetRate::Max {
            for (i, payload, n) in prepared {
                if self.cancel.is_cancelled() {
                    break;
                }
                publish(clients[i].topic.clone(), payload, n).await;
            }
        } else if let FleetRate::PerSecond(rate) = config.rate {
            let per_interval = rate * config.interval.as_secs_f64();
            let end = config.duration.map(|d| go_at + d);
            'rounds: for round in 0u32.. {
                let mut active = false;
                for c in &mut clients {
                    if c.remaining == 0 {
                        continue;
                    }
                    active = true;
                    let at = go_at + config.interval * round + c.phase;
                    if end.is_some_and(|e| at >= e) {
                        break 'rounds;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = self.cancel.cancelled() => break 'rounds,
                    }
                    c.owed += per_interval;
                    let n = (c.owed.floor() as u64).min(c.remaining);
                    if n == 0 {
                        continue;
                    }
                    c.owed -= n as f64;
                    let payload = c.next_batch(n as usize, now_micros(), &mut readings);
                    publish(c.topic.clone(), payload, n).await;
                }
                if !active {
                    break;
                }
            }
        }
        let publish_secs = go_at.elapsed().as_secs_f64();
        // Wait for the broker's PUBACKs of everything published.
        let drain_deadline = Instant::now() + config.drain_timeout;
        while counters.acked.load(Ordering::Relaxed) < counters.published.load(Ordering::Relaxed)
            && Instant::now() < drain_deadline
            && !self.cancel.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let acked_secs = go_at.elapsed().as_secs_f64();
        let _ = client.disconnect().await;
        if tokio::time::timeout(Duration::from_secs(5), poller).await.is_err() {
            poller_stop.cancel();
        }
        (publish_secs, acked_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("max".parse::<FleetRate>(), Ok(FleetRate::Max));
        assert_eq!("0.5".parse::<FleetRate>(), Ok(FleetRate::PerSecond(0.5)));
        assert!("0".parse::<FleetRate>().is_err());
        assert!("fast".parse::<FleetRate>().is_err());
    }

    #[test]
    fn batches_are_valid_with_contiguous_seqs_and_increasing_timestamps() {
        let mut config = FleetConfig::new("127.0.0.1", 1, 3);
        config.sensors = 2;
        let mut c = SimClient::new(&config, 2, None);
        assert_eq!(c.topic, "/telemetry/client/fleet-2");
        let mut buf = Vec::new();
        let now = now_micros();
        let start = c.next_seq;
        let first = Batch::decode(&c.next_batch(5, now, &mut buf), 1 << 20).expect("valid batch");
        let second = Batch::decode(&c.next_batch(1, now, &mut buf), 1 << 20).expect("valid batch");
        assert_eq!((first.client_id.as_str(), first.first_seq, first.last_seq), ("fleet-2", start, start + 4));
        assert_eq!((second.first_seq, second.last_seq, second.epoch), (start + 5, start + 5, first.epoch));
        let mut all = first.readings;
        all.extend(second.readings);
        for sensor in ["temperature-0", "pressure-1"] {
            let ts: Vec<i64> = all.iter().filter(|r| r.sensor == sensor).map(|r| r.ts).collect();
            assert!(ts.windows(2).all(|w| w[0] < w[1]), "{sensor}: {ts:?}");
        }
        // Different clients have different epochs.
        assert_ne!(SimClient::new(&config, 1, None).epoch, c.epoch);
    }

    #[test]
    fn clients_are_not_in_lockstep() {
        // Synthetic clock: each client its own phase within the step and
        // its own first seq, so no two clients share timestamps or seqs.
        let config = FleetConfig::new("127.0.0.1", 1, 50);
        let (start, step) = (now_micros() - 3_600_000_000, 100_000);
        let mut firsts = std::collections::BTreeSet::new();
        let mut phases = std::collections::BTreeSet::new();
        let mut buf = Vec::new();
        for n in 0..50 {
            let mut c = SimClient::new(&config, n, Some((start, step)));
            let batch = Batch::decode(&c.next_batch(1, 0, &mut buf), 1 << 20).expect("valid batch");
            let ts = batch.readings[0].ts;
            assert!((start..start + step).contains(&ts), "client {n}: ts {ts} within one step of the start");
            firsts.insert(batch.first_seq);
            phases.insert(ts);
        }
        assert_eq!(firsts.len(), 50, "first seqs: {firsts:?}");
        assert!(phases.len() >= 45, "phases: {phases:?}");
    }
}
