//! The publishing task: the I/O shell around [`PublishState`]. It feeds
//! the state machine what happens (committed blocks, MQTT events, outbox
//! rows, ticks) and carries out what it asks for (publish, subscribe, load
//! rows, delete ranges, send the status). Every decision is in
//! [`crate::publish_state`], unit-tested there without a broker or a
//! database; nothing here decides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, QoS};
use telemetry_wire::AgentStatus;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::committer::Block;
use crate::mqtt::MqttEvent;
use crate::outbox::Outbox;
pub use crate::publish_state::{ConnState, PublisherConfig, Tunables};
use crate::publish_state::{PublishState, Step};
use crate::shared::Shared;

/// Requests to the publisher from remote commands ([`crate::remote`]).
#[derive(Debug)]
pub enum Control {
    /// The status as of now (without starting a new status interval).
    Status(oneshot::Sender<AgentStatus>),
    /// Publish what is committed now, without lingering.
    Flush(oneshot::Sender<FlushReport>),
    /// New live settings (a configuration reload).
    Retune(Tunables, oneshot::Sender<()>),
}

/// What a flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FlushReport {
    /// Batches published by the flush.
    pub published_batches: u64,
    /// Batches in flight after it.
    pub inflight_batches: usize,
    /// Whether the broker connection is up (offline, nothing can go).
    pub connected: bool,
    /// Rows in the outbox after it.
    pub outbox_rows: u64,
}

/// The publishing task.
pub struct Publisher {
    state: PublishState,
    client: AsyncClient,
    outbox: Outbox,
    shared: Arc<Shared>,
    deletes: mpsc::UnboundedSender<(u64, u64)>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("state", &self.state).finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher, offline until the event loop reports a connection.
    #[must_use]
    pub fn new(
        config: PublisherConfig,
        client: AsyncClient,
        outbox: Outbox,
        shared: Arc<Shared>,
        deletes: mpsc::UnboundedSender<(u64, u64)>,
    ) -> Self {
        let state = PublishState::new(config, shared.clone(), Instant::now());
        Self { state, client, outbox, shared, deletes }
    }

    /// Runs until the committer is done (`blocks` closed) after `cancel`, and
    /// the outbox drained or the shutdown timeout passed; or until the event
    /// loop ends.
    pub async fn run(
        mut self,
        mut blocks: mpsc::Receiver<Block>,
        mut events: mpsc::Receiver<MqttEvent>,
        mut control: mpsc::Receiver<Control>,
        cancel: CancellationToken,
    ) {
        // The tick drives lingering batches, republishing and status, at the
        // state's period, which a retune (a remote `reload`) may change.
        let mut tick = ticker(self.state.tick_period());
        let mut blocks_open = true;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(e) => self.on_event(e),
                    None => break,
                },
                block = blocks.recv(), if blocks_open => match block {
                    Some(b) => self.state.block(b),
                    None => blocks_open = false,
                },
                _ = tick.tick() => self.on_tick().await,
                Some(request) = control.recv() => {
                    self.on_control(request).await;
                    if tick.period() != self.state.tick_period() {
                        tick = ticker(self.state.tick_period());
                    }
                }
            }
            if !blocks_open || cancel.is_cancelled() {
                self.state.set_draining();
                let timeout = self.state.config().shutdown_timeout;
                let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + timeout);
                let (rows, _) = self.shared.outbox_size();
                if !blocks_open && (rows == 0 || Instant::now() >= deadline) {
                    if rows > 0 {
                        tracing::warn!(rows, "shutdown timeout: rows stay in the outbox and replay at the next start");
                    }
                    break;
                }
            }
            self.fill().await;
        }
        self.publish_status().await;
        let _ = self.client.try_disconnect();
    }

    fn on_event(&mut self, event: MqttEvent) {
        let now = Instant::now();
        match event {
            MqttEvent::Connected => {
                for topic in self.state.connected(self.shared.committed_high(), now) {
                    if let Err(error) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
                        tracing::error!(%error, "cannot queue the subscription");
                    }
                }
            }
            MqttEvent::Disconnected => self.state.disconnected(),
            MqttEvent::Message { topic, payload } => {
                self.state.message(&topic, &payload, self.shared.committed_high(), now);
                self.send_deletes();
            }
        }
    }

    async fn on_control(&mut self, request: Control) {
        match request {
            Control::Status(reply) => {
                let (rows, bytes) = self.shared.outbox_size();
                let oldest_age_s = self.oldest_age_s(rows).await;
                let mut status = self.state.snapshot(rows, bytes, oldest_age_s, crate::now_micros(), Instant::now());
                status.last_command = self.shared.last_command();
                let _ = reply.send(status);
            }
            Control::Flush(reply) => {
                let before = self.shared.metrics.batches_published.get();
                self.state.flush();
                self.fill().await;
                self.state.end_flush();
                let _ = reply.send(FlushReport {
                    published_batches: self.shared.metrics.batches_published.get() - before,
                    inflight_batches: self.state.inflight(),
                    connected: self.state.conn() != ConnState::Offline,
                    outbox_rows: self.shared.outbox_size().0,
                });
            }
            Control::Retune(tunables, reply) => {
                self.state.retune(tunables, Instant::now());
                let _ = reply.send(());
            }
        }
    }

    /// Hands confirmed ranges to the deleter.
    fn send_deletes(&mut self) {
        for range in self.state.take_deletes() {
            let _ = self.deletes.send(range);
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let overdue = self.state.tick(self.shared.take_rescan(), self.shared.committed_high(), now);
        let topic = &self.state.config().data_topic;
        let sent: Vec<u64> = overdue
            .into_iter()
            .filter(|(_, payload)| self.client.try_publish(topic, QoS::AtLeastOnce, false, payload.clone()).is_ok())
            .map(|(first, _)| first)
            .collect();
        for first in sent {
            self.state.republished(first, now);
        }
        if self.state.status_due(now) {
            self.publish_status().await;
        }
    }

    /// The oldest outbox row's age (0 when empty, or unreadable just now).
    async fn oldest_age_s(&mut self, rows: u64) -> f64 {
        if rows == 0 || !self.state.outbox_readable(Instant::now()) {
            return 0.0;
        }
        self.outbox.oldest_age_secs().await.unwrap_or_else(|_| {
            self.outbox.reset();
            0.0
        })
    }

    /// Publishes the retained status message (when connected).
    async fn publish_status(&mut self) {
        let (rows, bytes) = self.shared.outbox_size();
        let oldest_age_s = self.oldest_age_s(rows).await;
        let mut status = self.state.status(rows, bytes, oldest_age_s, crate::now_micros(), Instant::now());
        status.last_command = self.shared.last_command();
        if self.state.conn() != ConnState::Offline {
            let topic = &self.state.config().status_topic;
            let _ = self.client.try_publish(topic, QoS::AtLeastOnce, true, status.encode());
        }
    }

    /// Does what the state asks until it has nothing more: publishes
    /// batches while the window has room, loading outbox rows it needs.
    async fn fill(&mut self) {
        loop {
            match self.state.poll(self.shared.committed_high(), Instant::now()) {
                Step::Idle => break,
                Step::Publish { first_seq, payload } => {
                    let topic = &self.state.config().data_topic;
                    if self.client.try_publish(topic, QoS::AtLeastOnce, false, payload).is_err() {
                        self.state.unsent(first_seq);
                    }
                }
                Step::Load { lane, after, limit } => {
                    let rows = self.outbox.load(after, limit).await;
                    if let Err(error) = &rows {
                        self.outbox.reset();
                        tracing::warn!(%error, "loading rows from the outbox failed; retrying in 1 s");
                    }
                    self.state.loaded(lane, after, rows, Instant::now());
                }
            }
        }
    }
}

/// An interval of `period` that skips ticks it missed rather than bursting.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}
