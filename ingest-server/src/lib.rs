//! The ingest server: MQTT batch payloads into ClickHouse, acknowledged only
//! after they are stored, deduplicated by exact seq ranges, with dead letters.
//!
//! ```text
//! broker --poll task (never blocks)--> [queue] --> batcher --(permit)--> writer tasks --> ClickHouse
//!                                                    |  dedup claim          | in flush order
//!                                                    v                       v
//!                                             (Job: messages,         acker: mark stored, PUBACK,
//!                                              new readings,          publish <prefix>/ack/<client>
//!                                              statuses, dead letters)
//!
//! roller (every rollup_interval_ms): rollup_queue markers --> readings_1m, off the insert path
//! ```
//!
//! # Layout
//! - [`config`]: the configuration (TOML file, `INGEST_*` variables, flags).
//! - [`subscriber`]: MQTT options, topic layout, the event-loop poll task.
//! - [`job`]: the unit passed from batcher to writer to acker.
//! - [`batcher`]: decode, dedup claim, gather into jobs, flush rules.
//! - [`store`]: the ClickHouse client, error classes, the retry policy.
//! - [`writer`]: a job's inserts (readings, rollup markers, ranges).
//! - [`body`]: the readings insert's body (key order, RowBinary).
//! - [`acker`]: in-order completion: dedup update, PUBACK, ingest acks.
//! - [`schema`]: DDL for ClickHouse 18.16 and current versions.
//! - [`dedup`]: interval sets of stored `(client_id, epoch, seq)` ranges.
//! - [`rollup`]: the exact 1-minute rollup: markers, closing passes, live reads.
//! - [`deadletter`]: rows for `ingest_errors`.
//! - [`metrics`]: Prometheus counters; [`http`]: `/metrics` and `/healthz`.
//! - [`api`]: the JSON API under `/api/`; [`dashboard`]: the page at `/`.
//!
//! The delivery rules (what is acked when) are at the top of [`acker`] and
//! [`writer`]; `deploy/clickhouse-schema.md` documents the tables.

pub mod acker;
pub mod api;
pub mod batcher;
pub mod body;
pub mod config;
pub mod dashboard;
pub mod deadletter;
pub mod dedup;
pub mod http;
pub mod job;
pub mod metrics;
pub mod rollup;
pub mod schema;
pub mod store;
pub mod subscriber;
pub mod writer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, Secret};
pub use metrics::Metrics;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// ClickHouse refused the schema or the stored ranges permanently.
    #[error("ClickHouse at start: {0}")]
    Startup(#[from] store::StoreError),
    /// The MQTT TLS files are unusable.
    #[error("MQTT TLS: {0}")]
    Tls(#[from] telemetry_link::SecureError),
    /// The HTTP listener could not bind.
    #[error("HTTP listener on {address}: {source}")]
    Http {
        /// The configured address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Drops `ingested_ranges` partitions beyond the dedup horizon, at start
/// and hourly, until `stop`.
async fn expire_ranges(writer: Arc<writer::Writer>, horizon_days: u32, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match writer.drop_expired_ranges(horizon_days).await {
            Ok(_) | Err(store::StoreError::Stopped) => {}
            Err(store::StoreError::Permanent(error) | store::StoreError::Exhausted { error, .. }) => {
                tracing::warn!(%error, "cannot drop expired stored ranges; retried in an hour");
            }
        }
    }
}

/// Runs the server until `shutdown` is cancelled, then flushes the pending
/// batch, acks what was stored and returns.
///
/// # Errors
/// Invalid configuration, a permanent ClickHouse error at start, or an
/// HTTP address that cannot be bound. Runtime errors are retried or
/// dead-lettered, never returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with_metrics(config, Arc::new(Metrics::new()), shutdown).await
}

/// [`run`] with a caller-owned metrics registry (tests read its counters;
/// an embedding program can serve it).
///
/// # Errors
/// See [`run`].
pub async fn run_with_metrics(
    mut config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    config.resolve_secrets()?;
    if let Some(files) = config.mqtt_tls_files() {
        // Bad TLS files fail the start, not the first connection attempt.
        telemetry_link::client_config(&files)?;
    }
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Shutdown starts a drain; its deadline is the hard stop.
    {
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        let deadline = Duration::from_secs(config.shutdown_timeout_secs);
        tracker.spawn(async move {
            tokio::select! {
                () = hard_stop.cancelled() => {}
                () = shutdown.cancelled() => {
                    tokio::select! {
                        () = hard_stop.cancelled() => {}
                        () = tokio::time::sleep(deadline) => {
                            tracing::warn!("shutdown deadline passed; abandoning unstored batches");
                            hard_stop.cancel();
                        }
                    }
                }
            }
        });
    }
    let result = serve(&config, metrics, &shutdown, &hard_stop, &tracker).await;
    hard_stop.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn serve(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), RunError> {
    // Start-up retries stop at shutdown itself, not at its deadline.
    let startup = store::Store::new(config, schema::Flavor::Legacy, metrics.clone(), shutdown.clone());
    let (version, flavor) = match startup.retry("version", || schema::detect(startup.client())).await {
        Err(store::StoreError::Stopped) => return Ok(()),
        other => other?,
    };
    let startup = startup.with_flavor(flavor);
    let tables = startup.tables().clone();
    tracing::info!(%version, ?flavor, database = %tables.database, "ClickHouse detected");
    match startup.retry("schema", || schema::ensure(startup.client(), flavor, &tables, config.retention_days)).await {
        Err(store::StoreError::Stopped) => return Ok(()),
        other => other?,
    }

    let ledger = Arc::new(Mutex::new(rollup::MarkLedger::new(config.rollup_orphan_secs)));
    let writer = Arc::new(writer::Writer::new(
        startup.clone().with_stop(hard_stop.clone()),
        &config.mqtt_client_id,
        ledger.clone(),
    ));
    let dedup = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        loaded = writer.load_ranges(config.dedup_horizon_days) => match loaded {
            Err(store::StoreError::Stopped) => return Ok(()),
            other => other?,
        },
    };
    let (streams, intervals) = dedup.size();
    tracing::info!(streams, intervals, horizon_days = config.dedup_horizon_days, "stored ranges loaded");
    let dedup = Arc::new(Mutex::new(dedup));

    if !config.http_address.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.http_address)
            .await
            .map_err(|source| RunError::Http { address: config.http_address.clone(), source })?;
        tracing::info!(address = %config.http_address, "HTTP listener: dashboard at /, /api/, /metrics, /healthz");
        let api = api::Api::new(config, flavor, metrics.clone());
        tracker.spawn(http::serve(listener, metrics.clone(), api, hard_stop.clone()));
    }

    // Markers are durable: the roller simply stops at shutdown, and the next
    // pass (here after a restart, or on a peer) finds what it left.
    let roller = rollup::Roller::new(
        startup.clone().with_stop(shutdown.clone()),
        &config.mqtt_client_id,
        rollup::Timing {
            interval: Duration::from_millis(config.rollup_interval_ms),
            after_secs: config.rollup_after_secs,
            orphan_secs: config.rollup_orphan_secs,
            consume_delay: rollup::CONSUME_DELAY,
            settle: if config.clickhouse_cluster.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_secs(config.cluster_replica_settle_secs)
            },
            quiet: Duration::from_secs(config.rollup_quiet_secs),
        },
        ledger,
    );
    tracker.spawn(roller.run(shutdown.clone()));
    tracker.spawn(expire_ranges(writer.clone(), config.dedup_horizon_days, shutdown.clone()));

    let topics = subscriber::Topics::new(&config.topic_prefix);
    let (client, eventloop) = subscriber::connect(config)?;
    let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
    let generation = subscriber::Generation::default();
    let presence = subscriber::Presence::of(config, &topics);
    let presence_topic = presence.topic.clone();
    let poll = tracker.spawn(subscriber::poll(
        eventloop,
        subscriber::PollContext {
            client: client.clone(),
            presence,
            filters: topics.filters(config.shared_group()),
            tx: inbound_tx,
            forward_stop: shutdown.clone(),
            hard_stop: hard_stop.clone(),
            metrics: metrics.clone(),
            generation: generation.clone(),
        },
    ));

    let (inflight_tx, inflight_rx) = mpsc::channel(config.max_inflight_inserts);
    let acker = acker::Acker {
        client: client.clone(),
        dedup: dedup.clone(),
        metrics: metrics.clone(),
        topics,
        generation,
        stall_after: Duration::from_secs(config.insert_timeout_secs.max(1)),
    };
    let acker = tracker.spawn(acker.run(inflight_rx));
    let batcher = batcher::Batcher::new(config, dedup, metrics, writer, inflight_tx, hard_stop.clone());
    tracing::info!(client_id = %config.mqtt_client_id, prefix = %config.topic_prefix,
        shared_group = ?config.shared_group(), "ingest server running");
    batcher.run(inbound_rx, shutdown.clone()).await;
    // The batcher flushed and dropped its sender: the acker finishes the
    // in-flight jobs (or sees them abandoned at the hard stop).
    let _ = acker.await;
    // This server no longer takes batches: clear its announcement (echo-mode
    // agents then keep their rows until a server announces itself), then
    // DISCONNECT, after every queued PUBACK and ack.
    if let Err(error) = client.try_publish(presence_topic, rumqttc::QoS::AtLeastOnce, true, Vec::new()) {
        tracing::warn!(%error, "cannot queue the presence withdrawal");
    }
    if let Err(error) = client.try_disconnect() {
        tracing::warn!(%error, "cannot queue MQTT disconnect");
    }
    tokio::select! {
        _ = poll => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => tracing::warn!("MQTT disconnect did not complete in 5 s"),
    }
    tracing::info!("ingest server stopped");
    Ok(())
}
