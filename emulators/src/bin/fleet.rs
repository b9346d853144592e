//! `fleet`: a load generator playing many edge agents at once; see
//! [`emulators::fleet`] and `fleet --help`.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use emulators::fleet::{run, FleetConfig, FleetProgress, FleetRate};
use tokio_util::sync::CancellationToken;

/// Simulates N edge agents publishing telemetry batches (valid client ids,
/// epochs, contiguous seqs) over MQTT QoS 1 to `<prefix>/client/<id>`.
/// Clients share `--connections` MQTT connections. Publishing starts once
/// every connection is up. Progress goes to stderr once a second; the last
/// line is a summary with `send_rate=`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Broker host.
    #[arg(long, env = "FLEET_MQTT_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, env = "FLEET_MQTT_PORT", default_value_t = 21883)]
    port: u16,
    /// Topic prefix (batches go to `<prefix>/client/<client_id>`).
    #[arg(long, default_value = "/telemetry")]
    topic_prefix: String,
    /// Number of simulated clients.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// MQTT connections shared by the clients (default: one per client).
    #[arg(long)]
    connections: Option<usize>,
    /// Readings per second per client (fractions allowed), or `max`:
    /// pre-encoded batches of `--batch`, published as fast as the broker acks.
    #[arg(long, default_value = "1")]
    rate: FleetRate,
    /// Readings per second across the whole fleet (divided among the clients;
    /// overrides `--rate`).
    #[arg(long)]
    total_rate: Option<f64>,
    /// Paced mode: milliseconds between two batches of one client.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Max mode: readings per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Max mode: microseconds between two readings of one sensor (the
    /// timestamps end about now; 100000 = a 10 Hz sensor).
    #[arg(long, default_value_t = 1000)]
    ts_step_us: i64,
    /// Readings per client, then stop (required with `--rate max`).
    #[arg(long)]
    count: Option<u64>,
    /// Stop publishing after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Client ids are `<id-prefix>-<n>`.
    #[arg(long, default_value = "fleet")]
    id_prefix: String,
    /// Sensors per client.
    #[arg(long, default_value_t = 4)]
    sensors: usize,
    /// QoS 1 publishes in flight per connection.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Connection handshakes in progress at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Seconds to wait for every connection before giving up.
    #[arg(long, default_value_t = 120.0)]
    connect_timeout: f64,
    /// Seed of epochs and signals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokio worker threads (0: a single-threaded runtime).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

impl Args {
    fn to_config(&self) -> FleetConfig {
        let mut c = FleetConfig::new(self.host.clone(), self.port, self.clients.max(1));
        c.topic_prefix.clone_from(&self.topic_prefix);
        c.connections = self.connections.unwrap_or(c.clients);
        c.rate = match self.total_rate {
            Some(total) if total > 0.0 => FleetRate::PerSecond(total / c.clients as f64),
            _ => self.rate,
        };
        c.interval = Duration::from_millis(self.interval_ms.max(1));
        c.batch = self.batch.max(1);
        c.ts_step_us = self.ts_step_us.max(1);
        c.count = self.count;
        c.duration = self.duration.map(|d| Duration::from_secs_f64(d.max(0.0)));
        c.id_prefix.clone_from(&self.id_prefix);
        c.sensors = self.sensors.max(1);
        c.inflight = self.inflight.max(1);
        c.connect_concurrency = self.connect_concurrency.max(1);
        c.connect_timeout = Duration::from_secs_f64(self.connect_timeout.max(0.0));
        c.seed = self.seed;
        c
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let config = args.to_config();
        let progress = Arc::new(FleetProgress::default());
        let cancel = CancellationToken::new();
        let ctrl_c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            ctrl_c.cancel();
        });
        let conns = config.connections.clamp(1, config.clients);
        let reporter = tokio::spawn(report(progress.clone(), conns, args.quiet));
        let started = Instant::now();
        let result = run(config, progress, cancel).await;
        reporter.abort();
        match result {
            Ok(stats) => {
                eprintln!(
                    "done: clients={} connections={} connect_secs={:.2} published={} batches={} acked={} errors={} \
                     elapsed={:.2}s publish_secs={:.2} acked_secs={:.2} send_rate={:.0}/s",
                    args.clients,
                    stats.connections,
                    stats.connect_secs,
                    stats.published_readings,
                    stats.published_batches,
                    stats.acked_batches,
                    stats.errors,
                    started.elapsed().as_secs_f64(),
                    stats.publish_secs,
                    stats.acked_secs,
                    stats.published_readings as f64 / stats.acked_secs.max(1e-9),
                );
                if stats.acked_batches < stats.published_batches {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(error) => {
                eprintln!("fleet: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Prints `fleet: connected N/N` when publishing starts (always: scripts wait
/// for it), and a progress line once a second unless quiet.
async fn report(progress: Arc<FleetProgress>, conns: usize, quiet: bool) {
    let started = Instant::now();
    let mut announced = false;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last = (Instant::now(), 0u64);
    loop {
        tick.tick().await;
        let connected = progress.connected.load(Ordering::Relaxed);
        if !announced && progress.publishing.load(Ordering::SeqCst) {
            announced = true;
            eprintln!("fleet: connected {connected}/{conns} in {:.2}s, publishing", started.elapsed().as_secs_f64());
        }
        if !quiet && last.0.elapsed() >= Duration::from_secs(1) {
            let published = progress.published_readings.load(Ordering::Relaxed);
            eprintln!(
                "connected={connected}/{conns} published={published} rate={:.0}/s batches={} acked={} errors={}",
                (published - last.1) as f64 / last.0.elapsed().as_secs_f64(),
                progress.published_batches.load(Ordering::Relaxed),
                progress.acked_batches.load(Ordering::Relaxed),
                progress.errors.load(Ordering::Relaxed),
            );
            last = (Instant::now(), published);
        }
    }
}
