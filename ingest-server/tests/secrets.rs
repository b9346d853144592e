//! Secrets never leak (issue 7): a full run of both daemons at debug level,
//! over TLS with passwords for MQTT (from a file and from the environment),
//! ClickHouse (from a file) and Postgres, then a search of every log line,
//! both `/metrics` pages and both `--help` texts for each secret value.
//!
//! One test in this binary: it installs the process-wide tracing subscriber
//! that records the in-process agent's debug log.

mod harness;
mod secure_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secure_support::{random_secret, SecureBroker, SecureClickHouse};
use tokio_util::sync::CancellationToken;

/// A log sink shared with the tracing subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_metrics_or_help_of_a_full_secure_run() {
    let Some(stack) = test_support::stack(&[test_support::Service::Postgres]) else { return };
    let agent_log = Captured::default();
    {
        let sink = agent_log.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .init();
    }
    let broker = SecureBroker::start(&["dev-s"]);
    let ch_password = random_secret("clickhouse");
    let clickhouse = SecureClickHouse::start(&ch_password);
    let pg_password = random_secret("postgres");
    let (ingest_pw, device_pw) = (broker.password("ingest"), broker.password("dev-s"));
    let secrets = [&ingest_pw, &device_pw, &ch_password, &pg_password];
    let dir = broker.dir.join("secrets");
    std::fs::create_dir_all(&dir).expect("dir");
    let (ch_pw_file, mqtt_pw_file) = (dir.join("clickhouse.pw"), dir.join("mqtt.pw"));
    std::fs::write(&ch_pw_file, format!("{ch_password}\n")).expect("write");
    std::fs::write(&mqtt_pw_file, format!("{device_pw}\n")).expect("write");

    // The ingest server binary, at debug level, secrets from env and file.
    let ingest_http = format!("127.0.0.1:{}", test_support::free_port());
    let ingest_log_path = dir.join("ingest.log");
    let database = test_support::unique_name("secrets");
    let mut ingest = std::process::Command::new(env!("CARGO_BIN_EXE_ingest-server"))
        .env("RUST_LOG", "debug")
        .env("INGEST_MQTT_PORT", broker.tls_port.to_string())
        .env("INGEST_MQTT_USERNAME", "ingest")
        .env("INGEST_MQTT_PASSWORD", &ingest_pw)
        .env("INGEST_MQTT_TLS", "true")
        .env("INGEST_MQTT_CA_FILE", broker.ca())
        .env("INGEST_MQTT_CLIENT_ID", test_support::unique_name("ingest"))
        .env("INGEST_CLICKHOUSE_URL", clickhouse.url())
        .env("INGEST_CLICKHOUSE_USER", "ingest")
        .env("INGEST_CLICKHOUSE_PASSWORD_FILE", &ch_pw_file)
        .env("INGEST_CLICKHOUSE_DATABASE", &database)
        .env("INGEST_BATCH_MAX_DELAY_MS", "200")
        .env("INGEST_HTTP_ADDRESS", &ingest_http)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&ingest_log_path).expect("log file"))
        .spawn()
        .expect("start ingest-server");

    // The agent in process, password from a file, debug log captured.
    let config = edge_agent::Config {
        client_id: "dev-s".into(),
        mqtt_client_id: test_support::unique_name("agent"),
        listen: vec![edge_agent::config::ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: test_support::fresh_pg_database(&stack).await,
        postgres_password: pg_password.parse().expect("infallible"),
        mqtt_port: broker.tls_port,
        mqtt_username: "dev-s".into(),
        mqtt_password_file: mqtt_pw_file,
        mqtt_tls: true,
        mqtt_ca_file: broker.ca(),
        confirm: edge_agent::config::ConfirmMode::Ingest,
        http_listen: "127.0.0.1:0".into(),
        status_interval_secs: 1,
        ..edge_agent::Config::default()
    };
    let agent = edge_agent::Agent::start(config, CancellationToken::new()).await.expect("agent starts");
    let edge_agent::config::ListenAddr::Tcp(addr) = agent.listen_addrs[0].clone() else { unreachable!() };
    let mut sensor = std::net::TcpStream::connect(&addr).expect("connect to the agent");
    let readings: Vec<_> =
        (0..200).map(|i| telemetry_wire::Reading::new("s0", harness::BASE_TS + i * 1000, i as f64)).collect();
    let mut frame = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(&mut telemetry_wire::SensorFrameCodec::default(), &readings[..], &mut frame)
        .expect("encode");
    sensor.write_all(&frame).expect("send");

    // Stored (ClickHouse user `ingest`, password from the file) and acked
    // end to end (the outbox empties on the ingest ack).
    let ch = clickhouse::Client::default()
        .with_url(clickhouse.url())
        .with_user("ingest")
        .with_password(&ch_password)
        .with_validation(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sql = format!("SELECT count() FROM `{database}`.readings");
        if ch.query(&sql).fetch_one::<u64>().await.ok() == Some(200) && agent.shared.outbox_size().0 == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not stored and acked within 60 s; ingest log:\n{}", read(&ingest_log_path));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent_metrics = test_support::http::http_get(&agent.http_addr.expect("agent http").to_string(), "/metrics")
        .await
        .expect("agent /metrics");
    let ingest_metrics = test_support::http::http_get(&ingest_http, "/metrics").await.expect("ingest /metrics");
    drop(sensor);
    agent.shutdown().await;
    let _ = std::process::Command::new("kill").args(["-TERM", &ingest.id().to_string()]).status();
    let _ = ingest.wait();

    // --help with every secret in the environment shows none of them.
    let ingest_help = std::process::Command::new(env!("CARGO_BIN_EXE_ingest-server"))
        .arg("--help")
        .env("INGEST_MQTT_PASSWORD", &ingest_pw)
        .env("INGEST_CLICKHOUSE_PASSWORD", &ch_password)
        .output()
        .expect("ingest-server --help");
    let ingest_help = String::from_utf8_lossy(&ingest_help.stdout).into_owned();
    assert!(ingest_help.contains("--mqtt-password-file"), "{ingest_help}");
    std::env::set_var("EDGE_AGENT_MQTT_PASSWORD", &device_pw);
    std::env::set_var("EDGE_AGENT_POSTGRES_PASSWORD", &pg_password);
    let agent_help = <edge_agent::config::Overrides as clap::Args>::augment_args(clap::Command::new("edge-agent"))
        .render_long_help()
        .to_string();
    assert!(agent_help.contains("--mqtt-password-file") && agent_help.contains("--mqtt-ca-file"), "{agent_help}");

    let agent_log = String::from_utf8_lossy(&agent_log.0.lock().expect("log lock")).into_owned();
    let ingest_log = read(&ingest_log_path);
    assert!(agent_log.contains("DEBUG") && agent_log.contains("connected to the broker"), "agent log too thin");
    assert!(ingest_log.contains("DEBUG") && ingest_log.contains("connected to MQTT broker"), "ingest log too thin");
    for (name, text) in [
        ("agent log", &agent_log),
        ("ingest log", &ingest_log),
        ("agent /metrics", &agent_metrics),
        ("ingest /metrics", &ingest_metrics),
        ("ingest --help", &ingest_help),
        ("agent --help", &agent_help),
    ] {
        for secret in secrets {
            assert!(!text.contains(secret.as_str()), "a secret appears in the {name}");
        }
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
