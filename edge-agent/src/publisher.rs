//! Publishing the outbox: committed rows, oldest first, in batches bounded by
//! readings and bytes, QoS 1, with a window of batches in flight; confirmed
//! by echo or ingest ack; republished after a timeout; replayed in full after
//! every (re)connect.
//!
//! The connection life is an explicit state machine ([`ConnState`]):
//! `Offline` → (ConnAck) → `Replaying` → (caught up) → `Live` → (error) →
//! `Offline`. On every ConnAck the window is cleared and the cursor reset to
//! the start of the outbox: rumqttc drops its pending queue on a clean
//! session, and the outbox, not client memory, is the source of truth.
//!
//! Rows come from two places: blocks the committer hands over (the hot path,
//! no read-back) and the outbox itself (replay, or when a hand-over was
//! skipped because this task was behind). The cursor is the highest seq
//! handed to the broker in this session; whatever lies above it and is not
//! in memory is loaded from Postgres.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, QoS};
use telemetry_wire::{AgentStatus, Batch, IngestAck, Reading, SeqRange};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ahead::EchoAhead;
use crate::committer::Block;
use crate::config::{Compression, ConfirmMode, ReplayOrder};
use crate::metrics::Reason;
use crate::mqtt::MqttEvent;
use crate::outbox::Outbox;
use crate::shared::Shared;
use crate::window::{cut, Inflight, Pace, Window};

/// Where the publisher is in its connection life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// No broker connection; rows accumulate in the outbox.
    Offline,
    /// Connected, republishing rows committed before this connection (up to
    /// and including `until`).
    Replaying {
        /// Highest seq committed when the connection came up.
        until: u64,
    },
    /// Connected and caught up: publishing rows as they are committed.
    Live,
}

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// This device.
    pub client_id: String,
    /// The outbox incarnation.
    pub epoch: u64,
    /// Batches go here (and echo from here).
    pub data_topic: String,
    /// Ingest acks arrive here.
    pub ack_topic: String,
    /// The ingest servers' presence announcements (`<prefix>/ingest/+`).
    pub presence_filter: String,
    /// Echo mode: delete on echo only while an ingest server is announced.
    pub wait_for_ingest: bool,
    /// Echo mode: readings echoed and not ingest-acked, at most (0: no limit).
    pub ahead_max_readings: u64,
    /// Echo mode: the same in payload bytes (0: no limit).
    pub ahead_max_bytes: u64,
    /// Echo mode: an echoed batch without an ingest ack stops counting after this.
    pub ahead_timeout: Duration,
    /// Retained status goes here.
    pub status_topic: String,
    /// What confirms a batch.
    pub confirm: ConfirmMode,
    /// Readings per batch, at most.
    pub batch_max_readings: usize,
    /// Payload bytes per batch, at most (roughly: reading bytes).
    pub batch_max_bytes: usize,
    /// Wait up to this long for a partial batch to fill before publishing it.
    pub batch_linger: Duration,
    /// Batch encoding on the wire.
    pub compression: Compression,
    /// Backlog first, or live readings first, after a (re)connect.
    pub replay_order: ReplayOrder,
    /// Backlog readings replayed per second, at most (0: no limit).
    pub replay_max_rate: u64,
    /// Batches in flight, at most.
    pub window: usize,
    /// Republish after this long unconfirmed.
    pub confirm_timeout: Duration,
    /// Status message period (zero: none).
    pub status_interval: Duration,
    /// At shutdown, wait this long for the outbox to drain.
    pub shutdown_timeout: Duration,
    /// Largest incoming payload accepted.
    pub max_packet_bytes: usize,
}

/// The publishing task's state.
pub struct Publisher {
    config: PublisherConfig,
    client: AsyncClient,
    outbox: Outbox,
    shared: Arc<Shared>,
    deletes: mpsc::UnboundedSender<(u64, u64)>,
    state: ConnState,
    cursor: u64,
    memory: VecDeque<Block>,
    memory_rows: usize,
    memory_cap: usize,
    window: Window,
    pg_retry_at: Option<Instant>,
    last_status: Instant,
    last_received: u64,
    last_confirmed: u64,
    draining: bool,
    /// Ingest servers whose presence announcement is set (echo mode).
    present: BTreeSet<String>,
    /// Echoed batches not yet acked by an ingest server (echo mode).
    ahead: EchoAhead,
    /// Whether the absence of any ingest server was logged since the last presence.
    absence_logged: bool,
    /// Outbox rows at the last status, and the smoothed net drain rate.
    last_rows: u64,
    drain_per_s: f64,
    /// The uncompressed body of the batch being compressed (reused).
    scratch: Vec<u8>,
    /// `live_first`: the backlog behind the live readings, `(cursor, until)`:
    /// rows above `cursor` up to `until` are still to be replayed.
    backlog: Option<(u64, u64)>,
    /// The pace of the backlog replay.
    pace: Pace,
    /// `live_first`: whether the backlog has the next turn for the window.
    backlog_turn: bool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("state", &self.state).field("cursor", &self.cursor).finish_non_exhaustive()
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
        let memory_cap = (config.window * config.batch_max_readings * 4).max(100_000);
        let window = Window::new(config.window);
        let ahead = EchoAhead::new(config.ahead_max_readings, config.ahead_max_bytes);
        Self {
            config,
            client,
            outbox,
            shared,
            deletes,
            state: ConnState::Offline,
            cursor: 0,
            memory: VecDeque::new(),
            memory_rows: 0,
            memory_cap,
            window,
            pg_retry_at: None,
            last_status: Instant::now(),
            last_received: 0,
            last_confirmed: 0,
            draining: false,
            present: BTreeSet::new(),
            ahead,
            absence_logged: false,
            last_rows: 0,
            drain_per_s: 0.0,
            scratch: Vec::new(),
            backlog: None,
            pace: Pace::new(0, Instant::now()),
            backlog_turn: false,
        }
    }

    /// Runs until the committer is done (`blocks` closed) after `cancel`, and
    /// the outbox drained or the shutdown timeout passed; or until the event
    /// loop ends.
    pub async fn run(
        mut self,
        mut blocks: mpsc::Receiver<Block>,
        mut events: mpsc::Receiver<MqttEvent>,
        cancel: CancellationToken,
    ) {
        // The tick drives lingering batches, republishing and status.
        let mut tick = tokio::time::interval(Duration::from_millis(10).max(self.config.batch_linger / 2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut blocks_open = true;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(e) => self.on_event(e),
                    None => break,
                },
                block = blocks.recv(), if blocks_open => match block {
                    Some(b) => self.on_block(b),
                    None => blocks_open = false,
                },
                _ = tick.tick() => self.on_tick().await,
            }
            if !blocks_open || cancel.is_cancelled() {
                self.draining = true;
                let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + self.config.shutdown_timeout);
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

    fn on_block(&mut self, block: Block) {
        // Above the cap, forget the block: it is in the outbox and will be
        // loaded from there when the cursor reaches it.
        if self.memory_rows + block.readings.len() <= self.memory_cap {
            self.memory_rows += block.readings.len();
            self.memory.push_back(block);
        }
    }

    fn on_event(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected => {
                // Echo mode also hears the ingest acks (its bound on what
                // lives only in the broker) and the presence announcements,
                // subscribed before anything is published, so that the
                // retained announcements arrive before the first echo.
                let topics = match self.config.confirm {
                    ConfirmMode::Echo => {
                        vec![&self.config.presence_filter, &self.config.ack_topic, &self.config.data_topic]
                    }
                    ConfirmMode::Ingest => vec![&self.config.ack_topic],
                };
                for topic in topics {
                    if let Err(error) = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                        tracing::error!(%error, "cannot queue the subscription");
                    }
                }
                // The retained announcements arrive again on this connection.
                self.present.clear();
                self.shared.metrics.ingest_present.set(0);
                self.replay_from_start();
                tracing::info!(outbox_rows = self.shared.outbox_size().0, "connected; replaying the outbox");
            }
            MqttEvent::Disconnected => {
                if self.state != ConnState::Offline {
                    tracing::warn!(inflight = self.window.len(), "offline; readings accumulate in the outbox");
                }
                self.state = ConnState::Offline;
            }
            MqttEvent::Message { topic, payload } => {
                let presence_prefix = self.config.presence_filter.trim_end_matches('+');
                if let Some(server) = topic.strip_prefix(presence_prefix) {
                    self.on_presence(server, payload.is_empty());
                } else if topic == self.config.data_topic && self.config.confirm == ConfirmMode::Echo {
                    match Batch::decode_header(&payload, self.config.max_packet_bytes) {
                        Ok((client_id, range)) if client_id == self.config.client_id => {
                            if self.echo_matches(range, &payload) {
                                if self.ingest_announced() {
                                    self.confirm(range, Confirmation::Confirmed);
                                } else {
                                    self.hold(range);
                                }
                            }
                        }
                        Ok((client_id, _)) => tracing::warn!(%client_id, "batch of another client on our topic"),
                        Err(error) => tracing::warn!(%error, "undecodable message on our own topic"),
                    }
                } else if topic == self.config.ack_topic {
                    match IngestAck::decode(&payload, self.config.max_packet_bytes) {
                        Ok(ack) if self.config.confirm == ConfirmMode::Ingest => {
                            ack.ranges.into_iter().for_each(|r| self.confirm(r, Confirmation::Confirmed));
                            ack.rejected.into_iter().for_each(|r| self.confirm(r, Confirmation::Rejected));
                        }
                        Ok(ack) => self.echo_acked(&ack),
                        Err(error) => tracing::warn!(%error, "undecodable ingest ack"),
                    }
                }
            }
        }
    }

    /// Clears the window and replays the whole outbox on this connection:
    /// oldest first (the cursor from the start), or live first (the cursor
    /// at the committed high; the backlog below it goes behind, paced).
    fn replay_from_start(&mut self) {
        self.window.clear();
        self.shared.metrics.inflight_batches.set(0);
        self.shared.metrics.echo_held_batches.set(0);
        self.pace = Pace::new(self.config.replay_max_rate, Instant::now());
        let until = self.shared.committed_high();
        match self.config.replay_order {
            ReplayOrder::OldestFirst => {
                self.cursor = 0;
                self.backlog = None;
                self.state = ConnState::Replaying { until };
            }
            ReplayOrder::LiveFirst => {
                self.cursor = until;
                self.backlog = (until > 0).then_some((0, until));
                self.state = ConnState::Live;
            }
        }
    }

    /// Whether an echo may delete: some ingest server announces a durable
    /// subscription (or the agent was told not to wait for one).
    fn ingest_announced(&self) -> bool {
        !self.config.wait_for_ingest || !self.present.is_empty()
    }

    /// A presence announcement of `server` set or cleared. When the first
    /// server appears while batches are held, the outbox is replayed: those
    /// batches may have been routed to no durable subscriber.
    fn on_presence(&mut self, server: &str, cleared: bool) {
        let before = !self.present.is_empty();
        if cleared {
            self.present.remove(server);
        } else {
            self.present.insert(server.to_owned());
        }
        let now = !self.present.is_empty();
        self.shared.metrics.ingest_present.set(i64::from(now));
        if now && !before {
            self.absence_logged = false;
            let held = self.window.held();
            tracing::info!(%server, held, "an ingest server announces a durable subscription; echoes delete again");
            if held > 0 && self.state != ConnState::Offline {
                self.replay_from_start();
                tracing::info!(held, "publishing the held batches again (they may have reached no durable subscriber)");
            }
        } else if before && !now && self.config.wait_for_ingest && self.config.confirm == ConfirmMode::Echo {
            tracing::warn!(%server, "no ingest server announces a durable subscription any more; echoed batches stay in the outbox until one does");
            self.absence_logged = true;
        }
    }

    /// An echo while no ingest server is announced: the batch stays in the
    /// outbox and in the window (not republished on timeout), until a server
    /// appears and the outbox is replayed.
    fn hold(&mut self, range: SeqRange) {
        if self.window.hold(range.first_seq, range.last_seq) {
            self.shared.metrics.echo_held_batches.set(self.window.held() as i64);
            if !self.absence_logged {
                self.absence_logged = true;
                tracing::warn!(
                    "no ingest server announces a durable subscription on this prefix: echoed batches stay in \
                     the outbox (the broker may have routed them to nobody) until one does"
                );
            }
        }
    }

    /// Echo mode: an ingest ack shrinks what lives only in the broker.
    fn echo_acked(&mut self, ack: &IngestAck) {
        for (range, rejected) in ack.ranges.iter().map(|r| (r, false)).chain(ack.rejected.iter().map(|r| (r, true))) {
            if range.epoch != self.config.epoch {
                continue;
            }
            let readings = self.ahead.acked(range.first_seq, range.last_seq);
            if rejected && readings > 0 {
                self.rejected_by_ingest(range, readings);
            }
        }
        self.shared.metrics.echo_ahead_readings.set(self.ahead.readings() as i64);
    }

    /// Whether an echo is, byte for byte, the batch this agent published as
    /// `range` and is still waiting for: the broker routes our own publish
    /// back unchanged, so anything else on our topic (a forged or stale
    /// batch with our client id) confirms nothing.
    fn echo_matches(&self, range: SeqRange, payload: &[u8]) -> bool {
        if range.epoch != self.config.epoch {
            return self.reject_confirmation(range, "other_epoch");
        }
        match self.window.exact(range.first_seq, range.last_seq) {
            Some(batch) if batch.payload == payload => true,
            Some(_) => self.reject_confirmation(range, "payload_mismatch"),
            None => self.reject_confirmation(range, "not_in_flight"),
        }
    }

    /// Counts and logs readings the ingest server rejected for good (it
    /// dead-lettered them): republishing cannot help, so they leave the
    /// outbox (ingest mode) or were already gone (echo mode).
    fn rejected_by_ingest(&self, range: &SeqRange, readings: u64) {
        self.shared.metrics.readings_rejected_by_ingest.inc_by(readings);
        tracing::warn!(
            first_seq = range.first_seq,
            last_seq = range.last_seq,
            readings,
            "the ingest server rejected these readings for good (see its ingest_errors); not stored, not in the outbox"
        );
    }

    /// Counts and logs a confirmation that deletes nothing; `false`.
    fn reject_confirmation(&self, range: SeqRange, reason: &'static str) -> bool {
        self.shared.metrics.confirmations_rejected.get_or_create(&Reason { reason }).inc();
        tracing::debug!(
            epoch = range.epoch,
            first_seq = range.first_seq,
            last_seq = range.last_seq,
            reason,
            "confirmation ignored (late, duplicate or forged): it deletes nothing"
        );
        false
    }

    /// A confirmation of `range`: retire the in-flight batches it is made of
    /// (one, or a run of adjacent ones: see [`Window::confirm`]) and delete
    /// exactly their rows, nothing else. A range of another epoch (an
    /// earlier start: those seqs are republished under this one) or one that
    /// covers no batch in flight (late, duplicate, or forged by someone who
    /// may publish on our topics) deletes nothing: counted and logged. A
    /// rejection (the server dead-lettered those readings for good) deletes
    /// the same way, since republishing cannot help, but is counted and
    /// logged apart.
    fn confirm(&mut self, range: SeqRange, kind: Confirmation) {
        if range.epoch != self.config.epoch {
            self.reject_confirmation(range, "other_epoch");
            return;
        }
        let retired = self.window.confirm(range.first_seq, range.last_seq);
        if retired.is_empty() {
            self.reject_confirmation(range, "not_in_flight");
            return;
        }
        let readings: u64 = retired.iter().map(|(_, b)| b.readings).sum();
        match (kind, self.config.confirm) {
            (Confirmation::Rejected, _) => self.rejected_by_ingest(&range, readings),
            (Confirmation::Confirmed, ConfirmMode::Echo) => {
                self.shared.metrics.readings_echoed.inc_by(readings);
            }
            (Confirmation::Confirmed, ConfirmMode::Ingest) => {
                self.shared.metrics.readings_ingest_acked.inc_by(readings);
            }
        }
        self.shared.metrics.inflight_batches.set(self.window.len() as i64);
        let echo = self.config.confirm == ConfirmMode::Echo;
        let now = Instant::now();
        for (first, batch) in retired {
            if echo {
                self.ahead.echoed(first, batch.last_seq, batch.readings, batch.payload.len() as u64, now);
            }
            let _ = self.deletes.send((first, batch.last_seq));
        }
        self.shared.metrics.echo_ahead_readings.set(self.ahead.readings() as i64);
    }

    async fn on_tick(&mut self) {
        if self.pg_retry_at.is_some_and(|t| Instant::now() >= t) {
            self.pg_retry_at = None;
        }
        if self.shared.take_rescan() && self.state != ConnState::Offline {
            tracing::info!("the outbox was rolled back: replaying it whole");
            self.replay_from_start();
        }
        let expired = self.ahead.expire(Instant::now(), self.config.ahead_timeout);
        if expired > 0 {
            self.shared.metrics.echo_ahead_expired_readings.inc_by(expired);
            self.shared.metrics.echo_ahead_readings.set(self.ahead.readings() as i64);
            tracing::warn!(
                readings = expired,
                "echoed readings got no ingest ack in time (no ingest server storing, or the broker lost them); \
                 they no longer count against echo_ahead_max"
            );
        }
        if self.state != ConnState::Offline {
            let now = Instant::now();
            for first in self.window.overdue(now, self.config.confirm_timeout) {
                let Some(batch) = self.window.get_mut(first) else { continue };
                if self
                    .client
                    .try_publish(&self.config.data_topic, QoS::AtLeastOnce, false, batch.payload.clone())
                    .is_ok()
                {
                    batch.attempts += 1;
                    batch.sent_at = now;
                    self.shared.metrics.batches_republished.inc();
                    self.shared.metrics.batches_published.inc();
                    self.shared.metrics.bytes_published.inc_by(batch.payload.len() as u64);
                    tracing::info!(
                        first_seq = first,
                        last_seq = batch.last_seq,
                        attempt = batch.attempts,
                        "batch unconfirmed after the timeout; published again"
                    );
                }
            }
        }
        if !self.config.status_interval.is_zero() && self.last_status.elapsed() >= self.config.status_interval {
            self.publish_status().await;
        }
    }

    async fn publish_status(&mut self) {
        let elapsed = self.last_status.elapsed().as_secs_f64().max(1e-3);
        self.last_status = Instant::now();
        let m = &self.shared.metrics;
        let received = m.readings_received.get();
        let confirmed = m.readings_echoed.get() + m.readings_ingest_acked.get();
        let (rows, bytes) = self.shared.outbox_size();
        let oldest_age_s = if rows == 0 || self.pg_retry_at.is_some() {
            0.0
        } else {
            self.outbox.oldest_age_secs().await.unwrap_or_else(|_| {
                self.outbox.reset();
                0.0
            })
        };
        let echo = self.config.confirm == ConfirmMode::Echo;
        // Net rows leaving the outbox per second, smoothed over statuses
        // (about the last five): the backlog's drain rate and its ETA.
        let drained = (self.last_rows as f64 - rows as f64) / elapsed;
        self.drain_per_s = 0.7 * self.drain_per_s + 0.3 * drained;
        self.last_rows = rows;
        let drain_eta_s = match rows {
            0 => Some(0.0),
            _ if self.drain_per_s > 0.0 => Some(rows as f64 / self.drain_per_s),
            _ => None,
        };
        let m = &self.shared.metrics;
        m.outbox_oldest_age_seconds.set(oldest_age_s as i64);
        m.outbox_drain_eta_seconds.set(drain_eta_s.map_or(-1, |s| s.ceil() as i64));
        let published = m.readings_published.get();
        let bytes_per_reading = (published > 0).then(|| m.bytes_published.get() as f64 / published as f64);
        let status = AgentStatus {
            version: telemetry_wire::status::STATUS_VERSION,
            client_id: self.config.client_id.clone(),
            ts: crate::now_micros(),
            outbox_rows: rows,
            outbox_bytes: bytes,
            oldest_age_s,
            received_per_s: (received - self.last_received) as f64 / elapsed,
            confirmed_per_s: (confirmed.saturating_sub(self.last_confirmed)) as f64 / elapsed,
            connected: self.state != ConnState::Offline,
            drain_per_s: Some(self.drain_per_s),
            drain_eta_s,
            bytes_per_reading,
            ingest_present: echo.then_some(!self.present.is_empty()),
            echo_held_batches: echo.then(|| self.window.held() as u64),
            echo_ahead_readings: echo.then_some(self.ahead.readings()),
        };
        self.last_received = received;
        self.last_confirmed = confirmed;
        if self.state != ConnState::Offline {
            let _ = self.client.try_publish(&self.config.status_topic, QoS::AtLeastOnce, true, status.encode());
        }
    }

    /// Publishes batches while the window has room.
    async fn fill(&mut self) {
        if self.state == ConnState::Offline {
            return;
        }
        while self.window.has_room() && self.ahead.has_room() {
            let replaying = matches!(self.state, ConnState::Replaying { .. });
            if replaying && !self.pace.ready(Instant::now()) {
                break;
            }
            // live_first: live and backlog batches take turns for the window
            // (the backlog at its pace), so neither starves the other.
            let backlog_turn = self.backlog_turn;
            self.backlog_turn = !backlog_turn;
            let backlog_first = if backlog_turn { self.next_backlog_batch().await } else { None };
            let next = match backlog_first {
                Some((first, readings)) => Some((first, readings, true)),
                None => match self.next_batch().await {
                    Some((first, readings)) => Some((first, readings, false)),
                    None => self.next_backlog_batch().await.map(|(first, readings)| (first, readings, true)),
                },
            };
            let Some((first_seq, readings, from_backlog)) = next else {
                if replaying && self.pg_retry_at.is_none() {
                    self.state = ConnState::Live;
                    tracing::info!(cursor = self.cursor, "replay done; live");
                }
                break;
            };
            if replaying || from_backlog {
                self.pace.spend(readings.len() as u64);
            }
            let n = readings.len() as u64;
            let last_seq = first_seq + n - 1;
            let mut payload = Vec::new();
            let (client_id, epoch) = (&self.config.client_id, self.config.epoch);
            match self.config.compression {
                Compression::None => Batch::encode_parts(client_id, epoch, first_seq, &readings, &mut payload),
                Compression::Zstd => {
                    Batch::encode_parts_zstd(client_id, epoch, first_seq, &readings, &mut self.scratch, &mut payload);
                }
            }
            let sent_at =
                match self.client.try_publish(&self.config.data_topic, QoS::AtLeastOnce, false, payload.clone()) {
                    Ok(()) => Instant::now(),
                    // The request queue is full (or the loop is reconnecting):
                    // keep the batch in flight as already overdue, so the next
                    // tick publishes it again.
                    Err(_) => Instant::now().checked_sub(self.config.confirm_timeout).unwrap_or_else(Instant::now),
                };
            self.shared.metrics.batches_published.inc();
            self.shared.metrics.readings_published.inc_by(n);
            self.shared.metrics.bytes_published.inc_by(payload.len() as u64);
            if let ConnState::Replaying { until } = self.state {
                let replayed = until.min(last_seq).saturating_sub(first_seq - 1);
                self.shared.metrics.readings_replayed.inc_by(replayed);
                if last_seq >= until {
                    self.state = ConnState::Live;
                    tracing::info!(cursor = last_seq, "replay done; live");
                }
            }
            self.window
                .insert(first_seq, Inflight { last_seq, readings: n, payload, sent_at, attempts: 1, held: false });
            self.shared.metrics.inflight_batches.set(self.window.len() as i64);
            if from_backlog {
                self.shared.metrics.readings_replayed.inc_by(n);
                match self.backlog {
                    Some((_, until)) if last_seq < until => self.backlog = Some((last_seq, until)),
                    _ => self.end_backlog(),
                }
            } else {
                self.cursor = last_seq;
            }
        }
    }

    /// The next contiguous run of rows above the cursor, from memory when it
    /// holds them, else from the outbox. `None` when caught up (or Postgres
    /// is unavailable and memory has nothing contiguous).
    async fn next_batch(&mut self) -> Option<(u64, Vec<Reading>)> {
        loop {
            self.trim_memory();
            if self.memory.front().is_some_and(|b| b.first_seq == self.cursor + 1) {
                return self.take_from_memory();
            }
            // Nothing committed above the cursor: no query needed.
            let high = self.shared.committed_high();
            if self.pg_retry_at.is_some() || high <= self.cursor {
                return None;
            }
            match self.load_above(self.cursor).await? {
                rows if rows.is_empty() => {
                    // Nothing in the outbox above the cursor: every row up to
                    // `high` (committed before the query) is confirmed and
                    // gone, so the cursor moves there and the next call needs
                    // no query until something new is committed (no polling
                    // of an empty outbox after a reconnect).
                    match self.memory.front() {
                        Some(block) => self.cursor = block.first_seq - 1,
                        None => {
                            self.cursor = high;
                            return None;
                        }
                    }
                }
                rows => {
                    let first = rows[0].0;
                    if self.memory.front().is_some_and(|b| b.first_seq <= first) {
                        self.cursor = self.memory.front().map_or(self.cursor, |b| b.first_seq - 1);
                        continue;
                    }
                    return Some(self.first_batch(rows, u64::MAX));
                }
            }
        }
    }

    /// Up to a batch's worth of outbox rows above `after`, oldest first;
    /// `None` (and a retry in 1 s) when Postgres fails.
    async fn load_above(&mut self, after: u64) -> Option<Vec<(u64, Reading)>> {
        self.shared.metrics.outbox_reads.inc();
        match self.outbox.load(after, self.config.batch_max_readings).await {
            Ok(rows) => Some(rows),
            Err(error) => {
                self.shared.metrics.postgres_errors.inc();
                self.outbox.reset();
                self.pg_retry_at = Some(Instant::now() + Duration::from_secs(1));
                tracing::warn!(%error, "loading rows from the outbox failed; retrying in 1 s");
                None
            }
        }
    }

    /// The first batch of `rows` (non-empty, seq order): their leading run of
    /// contiguous seqs no higher than `upto`, cut to the batch limits.
    fn first_batch(&self, rows: Vec<(u64, Reading)>, upto: u64) -> (u64, Vec<Reading>) {
        let first = rows[0].0;
        let contiguous =
            rows.iter().enumerate().take_while(|(i, (seq, _))| *seq == first + *i as u64 && *seq <= upto).count();
        let n = cut(
            rows[..contiguous].iter().map(|(_, r)| r.encoded_len()),
            self.config.batch_max_readings,
            self.config.batch_max_bytes,
        );
        (first, rows.into_iter().take(n).map(|(_, r)| r).collect())
    }

    /// `live_first`: the next contiguous run of backlog rows (above the
    /// backlog cursor, up to where the backlog ends), when the pace allows;
    /// `None` when the backlog is done, or not yet allowed.
    async fn next_backlog_batch(&mut self) -> Option<(u64, Vec<Reading>)> {
        let (cursor, until) = self.backlog?;
        if self.pg_retry_at.is_some() || !self.pace.ready(Instant::now()) {
            return None;
        }
        let rows = self.load_above(cursor).await?;
        if rows.first().is_none_or(|&(seq, _)| seq > until) {
            self.end_backlog();
            return None;
        }
        Some(self.first_batch(rows, until))
    }

    /// `live_first`: the backlog is replayed.
    fn end_backlog(&mut self) {
        self.backlog = None;
        tracing::info!("backlog replayed behind the live readings");
    }

    /// The next batch from the committed blocks in memory, merging blocks
    /// while their seqs are contiguous. A partial batch waits up to
    /// `batch_linger` for more rows (fewer, fuller messages for the broker
    /// and the ingest server), except while draining at shutdown.
    fn take_from_memory(&mut self) -> Option<(u64, Vec<Reading>)> {
        let first_seq = self.memory.front()?.first_seq;
        let mut contiguous = 0usize;
        let mut next = first_seq;
        for b in &self.memory {
            if b.first_seq != next {
                break;
            }
            contiguous += b.readings.len();
            next += b.readings.len() as u64;
        }
        let n = cut(
            self.memory.iter().flat_map(|b| b.readings.iter()).take(contiguous).map(Reading::encoded_len),
            self.config.batch_max_readings,
            self.config.batch_max_bytes,
        );
        let full = n < contiguous || n >= self.config.batch_max_readings;
        let oldest = self.memory.front()?.committed_at;
        if !full && !self.draining && oldest.elapsed() < self.config.batch_linger {
            return None;
        }
        let mut readings = Vec::with_capacity(n);
        while readings.len() < n {
            // Invariant: `n` readings are in contiguous blocks at the front.
            let front = self.memory.front_mut().expect("n counted from these blocks");
            let want = n - readings.len();
            if want >= front.readings.len() {
                let block = self.memory.pop_front().expect("front exists");
                if readings.is_empty() {
                    readings = block.readings;
                    readings.reserve(n.saturating_sub(readings.len()));
                } else {
                    readings.extend(block.readings);
                }
            } else {
                let rest = front.readings.split_off(want);
                front.first_seq += want as u64;
                readings.append(&mut std::mem::replace(&mut front.readings, rest));
            }
        }
        self.memory_rows -= readings.len();
        Some((first_seq, readings))
    }

    /// Drops memory that is at or below the cursor.
    fn trim_memory(&mut self) {
        while let Some(front) = self.memory.front_mut() {
            let last = front.first_seq + front.readings.len() as u64 - 1;
            if front.readings.is_empty() || last <= self.cursor {
                self.memory_rows -= front.readings.len();
                self.memory.pop_front();
                continue;
            }
            if front.first_seq <= self.cursor {
                let skip = usize::try_from(self.cursor + 1 - front.first_seq).unwrap_or(usize::MAX);
                front.readings.drain(..skip);
                front.first_seq = self.cursor + 1;
                self.memory_rows -= skip;
            }
            break;
        }
    }
}
/// What a confirmation says about its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    /// Stored (ingest ack) or taken by the broker (echo).
    Confirmed,
    /// Dead-lettered by the ingest server: never to be stored.
    Rejected,
}
