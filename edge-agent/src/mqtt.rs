//! The MQTT connection: options that avoid rumqttc's known pitfalls, and the
//! one task that polls the event loop and only forwards events.
//!
//! Pitfalls handled here (measured on the target machines):
//! - `tcp_nodelay` is off by default; echo on the same connection collapses
//!   to a few thousand messages per second without it.
//! - the maximum packet size defaults to 10 KiB both ways and a larger
//!   publish is silently dropped after `publish()` returned Ok.
//! - the event loop has no reconnect backoff: [`run_event_loop`] adds one.
//! - with a clean session rumqttc drops its pending queue: the publisher
//!   replays from the outbox after every `ConnAck` instead.
//! - a refusal (bad password, not authorised) or a failed TLS handshake is
//!   logged as an error naming the cause and retried no sooner than
//!   [`telemetry_link::Failure::min_delay`], doubling up to a minute: a wrong
//!   password never turns into a busy reconnect loop.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::shared::Shared;

/// What the event loop reports to the publisher.
#[derive(Debug)]
pub enum MqttEvent {
    /// A connection was established (`ConnAck`).
    Connected,
    /// The connection failed or dropped.
    Disconnected,
    /// A message arrived on a subscribed topic.
    Message {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Bytes,
    },
}

/// Builds the client and its event loop (TLS when `mqtt_tls` is on).
///
/// # Errors
/// Unusable TLS files (the error names the file).
pub fn connect(config: &Config) -> Result<(AsyncClient, EventLoop), telemetry_link::SecureError> {
    let mut options = MqttOptions::new(config.mqtt_client_id(), config.mqtt_host.clone(), config.mqtt_port);
    options.set_keep_alive(Duration::from_secs(config.mqtt_keep_alive_secs.max(5)));
    // Replay comes from the outbox, so a clean session loses nothing and
    // keeps the broker from hoarding echoes for a device that is away.
    options.set_clean_session(true);
    options.set_max_packet_size(config.mqtt_max_packet_bytes, config.mqtt_max_packet_bytes);
    options.set_inflight(u16::try_from(config.window * 2 + 8).unwrap_or(u16::MAX));
    if !config.mqtt_username.is_empty() {
        options.set_credentials(config.mqtt_username.clone(), config.mqtt_password.expose().to_owned());
    }
    if let Some(files) = config.mqtt_tls_files() {
        options.set_transport(telemetry_link::transport(&files)?);
    }
    let (client, mut eventloop) = AsyncClient::new(options, config.window * 2 + 16);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(5);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// Remote commands' route: payloads on `topic` go to `tx` instead of the
/// publisher.
#[derive(Debug)]
pub struct CommandRoute {
    /// `<prefix>/cmd/<client_id>`.
    pub topic: String,
    /// To [`crate::remote`].
    pub tx: mpsc::Sender<Bytes>,
}

/// Polls the event loop until the client disconnects or the receiver is
/// gone, forwarding connection changes and incoming messages (remote
/// commands to their own task, never blocking the poll: a full command
/// queue refuses the command, counted as `busy`). Errors are followed by an
/// exponential backoff with jitter before the next attempt.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<MqttEvent>,
    commands: Option<CommandRoute>,
    shared: std::sync::Arc<Shared>,
) {
    let mut reconnect = telemetry_link::Reconnect::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                reconnect.connected();
                shared.metrics.mqtt_connects.inc();
                shared.metrics.mqtt_connected.set(1);
                tracing::info!("connected to the broker");
                if tx.send(MqttEvent::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if commands.as_ref().is_some_and(|c| c.topic == p.topic) => {
                if let Some(route) = &commands {
                    if route.tx.try_send(p.payload).is_err() {
                        shared
                            .metrics
                            .commands_rejected
                            .get_or_create(&crate::metrics::Reason { reason: "busy" })
                            .inc();
                        tracing::warn!("remote command queue full: command dropped (the operator may retry)");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(MqttEvent::Message { topic: p.topic, payload: p.payload }).await.is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(error) => {
                shared.metrics.mqtt_errors.inc();
                // `set` returns the previous value: 1 means the link just dropped.
                let was_connected = shared.metrics.mqtt_connected.set(0) == 1;
                let (failure, delay) = reconnect.after(&error);
                if failure.is_permanent() {
                    tracing::error!(%error, ?delay, "{failure}");
                } else if was_connected {
                    tracing::warn!(%error, "broker connection lost; reconnecting");
                } else {
                    tracing::warn!(%error, ?delay, "cannot reach the broker; retrying");
                }
                if tx.send(MqttEvent::Disconnected).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}
