//! The publisher's protocol state, apart from I/O (the way rumqttc keeps
//! `MqttState` apart from its event loop): inputs in, actions out, no
//! sockets, no database, no clock of its own. [`crate::publisher`] is the
//! thin shell that feeds it and carries out what it asks for.
//!
//! Inputs: committed blocks ([`PublishState::block`]), connection changes
//! ([`PublishState::connected`], [`PublishState::disconnected`]), messages
//! on subscribed topics (echoes, ingest acks, presence announcements:
//! [`PublishState::message`]), outbox rows the shell loaded on request
//! ([`PublishState::loaded`]), the outcome of a publish
//! ([`PublishState::unsent`], [`PublishState::republished`]) and the
//! passing of time ([`PublishState::tick`]).
//!
//! Actions: the next thing to do ([`PublishState::poll`]: publish this
//! batch, load outbox rows above a seq, or nothing), batches to publish
//! again (from `tick`), topics to subscribe (from `connected`) and ranges to
//! delete from the outbox ([`PublishState::take_deletes`]).
//!
//! The connection life ([`ConnState`]): `Offline` → (ConnAck) →
//! `Replaying` → (caught up) → `Live` → (error) → `Offline`. On every
//! ConnAck the window is cleared and the cursor reset: rumqttc drops its
//! pending queue on a clean session, and the outbox, not client memory, is
//! the source of truth.
//!
//! Rows come from two places: blocks the committer hands over (the hot path,
//! no read-back) and the outbox itself (replay, or when a hand-over was
//! skipped because the publisher was behind). The cursor is the highest seq
//! handed to the broker in this session; whatever lies above it and is not
//! in memory is loaded from the outbox.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use telemetry_wire::{AgentStatus, Batch, IngestAck, Reading, SeqRange};

use crate::ahead::EchoAhead;
use crate::committer::Block;
use crate::config::{Compression, ConfirmMode, ReplayOrder};
use crate::metrics::Reason;
use crate::shared::Shared;
use crate::window::{cut, Inflight, Pace, Window};

/// After a failed outbox read, the next one waits this long.
const PG_RETRY: Duration = Duration::from_secs(1);

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

/// Which stream of rows a load is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Rows above the cursor: the live stream (and the whole replay when
    /// oldest first).
    Live,
    /// `live_first`: the backlog replayed behind the live readings.
    Backlog,
}

/// What [`PublishState::poll`] asks the shell to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing now: wait for an input (a block, a message, a tick).
    Idle,
    /// Publish this batch (QoS 1, on the data topic); if the client refuses
    /// it, report [`PublishState::unsent`].
    Publish {
        /// Its first seq (its key in the window).
        first_seq: u64,
        /// The encoded batch.
        payload: Vec<u8>,
    },
    /// Load up to `limit` outbox rows above `after` and hand them to
    /// [`PublishState::loaded`].
    Load {
        /// For which stream.
        lane: Lane,
        /// Rows with a higher seq.
        after: u64,
        /// At most this many.
        limit: usize,
    },
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
    /// Remote commands arrive here (subscribed with the rest; `None`: off).
    pub command_topic: Option<String>,
}

/// The settings a configuration reload changes while the agent runs (the
/// `LIVE_KEYS` of [`crate::command`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunables {
    /// [`PublisherConfig::batch_linger`].
    pub batch_linger: Duration,
    /// [`PublisherConfig::confirm_timeout`].
    pub confirm_timeout: Duration,
    /// [`PublisherConfig::replay_max_rate`].
    pub replay_max_rate: u64,
    /// [`PublisherConfig::status_interval`].
    pub status_interval: Duration,
    /// [`PublisherConfig::ahead_max_readings`].
    pub ahead_max_readings: u64,
    /// [`PublisherConfig::ahead_max_bytes`].
    pub ahead_max_bytes: u64,
    /// [`PublisherConfig::ahead_timeout`].
    pub ahead_timeout: Duration,
}

/// Rows the shell loaded for a [`Step::Load`], waiting to be used by the
/// next [`PublishState::poll`].
#[derive(Debug)]
struct Loaded {
    lane: Lane,
    after: u64,
    /// The committed high when the load was asked for: an empty answer
    /// proves every row up to here is gone, and no further.
    high: u64,
    rows: Vec<(u64, Reading)>,
}

/// What a confirmation says about its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    /// Stored (ingest ack) or taken by the broker (echo).
    Confirmed,
    /// Dead-lettered by the ingest server: never to be stored.
    Rejected,
}

/// The publisher's state: everything it decides, nothing it does.
pub struct PublishState {
    config: PublisherConfig,
    shared: Arc<Shared>,
    conn: ConnState,
    cursor: u64,
    memory: VecDeque<Block>,
    memory_rows: usize,
    memory_cap: usize,
    window: Window,
    /// Ranges confirmed, for the shell to delete from the outbox.
    deletes: Vec<(u64, u64)>,
    /// An outbox read failed: no reads before this.
    pg_retry_at: Option<Instant>,
    /// The answer to the last [`Step::Load`].
    loaded: Option<Loaded>,
    /// The committed high the pending [`Step::Load`] was asked under.
    load_high: u64,
    draining: bool,
    /// A `flush` command: partial batches go without lingering until memory
    /// is empty.
    flushing: bool,
    /// Ingest servers whose presence announcement is set (echo mode).
    present: BTreeSet<String>,
    /// Echoed batches not yet acked by an ingest server (echo mode).
    ahead: EchoAhead,
    /// Whether the absence of any ingest server was logged since the last presence.
    absence_logged: bool,
    /// The uncompressed body of the batch being compressed (reused).
    scratch: Vec<u8>,
    /// `live_first`: the backlog behind the live readings, `(cursor, until)`:
    /// rows above `cursor` up to `until` are still to be replayed.
    backlog: Option<(u64, u64)>,
    /// The pace of the backlog replay.
    pace: Pace,
    /// `live_first`: whether the backlog has the next turn for the window.
    backlog_turn: bool,
    /// Status bookkeeping: when the last one was made, counters then, and
    /// the smoothed net drain rate of the outbox.
    last_status: Instant,
    last_received: u64,
    last_confirmed: u64,
    last_rows: Option<u64>,
    drain_per_s: f64,
}

impl std::fmt::Debug for PublishState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishState")
            .field("conn", &self.conn)
            .field("cursor", &self.cursor)
            .field("inflight", &self.window.len())
            .finish_non_exhaustive()
    }
}

impl PublishState {
    /// Offline, nothing in memory, cursor at 0.
    #[must_use]
    pub fn new(config: PublisherConfig, shared: Arc<Shared>, now: Instant) -> Self {
        let memory_cap = (config.window * config.batch_max_readings * 4).max(100_000);
        let window = Window::new(config.window);
        let ahead = EchoAhead::new(config.ahead_max_readings, config.ahead_max_bytes);
        Self {
            config,
            shared,
            conn: ConnState::Offline,
            cursor: 0,
            memory: VecDeque::new(),
            memory_rows: 0,
            memory_cap,
            window,
            deletes: Vec::new(),
            pg_retry_at: None,
            loaded: None,
            load_high: 0,
            draining: false,
            flushing: false,
            present: BTreeSet::new(),
            ahead,
            absence_logged: false,
            scratch: Vec::new(),
            backlog: None,
            pace: Pace::new(0, now),
            backlog_turn: false,
            last_status: now,
            last_received: 0,
            last_confirmed: 0,
            last_rows: None,
            drain_per_s: 0.0,
        }
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &PublisherConfig {
        &self.config
    }

    /// How often the shell should call [`PublishState::tick`]: half the
    /// linger (a lingering batch waits at most 1.5 lingers), but at least
    /// every 250 ms (a long linger must not hold back status messages and
    /// republishing) and at most every 10 ms. Follows [`PublishState::retune`].
    #[must_use]
    pub fn tick_period(&self) -> Duration {
        (self.config.batch_linger / 2).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    /// Where the connection life is.
    #[must_use]
    pub fn conn(&self) -> ConnState {
        self.conn
    }

    /// Shutting down: partial batches go without lingering.
    pub fn set_draining(&mut self) {
        self.draining = true;
    }

    /// A `flush` command: what is committed goes out without waiting for
    /// the linger, until [`PublishState::end_flush`].
    pub fn flush(&mut self) {
        self.flushing = true;
    }

    /// The flush is done (the shell polled until idle).
    pub fn end_flush(&mut self) {
        self.flushing = false;
    }

    /// Batches in flight.
    #[must_use]
    pub fn inflight(&self) -> usize {
        self.window.len()
    }

    /// Applies a configuration reload's live settings.
    pub fn retune(&mut self, t: Tunables, now: Instant) {
        let c = &mut self.config;
        c.batch_linger = t.batch_linger;
        c.confirm_timeout = t.confirm_timeout;
        c.status_interval = t.status_interval;
        c.ahead_max_readings = t.ahead_max_readings;
        c.ahead_max_bytes = t.ahead_max_bytes;
        c.ahead_timeout = t.ahead_timeout;
        self.ahead.set_limits(t.ahead_max_readings, t.ahead_max_bytes);
        if c.replay_max_rate != t.replay_max_rate {
            c.replay_max_rate = t.replay_max_rate;
            self.pace = Pace::new(t.replay_max_rate, now);
        }
    }

    /// Whether outbox reads are allowed at `now` (none for a while after one
    /// failed).
    #[must_use]
    pub fn outbox_readable(&self, now: Instant) -> bool {
        self.pg_retry_at.is_none_or(|t| now >= t)
    }

    /// Ranges confirmed since the last call, to delete from the outbox.
    pub fn take_deletes(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.deletes)
    }

    // ---- inputs ---------------------------------------------------------------

    /// The committer handed over `block` (committed rows). Above the memory
    /// cap it is forgotten: it is in the outbox and loaded from there when
    /// the cursor reaches it.
    pub fn block(&mut self, block: Block) {
        if self.memory_rows + block.readings.len() <= self.memory_cap {
            self.memory_rows += block.readings.len();
            self.memory.push_back(block);
        }
    }

    /// A connection came up with `committed_high` the highest committed
    /// seq: the whole outbox is replayed on it. Returns the topics to
    /// subscribe, in order: echo mode also hears the ingest acks (its bound
    /// on what lives only in the broker) and the presence announcements,
    /// subscribed before anything is published, so that the retained
    /// announcements arrive before the first echo.
    pub fn connected(&mut self, committed_high: u64, now: Instant) -> Vec<String> {
        let c = &self.config;
        let mut topics = match c.confirm {
            ConfirmMode::Echo => vec![c.presence_filter.clone(), c.ack_topic.clone(), c.data_topic.clone()],
            ConfirmMode::Ingest => vec![c.ack_topic.clone()],
        };
        topics.extend(c.command_topic.clone());
        // The retained announcements arrive again on this connection.
        self.present.clear();
        self.shared.metrics.ingest_present.set(0);
        self.replay_from_start(committed_high, now);
        tracing::info!(outbox_rows = self.shared.outbox_size().0, "connected; replaying the outbox");
        topics
    }

    /// The connection dropped.
    pub fn disconnected(&mut self) {
        if self.conn != ConnState::Offline {
            tracing::warn!(inflight = self.window.len(), "offline; readings accumulate in the outbox");
        }
        self.conn = ConnState::Offline;
    }

    /// A message on a subscribed topic: a presence announcement, an echo of
    /// our own batch, or an ingest ack. `committed_high` is needed when a
    /// presence makes the outbox replay.
    pub fn message(&mut self, topic: &str, payload: &[u8], committed_high: u64, now: Instant) {
        let presence_prefix = self.config.presence_filter.trim_end_matches('+');
        if let Some(server) = topic.strip_prefix(presence_prefix) {
            self.presence(server, payload.is_empty(), committed_high, now);
        } else if topic == self.config.data_topic && self.config.confirm == ConfirmMode::Echo {
            match Batch::decode_header(payload, self.config.max_packet_bytes) {
                Ok((client_id, range)) if client_id == self.config.client_id => {
                    if self.echo_matches(range, payload) {
                        if self.ingest_announced() {
                            self.confirm(range, Confirmation::Confirmed, now);
                        } else {
                            self.hold(range);
                        }
                    }
                }
                Ok((client_id, _)) => tracing::warn!(%client_id, "batch of another client on our topic"),
                Err(error) => tracing::warn!(%error, "undecodable message on our own topic"),
            }
        } else if topic == self.config.ack_topic {
            match IngestAck::decode(payload, self.config.max_packet_bytes) {
                Ok(ack) if self.config.confirm == ConfirmMode::Ingest => {
                    ack.ranges.into_iter().for_each(|r| self.confirm(r, Confirmation::Confirmed, now));
                    ack.rejected.into_iter().for_each(|r| self.confirm(r, Confirmation::Rejected, now));
                }
                Ok(ack) => self.echo_acked(&ack),
                Err(error) => tracing::warn!(%error, "undecodable ingest ack"),
            }
        }
    }

    /// The rows the shell loaded for the last [`Step::Load`] (`Err`: the
    /// read failed; reads pause for a second).
    pub fn loaded<E>(&mut self, lane: Lane, after: u64, rows: Result<Vec<(u64, Reading)>, E>, now: Instant) {
        match rows {
            Ok(rows) => self.loaded = Some(Loaded { lane, after, high: self.load_high, rows }),
            Err(_) => {
                self.shared.metrics.postgres_errors.inc();
                self.pg_retry_at = Some(now + PG_RETRY);
                self.loaded = None;
            }
        }
    }

    /// The client refused the batch at `first_seq` (its request queue is
    /// full, or it is reconnecting): it stays in flight, due at the next
    /// tick ([`crate::window::Inflight::unsent`]).
    pub fn unsent(&mut self, first_seq: u64) {
        if let Some(batch) = self.window.get_mut(first_seq) {
            batch.unsent = true;
        }
    }

    /// Time passed. `rescan`: the outbox was rolled back under the agent
    /// (replay it whole). Returns the batches unconfirmed for longer than
    /// the confirm timeout, to publish again (report each that went with
    /// [`PublishState::republished`]).
    pub fn tick(&mut self, rescan: bool, committed_high: u64, now: Instant) -> Vec<(u64, Vec<u8>)> {
        if self.pg_retry_at.is_some_and(|t| now >= t) {
            self.pg_retry_at = None;
        }
        if rescan && self.conn != ConnState::Offline {
            tracing::info!("the outbox was rolled back: replaying it whole");
            self.replay_from_start(committed_high, now);
        }
        let expired = self.ahead.expire(now, self.config.ahead_timeout);
        if expired > 0 {
            self.shared.metrics.echo_ahead_expired_readings.inc_by(expired);
            self.shared.metrics.echo_ahead_readings.set(self.ahead.readings() as i64);
            tracing::warn!(
                readings = expired,
                "echoed readings got no ingest ack in time (no ingest server storing, or the broker lost them); \
                 they no longer count against echo_ahead_max"
            );
        }
        if self.conn == ConnState::Offline {
            return Vec::new();
        }
        self.window
            .overdue(now, self.config.confirm_timeout)
            .into_iter()
            .filter_map(|first| self.window.get_mut(first).map(|b| (first, b.payload.clone())))
            .collect()
    }

    /// The overdue batch at `first_seq` went out again.
    pub fn republished(&mut self, first_seq: u64, now: Instant) {
        let Some(batch) = self.window.get_mut(first_seq) else { return };
        if !std::mem::take(&mut batch.unsent) {
            batch.attempts += 1;
        }
        batch.sent_at = now;
        let m = &self.shared.metrics;
        m.batches_republished.inc();
        m.batches_published.inc();
        m.bytes_published.inc_by(batch.payload.len() as u64);
        tracing::info!(
            first_seq,
            last_seq = batch.last_seq,
            attempt = batch.attempts,
            "batch unconfirmed after the timeout; published again"
        );
    }

    // ---- the next action ------------------------------------------------------

    /// What to do next, with `committed_high` the highest committed seq:
    /// publish a batch while the window (and, in echo mode, the echo-ahead
    /// bound) has room, load rows it needs from the outbox, or nothing.
    pub fn poll(&mut self, committed_high: u64, now: Instant) -> Step {
        if self.conn == ConnState::Offline || !self.window.has_room() || !self.ahead.has_room() {
            return Step::Idle;
        }
        let replaying = matches!(self.conn, ConnState::Replaying { .. });
        if replaying && !self.pace.ready(now) {
            return Step::Idle;
        }
        // live_first: live and backlog batches take turns for the window
        // (the backlog at its pace), so neither starves the other.
        let lanes = if self.backlog_turn { [Lane::Backlog, Lane::Live] } else { [Lane::Live, Lane::Backlog] };
        for lane in lanes {
            let next = match lane {
                Lane::Live => self.next_live(committed_high, now),
                Lane::Backlog => self.next_backlog(now),
            };
            match next {
                Next::Nothing => {}
                Next::Load(after) => {
                    self.load_high = committed_high;
                    self.shared.metrics.outbox_reads.inc();
                    return Step::Load { lane, after, limit: self.config.batch_max_readings };
                }
                Next::Batch(first_seq, readings) => {
                    self.backlog_turn = lane == Lane::Live;
                    return self.publish(lane, first_seq, &readings, now);
                }
            }
        }
        if replaying && self.outbox_readable(now) {
            self.conn = ConnState::Live;
            tracing::info!(cursor = self.cursor, "replay done; live");
        }
        Step::Idle
    }

    /// Encodes `readings` (seqs from `first_seq`) as a batch, puts it in
    /// flight and moves the lane's cursor past it.
    fn publish(&mut self, lane: Lane, first_seq: u64, readings: &[Reading], now: Instant) -> Step {
        let replaying = matches!(self.conn, ConnState::Replaying { .. });
        let n = readings.len() as u64;
        if replaying || lane == Lane::Backlog {
            self.pace.spend(n);
        }
        let last_seq = first_seq + n - 1;
        let mut payload = Vec::new();
        let (client_id, epoch) = (&self.config.client_id, self.config.epoch);
        match self.config.compression {
            Compression::None => Batch::encode_parts(client_id, epoch, first_seq, readings, &mut payload),
            Compression::Zstd => {
                Batch::encode_parts_zstd(client_id, epoch, first_seq, readings, &mut self.scratch, &mut payload);
            }
        }
        let m = &self.shared.metrics;
        m.batches_published.inc();
        m.readings_published.inc_by(n);
        m.bytes_published.inc_by(payload.len() as u64);
        if let ConnState::Replaying { until } = self.conn {
            m.readings_replayed.inc_by(until.min(last_seq).saturating_sub(first_seq - 1));
            if last_seq >= until {
                self.conn = ConnState::Live;
                tracing::info!(cursor = last_seq, "replay done; live");
            }
        }
        self.window.insert(
            first_seq,
            Inflight {
                last_seq,
                readings: n,
                payload: payload.clone(),
                sent_at: now,
                attempts: 1,
                held: false,
                unsent: false,
            },
        );
        m.inflight_batches.set(self.window.len() as i64);
        match lane {
            Lane::Live => self.cursor = last_seq,
            Lane::Backlog => {
                m.readings_replayed.inc_by(n);
                match self.backlog {
                    Some((_, until)) if last_seq < until => self.backlog = Some((last_seq, until)),
                    _ => self.end_backlog(),
                }
            }
        }
        Step::Publish { first_seq, payload }
    }

    /// The answer to a load of `lane` above `after`, if that is what was loaded.
    fn take_loaded(&mut self, lane: Lane, after: u64) -> Option<Loaded> {
        self.loaded.take_if(|l| l.lane == lane && l.after == after)
    }

    /// The next contiguous run of rows above the cursor: from memory when
    /// it holds them, else from the outbox (a load first).
    fn next_live(&mut self, committed_high: u64, now: Instant) -> Next {
        loop {
            self.trim_memory();
            if self.memory.front().is_some_and(|b| b.first_seq == self.cursor + 1) {
                return self.take_from_memory(now).map_or(Next::Nothing, |(first, r)| Next::Batch(first, r));
            }
            // Nothing committed above the cursor: no query needed.
            if !self.outbox_readable(now) || committed_high <= self.cursor {
                return Next::Nothing;
            }
            let Some(loaded) = self.take_loaded(Lane::Live, self.cursor) else {
                return Next::Load(self.cursor);
            };
            match loaded.rows.first() {
                None => {
                    // Nothing in the outbox above the cursor: every row up to
                    // the high at the time of the query is confirmed and
                    // gone, so the cursor moves there and needs no query
                    // until something new is committed (no polling of an
                    // empty outbox after a reconnect).
                    match self.memory.front() {
                        Some(block) => self.cursor = block.first_seq - 1,
                        None => self.cursor = self.cursor.max(loaded.high),
                    }
                }
                Some(&(first, _)) => {
                    if let Some(block) = self.memory.front().filter(|b| b.first_seq <= first) {
                        self.cursor = block.first_seq - 1;
                        continue;
                    }
                    let (first, readings) = self.first_batch(loaded.rows, u64::MAX);
                    return Next::Batch(first, readings);
                }
            }
        }
    }

    /// `live_first`: the next contiguous run of backlog rows (above the
    /// backlog cursor, up to where the backlog ends) when the pace allows.
    fn next_backlog(&mut self, now: Instant) -> Next {
        let Some((cursor, until)) = self.backlog else { return Next::Nothing };
        if !self.outbox_readable(now) || !self.pace.ready(now) {
            return Next::Nothing;
        }
        let Some(loaded) = self.take_loaded(Lane::Backlog, cursor) else { return Next::Load(cursor) };
        if loaded.rows.first().is_none_or(|&(seq, _)| seq > until) {
            self.end_backlog();
            return Next::Nothing;
        }
        let (first, readings) = self.first_batch(loaded.rows, until);
        Next::Batch(first, readings)
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

    /// `live_first`: the backlog is replayed.
    fn end_backlog(&mut self) {
        self.backlog = None;
        tracing::info!("backlog replayed behind the live readings");
    }

    /// The next batch from the committed blocks in memory, merging blocks
    /// while their seqs are contiguous. A partial batch waits up to
    /// `batch_linger` for more rows (fewer, fuller messages for the broker
    /// and the ingest server), except while draining at shutdown.
    fn take_from_memory(&mut self, now: Instant) -> Option<(u64, Vec<Reading>)> {
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
        if !full && !self.draining && !self.flushing && now.saturating_duration_since(oldest) < self.config.batch_linger
        {
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

    // ---- replay, presence, confirmations --------------------------------------

    /// Clears the window and replays the whole outbox on this connection:
    /// oldest first (the cursor from the start), or live first (the cursor
    /// at the committed high; the backlog below it goes behind, paced).
    fn replay_from_start(&mut self, committed_high: u64, now: Instant) {
        self.window.clear();
        self.loaded = None;
        self.shared.metrics.inflight_batches.set(0);
        self.shared.metrics.echo_held_batches.set(0);
        self.pace = Pace::new(self.config.replay_max_rate, now);
        match self.config.replay_order {
            ReplayOrder::OldestFirst => {
                self.cursor = 0;
                self.backlog = None;
                self.conn = ConnState::Replaying { until: committed_high };
            }
            ReplayOrder::LiveFirst => {
                self.cursor = committed_high;
                self.backlog = (committed_high > 0).then_some((0, committed_high));
                self.conn = ConnState::Live;
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
    fn presence(&mut self, server: &str, cleared: bool, committed_high: u64, now: Instant) {
        let before = !self.present.is_empty();
        if cleared {
            self.present.remove(server);
        } else {
            self.present.insert(server.to_owned());
        }
        let present = !self.present.is_empty();
        self.shared.metrics.ingest_present.set(i64::from(present));
        if present && !before {
            self.absence_logged = false;
            let held = self.window.held();
            tracing::info!(%server, held, "an ingest server announces a durable subscription; echoes delete again");
            if held > 0 && self.conn != ConnState::Offline {
                self.replay_from_start(committed_high, now);
                tracing::info!(held, "publishing the held batches again (they may have reached no durable subscriber)");
            }
        } else if before && !present && self.config.wait_for_ingest && self.config.confirm == ConfirmMode::Echo {
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
    fn confirm(&mut self, range: SeqRange, kind: Confirmation, now: Instant) {
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
        for (first, batch) in retired {
            if echo {
                self.ahead.echoed(first, batch.last_seq, batch.readings, batch.payload.len() as u64, now);
            }
            self.deletes.push((first, batch.last_seq));
        }
        self.shared.metrics.echo_ahead_readings.set(self.ahead.readings() as i64);
    }

    // ---- status ---------------------------------------------------------------

    /// Whether a status message is due at `now`.
    #[must_use]
    pub fn status_due(&self, now: Instant) -> bool {
        !self.config.status_interval.is_zero()
            && now.saturating_duration_since(self.last_status) >= self.config.status_interval
    }

    /// The status message as of `now`, with the outbox holding `rows` rows
    /// of `bytes` bytes, the oldest `oldest_age_s` old; `ts` its timestamp
    /// (Unix µs). Starts the next status interval, updates the smoothed
    /// drain rate and sets the backlog gauges.
    pub fn status(&mut self, rows: u64, bytes: u64, oldest_age_s: f64, ts: i64, now: Instant) -> AgentStatus {
        let elapsed = now.saturating_duration_since(self.last_status).as_secs_f64().max(1e-3);
        // Net rows leaving the outbox per second, smoothed over statuses
        // (about the last five): the backlog's drain rate and its ETA. The
        // first status only sets the baseline (the outbox was not empty
        // before it, it was unknown).
        if let Some(last_rows) = self.last_rows {
            let drained = (last_rows as f64 - rows as f64) / elapsed;
            self.drain_per_s = 0.7 * self.drain_per_s + 0.3 * drained;
        }
        self.last_rows = Some(rows);
        let status = self.snapshot(rows, bytes, oldest_age_s, ts, now);
        let m = &self.shared.metrics;
        m.outbox_oldest_age_seconds.set(oldest_age_s as i64);
        m.outbox_drain_eta_seconds.set(status.drain_eta_s.map_or(-1, |s| s.ceil() as i64));
        self.last_status = now;
        self.last_received = m.readings_received.get();
        self.last_confirmed = m.readings_echoed.get() + m.readings_ingest_acked.get();
        status
    }

    /// The status as of `now` without starting a new interval (a `status`
    /// command between two periodic statuses): rates over the interval so
    /// far, the drain rate as last smoothed.
    #[must_use]
    pub fn snapshot(&self, rows: u64, bytes: u64, oldest_age_s: f64, ts: i64, now: Instant) -> AgentStatus {
        let elapsed = now.saturating_duration_since(self.last_status).as_secs_f64().max(1e-3);
        let m = &self.shared.metrics;
        let received = m.readings_received.get();
        let confirmed = m.readings_echoed.get() + m.readings_ingest_acked.get();
        let drain_eta_s = match rows {
            0 => Some(0.0),
            _ if self.drain_per_s > 0.0 => Some(rows as f64 / self.drain_per_s),
            _ => None,
        };
        let published = m.readings_published.get();
        let bytes_per_reading = (published > 0).then(|| m.bytes_published.get() as f64 / published as f64);
        let echo = self.config.confirm == ConfirmMode::Echo;
        AgentStatus {
            version: telemetry_wire::status::STATUS_VERSION,
            client_id: self.config.client_id.clone(),
            ts,
            outbox_rows: rows,
            outbox_bytes: bytes,
            oldest_age_s,
            received_per_s: received.saturating_sub(self.last_received) as f64 / elapsed,
            confirmed_per_s: confirmed.saturating_sub(self.last_confirmed) as f64 / elapsed,
            connected: self.conn != ConnState::Offline,
            drain_per_s: Some(self.drain_per_s),
            drain_eta_s,
            bytes_per_reading,
            ingest_present: echo.then_some(!self.present.is_empty()),
            echo_held_batches: echo.then(|| self.window.held() as u64),
            echo_ahead_readings: echo.then_some(self.ahead.readings()),
            last_command: None,
        }
    }
}

/// What a lane has next.
enum Next {
    /// Nothing now.
    Nothing,
    /// Rows above this seq must be loaded first.
    Load(u64),
    /// A batch: its first seq and readings.
    Batch(u64, Vec<Reading>),
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 7;
    const DATA: &str = "/t/client/dev";
    const ACK: &str = "/t/ack/dev";
    const LINGER: Duration = Duration::from_millis(5);
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn config(confirm: ConfirmMode) -> PublisherConfig {
        PublisherConfig {
            client_id: "dev".into(),
            epoch: EPOCH,
            data_topic: DATA.into(),
            ack_topic: ACK.into(),
            presence_filter: "/t/ingest/+".into(),
            wait_for_ingest: false,
            ahead_max_readings: 0,
            ahead_max_bytes: 0,
            ahead_timeout: Duration::from_secs(600),
            status_topic: "/t/status/dev".into(),
            confirm,
            batch_max_readings: 10,
            batch_max_bytes: 1 << 20,
            batch_linger: LINGER,
            compression: Compression::None,
            replay_order: ReplayOrder::OldestFirst,
            replay_max_rate: 0,
            window: 4,
            confirm_timeout: TIMEOUT,
            status_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
            max_packet_bytes: 1 << 20,
            command_topic: None,
        }
    }

    fn reading(seq: u64) -> Reading {
        Reading { sensor: "t".into(), ts: seq as i64, value: seq as f64 }
    }

    fn block(first: u64, n: u64, at: Instant) -> Block {
        Block { first_seq: first, readings: (first..first + n).map(reading).collect(), committed_at: at }
    }

    fn rows(first: u64, last: u64) -> Vec<(u64, Reading)> {
        (first..=last).map(|s| (s, reading(s))).collect()
    }

    fn ack(first: u64, last: u64) -> Vec<u8> {
        IngestAck::stored(vec![SeqRange { epoch: EPOCH, first_seq: first, last_seq: last }]).encode()
    }

    /// A state with its metrics, connected at `t0` with `high` committed.
    struct Fixture {
        st: PublishState,
        shared: Arc<Shared>,
        t0: Instant,
        /// A load `publish_all` stopped at.
        pending: Option<Step>,
    }

    impl Fixture {
        fn new(config: PublisherConfig, high: u64) -> Self {
            let shared = Arc::new(Shared::default());
            let t0 = Instant::now();
            let mut st = PublishState::new(config, shared.clone(), t0);
            let _ = st.connected(high, t0);
            Self { st, shared, t0, pending: None }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Polls until idle or a load (kept for `answer_load`). Returns
        /// `(first_seq, last_seq, payload)` of each batch published.
        fn publish_all(&mut self, high: u64, now: Instant) -> Vec<(u64, u64, Vec<u8>)> {
            let mut out = Vec::new();
            loop {
                match self.st.poll(high, now) {
                    Step::Idle => return out,
                    Step::Publish { first_seq, payload } => {
                        let (_, range) = Batch::decode_header(&payload, 1 << 20).expect("a batch");
                        assert_eq!(range.first_seq, first_seq);
                        out.push((first_seq, range.last_seq, payload));
                    }
                    step @ Step::Load { .. } => {
                        self.pending = Some(step);
                        return out;
                    }
                }
            }
        }

        /// The next step must be a load of `lane` above `after`; answers it with `answer`.
        fn answer_load(&mut self, lane: Lane, after: u64, answer: Vec<(u64, Reading)>, high: u64, now: Instant) {
            let step = self.pending.take().unwrap_or_else(|| self.st.poll(high, now));
            assert_eq!(step, Step::Load { lane, after, limit: 10 });
            self.st.loaded::<()>(lane, after, Ok(answer), now);
        }

        fn rejected(&self, reason: &'static str) -> u64 {
            self.shared.metrics.confirmations_rejected.get_or_create(&Reason { reason }).get()
        }
    }

    fn ranges(published: &[(u64, u64, Vec<u8>)]) -> Vec<(u64, u64)> {
        published.iter().map(|(f, l, _)| (*f, *l)).collect()
    }

    #[test]
    fn live_batches_come_from_memory_and_a_partial_one_lingers() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 25, f.t0));
        assert_eq!(ranges(&f.publish_all(25, f.t0)), vec![(1, 10), (11, 20)]);
        assert_eq!(ranges(&f.publish_all(25, f.at(10))), vec![(21, 25)], "after the linger");
        assert_eq!(f.shared.metrics.outbox_reads.get(), 0, "the hot path reads nothing back");
        assert_eq!(f.shared.metrics.readings_published.get(), 25);
    }

    #[test]
    fn draining_publishes_a_partial_batch_at_once() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 3, f.t0));
        assert!(f.publish_all(3, f.t0).is_empty());
        f.st.set_draining();
        assert_eq!(ranges(&f.publish_all(3, f.t0)), vec![(1, 3)]);
    }

    #[test]
    fn the_window_bounds_batches_in_flight() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 100, f.t0));
        assert_eq!(f.publish_all(100, f.t0).len(), 4);
        f.st.message(ACK, &ack(1, 10), 100, f.t0);
        assert_eq!(ranges(&f.publish_all(100, f.t0)), vec![(41, 50)], "one confirmed, one more goes");
    }

    #[test]
    fn an_ingest_ack_deletes_exactly_what_it_names_and_nothing_else() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 30, f.t0));
        f.publish_all(30, f.t0);
        f.st.message(ACK, &ack(1, 20), 30, f.t0);
        assert_eq!(f.st.take_deletes(), vec![(1, 10), (11, 20)], "a run of adjacent batches");
        assert_eq!(f.shared.metrics.readings_ingest_acked.get(), 20);
        f.st.message(ACK, &ack(1, 10), 30, f.t0);
        f.st.message(ACK, &ack(21, 25), 30, f.t0);
        f.st.message(ACK, &ack(31, 40), 30, f.t0);
        assert!(f.st.take_deletes().is_empty(), "duplicate, part of a batch, never published");
        assert_eq!(f.rejected("not_in_flight"), 3);
        let other = IngestAck::stored(vec![SeqRange { epoch: EPOCH + 1, first_seq: 21, last_seq: 30 }]);
        f.st.message(ACK, &other.encode(), 30, f.t0);
        assert!(f.st.take_deletes().is_empty());
        assert_eq!(f.rejected("other_epoch"), 1);
        f.st.message(ACK, b"\xffnot an ack", 30, f.t0);
        assert!(f.st.take_deletes().is_empty(), "garbage deletes nothing");
    }

    #[test]
    fn a_rejection_deletes_and_is_counted_apart() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 10, f.t0));
        f.publish_all(10, f.t0);
        let range = SeqRange { epoch: EPOCH, first_seq: 1, last_seq: 10 };
        let rejection = IngestAck { ranges: Vec::new(), rejected: vec![range] };
        f.st.message(ACK, &rejection.encode(), 10, f.t0);
        assert_eq!(f.st.take_deletes(), vec![(1, 10)]);
        assert_eq!(f.shared.metrics.readings_rejected_by_ingest.get(), 10);
        assert_eq!(f.shared.metrics.readings_ingest_acked.get(), 0);
    }

    #[test]
    fn only_the_exact_bytes_published_confirm_by_echo() {
        let mut f = Fixture::new(config(ConfirmMode::Echo), 0);
        f.st.block(block(1, 10, f.t0));
        let published = f.publish_all(10, f.t0);
        let mut forged = Vec::new();
        let other: Vec<Reading> = (1..=10).map(|s| Reading { value: -1.0, ..reading(s) }).collect();
        Batch::encode_parts("dev", EPOCH, 1, &other, &mut forged);
        f.st.message(DATA, &forged, 10, f.t0);
        assert!(f.st.take_deletes().is_empty());
        assert_eq!(f.rejected("payload_mismatch"), 1);
        f.st.message(DATA, &published[0].2, 10, f.t0);
        assert_eq!(f.st.take_deletes(), vec![(1, 10)]);
        f.st.message(DATA, &published[0].2, 10, f.t0);
        assert!(f.st.take_deletes().is_empty(), "a second echo of the same batch");
        assert_eq!(f.rejected("not_in_flight"), 1);
    }

    #[test]
    fn oldest_first_replay_reads_the_outbox_then_goes_live() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 15);
        assert_eq!(f.st.conn(), ConnState::Replaying { until: 15 });
        f.answer_load(Lane::Live, 0, rows(1, 12), 15, f.t0);
        assert_eq!(ranges(&f.publish_all(15, f.t0)), vec![(1, 10)]);
        f.answer_load(Lane::Live, 10, rows(11, 15), 15, f.t0);
        assert_eq!(ranges(&f.publish_all(15, f.t0)), vec![(11, 15)]);
        assert_eq!(f.st.conn(), ConnState::Live);
        assert_eq!(f.shared.metrics.readings_replayed.get(), 15);
        assert_eq!(f.st.poll(15, f.t0), Step::Idle, "caught up: no further read");
    }

    #[test]
    fn memory_takes_over_from_the_outbox_where_it_starts() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 10);
        f.st.block(block(11, 10, f.t0));
        f.answer_load(Lane::Live, 0, rows(1, 10), 20, f.t0);
        let published = f.publish_all(20, f.t0);
        assert_eq!(ranges(&published), vec![(1, 10), (11, 20)]);
        assert_eq!(f.shared.metrics.outbox_reads.get(), 1);
    }

    #[test]
    fn an_empty_outbox_is_read_once_not_polled() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 100);
        // Rows 1..=100 were all confirmed before this connection; 101..=110
        // are committed while the (empty) answer is on its way.
        assert_eq!(f.st.poll(100, f.t0), Step::Load { lane: Lane::Live, after: 0, limit: 10 });
        f.st.loaded::<()>(Lane::Live, 0, Ok(Vec::new()), f.t0);
        assert_eq!(
            f.st.poll(110, f.t0),
            Step::Load { lane: Lane::Live, after: 100, limit: 10 },
            "the empty answer proves nothing beyond the high it was asked under"
        );
        f.st.loaded::<()>(Lane::Live, 100, Ok(Vec::new()), f.t0);
        assert_eq!(f.st.poll(110, f.t0), Step::Idle);
        assert_eq!(f.st.poll(110, f.at(1000)), Step::Idle, "no polling of an empty outbox");
        assert_eq!(f.shared.metrics.outbox_reads.get(), 2);
        assert_eq!(f.st.conn(), ConnState::Live);
    }

    #[test]
    fn a_failed_read_pauses_reads_for_a_second() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 5);
        assert!(matches!(f.st.poll(5, f.t0), Step::Load { after: 0, .. }));
        f.st.loaded(Lane::Live, 0, Err("connection refused"), f.t0);
        assert_eq!(f.shared.metrics.postgres_errors.get(), 1);
        assert!(!f.st.outbox_readable(f.at(500)));
        assert_eq!(f.st.poll(5, f.at(500)), Step::Idle);
        assert_eq!(f.st.conn(), ConnState::Replaying { until: 5 }, "not live while the backlog is unread");
        let _ = f.st.tick(false, 5, f.at(1000));
        f.answer_load(Lane::Live, 0, rows(1, 5), 5, f.at(1000));
        assert_eq!(ranges(&f.publish_all(5, f.at(1000))), vec![(1, 5)]);
    }

    #[test]
    fn an_unconfirmed_batch_is_published_again_after_the_timeout() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 20, f.t0));
        let published = f.publish_all(20, f.t0);
        assert!(f.st.tick(false, 20, f.at(1000)).is_empty());
        let overdue = f.st.tick(false, 20, f.t0 + TIMEOUT);
        assert_eq!(overdue.iter().map(|(first, _)| *first).collect::<Vec<_>>(), vec![1, 11]);
        assert_eq!(overdue[0].1, published[0].2, "the same bytes");
        f.st.republished(1, f.t0 + TIMEOUT);
        assert_eq!(f.shared.metrics.batches_republished.get(), 1);
        let again = f.st.tick(false, 20, f.t0 + TIMEOUT);
        assert_eq!(again.iter().map(|(first, _)| *first).collect::<Vec<_>>(), vec![11], "11 did not go");
    }

    #[test]
    fn a_batch_the_client_refused_goes_at_the_next_tick() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 10, f.t0));
        f.publish_all(10, f.t0);
        f.st.unsent(1);
        assert_eq!(f.st.tick(false, 10, f.at(10)).len(), 1, "due at once, however recent its publication");
        f.st.republished(1, f.at(10));
        assert!(f.st.tick(false, 10, f.at(11)).is_empty(), "sent now: waits for its confirmation");
        // The refused publication was not an attempt: the first real one
        // is republished after one timeout, not two.
        assert_eq!(f.st.tick(false, 10, f.at(10) + TIMEOUT).len(), 1);
    }

    #[test]
    fn offline_publishes_nothing_and_a_reconnect_replays_from_the_outbox() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 10, f.t0));
        f.publish_all(10, f.t0);
        f.st.disconnected();
        f.st.block(block(11, 10, f.t0));
        assert_eq!(f.st.poll(20, f.at(100)), Step::Idle);
        assert!(f.st.tick(false, 20, f.t0 + TIMEOUT).is_empty(), "nothing republished offline");
        let _ = f.st.connected(20, f.at(200));
        assert_eq!(f.st.conn(), ConnState::Replaying { until: 20 });
        f.answer_load(Lane::Live, 0, rows(1, 10), 20, f.at(200));
        assert_eq!(ranges(&f.publish_all(20, f.at(200))), vec![(1, 10), (11, 20)]);
        f.st.message(ACK, &ack(1, 20), 20, f.at(200));
        assert_eq!(f.st.take_deletes(), vec![(1, 10), (11, 20)]);
    }

    #[test]
    fn a_rollback_replays_the_outbox_whole() {
        let mut f = Fixture::new(config(ConfirmMode::Ingest), 0);
        f.st.block(block(1, 10, f.t0));
        f.publish_all(10, f.t0);
        let _ = f.st.tick(true, 10, f.at(10));
        assert_eq!(f.st.conn(), ConnState::Replaying { until: 10 });
        assert!(matches!(f.st.poll(10, f.at(10)), Step::Load { after: 0, .. }));
    }

    #[test]
    fn live_first_publishes_fresh_readings_ahead_of_the_paced_backlog() {
        let mut config = config(ConfirmMode::Ingest);
        config.replay_order = ReplayOrder::LiveFirst;
        config.replay_max_rate = 10;
        let mut f = Fixture::new(config, 20);
        assert_eq!(f.st.conn(), ConnState::Live);
        f.st.block(block(21, 10, f.t0));
        assert_eq!(ranges(&f.publish_all(30, f.t0)), vec![(21, 30)], "live first");
        f.answer_load(Lane::Backlog, 0, rows(1, 20), 30, f.t0);
        assert_eq!(ranges(&f.publish_all(30, f.t0)), vec![(1, 10)]);
        assert_eq!(f.pending, None, "10 readings/s: the next batch waits");
        f.answer_load(Lane::Backlog, 10, rows(11, 20), 30, f.at(1000));
        assert_eq!(ranges(&f.publish_all(30, f.at(1000))), vec![(11, 20)]);
        assert_eq!(f.st.poll(30, f.at(5000)), Step::Idle, "the backlog ended at the high of the connect");
        assert_eq!(f.shared.metrics.readings_replayed.get(), 20);
    }

    #[test]
    fn the_tick_follows_a_retuned_linger_within_its_bounds() {
        let f = Fixture::new(config(ConfirmMode::Echo), 0);
        let mut st = f.st;
        let tunables = |linger_ms| Tunables {
            batch_linger: Duration::from_millis(linger_ms),
            confirm_timeout: TIMEOUT,
            replay_max_rate: 0,
            status_interval: Duration::from_secs(1),
            ahead_max_readings: 0,
            ahead_max_bytes: 0,
            ahead_timeout: Duration::from_secs(600),
        };
        for (linger_ms, tick_ms) in [(5_000, 250), (100, 50), (4, 10)] {
            st.retune(tunables(linger_ms), f.t0);
            assert_eq!(st.tick_period(), Duration::from_millis(tick_ms), "linger {linger_ms} ms");
        }
    }

    #[test]
    fn echo_without_an_ingest_server_holds_then_replays_when_one_appears() {
        let mut config = config(ConfirmMode::Echo);
        config.wait_for_ingest = true;
        let mut f = Fixture::new(config, 0);
        f.st.block(block(1, 10, f.t0));
        let published = f.publish_all(10, f.t0);
        f.st.message(DATA, &published[0].2, 10, f.t0);
        assert!(f.st.take_deletes().is_empty(), "nobody durable may have it");
        assert_eq!(f.shared.metrics.echo_held_batches.get(), 1);
        assert!(f.st.tick(false, 10, f.t0 + TIMEOUT).is_empty(), "a held batch is not republished");
        f.st.message("/t/ingest/server-1", b"1", 10, f.at(10));
        assert_eq!(f.shared.metrics.ingest_present.get(), 1);
        assert_eq!(f.st.conn(), ConnState::Replaying { until: 10 }, "the held batches go again");
        f.answer_load(Lane::Live, 0, rows(1, 10), 10, f.at(10));
        let again = f.publish_all(10, f.at(10));
        f.st.message(DATA, &again[0].2, 10, f.at(10));
        assert_eq!(f.st.take_deletes(), vec![(1, 10)]);
        f.st.message("/t/ingest/server-1", b"", 10, f.at(20));
        assert_eq!(f.shared.metrics.ingest_present.get(), 0, "withdrawn");
    }

    #[test]
    fn echo_ahead_bound_stops_publishing_until_ingest_acks() {
        let mut config = config(ConfirmMode::Echo);
        config.ahead_max_readings = 10;
        let mut f = Fixture::new(config, 0);
        f.st.block(block(1, 20, f.t0));
        let published = f.publish_all(20, f.t0);
        assert_eq!(published.len(), 2);
        f.st.message(DATA, &published[0].2, 20, f.t0);
        f.st.message(DATA, &published[1].2, 20, f.t0);
        assert_eq!(f.shared.metrics.echo_ahead_readings.get(), 20);
        f.st.block(block(21, 10, f.t0));
        assert_eq!(f.st.poll(30, f.at(10)), Step::Idle, "20 readings only in the broker, bound 10");
        f.st.message(ACK, &ack(1, 20), 30, f.at(10));
        assert_eq!(ranges(&f.publish_all(30, f.at(10))), vec![(21, 30)]);
        assert!(f.st.take_deletes().len() == 2, "the echoes deleted; the ack deletes nothing more");
    }

    #[test]
    fn the_status_reports_the_backlog_and_its_drain() {
        let mut config = config(ConfirmMode::Echo);
        config.wait_for_ingest = true;
        let mut f = Fixture::new(config, 0);
        assert!(!f.st.status_due(f.at(500)));
        assert!(f.st.status_due(f.at(1000)));
        let first = f.st.status(1000, 50_000, 3.0, 1, f.at(1000));
        assert_eq!(first.drain_eta_s, None, "no drain seen yet");
        let second = f.st.status(400, 20_000, 2.0, 2, f.at(2000));
        let rate = second.drain_per_s.expect("a rate");
        assert!(rate > 0.0);
        assert_eq!(second.drain_eta_s, Some(400.0 / rate));
        assert_eq!(second.ingest_present, Some(false));
        assert!(second.connected);
        assert_eq!(f.shared.metrics.outbox_drain_eta_seconds.get(), (400.0 / rate).ceil() as i64);
        let empty = f.st.status(0, 0, 0.0, 3, f.at(3000));
        assert_eq!(empty.drain_eta_s, Some(0.0));
    }
}
