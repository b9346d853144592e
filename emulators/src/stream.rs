//! The connection life of an emulator: connect (with backoff), stream frames
//! at a rate, count acks, and in `--reliable` mode keep every unacked frame
//! and resend it after a reconnect.
//!
//! Acks are cumulative per connection (see `docs/wire-format.md`): frames are
//! written in order, so an ack of `n` confirms the first `n` units written on
//! this connection. A unit is a frame in the binary codec and a line in JSON.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use telemetry_wire::{json, AckFrameCodec, Reading, SensorFrameCodec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::codec::{Encoder, FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;

use crate::signal::{now_micros, SensorKind, Signal};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`
    Tcp(String),
    /// `unix:///path/to/socket`
    Unix(PathBuf),
}

/// A `--connect` value that is neither `tcp://host:port` nor `unix:///path`.
#[derive(Debug, thiserror::Error)]
#[error("endpoint {0:?} is neither tcp://host:port nor unix:///path")]
pub struct BadEndpoint(String);

impl FromStr for Endpoint {
    type Err = BadEndpoint;

    fn from_str(s: &str) -> Result<Self, BadEndpoint> {
        if let Some(addr) = s.strip_prefix("tcp://").filter(|a| a.contains(':')) {
            Ok(Self::Tcp(addr.to_owned()))
        } else if let Some(path) = s.strip_prefix("unix://").filter(|p| !p.is_empty()) {
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            Err(BadEndpoint(s.to_owned()))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

impl Endpoint {
    async fn connect(&self) -> std::io::Result<(Reader, Writer)> {
        match self {
            Self::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (r, w) = stream.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Self::Unix(path) => {
                let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

/// The sensor stream encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Codec {
    /// Length-delimited bincode frames, acked per frame.
    Bincode,
    /// JSON lines, acked per line.
    Json,
}

/// How fast to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Readings per second, across all sensors of this emulator.
    PerSecond(u64),
    /// As fast as the socket takes them.
    Max,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Self::Max);
        }
        match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Self::PerSecond(n)),
            _ => Err(format!("rate {s:?} is neither a positive integer nor `max`")),
        }
    }
}

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The agent.
    pub endpoint: Endpoint,
    /// Encoding.
    pub codec: Codec,
    /// Kind of sensor played.
    pub kind: SensorKind,
    /// Readings per second or max.
    pub rate: Rate,
    /// Number of sensors (`<kind>-0`, `<kind>-1`, ...); readings round-robin.
    pub sensors: usize,
    /// Sensor name prefix (defaults to the kind's name).
    pub prefix: String,
    /// Readings per frame (per write chunk in JSON).
    pub frame: usize,
    /// Stop after this many readings in total.
    pub count: Option<u64>,
    /// Stop generating after this long.
    pub duration: Option<Duration>,
    /// Keep unacked frames and resend them after a reconnect.
    pub reliable: bool,
    /// At most this many frames unacked; generation waits beyond it.
    pub max_unacked_frames: usize,
    /// Seed of the signals (sensor `i` uses `seed + i`).
    pub seed: u64,
    /// Synthetic timestamps `(start, step)` instead of the wall clock.
    pub synthetic_ts: Option<(i64, i64)>,
    /// Without `--reliable`: how long to wait for the last acks at the end.
    pub final_ack_wait: Duration,
    /// With `--reliable`, after cancellation: how long to wait for acks.
    pub drain_timeout: Duration,
}

impl StreamConfig {
    /// Defaults for `kind` sending to `endpoint`.
    #[must_use]
    pub fn new(kind: SensorKind, endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            codec: Codec::Bincode,
            kind,
            rate: Rate::PerSecond(1000),
            sensors: 1,
            prefix: kind.name().to_owned(),
            frame: 100,
            count: None,
            duration: None,
            reliable: false,
            max_unacked_frames: 10_000,
            seed: 0,
            synthetic_ts: None,
            final_ack_wait: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Live counters, read by the progress line while [`run`] works.
#[derive(Debug, Default)]
pub struct Progress {
    /// Readings generated (each once).
    pub generated: AtomicU64,
    /// Readings written to a socket (resends included).
    pub sent: AtomicU64,
    /// Readings whose frame the agent acked.
    pub acked: AtomicU64,
    /// Readings written again after a reconnect.
    pub resent: AtomicU64,
    /// Successful connections.
    pub connects: AtomicU64,
    /// Whether a connection is up now.
    pub connected: AtomicBool,
}

/// Final figures of a [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StreamStats {
    /// Readings generated.
    pub generated: u64,
    /// Readings written (resends included).
    pub sent: u64,
    /// Readings acked by the agent.
    pub acked: u64,
    /// Readings resent after reconnects.
    pub resent: u64,
    /// Successful connections.
    pub connects: u64,
    /// Readings generated but never acked (lost without `--reliable`, or left
    /// when the drain timed out).
    pub unacked: u64,
    /// Seconds from the start until the last reading was generated (the
    /// sending rate, without the wait for the last acks).
    pub generating_secs: f64,
}

/// A frame (or JSON chunk) written but not yet acked.
#[derive(Debug)]
struct Unacked {
    /// Kept only in reliable mode, for resending.
    bytes: Option<Bytes>,
    /// Ack units: 1 for a frame, one per line in JSON.
    units: u64,
    readings: u64,
}

struct Generator {
    signals: Vec<Signal>,
    next: usize,
    generated: u64,
    limit: Option<u64>,
    started: Instant,
    duration: Option<Duration>,
    finished_at: Option<Instant>,
}

impl Generator {
    fn exhausted(&self) -> bool {
        self.limit.is_some_and(|l| self.generated >= l) || self.duration.is_some_and(|d| self.started.elapsed() >= d)
    }

    fn fill(&mut self, batch: &mut Vec<Reading>, n: usize) {
        let n = match self.limit {
            Some(limit) => n.min(usize::try_from(limit - self.generated).unwrap_or(usize::MAX)),
            None => n,
        };
        let now = now_micros();
        for _ in 0..n {
            let idx = self.next;
            self.next = (self.next + 1) % self.signals.len();
            batch.push(self.signals[idx].next_reading(now));
        }
        self.generated += n as u64;
        if self.limit.is_some_and(|l| self.generated >= l) && self.finished_at.is_none() {
            self.finished_at = Some(Instant::now());
        }
    }
}

/// Streams readings to the agent until the count or duration is reached (and,
/// in reliable mode, everything is acked) or `cancel` fires.
///
/// Connection failures never end the run: the emulator reconnects with
/// exponential backoff and jitter, as a real sensor would.
pub async fn run(config: StreamConfig, progress: Arc<Progress>, cancel: CancellationToken) -> StreamStats {
    let sensors = config.sensors.max(1);
    let signals = (0..sensors)
        .map(|i| {
            let name = format!("{}-{i}", config.prefix);
            Signal::new(config.kind, name, config.seed.wrapping_add(i as u64), config.synthetic_ts)
        })
        .collect();
    let mut generator = Generator {
        signals,
        next: 0,
        generated: 0,
        limit: config.count,
        started: Instant::now(),
        duration: config.duration,
        finished_at: None,
    };
    let mut unacked: VecDeque<Unacked> = VecDeque::new();
    let mut backoff = new_backoff();
    let mut stats = StreamStats::default();
    let mut drain_deadline: Option<Instant> = None;

    'connection: loop {
        if finished(&config, &generator, &unacked, &cancel, &mut drain_deadline) {
            break;
        }
        let (reader, mut writer) = tokio::select! {
            () = cancel.cancelled(), if !config.reliable || drain_deadline.is_some_and(|d| Instant::now() >= d) => break,
            result = config.endpoint.connect() => match result {
                Ok(halves) => halves,
                Err(error) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(endpoint = %config.endpoint, %error, ?delay, "connect failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled(), if !config.reliable => break,
                        () = tokio::time::sleep(Duration::from_millis(200)), if cancel.is_cancelled() => {}
                    }
                    continue;
                }
            },
        };
        backoff = new_backoff();
        stats.connects += 1;
        progress.connects.fetch_add(1, Ordering::Relaxed);
        progress.connected.store(true, Ordering::Relaxed);
        tracing::info!(endpoint = %config.endpoint, "connected");
        let (ack_tx, mut ack_rx) = watch::channel(0u64);
        let ack_task = tokio::spawn(read_acks(reader, config.codec, ack_tx));
        let mut units_confirmed_on_conn = 0u64;

        // Resend what the previous connection left unacked (reliable mode:
        // those entries carry their bytes; otherwise there are none).
        if !unacked.is_empty() {
            let mut out = BytesMut::new();
            let mut readings = 0;
            for u in &unacked {
                if let Some(b) = &u.bytes {
                    out.extend_from_slice(b);
                    readings += u.readings;
                }
            }
            if writer.write_all_buf(&mut out).await.is_err() {
                ack_task.abort();
                continue 'connection;
            }
            stats.resent += readings;
            stats.sent += readings;
            progress.resent.fetch_add(readings, Ordering::Relaxed);
            progress.sent.fetch_add(readings, Ordering::Relaxed);
        }

        let mut codec = SensorFrameCodec::default();
        let mut out = BytesMut::with_capacity(256 << 10);
        let mut batch = Vec::with_capacity(config.frame);
        let rate_start = Instant::now();
        let rate_base = generator.generated;
        let mut lost_connection = false;
        loop {
            // Apply whatever acks arrived.
            let acked = *ack_rx.borrow_and_update();
            while let Some(front) = unacked.front() {
                if units_confirmed_on_conn + front.units > acked {
                    break;
                }
                units_confirmed_on_conn += front.units;
                stats.acked += front.readings;
                progress.acked.fetch_add(front.readings, Ordering::Relaxed);
                unacked.pop_front();
            }
            if finished(&config, &generator, &unacked, &cancel, &mut drain_deadline) {
                break;
            }
            let can_generate =
                !cancel.is_cancelled() && !generator.exhausted() && unacked.len() < config.max_unacked_frames.max(1);
            let budget = if can_generate {
                match config.rate {
                    Rate::Max => usize::MAX,
                    Rate::PerSecond(r) => {
                        let due = (rate_start.elapsed().as_secs_f64() * r as f64) as u64 + 1;
                        usize::try_from(due.saturating_sub(generator.generated - rate_base)).unwrap_or(usize::MAX)
                    }
                }
            } else {
                0
            };
            if budget == 0 {
                tokio::select! {
                    changed = ack_rx.changed() => if changed.is_err() { lost_connection = true; break },
                    () = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                continue;
            }
            // Generate frames up to the budget, the unacked cap and ~256 KiB.
            let mut budget = budget;
            while budget > 0 && out.len() < (256 << 10) && unacked.len() < config.max_unacked_frames.max(1) {
                batch.clear();
                generator.fill(&mut batch, config.frame.max(1).min(budget));
                if batch.is_empty() {
                    break;
                }
                budget -= batch.len();
                let start = out.len();
                let units = match config.codec {
                    Codec::Bincode => {
                        if let Err(error) = codec.encode(&batch[..], &mut out) {
                            tracing::error!(%error, "frame does not fit the frame limit; lower --frame");
                            return finish(stats, &generator, &progress);
                        }
                        1
                    }
                    Codec::Json => {
                        let mut line = Vec::with_capacity(batch.len() * 64);
                        for r in &batch {
                            json::write_line(r, &mut line);
                        }
                        out.extend_from_slice(&line);
                        batch.len() as u64
                    }
                };
                let bytes = config.reliable.then(|| Bytes::copy_from_slice(&out[start..]));
                unacked.push_back(Unacked { bytes, units, readings: batch.len() as u64 });
                stats.sent += batch.len() as u64;
            }
            progress.generated.store(generator.generated, Ordering::Relaxed);
            let write = tokio::select! {
                result = writer.write_all_buf(&mut out) => result,
                () = cancel.cancelled(), if !config.reliable => break,
            };
            if let Err(error) = write {
                tracing::warn!(%error, "write failed; reconnecting");
                lost_connection = true;
                break;
            }
            progress.sent.store(stats.sent, Ordering::Relaxed);
            if ack_rx.has_changed().is_err() {
                lost_connection = true;
                break;
            }
        }
        progress.connected.store(false, Ordering::Relaxed);
        if !lost_connection {
            let _ = writer.shutdown().await;
            ack_task.abort();
            break;
        }
        ack_task.abort();
        if !config.reliable {
            // Without --reliable the frames in flight are gone with the connection.
            unacked.clear();
        }
        tracing::warn!(endpoint = %config.endpoint, unacked = unacked.len(), "connection lost");
    }
    finish(stats, &generator, &progress)
}

fn finish(mut stats: StreamStats, generator: &Generator, progress: &Progress) -> StreamStats {
    stats.generated = generator.generated;
    let end = generator.finished_at.unwrap_or_else(Instant::now);
    stats.generating_secs = end.duration_since(generator.started).as_secs_f64();
    stats.unacked = stats.generated.saturating_sub(stats.acked);
    progress.generated.store(stats.generated, Ordering::Relaxed);
    progress.connected.store(false, Ordering::Relaxed);
    stats
}

/// Whether the run is over: nothing more to generate and nothing more worth
/// waiting for.
fn finished(
    config: &StreamConfig,
    generator: &Generator,
    unacked: &VecDeque<Unacked>,
    cancel: &CancellationToken,
    drain_deadline: &mut Option<Instant>,
) -> bool {
    let done_generating = cancel.is_cancelled() || generator.exhausted();
    if !done_generating {
        return false;
    }
    if unacked.is_empty() {
        return true;
    }
    let wait = if config.reliable && !cancel.is_cancelled() {
        // Reliable and not interrupted: wait for every ack, however long.
        return false;
    } else if config.reliable {
        config.drain_timeout
    } else {
        config.final_ack_wait
    };
    let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + wait);
    Instant::now() >= deadline
}

fn new_backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Reads the agent's cumulative acks and publishes the latest. Returns (and
/// drops the sender, which the writer notices) on EOF or a bad ack.
async fn read_acks(reader: Reader, codec: Codec, tx: watch::Sender<u64>) {
    match codec {
        Codec::Bincode => {
            let mut frames = FramedRead::new(reader, AckFrameCodec::default());
            while let Some(item) = frames.next().await {
                match item {
                    Ok(n) => tx.send_replace(n),
                    Err(error) => {
                        tracing::warn!(%error, "bad ack frame");
                        return;
                    }
                };
            }
        }
        Codec::Json => {
            let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(1024));
            while let Some(item) = lines.next().await {
                match item.map_err(|e| e.to_string()).and_then(|l| json::parse_ack_line(&l).map_err(|e| e.to_string()))
                {
                    Ok(n) => tx.send_replace(n),
                    Err(error) => {
                        tracing::warn!(%error, "bad ack line");
                        return;
                    }
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("tcp://127.0.0.1:7878".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:7878".into()));
        assert_eq!("unix:///tmp/a.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/tmp/a.sock".into()));
        for bad in ["127.0.0.1:1", "tcp://nohost", "unix://", "http://x:1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("250".parse::<Rate>(), Ok(Rate::PerSecond(250)));
        assert!("0".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }
}
