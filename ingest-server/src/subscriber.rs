//! The MQTT side: connection options, topic layout, and the one task that
//! polls rumqttc's event loop.
//!
//! # Invariants
//! - The poll task never waits on anything but the network: it moves events
//!   into the batcher's queue without blocking, and never awaits
//!   `publish()`/`ack()` (those go through rumqttc's request channel, which
//!   only this task drains). rumqttc sends PINGREQ only from `poll()`; a
//!   task that stopped polling while ClickHouse is slow would be dropped by
//!   the broker's keep-alive and get its whole unacked backlog redelivered.
//!   Inflow is bounded by the broker's in-flight limit for this client
//!   (`max_inflight_messages`), not by starving the event loop.
//! - Every message carries the generation of the connection that delivered
//!   it ([`Generation`]); a PUBACK is sent only while that connection is
//!   the current one (packet ids belong to a connection). Messages of a
//!   lost connection are redelivered by the broker on the next one.
//! - A reconnect that finds no session (`session_present = false`) after
//!   one existed is logged as a warning and counted: the broker forgot this
//!   server's subscriptions and queued messages.
//! - The request channel's capacity ([`request_capacity`]) exceeds every
//!   PUBACK and ingest ack that can be outstanding at once, so the tasks
//!   that ack never wait on a poll task that waits on them.
//! - A refusal (bad credentials, not authorised) or a failed TLS handshake
//!   is logged as an error naming the cause and retried after at least
//!   2 s, doubling up to a minute: no busy reconnect loop.
//! - During shutdown the poll task keeps polling (so queued PUBACKs reach the
//!   broker) but drops new publishes unacked: the broker redelivers them to
//!   this persistent session later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::job::Message;
use crate::metrics::Metrics;

/// What the poll task hands to the batcher.
#[derive(Debug)]
pub enum Inbound {
    /// A message to store and then ack.
    Publish(Message),
    /// A (re)connection was accepted.
    Connected {
        /// Whether the broker still had this client's session.
        session_present: bool,
        /// The new connection's generation.
        generation: u64,
    },
}

/// The generation of the current MQTT connection: 0 before the first
/// ConnAck, +1 at every ConnAck, shared by the poll task and the acker.
#[derive(Debug, Clone, Default)]
pub struct Generation(Arc<AtomicU64>);

impl Generation {
    /// The current connection's generation.
    #[must_use]
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Whether a message delivered on `generation` may be PUBACKed now.
    #[must_use]
    pub fn is_current(&self, generation: u64) -> bool {
        generation == self.current()
    }

    /// A new connection; returns its generation.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The connection is gone: from now on no message of it may be
    /// PUBACKed (the bump makes every delivered generation stale; the next
    /// ConnAck bumps again).
    pub fn lost(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// The topic layout under one prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    client_prefix: String,
    status_prefix: String,
}

/// What a received topic is.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicKind<'a> {
    /// `<prefix>/client/<client_id>`: a batch.
    Client(&'a str),
    /// `<prefix>/status/<client_id>`: an agent status.
    Status(&'a str),
    /// Anything else.
    Other,
}

impl Topics {
    /// The layout under `prefix` (e.g. `/telemetry`).
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            client_prefix: format!("{prefix}/client/"),
            status_prefix: format!("{prefix}/status/"),
        }
    }

    /// Classifies a received topic.
    #[must_use]
    pub fn classify<'a>(&self, topic: &'a str) -> TopicKind<'a> {
        let level = |rest: &'a str| (!rest.is_empty() && !rest.contains('/')).then_some(rest);
        if let Some(id) = topic.strip_prefix(&self.client_prefix).and_then(level) {
            TopicKind::Client(id)
        } else if let Some(id) = topic.strip_prefix(&self.status_prefix).and_then(level) {
            TopicKind::Status(id)
        } else {
            TopicKind::Other
        }
    }

    /// Where this server announces its durable subscription (retained;
    /// empty when it is gone): `<prefix>/ingest/<server>`, one topic per
    /// server so that a peer's will or shutdown clears only its own.
    #[must_use]
    pub fn presence(&self, server: &str) -> String {
        format!("{}/ingest/{server}", self.prefix)
    }

    /// Where the ingest ack for `client_id` goes.
    #[must_use]
    pub fn ack(&self, client_id: &str) -> String {
        format!("{}/ack/{client_id}", self.prefix)
    }

    /// The subscriptions: batches (shared when a group is set) and statuses
    /// (never shared: retained messages are not delivered to shared
    /// subscriptions, and every server may store them).
    #[must_use]
    pub fn filters(&self, shared_group: Option<&str>) -> Vec<(String, QoS)> {
        let batches = format!("{}+", self.client_prefix);
        let batches = match shared_group {
            Some(group) => format!("$share/{group}/{batches}"),
            None => batches,
        };
        vec![(batches, QoS::AtLeastOnce), (format!("{}+", self.status_prefix), QoS::AtLeastOnce)]
    }
}

/// The largest packet MQTT can express (remaining length 268,435,455 plus
/// the fixed header).
pub const MQTT_MAX_PACKET_BYTES: usize = 268_435_455 + 5;

/// Capacity of rumqttc's request channel: room for every PUBACK and ingest
/// ack that can be outstanding (twice the messages the batcher can hold in
/// pending and in-flight batches), plus the subscriptions. The poll task
/// drains it whenever it polls, which it never stops doing.
#[must_use]
pub fn request_capacity(config: &Config) -> usize {
    let held = config.batch_max_messages.saturating_mul(config.max_inflight_inserts.saturating_add(2));
    held.saturating_mul(2).saturating_add(64)
}

/// The client and event loop, configured for manual acks and a persistent
/// session, over TLS when `mqtt_tls` is on.
///
/// # Errors
/// Unusable TLS files (the error names the file).
pub fn connect(config: &Config) -> Result<(AsyncClient, EventLoop), telemetry_link::SecureError> {
    let mut options = MqttOptions::new(&config.mqtt_client_id, &config.mqtt_host, config.mqtt_port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(config.mqtt_keep_alive_secs.max(5)))
        // Incoming: MQTT's own maximum, not max_payload_bytes. A larger
        // packet is a rumqttc connection error; the broker redelivers the
        // unacked message to this persistent session after the reconnect,
        // and one oversized publish by anyone would wedge ingest for good
        // (found by tests/hostile.rs). Received, it is dead-lettered as
        // `oversize` by the batcher like any other bad payload.
        .set_max_packet_size(MQTT_MAX_PACKET_BYTES, config.max_payload_bytes + 1024)
        .set_inflight(1024)
        // Gone without a DISCONNECT (crash, network): the broker clears this
        // server's presence announcement, so echo-mode agents stop deleting
        // on echo until a server announces itself again.
        .set_last_will(LastWill::new(
            Topics::new(&config.topic_prefix).presence(&config.mqtt_client_id),
            Vec::new(),
            QoS::AtLeastOnce,
            true,
        ));
    if !config.mqtt_username.is_empty() {
        options.set_credentials(&config.mqtt_username, config.mqtt_password.expose());
    }
    if let Some(files) = config.mqtt_tls_files() {
        options.set_transport(telemetry_link::transport(&files)?);
    }
    let (client, mut eventloop) = AsyncClient::new(options, request_capacity(config));
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(10);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// Everything the poll task needs besides the event loop.
#[derive(Debug)]
pub struct PollContext {
    /// The client (for subscribing after each ConnAck).
    pub client: AsyncClient,
    /// The subscriptions.
    pub filters: Vec<(String, QoS)>,
    /// The batcher's queue (never blocks: see the module docs).
    pub tx: mpsc::UnboundedSender<Inbound>,
    /// Stop forwarding new publishes (the drain at shutdown).
    pub forward_stop: CancellationToken,
    /// Stop polling.
    pub hard_stop: CancellationToken,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The connection generation, shared with the acker.
    pub generation: Generation,
    /// This server's presence topic and announcement, published retained
    /// once the broker accepted the subscriptions (see [`Presence`]).
    pub presence: Presence,
}

/// The retained announcement that a durable (persistent-session)
/// subscription to the batches exists. An echo-mode agent deletes a batch on
/// its echo only while some server's announcement is present: a batch the
/// broker routed to no durable subscriber is gone, though its echo arrives.
/// Cleared by the server at shutdown and by its last will when it vanishes.
#[derive(Debug, Clone)]
pub struct Presence {
    /// `<prefix>/ingest/<mqtt_client_id>`.
    pub topic: String,
    /// A small JSON object naming the server, its group and its filter.
    pub payload: Vec<u8>,
}

impl Presence {
    /// The announcement of the server configured by `config`.
    #[must_use]
    pub fn of(config: &Config, topics: &Topics) -> Self {
        let payload = serde_json::json!({
            "server": config.mqtt_client_id,
            "shared_group": config.shared_group(),
            "batches": topics.filters(config.shared_group())[0].0,
            "durable": true,
        });
        Self { topic: topics.presence(&config.mqtt_client_id), payload: payload.to_string().into_bytes() }
    }
}

/// Polls the event loop until `hard_stop`, or until the client's
/// DISCONNECT has been written. Forwards publishes and connection events to
/// `tx` until `forward_stop`; reconnects with exponential backoff.
pub async fn poll(mut eventloop: EventLoop, ctx: PollContext) {
    let PollContext { client, filters, tx, forward_stop, hard_stop, metrics, generation, presence } = ctx;
    let mut ever_connected = false;
    let mut connected_generation = 0;
    let mut reconnect = telemetry_link::Reconnect::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let event = tokio::select! {
            biased;
            () = hard_stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if forward_stop.is_cancelled() {
                    // Dropped unacked: the broker redelivers it to this persistent session later.
                    tracing::debug!(topic = %publish.topic, "shutting down: message left for redelivery");
                    continue;
                }
                metrics.inbound_queue.inc();
                if tx.send(Inbound::Publish(Message { publish, generation: connected_generation })).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                reconnect.connected();
                connected_generation = generation.next();
                tracing::info!(session_present = ack.session_present, code = ?ack.code,
                    generation = connected_generation, "connected to MQTT broker");
                if ever_connected && !ack.session_present {
                    metrics.mqtt_sessions_lost.inc();
                    tracing::warn!(
                        "the broker had no session for this server: subscriptions and queued messages \
                        of the old session are gone (session expired, broker restarted without persistence, or \
                        another client took this id)"
                    );
                }
                ever_connected = true;
                // Subscribing again is harmless with a present session and
                // needed without one. try_: the request channel has room
                // (see request_capacity), and this task must not wait on it.
                if let Err(error) =
                    client.try_subscribe_many(filters.iter().map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q)))
                {
                    tracing::error!(%error, "cannot queue MQTT subscribe");
                }
                if !forward_stop.is_cancelled() {
                    let _ = tx.send(Inbound::Connected {
                        session_present: ack.session_present,
                        generation: connected_generation,
                    });
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                tracing::debug!(codes = ?ack.return_codes, "subscribed");
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    tracing::error!(codes = ?ack.return_codes, "broker refused a subscription");
                } else {
                    metrics.subscribed.set(1);
                    if !forward_stop.is_cancelled() {
                        if let Err(error) =
                            client.try_publish(&presence.topic, QoS::AtLeastOnce, true, presence.payload.clone())
                        {
                            tracing::error!(%error, "cannot queue the presence announcement");
                        }
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::info!("MQTT disconnect sent");
                return;
            }
            Ok(_) => {}
            Err(error) => {
                generation.lost();
                metrics.mqtt_connection_errors.inc();
                metrics.subscribed.set(0);
                let (failure, delay) = reconnect.after(&error);
                let errors_in_a_row = reconnect.errors_in_a_row();
                if failure.is_permanent() {
                    // A refusal or a TLS failure repeats until someone fixes
                    // the configuration: say so clearly.
                    tracing::error!(%error, errors_in_a_row, retry_in_ms = delay.as_millis() as u64, "{failure}");
                } else if errors_in_a_row <= 3 || errors_in_a_row % 20 == 0 {
                    tracing::warn!(%error, errors_in_a_row, retry_in_ms = delay.as_millis() as u64, "MQTT connection error");
                }
                if matches!(error, rumqttc::ConnectionError::RequestsDone) {
                    return;
                }
                tokio::select! {
                    () = hard_stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_classified_by_exact_layout() {
        let t = Topics::new("/telemetry");
        assert_eq!(t.classify("/telemetry/client/dev-1"), TopicKind::Client("dev-1"));
        assert_eq!(t.classify("/telemetry/status/dev-1"), TopicKind::Status("dev-1"));
        assert_eq!(t.classify("/telemetry/client/"), TopicKind::Other);
        assert_eq!(t.classify("/telemetry/client/a/b"), TopicKind::Other);
        assert_eq!(t.classify("telemetry/client/a"), TopicKind::Other);
        assert_eq!(t.ack("dev-1"), "/telemetry/ack/dev-1");
    }

    #[test]
    fn shared_groups_apply_to_batches_only() {
        let f = Topics::new("/telemetry").filters(Some("ingest"));
        assert_eq!(f[0].0, "$share/ingest//telemetry/client/+");
        assert_eq!(f[1].0, "/telemetry/status/+");
    }
}
