//! Configuration: one TOML file, every key also an environment variable
//! (`EDGE_AGENT_<KEY>`) and a flag (`--<key>`). Precedence: defaults < file <
//! environment < flags (the layering is `telemetry_settings`', shared with the
//! ingest server). The defaults run against `scripts/stack` with no file.
//!
//! Keys are flat (`mqtt_port`, not `[mqtt] port`) so that the file, the
//! environment and the flags name every setting the same way.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use telemetry_settings::{ConfigError, Secret};

/// Which stream encoding a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CodecChoice {
    /// Detect from the first bytes: a binary frame's 4th byte is 0 (frames
    /// are < 16 MiB), a JSON line's is printable.
    Auto,
    /// Length-delimited bincode frames only.
    Bincode,
    /// JSON lines only.
    Json,
}

/// A listening socket: `tcp://host:port` or `unix:///path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP.
    Tcp(String),
    /// Unix domain socket (an existing socket file is replaced).
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp://").filter(|a| a.contains(':')) {
            Ok(Self::Tcp(a.to_owned()))
        } else if let Some(p) = s.strip_prefix("unix://").filter(|p| !p.is_empty()) {
            Ok(Self::Unix(PathBuf::from(p)))
        } else {
            Err(format!("{s:?} is neither tcp://host:port nor unix:///path"))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a row in the outbox waits for before it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmMode {
    /// The broker routed the batch back to us on our own topic.
    Echo,
    /// The ingest server stored it in ClickHouse (end-to-end, no loss window).
    Ingest,
}

/// How batches are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Plain bincode (version 1): every ingest server reads it.
    None,
    /// zstd-compressed (version 2), for constrained links; needs an ingest
    /// server that reads version 2 (this one does).
    Zstd,
}

/// In what order the outbox is published again after a (re)connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReplayOrder {
    /// The backlog first, oldest row first, then live readings.
    #[value(alias = "oldest_first")]
    OldestFirst,
    /// Live readings as they come, the backlog behind them (oldest first)
    /// whenever the window has room: dashboards see the present at once.
    #[value(alias = "live_first")]
    LiveFirst,
}

/// What happens when the outbox reaches its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPolicy {
    /// Stop reading sensor sockets until rows are confirmed (nothing lost).
    Backpressure,
    /// Delete the oldest rows to make room (counted as dropped).
    #[value(alias = "drop_oldest")]
    DropOldest,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

telemetry_settings::settings! {
    /// The agent's configuration; see the module docs for how it is layered.
    pub struct Config;
    /// Environment variables and flags; each overrides the file's key of
    /// the same name.
    pub struct Overrides;
    secrets {
        mqtt_password_file => mqtt_password,
        postgres_password_file => postgres_password,
    }
    /// This device's id: the last level of its MQTT topics, 1–64 of [A-Za-z0-9_.-].
    client_id: String = "edge-1".into(), env "EDGE_AGENT_CLIENT_ID";
    /// Sockets to accept sensors on (repeat the flag, or comma-separate).
    listen: Vec<ListenAddr> = vec![ListenAddr::Tcp("127.0.0.1:7878".into())], env "EDGE_AGENT_LISTEN", arg(value_delimiter = ',');
    /// Stream encoding accepted on every listener.
    codec: CodecChoice = CodecChoice::Auto, env "EDGE_AGENT_CODEC", arg(value_enum);
    /// Most sensor connections at once; further ones wait in the accept queue.
    max_connections: usize = 1024, env "EDGE_AGENT_MAX_CONNECTIONS";
    /// Largest sensor frame (and JSON line) in bytes.
    max_frame_bytes: usize = telemetry_wire::DEFAULT_MAX_FRAME_BYTES, env "EDGE_AGENT_MAX_FRAME_BYTES";
    /// Close a sensor connection that sends nothing for this many seconds.
    idle_timeout_secs: u64 = 300, env "EDGE_AGENT_IDLE_TIMEOUT_SECS";
    /// Reject readings stamped further than this into the future.
    max_future_skew_secs: u64 = 86_400, env "EDGE_AGENT_MAX_FUTURE_SKEW_SECS";
    /// Reject readings stamped further than this into the past (0: accept
    /// any age down to the year 2000). A sensor whose clock reset at boot
    /// otherwise sends readings from another decade.
    max_past_skew_secs: u64 = 0, env "EDGE_AGENT_MAX_PAST_SKEW_SECS";
    /// Postgres connection string of the outbox (key=value or URL form).
    postgres_url: String = "host=127.0.0.1 port=25432 user=postgres dbname=postgres".into(), env "EDGE_AGENT_POSTGRES_URL";
    /// Postgres password, if the connection string has none.
    postgres_password: Secret = Secret::default(), env "EDGE_AGENT_POSTGRES_PASSWORD";
    /// File holding the Postgres password (one trailing newline ignored); instead of `postgres_password`.
    postgres_password_file: PathBuf = PathBuf::new(), env "EDGE_AGENT_POSTGRES_PASSWORD_FILE";
    /// Postgres schema holding the outbox tables.
    postgres_schema: String = "edge_agent".into(), env "EDGE_AGENT_POSTGRES_SCHEMA";
    /// Commit a transaction once this many readings are waiting...
    commit_max_rows: usize = 5000, env "EDGE_AGENT_COMMIT_MAX_ROWS";
    /// ...or once the oldest waiting reading is this many milliseconds old.
    commit_max_delay_ms: u64 = 2, env "EDGE_AGENT_COMMIT_MAX_DELAY_MS";
    /// MQTT broker host.
    mqtt_host: String = "127.0.0.1".into(), env "EDGE_AGENT_MQTT_HOST";
    /// MQTT broker port.
    mqtt_port: u16 = 21883, env "EDGE_AGENT_MQTT_PORT";
    /// MQTT client id (default: `edge-agent-<client_id>`).
    mqtt_client_id: String = String::new(), env "EDGE_AGENT_MQTT_CLIENT_ID";
    /// MQTT user name (empty: anonymous).
    mqtt_username: String = String::new(), env "EDGE_AGENT_MQTT_USERNAME";
    /// MQTT password.
    mqtt_password: Secret = Secret::default(), env "EDGE_AGENT_MQTT_PASSWORD";
    /// File holding the MQTT password (one trailing newline ignored); instead of `mqtt_password`.
    mqtt_password_file: PathBuf = PathBuf::new(), env "EDGE_AGENT_MQTT_PASSWORD_FILE";
    /// Connect to the broker over TLS (needs `mqtt_ca_file`); plain TCP when false.
    mqtt_tls: bool = false, env "EDGE_AGENT_MQTT_TLS";
    /// PEM file of the CA certificate(s) that sign the broker's certificate (TLS only).
    mqtt_ca_file: PathBuf = PathBuf::new(), env "EDGE_AGENT_MQTT_CA_FILE";
    /// PEM client certificate chain, for brokers that require one (TLS only; with `mqtt_client_key_file`).
    mqtt_client_cert_file: PathBuf = PathBuf::new(), env "EDGE_AGENT_MQTT_CLIENT_CERT_FILE";
    /// PEM private key of the client certificate (TLS only).
    mqtt_client_key_file: PathBuf = PathBuf::new(), env "EDGE_AGENT_MQTT_CLIENT_KEY_FILE";
    /// MQTT keep-alive in seconds.
    mqtt_keep_alive_secs: u64 = 15, env "EDGE_AGENT_MQTT_KEEP_ALIVE_SECS";
    /// Largest MQTT packet, both directions; must exceed the largest batch.
    mqtt_max_packet_bytes: usize = 4 << 20, env "EDGE_AGENT_MQTT_MAX_PACKET_BYTES";
    /// Topic prefix: batches go to `<prefix>/client/<client_id>`.
    topic_prefix: String = "/telemetry".into(), env "EDGE_AGENT_TOPIC_PREFIX";
    /// Most readings per published batch.
    batch_max_readings: usize = 2000, env "EDGE_AGENT_BATCH_MAX_READINGS";
    /// Most payload bytes per published batch.
    batch_max_bytes: usize = 256 << 10, env "EDGE_AGENT_BATCH_MAX_BYTES";
    /// Batch encoding on the wire: `none` or `zstd` (smaller, for constrained
    /// links; costs CPU on both ends).
    compression: Compression = Compression::None, env "EDGE_AGENT_COMPRESSION", arg(value_enum);
    /// Wait up to this many milliseconds for a partial batch to fill (0: publish at once).
    batch_linger_ms: u64 = 20, env "EDGE_AGENT_BATCH_LINGER_MS";
    /// Batches published but not yet confirmed, at most. With `confirm =
    /// "ingest"` a confirmation takes an ingest round trip (the server's batch
    /// timer, about 1 s, plus its insert): an agent confirms at most
    /// `window * batch_max_readings` readings per round trip, 128,000 with
    /// the defaults.
    window: usize = 64, env "EDGE_AGENT_WINDOW";
    /// What confirms a batch: its echo on our own topic, or the ingest ack.
    confirm: ConfirmMode = ConfirmMode::Echo, env "EDGE_AGENT_CONFIRM", arg(value_enum);
    /// In echo mode, delete on echo only while an ingest server announces a
    /// durable subscription (retained on `<prefix>/ingest/+`); until one does,
    /// echoed batches stay in the outbox and are published again when it
    /// appears. `false`: any echo deletes (a consumer other than this
    /// pipeline's ingest server).
    echo_wait_for_ingest: bool = true, env "EDGE_AGENT_ECHO_WAIT_FOR_INGEST";
    /// In echo mode, readings echoed (deleted here) but not yet acked by an
    /// ingest server, at most: beyond it the agent stops publishing, so a
    /// lagging centre makes the durable outbox grow, not the broker's
    /// memory (0: no limit).
    echo_ahead_max_readings: u64 = 200_000, env "EDGE_AGENT_ECHO_AHEAD_MAX_READINGS";
    /// The same bound in bytes of batch payload (0: no limit).
    echo_ahead_max_bytes: u64 = 16 << 20, env "EDGE_AGENT_ECHO_AHEAD_MAX_BYTES";
    /// Echoed readings with no ingest ack after this many seconds stop
    /// counting against the bound (counted and logged: the broker may have
    /// lost them).
    echo_ahead_timeout_secs: u64 = 600, env "EDGE_AGENT_ECHO_AHEAD_TIMEOUT_SECS";
    /// After a (re)connect: `oldest_first` (the backlog, then live
    /// readings) or `live_first` (live readings at once, the backlog behind).
    replay_order: ReplayOrder = ReplayOrder::OldestFirst, env "EDGE_AGENT_REPLAY_ORDER", arg(value_enum);
    /// Most backlog readings replayed per second after a (re)connect (0: no
    /// limit), so that a long outage's backlog does not swamp the link or
    /// the centre; live readings are not limited.
    replay_max_rate: u64 = 0, env "EDGE_AGENT_REPLAY_MAX_RATE";
    /// Publish a batch again when unconfirmed after this many milliseconds
    /// (each further republish of it waits twice as long, at most 16×).
    confirm_timeout_ms: u64 = 5000, env "EDGE_AGENT_CONFIRM_TIMEOUT_MS";
    /// Outbox quota in rows.
    quota_rows: u64 = 50_000_000, env "EDGE_AGENT_QUOTA_ROWS";
    /// Outbox quota in bytes of reading data (sensor name + 24 per row).
    quota_bytes: u64 = 4 << 30, env "EDGE_AGENT_QUOTA_BYTES";
    /// At quota: back-pressure (default, nothing lost) or drop the oldest.
    quota_policy: QuotaPolicy = QuotaPolicy::Backpressure, env "EDGE_AGENT_QUOTA_POLICY", arg(value_enum);
    /// Publish a retained status message every this many seconds (0: never).
    status_interval_secs: u64 = 5, env "EDGE_AGENT_STATUS_INTERVAL_SECS";
    /// On SIGTERM/ctrl-c, wait at most this long for confirmations.
    shutdown_timeout_secs: u64 = 10, env "EDGE_AGENT_SHUTDOWN_TIMEOUT_SECS";
    /// HTTP address for /metrics and /healthz (empty: no HTTP listener).
    http_listen: String = "127.0.0.1:9101".into(), env "EDGE_AGENT_HTTP_LISTEN";
    /// Log format.
    log_format: LogFormat = LogFormat::Text, env "EDGE_AGENT_LOG_FORMAT", arg(value_enum);
    /// Take remote commands on `<prefix>/cmd/<client_id>` (status, flush,
    /// pause/resume intake, log level, reload) and answer on
    /// `<prefix>/cmd-reply/<client_id>`. Who may send them is the broker's
    /// ACL (see `deploy/mosquitto-acl.in`).
    remote_commands: bool = true, env "EDGE_AGENT_REMOTE_COMMANDS";
}

impl Config {
    /// The TLS files, when `mqtt_tls` is on.
    #[must_use]
    pub fn mqtt_tls_files(&self) -> Option<telemetry_link::TlsFiles> {
        telemetry_link::TlsFiles::from_settings(
            self.mqtt_tls,
            &self.mqtt_ca_file,
            &self.mqtt_client_cert_file,
            &self.mqtt_client_key_file,
        )
    }

    /// Checks ranges and relations between keys.
    ///
    /// # Errors
    /// The first invalid key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.to_owned() });
        if let Err(e) = telemetry_wire::batch::validate_client_id(&self.client_id) {
            return invalid("client_id", &e.to_string());
        }
        if self.listen.is_empty() {
            return invalid("listen", "at least one listener is needed");
        }
        if self.max_frame_bytes < 16 || self.max_frame_bytes >= telemetry_wire::MAX_PAYLOAD_BYTES {
            return invalid("max_frame_bytes", "must be between 16 bytes and 16 MiB");
        }
        if self.batch_max_readings == 0 || self.window == 0 || self.max_connections == 0 || self.commit_max_rows == 0 {
            return invalid("batch_max_readings/window/max_connections/commit_max_rows", "must be positive");
        }
        if self.batch_max_bytes + 4096 > self.mqtt_max_packet_bytes {
            return invalid("mqtt_max_packet_bytes", "must exceed batch_max_bytes by at least 4 KiB");
        }
        if !self.postgres_schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            || self.postgres_schema.is_empty()
        {
            return invalid("postgres_schema", "must be a plain lower-case identifier");
        }
        if self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            return invalid("topic_prefix", "no wildcards and no trailing slash");
        }
        if self.mqtt_tls && self.mqtt_ca_file.as_os_str().is_empty() {
            return invalid("mqtt_ca_file", "mqtt_tls needs the CA certificate file of the broker");
        }
        if self.mqtt_client_cert_file.as_os_str().is_empty() != self.mqtt_client_key_file.as_os_str().is_empty() {
            return invalid(
                "mqtt_client_cert_file",
                "set both mqtt_client_cert_file and mqtt_client_key_file, or neither",
            );
        }
        Ok(())
    }

    /// The MQTT client id actually used.
    #[must_use]
    pub fn mqtt_client_id(&self) -> String {
        if self.mqtt_client_id.is_empty() {
            format!("edge-agent-{}", self.client_id)
        } else {
            self.mqtt_client_id.clone()
        }
    }

    /// `<prefix>/client/<client_id>`: where batches go (and echo from).
    #[must_use]
    pub fn data_topic(&self) -> String {
        format!("{}/client/{}", self.topic_prefix, self.client_id)
    }

    /// `<prefix>/ack/<client_id>`: where the ingest server confirms.
    #[must_use]
    pub fn ack_topic(&self) -> String {
        format!("{}/ack/{}", self.topic_prefix, self.client_id)
    }

    /// `<prefix>/ingest/+`: the ingest servers' retained presence announcements.
    #[must_use]
    pub fn presence_filter(&self) -> String {
        format!("{}/ingest/+", self.topic_prefix)
    }

    /// `<prefix>/status/<client_id>`: the retained status message.
    #[must_use]
    pub fn status_topic(&self) -> String {
        format!("{}/status/{}", self.topic_prefix, self.client_id)
    }

    /// `<prefix>/cmd/<client_id>`: remote commands to this agent.
    #[must_use]
    pub fn command_topic(&self) -> String {
        format!("{}/cmd/{}", self.topic_prefix, self.client_id)
    }

    /// `<prefix>/cmd-reply/<client_id>`: this agent's answers.
    #[must_use]
    pub fn command_reply_topic(&self) -> String {
        format!("{}/cmd-reply/{}", self.topic_prefix, self.client_id)
    }

    /// Commit delay as a duration.
    #[must_use]
    pub fn commit_max_delay(&self) -> Duration {
        Duration::from_millis(self.commit_max_delay_ms)
    }

    /// Confirm timeout as a duration.
    #[must_use]
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_file_sets_keys_and_overrides_win() {
        let mut c = Config::from_toml(
            "client_id = \"dev-7\"\nlisten = [\"unix:///tmp/a.sock\", \"tcp://0.0.0.0:1\"]\nconfirm = \"ingest\"\nmqtt_password = \"hunter2\"",
        )
        .unwrap();
        assert_eq!(c.client_id, "dev-7");
        assert_eq!(c.listen[0], ListenAddr::Unix("/tmp/a.sock".into()));
        assert_eq!(c.confirm, ConfirmMode::Ingest);
        c.apply(Overrides { client_id: Some("dev-8".into()), ..Overrides::default() });
        assert_eq!(c.client_id, "dev-8");
        assert_eq!(c.mqtt_client_id(), "edge-agent-dev-8");
    }

    #[test]
    fn multiword_values_are_spelt_the_same_in_the_file_and_on_the_command_line() {
        use clap::ValueEnum;
        assert_eq!(ReplayOrder::from_str("live_first", false), Ok(ReplayOrder::LiveFirst));
        assert_eq!(ReplayOrder::from_str("live-first", false), Ok(ReplayOrder::LiveFirst));
        assert_eq!(QuotaPolicy::from_str("drop_oldest", false), Ok(QuotaPolicy::DropOldest));
        assert_eq!(Config::from_toml("replay_order = \"live_first\"").unwrap().replay_order, ReplayOrder::LiveFirst);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml("clientid = \"x\"").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_toml("mqtt_password = \"hunter2\"\npostgres_password = \"s3cret\"").unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("s3cret"), "{printed}");
    }

    #[test]
    fn password_files_fill_the_secret_and_exclude_the_inline_password() {
        let dir = std::env::temp_dir().join(format!("edge_cfg_secret_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mqtt.pw");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let mut c = Config { mqtt_password_file: file.clone(), ..Config::default() };
        c.resolve_secrets().unwrap();
        assert_eq!(c.mqtt_password.expose(), "from-a-file");
        c.resolve_secrets().unwrap();
        let mut both = Config { mqtt_password_file: file, mqtt_password: "x".parse().unwrap(), ..Config::default() };
        assert!(matches!(both.resolve_secrets(), Err(ConfigError::Invalid { key: "mqtt_password_file", .. })));
        let mut missing = Config { postgres_password_file: dir.join("nope"), ..Config::default() };
        let error = missing.resolve_secrets().unwrap_err().to_string();
        assert!(error.contains("postgres_password_file") && error.contains("nope"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tls_needs_a_ca_file_and_client_auth_needs_both_files() {
        let c = Config { mqtt_tls: true, ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "mqtt_ca_file", .. })));
        let c = Config { mqtt_tls: true, mqtt_ca_file: "ca.pem".into(), ..Config::default() };
        c.validate().unwrap();
        assert_eq!(c.mqtt_tls_files().unwrap().client_cert, None);
        let c = Config { mqtt_client_cert_file: "c.pem".into(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "mqtt_client_cert_file", .. })));
    }

    #[test]
    fn invalid_values_name_their_key() {
        let c = Config { client_id: "a/b".into(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "client_id", .. })));
        let c = Config { batch_max_bytes: 4 << 20, ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "mqtt_max_packet_bytes", .. })));
    }
}
