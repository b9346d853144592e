//! The secure broker profile (issue 7): users, ACL and TLS on a private
//! Mosquitto per test (`scripts/stack instance mqtts`), against the real
//! ingest server and edge agent.

mod harness;
mod secure_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{batch, Server, World};
use ingest_server::{Config, Metrics, Secret};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use secure_support::SecureBroker;
use tokio_util::sync::CancellationToken;

fn secure_config(world: &World, broker: &SecureBroker, tls: bool) -> Config {
    let mut c = world.config();
    c.topic_prefix = "/telemetry".into();
    c.mqtt_host = "127.0.0.1".into();
    c.mqtt_username = "ingest".into();
    c.mqtt_password = Secret::new(broker.password("ingest"));
    if tls {
        c.mqtt_tls = true;
        c.mqtt_ca_file = broker.ca();
        c.mqtt_port = broker.tls_port;
    } else {
        c.mqtt_port = broker.plain_port;
    }
    c
}

type Shared<T> = Arc<Mutex<Vec<T>>>;

/// A bare MQTT client logged in as a device, recording what it receives.
struct Device {
    client: AsyncClient,
    received: Shared<String>,
    subacks: Shared<SubscribeReasonCode>,
    connects: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Device {
    async fn connect(broker: &SecureBroker, user: &str) -> Self {
        let mut options = MqttOptions::new(test_support::unique_name(user), "127.0.0.1", broker.plain_port);
        options.set_credentials(user, broker.password(user)).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received: Shared<String> = Arc::default();
        let subacks: Shared<SubscribeReasonCode> = Arc::default();
        let connects = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        {
            let (received, subacks, connects, stop) =
                (received.clone(), subacks.clone(), connects.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return,
                        e = eventloop.poll() => e,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connects.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => received.lock().unwrap().push(p.topic),
                        Ok(Event::Incoming(Packet::SubAck(a))) => subacks.lock().unwrap().extend(a.return_codes),
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            });
        }
        harness::wait_for("device connected", Duration::from_secs(10), || connects.load(Ordering::SeqCst) > 0).await;
        Self { client, received, subacks, connects, stop }
    }

    async fn subscribe(&self, filters: &[&str]) {
        let before = self.subacks.lock().unwrap().len();
        for f in filters {
            self.client.subscribe(*f, QoS::AtLeastOnce).await.expect("queue subscribe");
        }
        harness::wait_for("SUBACKs", Duration::from_secs(10), || {
            self.subacks.lock().unwrap().len() >= before + filters.len()
        })
        .await;
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("queue publish");
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_on_or_read_another_devices_topics() {
    let Some(world) = World::new() else { return };
    let broker = SecureBroker::start(&["dev-a", "dev-b"]);
    // The ingest user may subscribe to every client and status topic: the
    // server reports `subscribed` only when no SUBACK code is a failure.
    let server = Server::start(secure_config(&world, &broker, false)).await;
    let (a, b) = (Device::connect(&broker, "dev-a").await, Device::connect(&broker, "dev-b").await);
    a.subscribe(&["/telemetry/ack/dev-a"]).await;

    // B forges a batch in A's name on A's topic, and a status for A. The
    // broker drops both; Mosquitto 2.0.11 PUBACKs a denied MQTT 3.1.1
    // publish and then closes the connection (v3.1.1 has no way to say
    // "not authorised"), so B reconnects.
    b.publish("/telemetry/client/dev-a", batch("dev-a", 666, 1, 50).encode()).await;
    harness::wait_for("B disconnected and back", Duration::from_secs(15), || b.connects.load(Ordering::SeqCst) >= 2)
        .await;
    b.publish("/telemetry/status/dev-a", b"{\"forged\":true}".to_vec()).await;
    harness::wait_for("B disconnected and back", Duration::from_secs(15), || b.connects.load(Ordering::SeqCst) >= 3)
        .await;

    // B tries to read A's acks and A's batches. Mosquitto 2.0.11 grants
    // such subscriptions and applies the ACL's `read` rule to every message
    // it would deliver, so the check is on what B receives (below).
    b.subscribe(&["/telemetry/ack/dev-a", "/telemetry/ack/+", "/telemetry/client/dev-a", "/telemetry/ack/dev-b"]).await;
    // Each publishes its own data on its own topic.
    a.publish("/telemetry/client/dev-a", batch("dev-a", 1, 1, 100).encode()).await;
    b.publish("/telemetry/client/dev-b", batch("dev-b", 2, 1, 30).encode()).await;

    world.wait_stored(130, Duration::from_secs(30)).await;
    harness::wait_for("A acked", Duration::from_secs(10), || !a.received.lock().unwrap().is_empty()).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // room for anything forged to arrive
    assert_eq!(world.count("SELECT count() FROM DB.readings WHERE epoch = 666").await, 0, "forged batch stored");
    assert_eq!(world.count("SELECT count() FROM DB.readings").await, 130);
    let m = &server.metrics;
    assert_eq!(m.received_readings.get(), 130, "the server never saw the forged batch");
    assert_eq!(m.dead_letters_total(), 0, "nor the forged status");
    let seen_by_b = b.received.lock().unwrap().clone();
    assert!(seen_by_b.iter().all(|t| t.ends_with("/dev-b")), "B read someone else's topic: {seen_by_b:?}");
    assert!(seen_by_b.contains(&"/telemetry/ack/dev-b".to_owned()), "B gets its own ack: {seen_by_b:?}");
    let seen_by_a = a.received.lock().unwrap().clone();
    assert!(seen_by_a.iter().all(|t| t == "/telemetry/ack/dev-a"), "{seen_by_a:?}");
    drop((a, b));
    server.stop().await;
}

/// Runs the ingest-server binary with `envs` for `secs`, returns its stderr.
fn run_binary_for(envs: &[(&str, String)], secs: u64) -> String {
    let log = std::env::temp_dir().join(test_support::unique_name("ingest_log"));
    let file = std::fs::File::create(&log).expect("log file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest-server"))
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start ingest-server");
    std::thread::sleep(Duration::from_secs(secs));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(log);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_with_a_clear_error_and_backoff() {
    let Some(world) = World::new() else { return };
    let broker = SecureBroker::start(&["dev-a"]);
    let wrong = secure_support::random_secret("wrong");
    let c = secure_config(&world, &broker, true);
    let envs = [
        ("INGEST_MQTT_PORT", c.mqtt_port.to_string()),
        ("INGEST_MQTT_USERNAME", "ingest".to_owned()),
        ("INGEST_MQTT_PASSWORD", wrong.clone()),
        ("INGEST_MQTT_TLS", "true".to_owned()),
        ("INGEST_MQTT_CA_FILE", c.mqtt_ca_file.display().to_string()),
        ("INGEST_MQTT_CLIENT_ID", c.mqtt_client_id.clone()),
        ("INGEST_CLICKHOUSE_URL", c.clickhouse_url.clone()),
        ("INGEST_CLICKHOUSE_DATABASE", c.clickhouse_database.clone()),
    ];
    let log = tokio::task::spawn_blocking(move || run_binary_for(&envs, 10)).await.expect("binary run");
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("the broker refused the connection")).collect();
    assert!(!refusals.is_empty(), "no clear refusal in the log:\n{log}");
    assert!(refusals[0].contains("ERROR") && refusals[0].contains("not authorised"), "{}", refusals[0]);
    // Backoff of 2 s, 4 s, 8 s...: at most 4 attempts in 10 s, not hundreds.
    assert!(refusals.len() <= 4, "{} attempts in 10 s:\n{log}", refusals.len());
    assert!(!log.contains(&wrong), "the password is in the log");

    // The agent backs off the same way (in process: count its attempts).
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let agent_config = edge_agent::Config {
        client_id: "dev-a".into(),
        mqtt_client_id: test_support::unique_name("agent"),
        listen: vec![edge_agent::config::ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: test_support::fresh_pg_database(&stack).await,
        mqtt_port: broker.plain_port,
        mqtt_username: "dev-a".into(),
        mqtt_password: wrong.parse().expect("infallible"),
        http_listen: String::new(),
        ..edge_agent::Config::default()
    };
    let agent = edge_agent::Agent::start(agent_config, CancellationToken::new()).await.expect("agent starts");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let attempts = agent.shared.metrics.mqtt_errors.get();
    assert!((1..=4).contains(&attempts), "agent made {attempts} attempts in 10 s");
    assert!(!agent.shared.connected());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_wrong_ca_is_refused() {
    let Some(world) = World::new() else { return };
    let broker = SecureBroker::start(&[]);
    let mut config = secure_config(&world, &broker, true);
    config.mqtt_ca_file = secure_support::other_ca(&broker.dir.join("other"));
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(ingest_server::run_with_metrics(config, metrics.clone(), shutdown.clone()));
    harness::wait_for("a failed handshake", Duration::from_secs(30), || metrics.mqtt_connection_errors.get() >= 1)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metrics.subscribed.get(), 0, "connected although the CA is wrong");
    assert!(metrics.mqtt_connection_errors.get() <= 3, "TLS failures are retried with backoff");
    assert!(!broker.log().contains("as ingest-"), "the broker accepted the client:\n{}", broker.log());
    shutdown.cancel();
    run.await.expect("join").expect("clean stop");

    // The same server with the right CA (and a client certificate) connects.
    let mut config = secure_config(&world, &broker, true);
    let (cert, key) = broker.client_cert();
    config.mqtt_client_cert_file = cert;
    config.mqtt_client_key_file = key;
    let server = Server::start(config).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_delivers_end_to_end_over_tls_with_auth_and_acl() {
    let Some(world) = World::new() else { return };
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let broker = SecureBroker::start(&["dev-a"]);
    let server = Server::start(secure_config(&world, &broker, true)).await;
    let dir = broker.dir.join("agent");
    std::fs::create_dir_all(&dir).expect("dir");
    let pw_file = dir.join("mqtt.password");
    std::fs::write(&pw_file, format!("{}\n", broker.password("dev-a"))).expect("password file");
    let (cert, key) = broker.client_cert();
    let agent_config = edge_agent::Config {
        client_id: "dev-a".into(),
        mqtt_client_id: test_support::unique_name("agent"),
        listen: vec![edge_agent::config::ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: test_support::fresh_pg_database(&stack).await,
        mqtt_port: broker.tls_port,
        mqtt_username: "dev-a".into(),
        mqtt_password_file: pw_file,
        mqtt_tls: true,
        mqtt_ca_file: broker.ca(),
        mqtt_client_cert_file: cert,
        mqtt_client_key_file: key,
        confirm: edge_agent::config::ConfirmMode::Ingest,
        http_listen: String::new(),
        ..edge_agent::Config::default()
    };
    let agent = edge_agent::Agent::start(agent_config, CancellationToken::new()).await.expect("agent starts");
    let edge_agent::config::ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    send_frames(&addr, 500).await;
    world.wait_stored(500, Duration::from_secs(60)).await;
    // confirm = ingest: the outbox empties only through the ack on
    // /telemetry/ack/dev-a, which the ACL lets dev-a read.
    harness::wait_for("outbox empty", Duration::from_secs(30), || agent.shared.outbox_size().0 == 0).await;
    assert_eq!(world.count("SELECT count() FROM DB.readings WHERE client_id = 'dev-a'").await, 500);
    agent.shutdown().await;
    server.stop().await;
}

/// Sends `n` readings in frames of 50 over TCP and waits for the last ack.
async fn send_frames(addr: &str, n: u64) {
    use telemetry_wire::{AckFrameCodec, Reading, SensorFrameCodec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::{Decoder, Encoder};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the agent");
    let mut out = bytes::BytesMut::new();
    let frames = n.div_ceil(50);
    for f in 0..frames {
        let readings: Vec<Reading> = (f * 50..((f + 1) * 50).min(n))
            .map(|i| Reading::new("s0", harness::BASE_TS + i as i64 * 1000, i as f64))
            .collect();
        SensorFrameCodec::default().encode(&readings[..], &mut out).expect("encode frame");
    }
    stream.write_all(&out).await.expect("send frames");
    let (mut acks, mut buf) = (AckFrameCodec::default(), bytes::BytesMut::new());
    loop {
        while let Some(acked) = acks.decode(&mut buf).expect("ack frame") {
            if acked >= frames {
                return;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_buf(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(1..))), "connection closed or silent before every frame was acked");
    }
}

/// Issue 15: in the secure profile only the `operator` user commands a
/// device; another device can neither command it (tried with
/// `mosquitto_pub`, as an operator would try it by hand) nor read its
/// commands or replies, nor forge a reply in its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_may_command_a_device() {
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let broker = SecureBroker::start(&["dev-a", "dev-b", "operator"]);
    let agent_config = edge_agent::Config {
        client_id: "dev-b".into(),
        mqtt_client_id: test_support::unique_name("agent"),
        listen: vec![edge_agent::config::ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: test_support::fresh_pg_database(&stack).await,
        mqtt_port: broker.plain_port,
        mqtt_username: "dev-b".into(),
        mqtt_password: edge_agent::config::Secret::new(broker.password("dev-b")),
        http_listen: String::new(),
        ..edge_agent::Config::default()
    };
    let agent = edge_agent::Agent::start(agent_config, CancellationToken::new()).await.expect("agent starts");
    harness::wait_for("agent connected", Duration::from_secs(10), || agent.shared.connected()).await;
    let operator = Device::connect(&broker, "operator").await;
    operator.subscribe(&["/telemetry/cmd-reply/+"]).await;
    let a = Device::connect(&broker, "dev-a").await;
    a.subscribe(&["/telemetry/cmd/dev-b", "/telemetry/cmd/+", "/telemetry/cmd-reply/+"]).await;
    let replies =
        || operator.received.lock().unwrap().iter().filter(|t| t.as_str() == "/telemetry/cmd-reply/dev-b").count();
    let pub_as = |user: &str, topic: &str, payload: &str| {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.plain_port.to_string(), "-q", "1", "-i"])
            .arg(test_support::unique_name(user))
            .args(["-u", user, "-P", &broker.password(user), "-t", topic, "-m", payload])
            .output()
            .expect("run mosquitto_pub (Debian package mosquitto-clients)");
        // Mosquitto acks a denied QoS 1 publish, so this succeeds either way.
        assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
    };
    let expires = edge_agent::now_micros() / 1000 + 60_000;
    let command = |id: &str, name: &str| format!(r#"{{"id":"{id}","name":"{name}","expires_at_ms":{expires}}}"#);

    // The operator's command is carried out and answered. Until the agent
    // has subscribed (at its ConnAck) a command reaches nobody: repeat it.
    for attempt in 0.. {
        pub_as("operator", "/telemetry/cmd/dev-b", &command("op-pause", "pause_intake"));
        if harness::try_wait_for(Duration::from_secs(1), || replies() >= 1).await {
            break;
        }
        assert!(attempt < 20, "the agent never answered the operator");
    }
    assert!(agent.shared.intake_paused(), "the operator's pause_intake ran");
    let seen_by_a = a.received.lock().unwrap().len();
    assert_eq!(seen_by_a, 0, "dev-a read dev-b's command or reply: {:?}", a.received.lock().unwrap());

    // dev-a tries to command dev-b, and to forge a reply in its name.
    pub_as("dev-a", "/telemetry/cmd/dev-b", &command("evil", "resume_intake"));
    pub_as("dev-a", "/telemetry/cmd-reply/dev-b", r#"{"id":"op-pause","client_id":"dev-b","ts_ms":1,"ok":false}"#);
    tokio::time::sleep(Duration::from_secs(2)).await; // room for anything forged to arrive
    assert!(agent.shared.intake_paused(), "dev-a's resume_intake ran");
    assert_eq!(replies(), 1, "the operator got a forged or an extra reply");
    let run = |name: &'static str| {
        agent.shared.metrics.commands_run.get_or_create(&edge_agent::metrics::Command { command: name }).get()
    };
    assert_eq!((run("pause_intake"), run("resume_intake")), (1, 0));
    assert!(a.received.lock().unwrap().is_empty(), "dev-a read commands or replies: {:?}", a.received.lock().unwrap());
    drop((operator, a));
    agent.shutdown().await;
}
