//! Configuration: a TOML file, then `INGEST_<KEY>` environment variables, then
//! command-line flags (each later source overrides the earlier ones). With no
//! file at all the defaults run against `scripts/stack`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use telemetry_link::Secret;

/// Everything the ingest server can be told. Keys are flat so that each has
/// an obvious environment variable (`INGEST_` + upper case) and flag
/// (`--` + kebab case).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// MQTT broker host.
    pub mqtt_host: String,
    /// MQTT broker port.
    pub mqtt_port: u16,
    /// MQTT client id. Fixed, because the broker keeps this id's persistent
    /// session (subscriptions and unacknowledged messages) across restarts;
    /// every ingest server needs its own.
    pub mqtt_client_id: String,
    /// MQTT user name (empty: connect without credentials).
    pub mqtt_username: String,
    /// MQTT password.
    pub mqtt_password: Secret,
    /// File holding the MQTT password (one trailing newline ignored);
    /// instead of `mqtt_password`.
    pub mqtt_password_file: PathBuf,
    /// Connect to the broker over TLS (needs `mqtt_ca_file`); plain TCP when false.
    pub mqtt_tls: bool,
    /// PEM file of the CA certificate(s) that sign the broker's certificate.
    pub mqtt_ca_file: PathBuf,
    /// PEM client certificate chain, for brokers that require one (with
    /// `mqtt_client_key_file`).
    pub mqtt_client_cert_file: PathBuf,
    /// PEM private key of the client certificate.
    pub mqtt_client_key_file: PathBuf,
    /// MQTT keep-alive in seconds. The server keeps polling (and pinging)
    /// the broker while ClickHouse is slow or down; inflow is bounded by the
    /// broker's in-flight limit for this client, not by going silent.
    pub mqtt_keep_alive_secs: u64,
    /// Topic prefix: batches arrive on `<prefix>/client/<client_id>`, acks
    /// go to `<prefix>/ack/<client_id>`, status on `<prefix>/status/<client_id>`.
    pub topic_prefix: String,
    /// Shared-subscription group: when set, batches are subscribed as
    /// `$share/<group>/<prefix>/client/+` so several servers split the load.
    pub shared_group: Option<String>,
    /// Largest accepted MQTT packet / batch payload in bytes (both directions).
    pub max_payload_bytes: usize,
    /// ClickHouse HTTP URL.
    pub clickhouse_url: String,
    /// ClickHouse database holding every table (created if missing).
    pub clickhouse_database: String,
    /// ClickHouse user.
    pub clickhouse_user: String,
    /// ClickHouse password.
    pub clickhouse_password: Secret,
    /// File holding the ClickHouse password (one trailing newline ignored);
    /// instead of `clickhouse_password`.
    pub clickhouse_password_file: PathBuf,
    /// Retention of raw readings in days (0: keep forever). Applied as a
    /// table TTL on ClickHouse versions that have TTL (not 18.16).
    pub retention_days: u32,
    /// Flush a batch when it holds this many new readings.
    pub batch_max_rows: usize,
    /// Flush a batch at the latest this many milliseconds after its first message.
    pub batch_max_delay_ms: u64,
    /// Flush a batch when it holds this many MQTT messages not yet acked.
    /// The broker's `max_inflight_messages` for this client should be at
    /// least `(max_inflight_inserts + 1) * batch_max_messages`: below that
    /// the broker stops sending before a flush triggers and batches wait for
    /// the timer; that limit (not 0 = unlimited) is also what bounds the
    /// server's memory while ClickHouse is slow.
    pub batch_max_messages: usize,
    /// Flush a batch when its payloads hold this many bytes.
    pub batch_max_bytes: usize,
    /// Inserts (batches) in flight at once; beyond it new messages wait in
    /// memory (bounded by the broker's in-flight limit) while the MQTT
    /// connection keeps being polled.
    pub max_inflight_inserts: usize,
    /// First retry delay after a failed insert, in milliseconds.
    pub retry_min_ms: u64,
    /// Longest retry delay, in milliseconds (exponential backoff with jitter).
    pub retry_max_ms: u64,
    /// Timeout of one ClickHouse request, in seconds.
    pub insert_timeout_secs: u64,
    /// Refusals with an error code of no known meaning (not outages, not
    /// known overload) after which a job's readings insert is bisected to
    /// the messages ClickHouse refuses; those are dead-lettered, the rest
    /// stored.
    pub insert_retry_budget: u32,
    /// Milliseconds between two rollup passes (each folds the closed
    /// minutes with pending markers into `readings_1m`).
    pub rollup_interval_ms: u64,
    /// A minute is folded into `readings_1m` once this many seconds passed
    /// since its start (70: its end plus 10 s for stragglers). Until then it
    /// is answered from raw rows. Later readings re-open it; it is folded
    /// in again. 0 folds in every minute at every pass (tests).
    pub rollup_after_secs: u64,
    /// Rollup markers written by another ingest server are folded in by this
    /// one once they are this many seconds old by ClickHouse's clock (that
    /// server may be gone). Keep it the same on every server of one
    /// database: a server relies on its own unread markers for half of its
    /// own value, and a peer with a much smaller one could take them sooner.
    pub rollup_orphan_secs: u64,
    /// Days the server remembers exactly which seq ranges it stored (the
    /// dedup horizon): ranges are loaded at start from this far back,
    /// streams idle this long are forgotten in memory, and older monthly
    /// partitions of `ingested_ranges` are dropped. A replay older than that
    /// is inserted again; the raw table's identity still counts it once.
    pub dedup_horizon_days: u32,
    /// On shutdown, how long to keep trying to flush and ack, in seconds.
    pub shutdown_timeout_secs: u64,
    /// Address of the HTTP listener for the dashboard (`/`), the JSON API
    /// (`/api/`), `/metrics` and `/healthz` (empty: no listener).
    pub http_address: String,
    /// `/api/` requests answered at once; more wait up to 2 s for a slot,
    /// then are refused with 503 `busy` (a refresh storm must not queue work
    /// on the ClickHouse that inserts depend on).
    pub api_max_concurrent: usize,
    /// ClickHouse user for `/api/` queries (empty: `clickhouse_user`). Give
    /// it a profile with its own limits (see `deploy/clickhouse/users.xml.in`,
    /// user `telemetry_api`).
    pub api_clickhouse_user: String,
    /// Its password (with an `api_clickhouse_user`).
    pub api_clickhouse_password: Secret,
    /// Its password from a file.
    pub api_clickhouse_password_file: PathBuf,
    /// Memory one `/api/` query may use in ClickHouse, bytes
    /// (`max_memory_usage` of its queries).
    pub api_max_memory_bytes: u64,
    /// Threads one `/api/` query may use in ClickHouse (`max_threads`).
    pub api_max_threads: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: 21883,
            mqtt_client_id: "ingest-server".into(),
            mqtt_username: String::new(),
            mqtt_password: Secret::default(),
            mqtt_password_file: PathBuf::new(),
            mqtt_tls: false,
            mqtt_ca_file: PathBuf::new(),
            mqtt_client_cert_file: PathBuf::new(),
            mqtt_client_key_file: PathBuf::new(),
            mqtt_keep_alive_secs: 30,
            topic_prefix: "/telemetry".into(),
            shared_group: None,
            max_payload_bytes: 16 << 20,
            clickhouse_url: "http://127.0.0.1:28123".into(),
            clickhouse_database: "telemetry".into(),
            clickhouse_user: "default".into(),
            clickhouse_password: Secret::default(),
            clickhouse_password_file: PathBuf::new(),
            api_max_concurrent: 4,
            api_clickhouse_user: String::new(),
            api_clickhouse_password: Secret::default(),
            api_clickhouse_password_file: PathBuf::new(),
            api_max_memory_bytes: 1 << 30,
            api_max_threads: 2,
            retention_days: 0,
            batch_max_rows: 200_000,
            batch_max_delay_ms: 1000,
            batch_max_messages: 10_000,
            batch_max_bytes: 32 << 20,
            max_inflight_inserts: 2,
            retry_min_ms: 100,
            retry_max_ms: 5000,
            insert_timeout_secs: 60,
            insert_retry_budget: 3,
            dedup_horizon_days: 7,
            rollup_interval_ms: 2000,
            rollup_after_secs: 70,
            rollup_orphan_secs: 300,
            shutdown_timeout_secs: 30,
            http_address: String::new(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`].
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: toml::de::Error,
    },
    /// A secret file could not be read (the error names the file, never its content).
    #[error("invalid {key}: {source}")]
    SecretFile {
        /// The key naming the file.
        key: &'static str,
        /// Why.
        source: telemetry_link::SecureError,
    },
    /// A value is out of range or malformed.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

impl Config {
    /// Reads a TOML file (missing keys take their defaults).
    ///
    /// # Errors
    /// Unreadable file, bad TOML, unknown keys.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// Bad TOML or unknown keys.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks values that would only fail later, obscurely.
    ///
    /// # Errors
    /// The first invalid key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let db = &self.clickhouse_database;
        let ident_ok = db.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident_ok {
            return Err(invalid("clickhouse_database", "must match [A-Za-z_][A-Za-z0-9_]*"));
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            return Err(invalid("topic_prefix", "must be non-empty, without wildcards and without a trailing '/'"));
        }
        if let Some(group) = &self.shared_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(invalid("shared_group", "must be non-empty, without '/', '+' or '#'"));
            }
        }
        if self.mqtt_client_id.is_empty() {
            return Err(invalid("mqtt_client_id", "must not be empty"));
        }
        for (key, value) in [
            ("batch_max_rows", self.batch_max_rows),
            ("batch_max_messages", self.batch_max_messages),
            ("batch_max_bytes", self.batch_max_bytes),
            ("max_inflight_inserts", self.max_inflight_inserts),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_payload_bytes > telemetry_wire::MAX_PAYLOAD_BYTES {
            return Err(invalid("max_payload_bytes", format!("at most {}", telemetry_wire::MAX_PAYLOAD_BYTES)));
        }
        if self.dedup_horizon_days == 0 {
            return Err(invalid("dedup_horizon_days", "must be at least 1"));
        }
        if self.api_max_concurrent == 0 || self.api_max_threads == 0 {
            return Err(invalid("api_max_concurrent", "api_max_concurrent and api_max_threads must be at least 1"));
        }
        if self.insert_retry_budget == 0 {
            return Err(invalid("insert_retry_budget", "must be at least 1"));
        }
        if self.rollup_interval_ms == 0 {
            return Err(invalid("rollup_interval_ms", "must be at least 1"));
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return Err(invalid("retry_min_ms", "must be > 0 and <= retry_max_ms"));
        }
        if self.mqtt_tls && self.mqtt_ca_file.as_os_str().is_empty() {
            return Err(invalid("mqtt_ca_file", "mqtt_tls needs the CA certificate file of the broker"));
        }
        if self.mqtt_client_cert_file.as_os_str().is_empty() != self.mqtt_client_key_file.as_os_str().is_empty() {
            return Err(invalid(
                "mqtt_client_cert_file",
                "set both mqtt_client_cert_file and mqtt_client_key_file, or neither",
            ));
        }
        Ok(())
    }

    /// Reads every `*_password_file` into its password and clears the file
    /// key (a second call does nothing). A password and its file together
    /// are an error.
    ///
    /// # Errors
    /// Both set, or an unreadable file.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        for (key, file, secret) in [
            ("mqtt_password_file", &mut self.mqtt_password_file, &mut self.mqtt_password),
            ("clickhouse_password_file", &mut self.clickhouse_password_file, &mut self.clickhouse_password),
            ("api_clickhouse_password_file", &mut self.api_clickhouse_password_file, &mut self.api_clickhouse_password),
        ] {
            secret.take_from_file(file).map_err(|error| match error {
                telemetry_link::SecretFileError::Both => ConfigError::Invalid { key, reason: error.to_string() },
                telemetry_link::SecretFileError::Unreadable(source) => ConfigError::SecretFile { key, source },
            })?;
        }
        Ok(())
    }

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
}

/// Command-line flags; each also reads `INGEST_<KEY>` from the environment
/// (clap gives the flag precedence over the variable). Unset ones leave the
/// file's (or default) value alone.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "ingest-server", version, about = "MQTT -> ClickHouse telemetry ingest")]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "INGEST_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "INGEST_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Print the DDL the server would run for this ClickHouse flavour
    /// (`legacy`: before 20.3, e.g. 18.16; `current`) in the configured
    /// database, then exit: for a DBA who creates the tables by hand.
    #[arg(long, value_name = "FLAVOR", value_parser = ["legacy", "current"])]
    pub print_schema: Option<String>,
    #[command(flatten)]
    pub overrides: Overrides,
}

macro_rules! overrides {
    ($($field:ident : $ty:ty => $env:literal),* $(,)?) => {
        /// Per-key overrides (flag or environment variable).
        #[derive(Debug, Default, clap::Args)]
        pub struct Overrides {
            $(
                #[doc = concat!("Overrides `", stringify!($field), "` (see the config file reference).")]
                #[arg(long, env = $env, hide_env_values = true)]
                pub $field: Option<$ty>,
            )*
        }

        impl Overrides {
            /// Applies every set override to `config`.
            pub fn apply(self, config: &mut Config) {
                $( if let Some(v) = self.$field { config.$field = v.into(); } )*
            }
        }
    };
}

overrides! {
    mqtt_host: String => "INGEST_MQTT_HOST",
    mqtt_port: u16 => "INGEST_MQTT_PORT",
    mqtt_client_id: String => "INGEST_MQTT_CLIENT_ID",
    mqtt_username: String => "INGEST_MQTT_USERNAME",
    mqtt_password: Secret => "INGEST_MQTT_PASSWORD",
    mqtt_password_file: PathBuf => "INGEST_MQTT_PASSWORD_FILE",
    mqtt_tls: bool => "INGEST_MQTT_TLS",
    mqtt_ca_file: PathBuf => "INGEST_MQTT_CA_FILE",
    mqtt_client_cert_file: PathBuf => "INGEST_MQTT_CLIENT_CERT_FILE",
    mqtt_client_key_file: PathBuf => "INGEST_MQTT_CLIENT_KEY_FILE",
    mqtt_keep_alive_secs: u64 => "INGEST_MQTT_KEEP_ALIVE_SECS",
    topic_prefix: String => "INGEST_TOPIC_PREFIX",
    shared_group: String => "INGEST_SHARED_GROUP",
    max_payload_bytes: usize => "INGEST_MAX_PAYLOAD_BYTES",
    clickhouse_url: String => "INGEST_CLICKHOUSE_URL",
    clickhouse_database: String => "INGEST_CLICKHOUSE_DATABASE",
    clickhouse_user: String => "INGEST_CLICKHOUSE_USER",
    clickhouse_password: Secret => "INGEST_CLICKHOUSE_PASSWORD",
    clickhouse_password_file: PathBuf => "INGEST_CLICKHOUSE_PASSWORD_FILE",
    retention_days: u32 => "INGEST_RETENTION_DAYS",
    batch_max_rows: usize => "INGEST_BATCH_MAX_ROWS",
    batch_max_delay_ms: u64 => "INGEST_BATCH_MAX_DELAY_MS",
    batch_max_messages: usize => "INGEST_BATCH_MAX_MESSAGES",
    batch_max_bytes: usize => "INGEST_BATCH_MAX_BYTES",
    max_inflight_inserts: usize => "INGEST_MAX_INFLIGHT_INSERTS",
    retry_min_ms: u64 => "INGEST_RETRY_MIN_MS",
    retry_max_ms: u64 => "INGEST_RETRY_MAX_MS",
    insert_timeout_secs: u64 => "INGEST_INSERT_TIMEOUT_SECS",
    insert_retry_budget: u32 => "INGEST_INSERT_RETRY_BUDGET",
    dedup_horizon_days: u32 => "INGEST_DEDUP_HORIZON_DAYS",
    rollup_interval_ms: u64 => "INGEST_ROLLUP_INTERVAL_MS",
    rollup_after_secs: u64 => "INGEST_ROLLUP_AFTER_SECS",
    rollup_orphan_secs: u64 => "INGEST_ROLLUP_ORPHAN_SECS",
    shutdown_timeout_secs: u64 => "INGEST_SHUTDOWN_TIMEOUT_SECS",
    http_address: String => "INGEST_HTTP_ADDRESS",
    api_max_concurrent: usize => "INGEST_API_MAX_CONCURRENT",
    api_clickhouse_user: String => "INGEST_API_CLICKHOUSE_USER",
    api_clickhouse_password: Secret => "INGEST_API_CLICKHOUSE_PASSWORD",
    api_clickhouse_password_file: PathBuf => "INGEST_API_CLICKHOUSE_PASSWORD_FILE",
    api_max_memory_bytes: u64 => "INGEST_API_MAX_MEMORY_BYTES",
    api_max_threads: u32 => "INGEST_API_MAX_THREADS",
}

impl Cli {
    /// File (or defaults), then environment and flags, validated.
    ///
    /// # Errors
    /// See [`Config::from_file`] and [`Config::validate`].
    pub fn load(self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.overrides.apply(&mut config);
        config.validate()?;
        config.resolve_secrets()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_valid_and_match_the_stack() {
        let c = Config::default();
        c.validate().expect("defaults validate");
        assert_eq!(c.mqtt_port, 21883);
        assert_eq!(c.clickhouse_url, "http://127.0.0.1:28123");
        assert_eq!(c.topic_prefix, "/telemetry");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml("mqtt_hots = \"x\"").is_err());
        let c = Config::from_toml("mqtt_port = 1884\nshared_group = \"ingest\"").expect("valid toml");
        assert_eq!(c.mqtt_port, 1884);
        assert_eq!(c.shared_group.as_deref(), Some("ingest"));
        assert_eq!(c.batch_max_rows, Config::default().batch_max_rows);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("ingest_cfg_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ingest.toml");
        std::fs::write(&path, "mqtt_port = 1000\nbatch_max_rows = 5\n").expect("write config");
        let cli = Cli::try_parse_from([
            "ingest-server",
            "--config",
            path.to_str().expect("utf-8 temp path"),
            "--mqtt-port",
            "2000",
        ])
        .expect("flags parse");
        let c = cli.load().expect("config loads");
        assert_eq!(c.mqtt_port, 2000);
        assert_eq!(c.batch_max_rows, 5);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config { clickhouse_password: Secret::new("hunter2"), ..Config::default() };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Secret(***)"));
    }

    #[test]
    fn password_files_fill_the_secret_and_exclude_the_inline_password() {
        let dir = std::env::temp_dir().join(format!("ingest_cfg_secret_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("ch.pw");
        std::fs::write(&file, "ch-secret\n").expect("write secret");
        let mut c = Config { clickhouse_password_file: file.clone(), ..Config::default() };
        c.resolve_secrets().expect("file read");
        assert_eq!(c.clickhouse_password.expose(), "ch-secret");
        let mut both = Config { mqtt_password_file: file, mqtt_password: Secret::new("x"), ..Config::default() };
        assert!(matches!(both.resolve_secrets(), Err(ConfigError::Invalid { key: "mqtt_password_file", .. })));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secrets_from_the_environment_are_hidden_in_help() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--mqtt-password-file") && help.contains("--mqtt-tls"), "{help}");
        // hide_env_values: `[env: INGEST_MQTT_PASSWORD=<value>]` is never shown.
        let overrides = Cli::command();
        let mut keys = overrides.get_arguments().filter(|a| a.get_id() != "config" && a.get_id() != "log_format");
        assert!(keys.all(|a| a.is_hide_env_values_set() || a.get_env().is_none()));
    }

    #[test]
    fn tls_needs_a_ca_file() {
        let c = Config { mqtt_tls: true, ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "mqtt_ca_file", .. })));
    }

    #[test]
    fn bad_values_are_named() {
        let c = Config { clickhouse_database: "a-b".into(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "clickhouse_database", .. })));
        let c = Config { topic_prefix: "/t/#".into(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "topic_prefix", .. })));
    }
}
