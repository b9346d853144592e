//! Test harness: a fresh ClickHouse database and MQTT topic prefix per test,
//! an in-process ingest server (or the binary, for crash tests), a test MQTT
//! client that publishes batches and records ingest acks, and queries.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ingest_server::{Config, Metrics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetry_wire::{Batch, IngestAck, Reading, SeqRange};
use test_support::http::{http_get, metric_value};
use test_support::{Service, Stack};
use tokio_util::sync::CancellationToken;

/// 2023-11-14T22:13:20Z in µs: readings are spaced 100 ms from here.
pub const BASE_TS: i64 = 1_700_000_000_000_000;

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// One test's world: stack, prefix, database.
pub struct World {
    pub stack: Stack,
    pub prefix: String,
    pub database: String,
    pub ch_url: String,
}

impl World {
    /// `None` when the stack is not up (skip; under CI this panics instead).
    pub fn new() -> Option<Self> {
        init_logging();
        let stack = test_support::stack(&[Service::Mqtt, Service::ClickHouse])?;
        let ch_url = stack.ch_url.clone();
        Some(Self {
            stack,
            prefix: test_support::topic_prefix(),
            database: test_support::unique_name("ingest"),
            ch_url,
        })
    }

    /// A server configuration for this world with short timers.
    pub fn config(&self) -> Config {
        Config {
            mqtt_host: self.stack.mqtt_host.clone(),
            mqtt_port: self.stack.mqtt_port,
            mqtt_client_id: test_support::unique_name("ingest"),
            topic_prefix: self.prefix.clone(),
            clickhouse_url: self.ch_url.clone(),
            clickhouse_database: self.database.clone(),
            batch_max_delay_ms: 200,
            retry_min_ms: 100,
            retry_max_ms: 1000,
            insert_timeout_secs: 10,
            // Fold every minute at every pass: the tests judge the
            // materialised rollup, not only the live view.
            rollup_after_secs: 0,
            rollup_quiet_secs: 0,
            rollup_interval_ms: 200,
            shutdown_timeout_secs: 10,
            // The API's own bounded, read-only user (deploy/clickhouse/users.xml.in).
            api_clickhouse_user: "telemetry_api".into(),
            ..Config::default()
        }
    }

    /// A ClickHouse client for assertions.
    pub fn ch(&self) -> clickhouse::Client {
        clickhouse::Client::default().with_url(&self.ch_url).with_validation(false)
    }

    /// A count query's answer.
    pub async fn count(&self, sql: &str) -> u64 {
        let sql = sql.replace("DB.", &format!("`{}`.", self.database));
        match self.ch().query(&sql).fetch_one::<u64>().await {
            Ok(n) => n,
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    /// Distinct reading identities stored.
    pub async fn distinct_readings(&self) -> u64 {
        self.count("SELECT count() FROM (SELECT client_id, sensor, ts FROM DB.readings GROUP BY client_id, sensor, ts)")
            .await
    }

    /// Rows visible with FINAL.
    pub async fn final_readings(&self) -> u64 {
        self.count("SELECT count() FROM DB.readings FINAL").await
    }

    /// Sum of the rollup's counts (FINAL).
    pub async fn rollup_count(&self) -> u64 {
        self.count("SELECT toUInt64(sum(count)) FROM DB.readings_1m FINAL").await
    }

    /// Waits until distinct readings, FINAL rows and rollup all equal `n`.
    pub async fn wait_stored(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (d, f, r) = (self.distinct_readings().await, self.final_readings().await, self.rollup_count().await);
            if d == n && f == n && r == n {
                return;
            }
            assert!(Instant::now() < deadline, "after {within:?}: distinct {d}, final {f}, rollup {r}; want {n}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Rollup markers not yet consumed.
    pub async fn pending_markers(&self) -> u64 {
        self.count(
            "SELECT count() FROM (SELECT client_id FROM DB.rollup_queue GROUP BY client_id, minute, token HAVING sum(pending) > 0)",
        )
        .await
    }

    /// Checks that the live view equals aggregates computed from
    /// deduplicated raw data (at once), then that the materialised rollup
    /// does once the rollup passes consumed every marker.
    pub async fn assert_rollup_exact(&self) {
        self.assert_rollup_table_exact("DB.readings_1m_live").await;
        wait_for_async("rollup markers consumed", Duration::from_secs(30), || async {
            self.pending_markers().await == 0
        })
        .await;
        self.assert_rollup_table_exact("DB.readings_1m FINAL").await;
    }

    async fn assert_rollup_table_exact(&self, table: &str) {
        let sql = "SELECT count() FROM (
            SELECT client_id, sensor, minute, count, sum, min, max FROM TABLE
        ) r
        FULL OUTER JOIN (
            SELECT client_id, sensor, minute, toUInt64(count()) AS c, sum(value) AS s, min(value) AS mn, max(value) AS mx
            FROM (SELECT client_id, sensor, ts, any(value) AS value,
                         toStartOfMinute(toDateTime(intDiv(ts, 1000000))) AS minute
                  FROM DB.readings GROUP BY client_id, sensor, ts)
            GROUP BY client_id, sensor, minute
        ) x USING (client_id, sensor, minute)
        WHERE count != c OR abs(sum - s) > 1e-6 OR min != mn OR max != mx"
            .replace("TABLE", table);
        assert_eq!(self.count(&sql).await, 0, "{table} differs from the deduplicated raw data");
    }
}

/// An ingest server running in this process.
pub struct Server {
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), ingest_server::RunError>>,
}

impl Server {
    /// Starts one and waits until the broker confirmed its subscriptions.
    pub async fn start(config: Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(ingest_server::run_with_metrics(config, metrics.clone(), shutdown.clone()));
        let server = Self { metrics, shutdown, handle };
        server.wait_subscribed().await;
        server
    }

    /// Waits for the subscription gauge.
    pub async fn wait_subscribed(&self) {
        wait_for("server subscribed", Duration::from_secs(30), || self.metrics.subscribed.get() == 1).await;
    }

    /// Graceful stop; returns the run result.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
        match result {
            Ok(Ok(Ok(()))) => {}
            other => panic!("server did not stop cleanly: {other:?}"),
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `cond` every 50 ms for up to `within`; whether it came to hold.
pub async fn try_wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Waits until the async `cond` holds, polling every 100 ms.
pub async fn wait_for_async<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` readings of `client_id` with seqs `first..first + n`, cut into
/// batches of `per_batch`. Reading `seq` has sensor `s{seq % 3}`, ts
/// `BASE_TS + seq * 100 ms` and value `seq`.
pub fn batches(client_id: &str, epoch: u64, first: u64, n: u64, per_batch: u64) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut seq = first;
    while seq < first + n {
        let last = (seq + per_batch - 1).min(first + n - 1);
        out.push(batch(client_id, epoch, seq, last));
        seq = last + 1;
    }
    out
}

/// One batch covering `first..=last` (same readings as [`batches`]).
pub fn batch(client_id: &str, epoch: u64, first: u64, last: u64) -> Batch {
    let readings =
        (first..=last).map(|s| Reading::new(format!("s{}", s % 3), BASE_TS + s as i64 * 100_000, s as f64)).collect();
    Batch { client_id: client_id.to_owned(), epoch, first_seq: first, last_seq: last, readings }
}

/// A test MQTT client: publishes QoS 1 and records ingest acks.
pub struct Agent {
    pub client: AsyncClient,
    prefix: String,
    pubacks: Arc<AtomicU64>,
    published: AtomicU64,
    pub acks: Arc<Mutex<Vec<(String, IngestAck)>>>,
    stop: CancellationToken,
}

impl Agent {
    /// Connects, subscribes to `<prefix>/ack/+` and waits for the SUBACK.
    pub async fn connect(world: &World) -> Self {
        let mut options =
            MqttOptions::new(test_support::unique_name("agent"), &world.stack.mqtt_host, world.stack.mqtt_port);
        options.set_max_packet_size(16 << 20, 16 << 20).set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(options, 10_000);
        let pubacks = Arc::new(AtomicU64::new(0));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let subacked = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let ack_prefix = format!("{}/ack/", world.prefix);
        {
            let (pubacks, acks, subacked, stop) = (pubacks.clone(), acks.clone(), subacked.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return,
                        e = eventloop.poll() => e,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            pubacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacked.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let client_id = p.topic.strip_prefix(&ack_prefix).unwrap_or("?").to_owned();
                            let ack = IngestAck::decode(&p.payload, 1 << 20).expect("a valid ingest ack");
                            acks.lock().expect("acks lock").push((client_id, ack));
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            });
        }
        client.subscribe(format!("{}/ack/+", world.prefix), QoS::AtLeastOnce).await.expect("queue subscribe");
        wait_for("agent subscribed", Duration::from_secs(10), || subacked.load(Ordering::SeqCst) > 0).await;
        Self { client, prefix: world.prefix.clone(), pubacks, published: AtomicU64::new(0), acks, stop }
    }

    /// Publishes raw bytes QoS 1 on `<prefix>/client/<client_id>`.
    pub async fn publish_raw(&self, client_id: &str, payload: Vec<u8>) {
        self.client
            .publish(format!("{}/client/{client_id}", self.prefix), QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
        self.published.fetch_add(1, Ordering::SeqCst);
    }

    /// Publishes each batch on its client's topic.
    pub async fn publish(&self, batches: &[Batch]) {
        for b in batches {
            self.publish_raw(&b.client_id, b.encode()).await;
        }
    }

    /// Waits until the broker PUBACKed everything published so far.
    pub async fn flushed(&self) {
        let want = self.published.load(Ordering::SeqCst);
        wait_for("broker PUBACKs", Duration::from_secs(30), || self.pubacks.load(Ordering::SeqCst) >= want).await;
    }

    /// The union of acked ranges per client, merged.
    pub fn acked(&self) -> BTreeMap<String, Vec<SeqRange>> {
        let mut out: BTreeMap<String, Vec<SeqRange>> = BTreeMap::new();
        for (c, ack) in self.acks.lock().expect("acks lock").iter() {
            out.entry(c.clone()).or_default().extend(ack.ranges.iter().copied());
        }
        out.into_iter().map(|(c, r)| (c, ingest_server::acker::merge(r))).collect()
    }

    /// Waits until the acks for `client_id` cover exactly `ranges`.
    pub async fn wait_acked(&self, client_id: &str, ranges: &[SeqRange], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.acked().get(client_id).cloned().unwrap_or_default();
            if got == ranges {
                return;
            }
            assert!(Instant::now() < deadline, "acks for {client_id}: {got:?}, want {ranges:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A seq range (shorthand).
pub fn range(epoch: u64, first_seq: u64, last_seq: u64) -> SeqRange {
    SeqRange { epoch, first_seq, last_seq }
}

/// Runs `mosquitto_pub` QoS 1 with extra arguments (e.g. `-m`, `-n`, `-f`).
pub fn mosquitto_pub(world: &World, topic: &str, args: &[&str]) {
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", &world.stack.mqtt_host, "-p", &world.stack.mqtt_port.to_string(), "-q", "1", "-t", topic])
        .args(args)
        .output()
        .expect("run mosquitto_pub (Debian package mosquitto-clients)");
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The ingest-server binary as a child process (for SIGKILL tests).
pub struct Binary {
    child: std::process::Child,
    pub http: String,
}

impl Binary {
    /// Starts the binary with `config` passed as flags and environment
    /// variables, and waits until `/metrics` reports it subscribed.
    pub async fn start(config: &Config) -> Self {
        let http = format!("127.0.0.1:{}", test_support::free_port());
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ingest-server"));
        cmd.args(["--mqtt-host", &config.mqtt_host])
            .args(["--mqtt-port", &config.mqtt_port.to_string()])
            .args(["--mqtt-client-id", &config.mqtt_client_id])
            .args(["--topic-prefix", &config.topic_prefix])
            .args(["--clickhouse-url", &config.clickhouse_url])
            .args(["--http-address", &http])
            // Through the environment, to exercise that path too.
            .env("INGEST_CLICKHOUSE_DATABASE", &config.clickhouse_database)
            .env("INGEST_BATCH_MAX_DELAY_MS", config.batch_max_delay_ms.to_string())
            .env("INGEST_ROLLUP_AFTER_SECS", config.rollup_after_secs.to_string())
            .env("INGEST_ROLLUP_INTERVAL_MS", config.rollup_interval_ms.to_string())
            .env("INGEST_RETRY_MAX_MS", config.retry_max_ms.to_string());
        if std::env::var_os("INGEST_TEST_LOG").is_some() {
            cmd.env("RUST_LOG", "info");
        } else {
            cmd.stderr(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        }
        let child = cmd.spawn().expect("start the ingest-server binary");
        let me = Self { child, http };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(body) = http_get(&me.http, "/metrics").await {
                if body.contains("telemetry_ingest_subscribed 1") {
                    return me;
                }
            }
            assert!(Instant::now() < deadline, "binary did not subscribe within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, no flush, no acks.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        test_support::peak_rss_mib(self.pid()).expect("VmHWM of the running binary")
    }

    /// SIGTERM and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("wait for the binary")
    }

    /// Received and inserted readings, from one `/metrics` answer (0 when
    /// unanswered).
    pub async fn received_and_inserted(&self) -> (f64, f64) {
        let body = http_get(&self.http, "/metrics").await.unwrap_or_default();
        let value = |name| metric_value(&body, name).unwrap_or(0.0);
        (value("telemetry_ingest_received_readings_total"), value("telemetry_ingest_inserted_readings_total"))
    }

    /// A counter or gauge value from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&http_get(&self.http, "/metrics").await?, name)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- current ClickHouse, in-process (chdb) -------------------------------------

/// Whether chdb (current ClickHouse in-process) is installed; a failure
/// unless skips were asked for ([`test_support::require`]).
pub fn has_chdb() -> bool {
    let has =
        std::process::Command::new("python3").args(["-c", "import chdb"]).output().is_ok_and(|o| o.status.success());
    test_support::require(has, "chdb is not installed; run ingest-server/tests/chdb/install.sh")
}

/// Runs `statements` in chdb (`tests/chdb/run_sql.py`).
pub fn chdb(statements: &[String]) -> std::process::Output {
    let dir = std::env::temp_dir().join(test_support::unique_name("chdb"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("statements.json");
    std::fs::write(&file, serde_json::to_string(statements).expect("JSON")).expect("write statements");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chdb/run_sql.py");
    let out = std::process::Command::new("python3").arg(script).arg(&file).output().expect("run python3");
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// Whether all of `statements` succeeded in chdb, and its standard error.
pub fn try_chdb(statements: &[String]) -> (bool, String) {
    let out = chdb(statements);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `statements` in chdb; the last one's TSV output.
pub fn run_chdb(statements: &[String]) -> String {
    let out = chdb(statements);
    assert!(out.status.success(), "chdb run failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
