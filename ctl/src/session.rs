//! The MQTT side: connect, subscribe to the replies (and, for globs, the
//! statuses), publish one command per target, collect the replies. All the
//! deciding is done by the pure modules; this one only moves messages.

use std::collections::BTreeSet;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use telemetry_link::{Failure, Secret, TlsFiles};
use telemetry_wire::{AgentStatus, Reply};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::replies::{Collector, Outcome};
use crate::request::{self, Action};
use crate::targets::Targets;
use crate::topics::Topics;

/// How long connecting (TCP, TLS and the MQTT login) and the SUBACK may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest packet taken from the broker (a `status` reply carries the
/// agent's configuration); equal to the shipped broker's `max_packet_size`.
const MAX_INCOMING_BYTES: usize = 4 << 20;

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password (only with a user name).
    pub password: Option<Secret>,
    /// TLS files; plain TCP when `None`.
    pub tls: Option<TlsFiles>,
}

impl Broker {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// One invocation, checked.
#[derive(Debug)]
pub struct Plan {
    /// The broker.
    pub broker: Broker,
    /// The agents' topics.
    pub topics: Topics,
    /// `--to`.
    pub targets: Targets,
    /// The command.
    pub action: Action,
    /// How long to wait for replies (and the command's expiry).
    pub timeout: Duration,
    /// How long to collect retained statuses for globs.
    pub discover_wait: Duration,
    /// `--json`.
    pub json: bool,
}

/// Why nothing could be sent (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// A usage problem found only with the broker's help (a glob matching
    /// nothing) or unusable TLS files.
    Usage(String),
    /// The broker cannot be reached or refused us.
    Broker(String),
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fatal::Usage(m) | Fatal::Broker(m) => f.write_str(m),
        }
    }
}

/// What came back.
#[derive(Debug)]
pub struct Report {
    /// One per target, sorted by client id.
    pub outcomes: Vec<Outcome>,
    /// Set when the connection dropped before every target answered.
    pub lost: Option<String>,
}

/// Sends `plan`'s command and collects the replies.
///
/// # Errors
/// See [`Fatal`].
pub async fn run(plan: &Plan) -> Result<Report, Fatal> {
    let mut link = Link::connect(&plan.broker).await?;
    let result = exchange(plan, &mut link).await;
    link.close().await;
    result
}

async fn exchange(plan: &Plan, link: &mut Link) -> Result<Report, Fatal> {
    let discover = plan.targets.has_globs();
    let mut filters = vec![plan.topics.reply_filter()];
    if discover {
        filters.push(plan.topics.status_filter());
    }
    let mut discovered = BTreeSet::new();
    link.subscribe(&filters, |p| note_status(&plan.topics, p, &mut discovered)).await?;
    if discover {
        let until = Instant::now() + plan.discover_wait;
        loop {
            match link.next(until).await {
                Next::Event(Event::Incoming(Packet::Publish(p))) => note_status(&plan.topics, &p, &mut discovered),
                Next::Event(_) => {}
                Next::Deadline => break,
                Next::Lost(e) => return Err(Fatal::Broker(describe_lost(&plan.broker.addr(), &e, None))),
            }
        }
        // Statuses keep coming every few seconds; they are not needed any more.
        let _ = link.client.unsubscribe(plan.topics.status_filter()).await;
    }
    let targets = plan.targets.resolve(&discovered).map_err(|e| Fatal::Usage(e.0))?;

    let id = request::new_command_id();
    let command = request::build(&plan.action, &id, request::now_ms(), plan.timeout).map_err(|e| Fatal::Usage(e.0))?;
    let deadline = Instant::now() + plan.timeout;
    let payload = command.encode();
    let mut collector = Collector::new(&id, &targets);
    for target in &targets {
        let published =
            link.client.publish(plan.topics.command(target), QoS::AtLeastOnce, false, payload.clone()).await;
        if published.is_err() {
            // The event loop ended: its error is waiting in the channel.
            break;
        }
    }
    // Mosquitto acks a publish its ACL denies and then closes an MQTT 3.1.1
    // connection (sometimes before the ack is read): a drop after the
    // commands went out and before any reply most likely means that.
    let (mut sent, mut replied) = (false, false);
    let mut lost = None;
    while !collector.done() {
        match link.next(deadline).await {
            Next::Event(Event::Outgoing(Outgoing::Publish(_))) => sent = true,
            Next::Event(Event::Incoming(Packet::Publish(p))) => {
                if let (Some(client), Ok(reply)) = (plan.topics.reply_client(&p.topic), Reply::decode(&p.payload)) {
                    replied = true;
                    collector.offer(client, reply);
                }
            }
            Next::Event(_) => {}
            Next::Deadline => break,
            Next::Lost(e) => {
                let denied = (sent && !replied).then(|| plan.topics.command("<client_id>"));
                lost = Some(describe_lost(&plan.broker.addr(), &e, denied.as_deref()));
                break;
            }
        }
    }
    Ok(Report { outcomes: collector.outcomes(), lost })
}

/// Adds the client id of a retained agent status to `discovered`; ignores
/// anything else (other topics, cleared statuses, unreadable payloads).
fn note_status(topics: &Topics, p: &rumqttc::Publish, discovered: &mut BTreeSet<String>) {
    if topics.status_client(&p.topic).is_none() || p.payload.is_empty() {
        return;
    }
    if let Ok(status) = AgentStatus::decode(&p.payload) {
        if telemetry_wire::batch::validate_client_id(&status.client_id).is_ok() {
            discovered.insert(status.client_id);
        }
    }
}

enum Next {
    Event(Event),
    Deadline,
    Lost(ConnectionError),
}

/// A connected client whose event loop is polled by its own task, which
/// forwards every event (and the first error, after which it stops).
struct Link {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
}

impl Link {
    async fn connect(broker: &Broker) -> Result<Self, Fatal> {
        let client_id = format!("telemetry-ctl-{:016x}", fastrand::u64(..));
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options.set_clean_session(true);
        options.set_keep_alive(Duration::from_secs(15));
        options.set_max_packet_size(MAX_INCOMING_BYTES, telemetry_wire::command::COMMAND_MAX_BYTES + 1024);
        if let Some(username) = &broker.username {
            let password = broker.password.as_ref().map(|p| p.expose().to_owned()).unwrap_or_default();
            options.set_credentials(username.clone(), password);
        }
        if let Some(files) = &broker.tls {
            telemetry_link::install_crypto_provider();
            options.set_transport(telemetry_link::transport(files).map_err(|e| Fatal::Usage(e.to_string()))?);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        eventloop.set_network_options(network);
        // Unbounded: while the commands are queued nobody reads the events, and a
        // bounded channel would stall the poller and with it the queue.
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let last = matches!(event, Err(_) | Ok(Event::Outgoing(Outgoing::Disconnect)));
                if tx.send(event).is_err() || last {
                    return;
                }
            }
        });
        let mut link = Self { client, events };
        match link.next(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1)).await {
            Next::Event(Event::Incoming(Packet::ConnAck(_))) => Ok(link),
            Next::Lost(e) => Err(Fatal::Broker(describe_connect(&broker.addr(), &e))),
            Next::Deadline | Next::Event(_) => {
                Err(Fatal::Broker(describe_connect(&broker.addr(), &ConnectionError::NetworkTimeout)))
            }
        }
    }

    /// The next event, or `Deadline` once `until` has passed.
    async fn next(&mut self, until: Instant) -> Next {
        match tokio::time::timeout_at(until, self.events.recv()).await {
            Err(_) => Next::Deadline,
            Ok(Some(Ok(event))) => Next::Event(event),
            Ok(Some(Err(e))) => Next::Lost(e),
            Ok(None) => Next::Lost(ConnectionError::RequestsDone),
        }
    }

    /// Subscribes to `filters` (QoS 1) and waits for the SUBACK; messages
    /// arriving meanwhile go to `on_publish`.
    async fn subscribe(
        &mut self,
        filters: &[String],
        mut on_publish: impl FnMut(&rumqttc::Publish),
    ) -> Result<(), Fatal> {
        let names = filters.join(" and ");
        let request = filters.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        if self.client.subscribe_many(request).await.is_err() {
            return Err(Fatal::Broker("the connection to the broker ended before subscribing".into()));
        }
        let until = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match self.next(until).await {
                Next::Event(Event::Incoming(Packet::SubAck(ack))) => {
                    return match describe_refused_filters(filters, &ack.return_codes) {
                        None => Ok(()),
                        Some(message) => Err(Fatal::Broker(message)),
                    };
                }
                Next::Event(Event::Incoming(Packet::Publish(p))) => on_publish(&p),
                Next::Event(_) => {}
                Next::Deadline => {
                    return Err(Fatal::Broker(format!("the broker did not confirm the subscription to {names}")));
                }
                Next::Lost(e) => return Err(Fatal::Broker(format!("the broker closed the connection: {e}"))),
            }
        }
    }

    /// Disconnects cleanly, letting the event loop send the DISCONNECT.
    async fn close(mut self) {
        if self.client.disconnect().await.is_err() {
            return;
        }
        let until = Instant::now() + Duration::from_secs(1);
        while let Next::Event(_) = self.next(until).await {}
    }
}

/// Why connecting failed, in the words of this tool's flags.
#[must_use]
pub fn describe_connect(addr: &str, error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => {
                    "bad user name or password (check --username and --password-file or TELEMETRY_CTL_PASSWORD)"
                }
                ConnectReturnCode::NotAuthorized => {
                    "not authorised (check --username, the password and the broker's users and ACL)"
                }
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::RefusedProtocolVersion => "MQTT protocol version refused",
                ConnectReturnCode::ServiceUnavailable | ConnectReturnCode::Success => "service unavailable",
            };
            format!("the broker at {addr} refused the connection: {why}")
        }
        ConnectionError::NetworkTimeout => {
            format!("cannot reach the broker at {addr}: no answer within {}s", CONNECT_TIMEOUT.as_secs())
        }
        e if telemetry_link::classify(e) == Failure::Tls => format!(
            "TLS handshake with the broker at {addr} failed: {e} (check --tls-ca, the broker's certificate and \
             host name, and --tls-cert/--tls-key)"
        ),
        ConnectionError::Io(io) => format!("cannot reach the broker at {addr}: {io}"),
        e => format!("cannot reach the broker at {addr}: {e}"),
    }
}

/// The connection dropped; `denied` is the command topic pattern when the
/// drop came after the commands were sent and before any reply (then the
/// broker's ACL most likely refused them).
#[must_use]
pub fn describe_lost(addr: &str, error: &ConnectionError, denied: Option<&str>) -> String {
    match denied {
        Some(topic) => format!(
            "the broker at {addr} closed the connection after the commands were sent and before any reply \
             ({error}): most likely its ACL does not let this user write {topic} (Mosquitto disconnects an MQTT \
             3.1.1 client whose publish it denies)"
        ),
        None => format!("lost the connection to the broker at {addr}: {error}"),
    }
}

/// `None` when every filter was granted; otherwise which were refused.
#[must_use]
pub fn describe_refused_filters(filters: &[String], codes: &[SubscribeReasonCode]) -> Option<String> {
    let refused: Vec<&str> = filters
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(codes.get(*i), Some(SubscribeReasonCode::Success(_))))
        .map(|(_, f)| f.as_str())
        .collect();
    (!refused.is_empty()).then(|| {
        format!(
            "the broker refused the subscription to {}: not authorised (the broker's ACL must let this user read it)",
            refused.join(" and ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_named_plainly() {
        let refused = ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let m = describe_connect("127.0.0.1:1", &refused);
        assert!(m.starts_with("cannot reach the broker at 127.0.0.1:1: "), "{m}");
        let m = describe_connect("b:1", &ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized));
        assert!(m.contains("refused the connection: not authorised"), "{m}");
        let m = describe_connect("b:1", &ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword));
        assert!(m.contains("bad user name or password") && m.contains("--username"), "{m}");
        let m = describe_connect("b:1", &ConnectionError::NetworkTimeout);
        assert!(m.contains("no answer within 5s"), "{m}");
        let tls = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        let m = describe_connect("b:1", &ConnectionError::Io(tls));
        assert!(m.starts_with("TLS handshake with the broker at b:1 failed") && m.contains("--tls-ca"), "{m}");
    }

    #[test]
    fn a_drop_between_the_commands_and_the_replies_points_at_the_acl() {
        let closed = ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable);
        let m = describe_lost("b:1", &closed, Some("/t/cmd/<client_id>"));
        assert!(
            m.contains("before any reply") && m.contains("ACL does not let this user write /t/cmd/<client_id>"),
            "{m}"
        );
        let m = describe_lost("b:1", &closed, None);
        assert!(m.starts_with("lost the connection to the broker at b:1") && !m.contains("ACL"), "{m}");
    }

    #[test]
    fn refused_subscriptions_are_named() {
        let filters = ["/t/cmd-reply/+".to_owned(), "/t/status/+".to_owned()];
        let ok = [SubscribeReasonCode::Success(QoS::AtLeastOnce), SubscribeReasonCode::Success(QoS::AtMostOnce)];
        assert_eq!(describe_refused_filters(&filters, &ok), None);
        let m = describe_refused_filters(&filters, &[ok[0], SubscribeReasonCode::Failure]).unwrap();
        assert!(m.contains("/t/status/+") && !m.contains("cmd-reply") && m.contains("not authorised"), "{m}");
        assert!(describe_refused_filters(&filters, &ok[..1]).is_some(), "a missing code counts as refused");
    }
}
