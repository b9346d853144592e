//! Configuration: a TOML file, then `INGEST_<KEY>` environment variables, then
//! command-line flags (each later source overrides the earlier ones; the
//! layering is `telemetry_settings`', shared with the edge agent). With no
//! file at all the defaults run against `scripts/stack`.

use std::path::PathBuf;

use telemetry_settings::invalid;
pub use telemetry_settings::{ConfigError, Secret};

telemetry_settings::settings! {
    /// Everything the ingest server can be told. Keys are flat so that each has
    /// an obvious environment variable (`INGEST_` + upper case) and flag
    /// (`--` + kebab case).
    pub struct Config;
    /// Per-key overrides: a flag, or its `INGEST_<KEY>` environment variable.
    pub struct Overrides;
    secrets {
        mqtt_password_file => mqtt_password,
        clickhouse_password_file => clickhouse_password,
        api_clickhouse_password_file => api_clickhouse_password,
    }
    /// MQTT broker host.
    mqtt_host: String = "127.0.0.1".into(), env "INGEST_MQTT_HOST";
    /// MQTT broker port.
    mqtt_port: u16 = 21883, env "INGEST_MQTT_PORT";
    /// MQTT client id. Fixed, because the broker keeps this id's persistent
    /// session (subscriptions and unacknowledged messages) across restarts;
    /// every ingest server needs its own.
    mqtt_client_id: String = "ingest-server".into(), env "INGEST_MQTT_CLIENT_ID";
    /// MQTT user name (empty: connect without credentials).
    mqtt_username: String = String::new(), env "INGEST_MQTT_USERNAME";
    /// MQTT password.
    mqtt_password: Secret = Secret::default(), env "INGEST_MQTT_PASSWORD";
    /// File holding the MQTT password (one trailing newline ignored);
    /// instead of `mqtt_password`.
    mqtt_password_file: PathBuf = PathBuf::new(), env "INGEST_MQTT_PASSWORD_FILE";
    /// Connect to the broker over TLS (needs `mqtt_ca_file`); plain TCP when false.
    mqtt_tls: bool = false, env "INGEST_MQTT_TLS";
    /// PEM file of the CA certificate(s) that sign the broker's certificate.
    mqtt_ca_file: PathBuf = PathBuf::new(), env "INGEST_MQTT_CA_FILE";
    /// PEM client certificate chain, for brokers that require one (with
    /// `mqtt_client_key_file`).
    mqtt_client_cert_file: PathBuf = PathBuf::new(), env "INGEST_MQTT_CLIENT_CERT_FILE";
    /// PEM private key of the client certificate.
    mqtt_client_key_file: PathBuf = PathBuf::new(), env "INGEST_MQTT_CLIENT_KEY_FILE";
    /// MQTT keep-alive in seconds. The server keeps polling (and pinging)
    /// the broker while ClickHouse is slow or down; inflow is bounded by the
    /// broker's in-flight limit for this client, not by going silent.
    mqtt_keep_alive_secs: u64 = 30, env "INGEST_MQTT_KEEP_ALIVE_SECS";
    /// Topic prefix: batches arrive on `<prefix>/client/<client_id>`, acks
    /// go to `<prefix>/ack/<client_id>`, status on `<prefix>/status/<client_id>`.
    topic_prefix: String = "/telemetry".into(), env "INGEST_TOPIC_PREFIX";
    /// Shared-subscription group (empty: none): when set, batches are subscribed as
    /// `$share/<group>/<prefix>/client/+` so several servers split the load.
    shared_group: String = String::new(), env "INGEST_SHARED_GROUP";
    /// Largest accepted MQTT packet / batch payload in bytes (both directions).
    max_payload_bytes: usize = 16 << 20, env "INGEST_MAX_PAYLOAD_BYTES";
    /// ClickHouse HTTP URL.
    clickhouse_url: String = "http://127.0.0.1:28123".into(), env "INGEST_CLICKHOUSE_URL";
    /// ClickHouse database holding every table (created if missing).
    clickhouse_database: String = "telemetry".into(), env "INGEST_CLICKHOUSE_DATABASE";
    /// ClickHouse user.
    clickhouse_user: String = "default".into(), env "INGEST_CLICKHOUSE_USER";
    /// ClickHouse password.
    clickhouse_password: Secret = Secret::default(), env "INGEST_CLICKHOUSE_PASSWORD";
    /// File holding the ClickHouse password (one trailing newline ignored);
    /// instead of `clickhouse_password`.
    clickhouse_password_file: PathBuf = PathBuf::new(), env "INGEST_CLICKHOUSE_PASSWORD_FILE";
    /// ClickHouse cluster (a name in the servers' `remote_servers`; empty:
    /// a single server, the default). When set, every table is created in
    /// its cluster form: a `Replicated*MergeTree` table `<name>_local` on
    /// every node (`ON CLUSTER`, the `{shard}` and `{replica}` macros) and
    /// a `Distributed` table under the table's own name, sharded by
    /// `cityHash64(client_id)`; the server inserts through the `Distributed`
    /// tables with `insert_distributed_sync = 1` (see
    /// `deploy/clickhouse-schema.md`, "On a cluster").
    clickhouse_cluster: String = String::new(), env "INGEST_CLICKHOUSE_CLUSTER";
    /// Retention of raw readings in days (0: keep forever). Applied as a
    /// table TTL on ClickHouse versions that have TTL (not 18.16).
    retention_days: u32 = 0, env "INGEST_RETENTION_DAYS";
    /// Flush a batch when it holds this many new readings.
    batch_max_rows: usize = 200_000, env "INGEST_BATCH_MAX_ROWS";
    /// Flush a batch at the latest this many milliseconds after its first message.
    batch_max_delay_ms: u64 = 1000, env "INGEST_BATCH_MAX_DELAY_MS";
    /// Flush a batch when it holds this many MQTT messages not yet acked.
    /// The broker's `max_inflight_messages` for this client should be at
    /// least `(max_inflight_inserts + 1) * batch_max_messages`: below that
    /// the broker stops sending before a flush triggers and batches wait for
    /// the timer; that limit (not 0 = unlimited) is also what bounds the
    /// server's memory while ClickHouse is slow.
    batch_max_messages: usize = 10_000, env "INGEST_BATCH_MAX_MESSAGES";
    /// Flush a batch when its payloads hold this many bytes.
    batch_max_bytes: usize = 32 << 20, env "INGEST_BATCH_MAX_BYTES";
    /// Inserts (batches) in flight at once; beyond it new messages wait in
    /// memory (bounded by the broker's in-flight limit) while the MQTT
    /// connection keeps being polled.
    max_inflight_inserts: usize = 2, env "INGEST_MAX_INFLIGHT_INSERTS";
    /// First retry delay after a failed insert, in milliseconds.
    retry_min_ms: u64 = 100, env "INGEST_RETRY_MIN_MS";
    /// Longest retry delay, in milliseconds (exponential backoff with jitter).
    retry_max_ms: u64 = 5000, env "INGEST_RETRY_MAX_MS";
    /// Timeout of one ClickHouse request, in seconds.
    insert_timeout_secs: u64 = 60, env "INGEST_INSERT_TIMEOUT_SECS";
    /// Refusals with an error code of no known meaning (not outages, not
    /// known overload) after which a job's readings insert is bisected to
    /// the messages ClickHouse refuses; those are dead-lettered, the rest
    /// stored.
    insert_retry_budget: u32 = 3, env "INGEST_INSERT_RETRY_BUDGET";
    /// Milliseconds between two rollup passes (each folds the closed
    /// minutes with pending markers into `readings_1m`).
    rollup_interval_ms: u64 = 2000, env "INGEST_ROLLUP_INTERVAL_MS";
    /// A minute is folded into `readings_1m` once this many seconds passed
    /// since its start (70: its end plus 10 s for stragglers). Until then it
    /// is answered from raw rows. Later readings re-open it; it is folded
    /// in again. 0 folds in every minute at every pass (tests).
    rollup_after_secs: u64 = 70, env "INGEST_ROLLUP_AFTER_SECS";
    /// A closed minute that is still getting readings (a replayed backlog
    /// arriving batch after batch) is folded once it had no new readings
    /// for this many seconds, or at the latest 60 s after the first of
    /// them: recomputed once, not at every pass. A minute whose readings
    /// came while it was open is folded when it closes, as before. 0 folds
    /// at the next pass (tests).
    rollup_quiet_secs: u64 = 5, env "INGEST_ROLLUP_QUIET_SECS";
    /// Rollup markers written by another ingest server are folded in by this
    /// one once they are this many seconds old by ClickHouse's clock (that
    /// server may be gone). Keep it the same on every server of one
    /// database: a server relies on its own unread markers for half of its
    /// own value, and a peer with a much smaller one could take them sooner.
    rollup_orphan_secs: u64 = 300, env "INGEST_ROLLUP_ORPHAN_SECS";
    /// With `clickhouse_cluster`: a rollup pass folds in only readings
    /// inserted at least this many seconds before it reads them, and reads
    /// them from a replica at most 1 s behind (ClickHouse's
    /// `max_replica_delay_for_distributed_queries`), so a replica that
    /// missed recent inserts (restarted after a failover, fetches stuck) is
    /// never the one a minute is folded from. At least 3 (one second of
    /// delay, one of rounding, one for the nodes' clocks); ignored on a
    /// single server.
    cluster_replica_settle_secs: u64 = 5, env "INGEST_CLUSTER_REPLICA_SETTLE_SECS";
    /// Days the server remembers exactly which seq ranges it stored (the
    /// dedup horizon): ranges are loaded at start from this far back,
    /// streams idle this long are forgotten in memory, and older monthly
    /// partitions of `ingested_ranges` are dropped. A replay older than that
    /// is inserted again; the raw table's identity still counts it once.
    dedup_horizon_days: u32 = 7, env "INGEST_DEDUP_HORIZON_DAYS";
    /// On shutdown, how long to keep trying to flush and ack, in seconds.
    shutdown_timeout_secs: u64 = 30, env "INGEST_SHUTDOWN_TIMEOUT_SECS";
    /// Address of the HTTP listener for the dashboard (`/`), the JSON API
    /// (`/api/`), `/metrics` and `/healthz` (empty: no listener).
    http_address: String = String::new(), env "INGEST_HTTP_ADDRESS";
    /// `/api/` requests answered at once; more wait up to 2 s for a slot,
    /// then are refused with 503 `busy` (a refresh storm must not queue work
    /// on the ClickHouse that inserts depend on).
    api_max_concurrent: usize = 4, env "INGEST_API_MAX_CONCURRENT";
    /// ClickHouse user for `/api/` queries (empty: `clickhouse_user`). Give
    /// it a profile with its own limits (see `deploy/clickhouse/users.xml.in`,
    /// user `telemetry_api`).
    api_clickhouse_user: String = String::new(), env "INGEST_API_CLICKHOUSE_USER";
    /// Its password (with an `api_clickhouse_user`).
    api_clickhouse_password: Secret = Secret::default(), env "INGEST_API_CLICKHOUSE_PASSWORD";
    /// Its password from a file.
    api_clickhouse_password_file: PathBuf = PathBuf::new(), env "INGEST_API_CLICKHOUSE_PASSWORD_FILE";
    /// Memory one `/api/` query may use in ClickHouse, bytes
    /// (`max_memory_usage` of its queries).
    api_max_memory_bytes: u64 = 1 << 30, env "INGEST_API_MAX_MEMORY_BYTES";
    /// Threads one `/api/` query may use in ClickHouse (`max_threads`).
    api_max_threads: u32 = 2, env "INGEST_API_MAX_THREADS";
}
impl Config {
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
        let cluster = &self.clickhouse_cluster;
        let cluster_ok = cluster.is_empty()
            || (cluster.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !cluster_ok {
            return Err(invalid("clickhouse_cluster", "must be empty or match [A-Za-z_][A-Za-z0-9_]*"));
        }
        if !cluster.is_empty() && self.cluster_replica_settle_secs < 3 {
            return Err(invalid("cluster_replica_settle_secs", "must be at least 3"));
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            return Err(invalid("topic_prefix", "must be non-empty, without wildcards and without a trailing '/'"));
        }
        if self.shared_group.contains(['/', '+', '#']) {
            return Err(invalid("shared_group", "must not contain '/', '+' or '#'"));
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

    /// The shared-subscription group, if one is set.
    #[must_use]
    pub fn shared_group(&self) -> Option<&str> {
        Some(self.shared_group.as_str()).filter(|g| !g.is_empty())
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
    /// database (and, with `clickhouse_cluster`, in its cluster form), then
    /// exit: for a DBA who creates the tables by hand.
    #[arg(long, value_name = "FLAVOR", value_parser = ["legacy", "current"])]
    pub print_schema: Option<String>,
    #[command(flatten)]
    pub overrides: Overrides,
}

impl Cli {
    /// File (or defaults), then environment and flags, validated.
    ///
    /// # Errors
    /// See [`Config::from_file`] and [`Config::validate`].
    pub fn load(self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), self.overrides)
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
        assert_eq!(c.shared_group(), Some("ingest"));
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
        let c = Config { clickhouse_cluster: "my-cluster".into(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "clickhouse_cluster", .. })));
        let c = Config { topic_prefix: "/t/#".into(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "topic_prefix", .. })));
    }
}
