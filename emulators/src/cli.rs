//! Command-line flags and the once-a-second progress line.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::stream::{run, Codec, Endpoint, Progress, Rate, StreamConfig};
use crate::SensorKind;

/// Plays one or more sensors of one kind and streams their readings to an
/// edge agent. Progress goes to stderr once a second.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// The agent: `tcp://host:port` or `unix:///path/to/socket`.
    #[arg(long, env = "EMULATOR_CONNECT", default_value = "tcp://127.0.0.1:7878")]
    pub connect: Endpoint,
    /// Stream encoding: length-delimited bincode frames, or JSON lines.
    #[arg(long, value_enum, default_value_t = Codec::Bincode)]
    pub codec: Codec,
    /// Readings per second across all sensors, or `max`.
    #[arg(long, default_value = "1000")]
    pub rate: Rate,
    /// Number of sensors, named `<prefix>-0`, `<prefix>-1`, ...
    #[arg(long, default_value_t = 1)]
    pub sensors: usize,
    /// Sensor name prefix (default: the sensor kind).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Readings per frame (per write in JSON).
    #[arg(long, default_value_t = 100)]
    pub frame: usize,
    /// Stop after this many readings in total.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Keep unacked frames and resend them after a reconnect; at the end,
    /// wait until every reading is acked.
    #[arg(long)]
    pub reliable: bool,
    /// At most this many frames unacked; generation pauses beyond.
    #[arg(long, default_value_t = 10_000)]
    pub max_unacked: usize,
    /// Seed of the signals, for reproducible values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Synthetic timestamps starting here (Unix µs) instead of the clock.
    #[arg(long)]
    pub start_ts: Option<i64>,
    /// Step of synthetic timestamps in µs.
    #[arg(long, default_value_t = 1000)]
    pub ts_step: i64,
    /// After ctrl-c in reliable mode, wait this many seconds for acks.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

impl Args {
    /// The stream configuration these flags describe.
    #[must_use]
    pub fn to_config(&self, kind: SensorKind) -> StreamConfig {
        let mut c = StreamConfig::new(kind, self.connect.clone());
        c.codec = self.codec;
        c.rate = self.rate;
        c.sensors = self.sensors.max(1);
        c.prefix = self.prefix.clone().unwrap_or_else(|| kind.name().to_owned());
        c.frame = self.frame.max(1);
        c.count = self.count;
        c.duration = self.duration.map(Duration::from_secs_f64);
        c.reliable = self.reliable;
        c.max_unacked_frames = self.max_unacked.max(1);
        c.seed = self.seed;
        c.synthetic_ts = self.start_ts.map(|s| (s, self.ts_step.max(1)));
        c.drain_timeout = Duration::from_secs_f64(self.drain_timeout.max(0.0));
        c
    }
}

/// Entry point of the `temperature`, `pressure` and `height` binaries.
#[must_use]
pub fn main(kind: SensorKind) -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let config = args.to_config(kind);
        let progress = Arc::new(Progress::default());
        let cancel = CancellationToken::new();
        let ctrl_c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            ctrl_c.cancel();
        });
        let reporter = (!args.quiet).then(|| tokio::spawn(report(progress.clone())));
        let started = Instant::now();
        let stats = run(config, progress, cancel).await;
        if let Some(r) = reporter {
            r.abort();
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "done: generated={} sent={} acked={} resent={} unacked={} connects={} elapsed={secs:.2}s rate={:.0}/s \
             send_rate={:.0}/s",
            stats.generated,
            stats.sent,
            stats.acked,
            stats.resent,
            stats.unacked,
            stats.connects,
            stats.generated as f64 / secs.max(1e-9),
            stats.generated as f64 / stats.generating_secs.max(1e-9)
        );
        if args.reliable && stats.unacked > 0 {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        }
    })
}

async fn report(progress: Arc<Progress>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let sent = progress.sent.load(Ordering::Relaxed);
        let acked = progress.acked.load(Ordering::Relaxed);
        let connected = progress.connected.load(Ordering::Relaxed);
        eprintln!(
            "sent={sent} acked={acked} rate={}/s unacked={} {}",
            sent - last,
            progress.generated.load(Ordering::Relaxed).saturating_sub(acked),
            if connected { "connected" } else { "disconnected" }
        );
        last = sent;
    }
}
