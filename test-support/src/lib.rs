//! Integration-test harness shared by the daemons' `tests/`.
//!
//! Tests reach the services that `scripts/stack up` runs through the
//! variables `scripts/stack env` prints (`TELEMETRY_*`, defaults equal to the
//! stack's defaults). Each test gets its own Postgres database, ClickHouse
//! database and MQTT topic prefix, so tests run in parallel. Tests that kill
//! or restart a service get a [`PrivateService`] of their own. The local
//! ClickHouse cluster (`scripts/stack up --cluster`) is reached through
//! [`cluster()`].
//!
//! Missing services: a test that needs one **fails**, everywhere; a developer
//! may opt in to skipping such tests visibly (`TELEMETRY_ALLOW_SKIP=1`, never
//! under CI; each prints `SKIPPED: <reason>`).

pub mod cluster;
pub mod example_config;
pub mod http;

pub use cluster::{cluster, Cluster, ClusterNode};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A service of the local stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Mosquitto.
    Mqtt,
    /// PostgreSQL.
    Postgres,
    /// ClickHouse (HTTP interface).
    ClickHouse,
}

impl Service {
    fn script_name(self) -> &'static str {
        match self {
            Self::Mqtt => "mosquitto",
            Self::Postgres => "postgres",
            Self::ClickHouse => "clickhouse",
        }
    }
}

/// Where the shared stack's services listen.
#[derive(Debug, Clone)]
pub struct Stack {
    /// MQTT host.
    pub mqtt_host: String,
    /// MQTT port.
    pub mqtt_port: u16,
    /// Postgres port (host is 127.0.0.1, user postgres, trust auth).
    pub pg_port: u16,
    /// ClickHouse HTTP URL.
    pub ch_url: String,
    /// ClickHouse HTTP port.
    pub ch_http_port: u16,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Stack {
    /// The stack as described by the environment (or its defaults).
    #[must_use]
    pub fn from_env() -> Self {
        let ch_http_port = env_or("TELEMETRY_CH_HTTP_PORT", 28123);
        Self {
            mqtt_host: env_or("TELEMETRY_MQTT_HOST", "127.0.0.1".to_owned()),
            mqtt_port: env_or("TELEMETRY_MQTT_PORT", 21883),
            pg_port: env_or("TELEMETRY_PG_PORT", 25432),
            ch_url: env_or("TELEMETRY_CH_URL", format!("http://127.0.0.1:{ch_http_port}")),
            ch_http_port,
        }
    }

    fn addr(&self, service: Service) -> SocketAddr {
        let port = match service {
            Service::Mqtt => self.mqtt_port,
            Service::Postgres => self.pg_port,
            Service::ClickHouse => self.ch_http_port,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A Postgres connection string for `database`.
    #[must_use]
    pub fn pg_url(&self, database: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={database}", self.pg_port)
    }
}

/// Whether tests run under CI, where a missing service is a failure.
#[must_use]
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether a developer asked to skip tests whose services or tools are
/// missing (`TELEMETRY_ALLOW_SKIP=1`); never under CI. Without it a missing
/// service fails the test everywhere: a green run never means "nothing ran".
#[must_use]
pub fn skips_allowed() -> bool {
    !under_ci() && std::env::var("TELEMETRY_ALLOW_SKIP").is_ok_and(|v| v == "1")
}

/// Whether a test may go on: `true` when `present`; otherwise a failure,
/// or, with [`skips_allowed`], `false` and a `SKIPPED: <reason>` line.
///
/// # Panics
/// When `what` is missing and skips are not allowed.
#[must_use]
pub fn require(present: bool, what: &str) -> bool {
    if !present {
        assert!(skips_allowed(), "{what} (set TELEMETRY_ALLOW_SKIP=1 to skip such tests on purpose; never under CI)");
        eprintln!("SKIPPED: {what}");
    }
    present
}

/// The stack, if every service in `needs` answers. Otherwise a failure, or
/// with [`skips_allowed`] `None` and a message (the test skips, visibly).
///
/// # Panics
/// When a needed service does not answer and skips are not allowed.
#[must_use]
pub fn stack(needs: &[Service]) -> Option<Stack> {
    let stack = Stack::from_env();
    for &service in needs {
        let addr = stack.addr(service);
        if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
            let what = format!("{service:?} does not answer on {addr}; run `scripts/stack up`");
            return require(false, &what).then_some(stack);
        }
    }
    Some(stack)
}

/// A name unique to this test run: `<tag>_<pid>_<random>`; safe as a
/// database name and a topic level.
#[must_use]
pub fn unique_name(tag: &str) -> String {
    format!("{tag}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

/// A fresh MQTT topic prefix such as `/t_123_abcd/telemetry`.
#[must_use]
pub fn topic_prefix() -> String {
    format!("/{}/telemetry", unique_name("t"))
}

/// Creates a fresh Postgres database and returns its connection string.
///
/// # Panics
/// When Postgres refuses (the stack is up: this is a real failure).
pub async fn fresh_pg_database(stack: &Stack) -> String {
    let name = unique_name("test");
    let (client, conn) = tokio_postgres::connect(&stack.pg_url("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect to the stack's postgres");
    let handle = tokio::spawn(conn);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    drop(client);
    let _ = handle.await;
    stack.pg_url(&name)
}

/// Runs a Postgres client tool (`psql`, `pg_dump`) against the database of
/// connection string `url` with `args`; its standard output, or why it failed.
///
/// # Errors
/// The tool could not run, or exited unsuccessfully (its stderr).
pub fn pg_tool(tool: &str, url: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .arg("-d")
        .arg(url)
        .args(args)
        .output()
        .map_err(|e| format!("run {tool} (Debian package postgresql-client): {e}"))?;
    if !out.status.success() {
        return Err(format!("{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Attempts [`pg_restore`] makes before it gives up on deadlocks.
const RESTORE_ATTEMPTS: u32 = 5;

/// Restores the plain `pg_dump` file at `path` (made with `--clean`) into
/// the database of `url` in one transaction, under whatever runs there;
/// returns the attempts it took. The restore drops and recreates tables
/// that a running agent is writing, and Postgres may break the resulting
/// deadlock by aborting the restore (seen once in `scripts/chaos`, scenario
/// `outbox-rollback`): the whole transaction rolls back, so it is run
/// again, as an operator would, up to `RESTORE_ATTEMPTS` (5) times.
///
/// # Errors
/// `psql` failed for another reason, or deadlocked every time.
pub fn pg_restore(url: &str, path: &str) -> Result<u32, String> {
    let mut attempt = 1;
    loop {
        match pg_tool("psql", url, &["-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "-f", path]) {
            Ok(_) => return Ok(attempt),
            Err(e) if e.contains("deadlock detected") && attempt < RESTORE_ATTEMPTS => {
                eprintln!("restore of {path} deadlocked with a running client (attempt {attempt}); again");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Drops a database made by [`fresh_pg_database`] (given its connection
/// string); best effort, for suites that clean up after themselves. Nothing
/// may be connected to it any more.
pub async fn drop_pg_database(stack: &Stack, url: &str) {
    let Some(name) = url.split_whitespace().find_map(|kv| kv.strip_prefix("dbname=")) else { return };
    if name == "postgres" || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return;
    }
    let Ok((client, conn)) = tokio_postgres::connect(&stack.pg_url("postgres"), tokio_postgres::NoTls).await else {
        return;
    };
    let handle = tokio::spawn(conn);
    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await;
    drop(client);
    let _ = handle.await;
}

/// Peak resident memory (`VmHWM`) of process `pid`, in MiB, if it runs.
#[must_use]
pub fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024)
}

/// A TCP port that was free a moment ago.
///
/// # Panics
/// When the OS has no free port.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The repository root (for `scripts/stack`).
#[must_use]
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("test-support lives in the repo").to_path_buf()
}

/// A private instance of one service, in its own directory and port, that a
/// test may stop, kill and restart. Stopped when dropped.
#[derive(Debug)]
pub struct PrivateService {
    service: Service,
    dir: PathBuf,
    /// The main port (MQTT, Postgres, ClickHouse HTTP).
    pub port: u16,
    /// ClickHouse's native TCP port (0 for the others).
    pub port2: u16,
}

impl PrivateService {
    /// Starts a fresh instance and waits until it answers.
    ///
    /// # Panics
    /// When the instance does not start (see its log under the directory).
    #[must_use]
    pub fn start(service: Service) -> Self {
        let dir = std::env::temp_dir().join(unique_name(&format!("private_{}", service.script_name())));
        let port = free_port();
        let port2 = if service == Service::ClickHouse { free_port() } else { 0 };
        let me = Self { service, dir, port, port2 };
        me.run("instance", true);
        me
    }

    fn run(&self, command: &str, with_ports: bool) {
        let mut cmd = Command::new(repo_root().join("scripts/stack"));
        cmd.arg(command).arg(self.service.script_name()).arg(&self.dir);
        if with_ports {
            cmd.arg(self.port.to_string());
            if self.port2 != 0 {
                cmd.arg(self.port2.to_string());
            }
        }
        let out = cmd.output().expect("run scripts/stack");
        assert!(
            out.status.success(),
            "scripts/stack {command} {:?} failed: {}",
            self.service,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops it cleanly.
    pub fn stop(&self) {
        self.run("instance-stop", false);
    }

    /// Kills it with SIGKILL.
    pub fn kill(&self) {
        self.run("instance-kill", false);
    }

    /// Starts it again on the same data and ports, waiting until it answers.
    pub fn restart(&self) {
        self.run("instance", true);
    }

    /// The process id of the running instance (from the pid file `scripts/stack` keeps).
    ///
    /// # Panics
    /// When the pid file is missing or malformed.
    #[must_use]
    pub fn pid(&self) -> u32 {
        let file = match self.service {
            Service::Mqtt => self.dir.join("mosquitto.pid"),
            Service::Postgres => self.dir.join("data/postmaster.pid"),
            Service::ClickHouse => self.dir.join("clickhouse.pid"),
        };
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{}: no pid", file.display()))
    }

    /// Freezes it (SIGSTOP): it keeps its sockets but answers nothing, like a hung server.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// Thaws a frozen instance (SIGCONT).
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// Postgres connection string (Postgres instances only).
    #[must_use]
    pub fn pg_url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// HTTP URL (ClickHouse instances only).
    #[must_use]
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn signal(pid: u32, name: &str) {
    let out = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).output().expect("run kill");
    assert!(out.status.success(), "kill -{name} {pid}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        // A frozen instance would not stop.
        if let Ok(text) = std::fs::read_to_string(self.dir.join("clickhouse.pid")) {
            let _ = Command::new("kill").arg("-CONT").arg(text.trim()).output();
        }
        let _ = Command::new(repo_root().join("scripts/stack"))
            .arg("instance-stop")
            .arg(self.service.script_name())
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_service_lets_the_test_go_on() {
        assert!(require(true, "anything"));
    }

    #[test]
    #[should_panic(expected = "TELEMETRY_ALLOW_SKIP")]
    fn a_missing_service_fails_unless_skips_were_asked_for() {
        // The test runner's environment has no TELEMETRY_ALLOW_SKIP (scripts/test never sets it).
        assert!(!skips_allowed(), "run without TELEMETRY_ALLOW_SKIP");
        let _ = require(false, "Mqtt does not answer");
    }

    #[test]
    fn unique_names_are_unique_and_identifier_safe() {
        let (a, b) = (unique_name("t"), unique_name("t"));
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
    }
}
