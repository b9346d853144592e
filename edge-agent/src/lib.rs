//! The edge agent: a daemon that never loses a sensor reading.
//!
//! Sensors stream readings over TCP or Unix sockets. Every reading is
//! committed to a local Postgres outbox before its frame is acked; outbox
//! rows are published over MQTT (QoS 1) in batches to
//! `<prefix>/client/<client_id>`; a row is deleted only when its batch's echo
//! (or, with `confirm = "ingest"`, the ingest server's ack) names its seq; and
//! after every reconnect the whole outbox is replayed, oldest first. See
//! `docs/design.md` for the durability rules this implements.
//!
//! # Layout
//! - [`config`]: the TOML file / environment / flags.
//! - [`listener`]: sensor connections, decoding, validation, acks.
//! - [`committer`]: group commit into the outbox; quota.
//! - [`outbox`]: the Postgres tables and queries.
//! - [`publish_state`]: the publisher's decisions as a pure state machine:
//!   batches, replay, confirmations, presence, status (no I/O).
//! - [`publisher`]: the I/O shell around it (MQTT client, outbox reads).
//! - [`window`], [`ahead`]: the pure in-flight and echo-ahead bookkeeping.
//! - [`confirm`]: deleting confirmed rows.
//! - [`mqtt`]: rumqttc options and the event-loop task.
//! - [`http`]: `/metrics` and `/healthz`.
//! - [`metrics`], [`shared`]: counters and shared state.
//!
//! Each stage is a tokio task joined by bounded channels; shutdown goes
//! through one [`CancellationToken`].

pub mod ahead;
pub mod command;
pub mod committer;
pub mod config;
pub mod confirm;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod publish_state;
pub mod publisher;
pub mod remote;
pub mod shared;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use config::ListenAddr;
use outbox::{Outbox, OutboxError};
use shared::Shared;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The outbox connection string is unusable.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The MQTT TLS files are unusable.
    #[error("MQTT TLS: {0}")]
    Tls(#[from] telemetry_link::SecureError),
    /// Shut down before Postgres became reachable.
    #[error("shut down before the outbox was reachable")]
    Cancelled,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// Where sensors connect (a TCP port 0 resolved to the real port).
    pub listen_addrs: Vec<ListenAddr>,
    /// The HTTP address for /metrics, if any.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Metrics and outbox size.
    pub shared: Arc<Shared>,
    /// The outbox epoch.
    pub epoch: u64,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Agent {
    /// Connects to the outbox (retrying until it answers or `cancel`), binds
    /// the listeners and starts every task.
    ///
    /// # Errors
    /// Invalid configuration, unbindable listener, or cancellation before
    /// Postgres answered.
    pub async fn start(config: Config, cancel: CancellationToken) -> Result<Self, AgentError> {
        Self::start_with(config, remote::Controls::default(), cancel).await
    }

    /// [`Agent::start`], with what remote commands may change in the
    /// process (its log filter, a reload of its configuration).
    ///
    /// # Errors
    /// As [`Agent::start`].
    pub async fn start_with(
        mut config: Config,
        controls: remote::Controls,
        cancel: CancellationToken,
    ) -> Result<Self, AgentError> {
        config.validate()?;
        config.resolve_secrets()?;
        // Before anything else starts, so that bad TLS files fail the start.
        let mqtt = mqtt::connect(&config)?;
        let shared = Arc::new(Shared::default());
        let mut outbox = Outbox::new(&config.postgres_url, &config.postgres_password, &config.postgres_schema)?;
        let mut delay = backoff(Duration::from_millis(100), Duration::from_secs(5));
        let state = loop {
            match outbox.migrate().await {
                Ok(state) => break state,
                Err(error) => {
                    shared.metrics.postgres_errors.inc();
                    outbox.reset();
                    let d = delay.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(%error, delay = ?d, "outbox unreachable at start; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return Err(AgentError::Cancelled),
                        () = tokio::time::sleep(d) => {}
                    }
                }
            }
        };
        tracing::info!(
            client_id = %config.client_id,
            epoch = state.epoch,
            rows = state.rows,
            next_seq = state.next_seq,
            "outbox ready"
        );
        shared.init_rows(state.rows, state.bytes);
        shared.set_committed_high(state.next_seq - 1);

        let bound = listener::bind(&config.listen)
            .await
            .map_err(|source| AgentError::Bind { addr: format!("{:?}", config.listen), source })?;
        let listen_addrs: Vec<ListenAddr> = bound.iter().map(listener::Bound::local_addr).collect();
        let http = match config.http_listen.as_str() {
            "" => None,
            addr => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Bind { addr: addr.to_owned(), source })?,
            ),
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let io = Io { outbox, bound, http, mqtt, controls };
        let task = tokio::spawn(run_tasks(config, state, io, shared.clone(), cancel.clone()));
        Ok(Self { listen_addrs, http_addr, shared, epoch: state.epoch, cancel, task })
    }

    /// Starts a graceful shutdown and waits for it: stop accepting, commit
    /// what was received, wait for confirmations up to the shutdown timeout.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }

    /// Waits until the agent stopped (after its token was cancelled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// What [`Agent::start`] opened for the tasks.
struct Io {
    outbox: Outbox,
    bound: Vec<listener::Bound>,
    http: Option<tokio::net::TcpListener>,
    mqtt: (rumqttc::AsyncClient, rumqttc::EventLoop),
    controls: remote::Controls,
}

async fn run_tasks(config: Config, state: outbox::OutboxState, io: Io, shared: Arc<Shared>, cancel: CancellationToken) {
    let Io { outbox, bound, http, mqtt: (client, eventloop), controls } = io;
    let (sub_tx, sub_rx) = mpsc::channel(64);
    let (block_tx, block_rx) = mpsc::channel(64);
    let (del_tx, del_rx) = mpsc::unbounded_channel();
    let (event_tx, event_rx) = mpsc::channel(1024);
    let reopen = || Outbox::new(&config.postgres_url, &config.postgres_password, &config.postgres_schema);
    // Invariant: the same connection string parsed a moment ago.
    let (delete_outbox, publish_outbox) = (reopen().expect("parsed before"), reopen().expect("parsed before"));

    let http_task = http.map(|l| tokio::spawn(http::serve(l, shared.clone(), cancel.clone())));
    let deleter = tokio::spawn(confirm::run_deleter(del_rx, delete_outbox, shared.clone()));
    let committer = tokio::spawn(committer::run(
        sub_rx,
        outbox,
        state.next_seq,
        shared.clone(),
        block_tx,
        committer::CommitterConfig {
            max_rows: config.commit_max_rows,
            max_delay: config.commit_max_delay(),
            quota_rows: config.quota_rows,
            quota_bytes: config.quota_bytes,
            policy: config.quota_policy,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
        },
        cancel.clone(),
    ));
    let (control_tx, control_rx) = mpsc::channel(8);
    let (command_route, remote_task) = if config.remote_commands {
        let (tx, rx) = mpsc::channel(32);
        let remote = remote::Remote {
            client: client.clone(),
            reply_topic: config.command_reply_topic(),
            config: config.clone(),
            shared: shared.clone(),
            publisher: control_tx.clone(),
            controls,
        };
        (Some(mqtt::CommandRoute { topic: config.command_topic(), tx }), Some(tokio::spawn(remote.run(rx))))
    } else {
        (None, None)
    };
    drop(control_tx);
    let event_task = tokio::spawn(mqtt::run_event_loop(eventloop, event_tx, command_route, shared.clone()));
    let publisher = publisher::Publisher::new(
        publisher::PublisherConfig {
            client_id: config.client_id.clone(),
            epoch: state.epoch,
            data_topic: config.data_topic(),
            ack_topic: config.ack_topic(),
            presence_filter: config.presence_filter(),
            wait_for_ingest: config.echo_wait_for_ingest,
            ahead_max_readings: config.echo_ahead_max_readings,
            ahead_max_bytes: config.echo_ahead_max_bytes,
            ahead_timeout: Duration::from_secs(config.echo_ahead_timeout_secs),
            status_topic: config.status_topic(),
            confirm: config.confirm,
            batch_max_readings: config.batch_max_readings,
            batch_max_bytes: config.batch_max_bytes,
            batch_linger: Duration::from_millis(config.batch_linger_ms),
            compression: config.compression,
            replay_order: config.replay_order,
            replay_max_rate: config.replay_max_rate,
            window: config.window,
            confirm_timeout: config.confirm_timeout(),
            status_interval: Duration::from_secs(config.status_interval_secs),
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
            max_packet_bytes: config.mqtt_max_packet_bytes,
            command_topic: config.remote_commands.then(|| config.command_topic()),
        },
        client,
        publish_outbox,
        shared.clone(),
        del_tx,
    );
    let publisher = tokio::spawn(publisher.run(block_rx, event_rx, control_rx, cancel.clone()));

    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let ctx = listener::ConnContext {
        submissions: sub_tx,
        metrics: shared.metrics.clone(),
        codec: config.codec,
        max_frame_bytes: config.max_frame_bytes,
        idle_timeout: Duration::from_secs(config.idle_timeout_secs.max(1)),
        max_future_skew_micros: i64::try_from(config.max_future_skew_secs.saturating_mul(1_000_000))
            .unwrap_or(i64::MAX),
        max_past_skew_micros: (config.max_past_skew_secs > 0)
            .then(|| i64::try_from(config.max_past_skew_secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
        close_grace: Duration::from_secs(config.shutdown_timeout_secs.clamp(1, 5)),
        gather_readings: config.commit_max_rows.min(4096),
        intake_paused: shared.watch_intake(),
    };
    for b in bound {
        tracker.spawn(listener::serve(b, ctx.clone(), limit.clone(), tracker.clone(), cancel.clone()));
    }
    drop(ctx);

    cancel.cancelled().await;
    tracing::info!("shutting down: no new sensor data; committing and draining");
    tracker.close();
    tracker.wait().await;
    let _ = committer.await;
    let _ = publisher.await;
    let _ = deleter.await;
    event_task.abort();
    if let Some(task) = remote_task {
        task.abort();
    }
    if let Some(h) = http_task {
        let _ = h.await;
    }
    tracing::info!(outbox_rows = shared.outbox_size().0, "stopped");
}

/// The retry schedule shared with the ingest server ([`telemetry_link::backoff`]):
/// exponential with jitter (up to 100% of the delay, so a delay can reach
/// `2 * max`), without a limit on attempts.
pub use telemetry_link::backoff;

pub use telemetry_wire::reading::now_micros;
