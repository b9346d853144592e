//! The ClickHouse schema, created at start, idempotently
//! (`CREATE ... IF NOT EXISTS`), in one of two flavours picked from the
//! server's version. `deploy/clickhouse-schema.md` explains every table.
//!
//! - [`Flavor::Legacy`] (ClickHouse < 20.3, e.g. Debian's 18.16): no
//!   `DateTime64`, codecs or TTL. `ts` is an `Int64` of microseconds and a
//!   `MATERIALIZED` `DateTime` column (`dt`) serves partitioning.
//! - [`Flavor::Current`]: `ts` is `DateTime64(6, 'UTC')` with
//!   `DoubleDelta`/`Gorilla` + ZSTD codecs, `LowCardinality` names and an
//!   optional TTL (`retention_days`).
//!
//! `DateTime64(6)` travels in RowBinary as an `Int64` of microseconds, so the
//! writer's row types are the same for both flavours; only the SQL differs.
//!
//! `CREATE ... IF NOT EXISTS` leaves an existing table as it is. Columns a
//! later release adds to an existing table are listed in
//! [`ADDED_STATUS_COLUMNS`] and added by [`ensure`] when missing (the only
//! ones so far: the agents' backlog outlook, echo state and last remote
//! command in `agent_status`).

use clickhouse::Client;

/// Which DDL and SQL dialect the server gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// ClickHouse before 20.3 (no DateTime64, codecs, TTL).
    Legacy,
    /// ClickHouse 20.3 and later.
    Current,
}

impl Flavor {
    /// The flavour for a `version()` string such as `18.16.1` or `24.8.4.13`.
    #[must_use]
    pub fn for_version(version: &str) -> Self {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        if (major, minor) >= (20, 3) {
            Self::Current
        } else {
            Self::Legacy
        }
    }

    /// SQL for "the `DateTime` of the minute of `ts`".
    #[must_use]
    pub fn minute_of_ts(self) -> &'static str {
        match self {
            Self::Legacy => "toStartOfMinute(toDateTime(intDiv(ts, 1000000)))",
            Self::Current => "toDateTime(toStartOfMinute(ts))",
        }
    }

    /// SQL for "the microseconds of `ts` since its minute began", a
    /// `UInt32`: within one minute it tells readings apart as `ts` does,
    /// and a set of them takes half the memory.
    #[must_use]
    pub fn micros_in_minute(self) -> &'static str {
        match self {
            Self::Legacy => "toUInt32(ts % 60000000)",
            Self::Current => "toUInt32(toUnixTimestamp64Micro(ts) % 60000000)",
        }
    }

    /// SQL turning a bound microsecond integer (`?`) into a value comparable with `ts`.
    #[must_use]
    pub fn ts_param(self) -> &'static str {
        match self {
            Self::Legacy => "toInt64(?)",
            Self::Current => "fromUnixTimestamp64Micro(toInt64(?), 'UTC')",
        }
    }
}

/// Names of the tables, fully qualified with the configured database.
#[derive(Debug, Clone)]
pub struct Tables {
    /// The database.
    pub database: String,
    /// `<db>.readings`
    pub readings: String,
    /// `<db>.readings_1m`
    pub readings_1m: String,
    /// `<db>.ingested_ranges`
    pub ingested_ranges: String,
    /// `<db>.ingest_errors`
    pub ingest_errors: String,
    /// `<db>.agent_status`
    pub agent_status: String,
    /// `<db>.rollup_queue`: minutes whose rollup is pending (see [`crate::rollup`]).
    pub rollup_queue: String,
    /// `<db>.readings_1m_live`: the view of the exact rollup including open minutes.
    pub readings_1m_live: String,
    /// The ClickHouse cluster (`clickhouse_cluster`), if the tables are in
    /// their cluster form: every name above is then a `Distributed` table
    /// (the view: a view over them) in front of `<name>_local`
    /// ([`Tables::local`]).
    pub cluster: Option<String>,
}

impl Tables {
    /// Table names in `database` (already validated as a plain identifier).
    #[must_use]
    pub fn new(database: &str) -> Self {
        let q = |t: &str| format!("`{database}`.`{t}`");
        Self {
            database: database.to_owned(),
            readings: q("readings"),
            readings_1m: q("readings_1m"),
            ingested_ranges: q("ingested_ranges"),
            ingest_errors: q("ingest_errors"),
            agent_status: q("agent_status"),
            rollup_queue: q("rollup_queue"),
            readings_1m_live: q("readings_1m_live"),
            cluster: None,
        }
    }

    /// The same tables in their cluster form on `cluster` (already
    /// validated as a plain identifier); an empty name: a single server.
    #[must_use]
    pub fn on_cluster(mut self, cluster: &str) -> Self {
        self.cluster = Some(cluster.to_owned()).filter(|c| !c.is_empty());
        self
    }

    /// The tables of `config`: its database, and its cluster if set.
    #[must_use]
    pub fn for_config(config: &crate::config::Config) -> Self {
        Self::new(&config.clickhouse_database).on_cluster(&config.clickhouse_cluster)
    }

    /// `<db>.<name>_local`: in the cluster form, the replicated table on
    /// each node behind the `Distributed` table `name`.
    #[must_use]
    pub fn local(&self, name: &str) -> String {
        format!("`{}`.`{name}_local`", self.database)
    }

    /// ` ON CLUSTER <cluster>` in the cluster form, else nothing: 18.16
    /// wants it right after the table's name.
    #[must_use]
    pub fn on_cluster_clause(&self) -> String {
        self.cluster.as_ref().map_or_else(String::new, |c| format!(" ON CLUSTER {c}"))
    }

    /// `IN`, or `GLOBAL IN` in the cluster form: a subquery over a
    /// `Distributed` table inside a query over another one is refused by
    /// default ("Double-distributed IN/JOIN subqueries is denied",
    /// `distributed_product_mode = 'deny'`); `GLOBAL` runs it once, on the
    /// node that got the query, and ships its result to the shards, which
    /// is also what the single-server form means (the set read once).
    #[must_use]
    pub fn in_subquery(&self) -> &'static str {
        if self.cluster.is_some() {
            "GLOBAL IN"
        } else {
            "IN"
        }
    }
}

/// The tables of the cluster form, by short name: every table has a
/// `client_id`, and all rows of one client live on one shard.
pub const CLUSTER_SHARDING_KEY: &str = "cityHash64(client_id)";

/// The cluster form of one single-server `CREATE TABLE` statement of
/// [`ddl`] (for table `name`): the replicated local table on every node,
/// then the `Distributed` table under the original name. The local table
/// has the same columns, `PARTITION BY`, `ORDER BY` and TTL; its engine is
/// the `Replicated` variant of the same one (ZooKeeper path
/// `/clickhouse/tables/{shard}/<db>/<name>`, replica `{replica}`). The
/// `Distributed` table lists the same columns, a `MATERIALIZED` one as
/// `ALIAS` (18.16 computes a `MATERIALIZED` column on the `Distributed`
/// table and the shard then refuses the insert, code 44; an `ALIAS` is sent
/// to the shards by name, where the local table has it materialized, so
/// partition pruning by `dt` still works).
fn cluster_statements(tables: &Tables, cluster: &str, name: &str, statement: &str) -> [String; 2] {
    let db = &tables.database;
    let full = format!("`{db}`.`{name}`");
    let head = format!("CREATE TABLE IF NOT EXISTS {full} (");
    let body = statement.strip_prefix(head.as_str()).unwrap_or_else(|| panic!("{name}: unexpected DDL {statement}"));
    let (columns, rest) =
        body.split_once("\n) ENGINE = ").unwrap_or_else(|| panic!("{name}: no engine in {statement}"));
    let (engine, rest) = rest.split_once('(').unwrap_or_else(|| panic!("{name}: no engine arguments"));
    let (args, rest) = rest.split_once(')').unwrap_or_else(|| panic!("{name}: engine arguments unclosed"));
    let path = format!("'/clickhouse/tables/{{shard}}/{db}/{name}', '{{replica}}'");
    let args = if args.trim().is_empty() { path } else { format!("{path}, {args}") };
    let local = format!(
        "CREATE TABLE IF NOT EXISTS {local} ON CLUSTER {cluster} ({columns}\n) ENGINE = Replicated{engine}({args}){rest}",
        local = tables.local(name)
    );
    let distributed = format!(
        "CREATE TABLE IF NOT EXISTS {full} ON CLUSTER {cluster} ({columns}\n) ENGINE = Distributed({cluster}, {db}, {name}_local, {CLUSTER_SHARDING_KEY})",
        columns = columns.replace(" MATERIALIZED ", " ALIAS "),
    );
    [local, distributed]
}

/// The short name of the table a `CREATE TABLE IF NOT EXISTS `db`.`name``
/// statement creates.
fn created_table(statement: &str) -> Option<&str> {
    let rest = statement.strip_prefix("CREATE TABLE IF NOT EXISTS `")?;
    let (_, rest) = rest.split_once("`.`")?;
    Some(rest.split_once('`')?.0)
}

/// The DDL statements, in order, for `flavor`. Each flavour's tables are
/// written out whole, not assembled from shared column lists: this is what
/// `--print-schema` hands a DBA, and the flavours differ in nearly every
/// column's type or codec.
///
/// With [`Tables::cluster`] set, the cluster form of the same tables: the
/// database `ON CLUSTER`, each table as a replicated `<name>_local` on every
/// node plus a `Distributed` table under its own name
/// (`cluster_statements`), and the view `ON CLUSTER` over the
/// `Distributed` tables.
#[must_use]
pub fn ddl(flavor: Flavor, tables: &Tables, retention_days: u32) -> Vec<String> {
    let single = single_server_ddl(flavor, tables, retention_days);
    let Some(cluster) = tables.cluster.as_deref() else { return single };
    let mut out = Vec::with_capacity(single.len() * 2);
    for statement in single {
        if let Some(rest) = statement.strip_prefix("CREATE DATABASE IF NOT EXISTS ") {
            out.push(format!("CREATE DATABASE IF NOT EXISTS {rest} ON CLUSTER {cluster}"));
        } else if let Some(name) = created_table(&statement) {
            out.extend(cluster_statements(tables, cluster, name, &statement));
        } else if let Some(rest) =
            statement.strip_prefix(&format!("CREATE VIEW IF NOT EXISTS {} AS", tables.readings_1m_live))
        {
            out.push(format!("CREATE VIEW IF NOT EXISTS {} ON CLUSTER {cluster} AS{rest}", tables.readings_1m_live));
        } else {
            panic!("no cluster form for {statement}");
        }
    }
    out
}

fn single_server_ddl(flavor: Flavor, tables: &Tables, retention_days: u32) -> Vec<String> {
    let db = &tables.database;
    let mut out = vec![format!("CREATE DATABASE IF NOT EXISTS `{db}`")];
    match flavor {
        Flavor::Legacy => {
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    sensor String,
    ts Int64,
    value Float64,
    epoch UInt64,
    seq UInt64,
    dt DateTime MATERIALIZED toDateTime(intDiv(ts, 1000000))
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(dt)
ORDER BY (client_id, sensor, ts)",
                t = tables.readings
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    sensor String,
    minute DateTime,
    count UInt64,
    sum Float64,
    avg Float64,
    min Float64,
    max Float64,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(minute)
ORDER BY (client_id, sensor, minute)",
                t = tables.readings_1m
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    epoch UInt64,
    first_seq UInt64,
    last_seq UInt64,
    inserted_at DateTime
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(inserted_at)
ORDER BY (client_id, epoch, first_seq)",
                t = tables.ingested_ranges
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    received_at DateTime,
    topic String,
    client_id String,
    reason String,
    error String,
    payload String
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(received_at)
ORDER BY received_at",
                t = tables.ingest_errors
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    ts Int64,
    outbox_rows UInt64,
    outbox_bytes UInt64,
    oldest_age_s Float64,
    received_per_s Float64,
    confirmed_per_s Float64,
    connected UInt8,
    received_at DateTime,
    {added}
) ENGINE = ReplacingMergeTree(ts)
ORDER BY client_id",
                t = tables.agent_status,
                added = added_status_columns(),
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    minute DateTime,
    token UInt64,
    owner String,
    marked_at DateTime DEFAULT now(),
    pending Int64
) ENGINE = SummingMergeTree(pending)
ORDER BY (minute, client_id, token)",
                t = tables.rollup_queue
            ));
        }
        Flavor::Current => {
            let ttl = |expr: &str| {
                if retention_days > 0 {
                    format!("\nTTL {expr} + INTERVAL {retention_days} DAY")
                } else {
                    String::new()
                }
            };
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id LowCardinality(String),
    sensor LowCardinality(String),
    ts DateTime64(6, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    value Float64 CODEC(Gorilla, ZSTD(1)),
    epoch UInt64 CODEC(ZSTD(1)),
    seq UInt64 CODEC(Delta, ZSTD(1))
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(ts)
ORDER BY (client_id, sensor, ts){ttl}",
                t = tables.readings,
                ttl = ttl("toDateTime(ts)")
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id LowCardinality(String),
    sensor LowCardinality(String),
    minute DateTime('UTC') CODEC(DoubleDelta, ZSTD(1)),
    count UInt64,
    sum Float64,
    avg Float64,
    min Float64,
    max Float64,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(minute)
ORDER BY (client_id, sensor, minute){ttl}",
                t = tables.readings_1m,
                ttl = ttl("minute")
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id LowCardinality(String),
    epoch UInt64,
    first_seq UInt64,
    last_seq UInt64,
    inserted_at DateTime('UTC')
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(inserted_at)
ORDER BY (client_id, epoch, first_seq)",
                t = tables.ingested_ranges
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    received_at DateTime('UTC'),
    topic String,
    client_id String,
    reason LowCardinality(String),
    error String,
    payload String CODEC(ZSTD(3))
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(received_at)
ORDER BY received_at{ttl}",
                t = tables.ingest_errors,
                ttl = ttl("received_at")
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    ts Int64,
    outbox_rows UInt64,
    outbox_bytes UInt64,
    oldest_age_s Float64,
    received_per_s Float64,
    confirmed_per_s Float64,
    connected UInt8,
    received_at DateTime('UTC'),
    {added}
) ENGINE = ReplacingMergeTree(ts)
ORDER BY client_id",
                t = tables.agent_status,
                added = added_status_columns(),
            ));
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t} (
    client_id String,
    minute DateTime('UTC'),
    token UInt64,
    owner LowCardinality(String),
    marked_at DateTime('UTC') DEFAULT now(),
    pending Int64
) ENGINE = SummingMergeTree(pending)
ORDER BY (minute, client_id, token)",
                t = tables.rollup_queue
            ));
        }
    }
    out.push(crate::rollup::live_view_sql(tables, flavor));
    out
}

/// Columns of `agent_status` added after its first release, with their type
/// (the same in both flavours, and as in [`ddl`]): the agent's backlog
/// outlook, echo state and last remote command, `NULL` when its status did
/// not carry the field (older agents; the echo fields in ingest mode; the
/// `last_command_*` five, all set or all `NULL`, before the agent's first
/// command). `last_command_ts_ms` is Unix milliseconds in an `Int64`, as the
/// agent sends it (18.16 has no `DateTime64`, and `DateTime` drops the
/// milliseconds). `Nullable` rather than a
/// sentinel, because every value is meaningful (a drain rate of 0 or below,
/// an ETA of 0 for an empty outbox, `ingest_present` 0) and rows stored
/// before the column existed read as `NULL` too.
pub const ADDED_STATUS_COLUMNS: [(&str, &str); 11] = [
    ("drain_per_s", "Nullable(Float64)"),
    ("drain_eta_s", "Nullable(Float64)"),
    ("bytes_per_reading", "Nullable(Float64)"),
    ("ingest_present", "Nullable(UInt8)"),
    ("echo_held_batches", "Nullable(UInt64)"),
    ("echo_ahead_readings", "Nullable(UInt64)"),
    ("last_command_id", "Nullable(String)"),
    ("last_command_name", "Nullable(String)"),
    ("last_command_ok", "Nullable(UInt8)"),
    ("last_command_ts_ms", "Nullable(Int64)"),
    ("last_command_summary", "Nullable(String)"),
];

/// The [`ADDED_STATUS_COLUMNS`] as column definitions of a `CREATE TABLE`
/// (one list for the new table and the upgrade of an old one).
fn added_status_columns() -> String {
    ADDED_STATUS_COLUMNS.iter().map(|(name, ty)| format!("{name} {ty}")).collect::<Vec<_>>().join(",\n    ")
}

/// The `ALTER TABLE` adding to `agent_status` those of
/// [`ADDED_STATUS_COLUMNS`] that are not among `existing` (its column names),
/// or `None` when none is missing. ClickHouse 18.16 has no `ADD COLUMN IF NOT
/// EXISTS` (a syntax error there), so the legacy statement names only the
/// missing columns; the current one also says `IF NOT EXISTS`, so servers
/// starting together cannot trip over each other.
#[must_use]
pub fn add_status_columns(flavor: Flavor, tables: &Tables, existing: &[String]) -> Option<String> {
    let guard = match flavor {
        Flavor::Legacy => "",
        Flavor::Current => "IF NOT EXISTS ",
    };
    let adds: Vec<String> =
        missing_status_columns(existing).map(|(name, ty)| format!("ADD COLUMN {guard}{name} {ty}")).collect();
    // In the cluster form the columns go to the replicated tables, on every
    // node; the Distributed table is recreated instead (see `upgrade_status_table`).
    let (table, on_cluster) = match &tables.cluster {
        Some(_) => (tables.local("agent_status"), tables.on_cluster_clause()),
        None => (tables.agent_status.clone(), String::new()),
    };
    (!adds.is_empty()).then(|| format!("ALTER TABLE {table}{on_cluster} {}", adds.join(", ")))
}

/// Those of [`ADDED_STATUS_COLUMNS`] that are not among `existing`.
fn missing_status_columns(existing: &[String]) -> impl Iterator<Item = &'static (&'static str, &'static str)> + '_ {
    ADDED_STATUS_COLUMNS.iter().filter(|(name, _)| !existing.iter().any(|e| e == name))
}

/// Asks the server for its version and picks the flavour.
///
/// # Errors
/// The server did not answer.
pub async fn detect(client: &Client) -> Result<(String, Flavor), clickhouse::error::Error> {
    let version: String = client.query("SELECT version()").fetch_one().await?;
    let flavor = Flavor::for_version(&version);
    Ok((version, flavor))
}

/// Creates the database and every table if missing, and adds the
/// [`ADDED_STATUS_COLUMNS`] an `agent_status` of an older release lacks.
///
/// # Errors
/// The first statement that fails.
pub async fn ensure(
    client: &Client,
    flavor: Flavor,
    tables: &Tables,
    retention_days: u32,
) -> Result<(), clickhouse::error::Error> {
    replace_outdated_view(client, tables).await?;
    for statement in ddl(flavor, tables, retention_days) {
        client.query(&statement).execute().await?;
    }
    upgrade_status_table(client, flavor, tables).await?;
    if tables.cluster.is_some() {
        upgrade_distributed_status_table(client, flavor, tables).await?;
    }
    Ok(())
}

/// The column names of `table` (`agent_status`, or in the cluster form
/// `agent_status_local`) on the node the client talks to.
async fn columns_of(client: &Client, tables: &Tables, table: &str) -> Result<Vec<String>, clickhouse::error::Error> {
    client
        .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
        .bind(tables.database.as_str())
        .bind(table)
        .fetch_all()
        .await
}

/// The column names of the table [`add_status_columns`] alters.
async fn status_columns(client: &Client, tables: &Tables) -> Result<Vec<String>, clickhouse::error::Error> {
    let table = if tables.cluster.is_some() { "agent_status_local" } else { "agent_status" };
    columns_of(client, tables, table).await
}

/// Cluster form: the `Distributed` `agent_status` of an older release lacks
/// columns its local tables now have. 18.16 refuses `ALTER … ON CLUSTER`
/// of a table that is not replicated on a cluster whose shards are
/// (code 371, "Table … isn't replicated, but shard #2 is replicated
/// according to its cluster definition"), so the `Distributed` table is
/// dropped and created again `ON CLUSTER`: it holds no data (the server
/// inserts synchronously, nothing waits in its queue), and an insert
/// between the two statements fails with "unknown table", which is
/// retried.
async fn upgrade_distributed_status_table(
    client: &Client,
    flavor: Flavor,
    tables: &Tables,
) -> Result<(), clickhouse::error::Error> {
    let existing = columns_of(client, tables, "agent_status").await?;
    let missing: Vec<&str> = missing_status_columns(&existing).map(|(name, _)| *name).collect();
    if missing.is_empty() {
        return Ok(());
    }
    tracing::info!(table = %tables.agent_status, ?missing, "recreating the Distributed status table of an older release");
    let drop = format!("DROP TABLE IF EXISTS {}{}", tables.agent_status, tables.on_cluster_clause());
    client.query(&drop).execute().await?;
    let create = ddl(flavor, tables, 0)
        .into_iter()
        .find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS {} ", tables.agent_status)))
        .expect("the cluster DDL creates the Distributed agent_status");
    client.query(&create).execute().await
}

/// Adds the [`ADDED_STATUS_COLUMNS`] missing from `agent_status` (a table
/// created by an older release). Servers starting together on 18.16 may
/// both try: when the `ALTER` fails, the columns are read again, and it is
/// an error only while some are still missing.
async fn upgrade_status_table(
    client: &Client,
    flavor: Flavor,
    tables: &Tables,
) -> Result<(), clickhouse::error::Error> {
    let Some(alter) = add_status_columns(flavor, tables, &status_columns(client, tables).await?) else {
        return Ok(());
    };
    tracing::info!(table = %tables.agent_status, %alter, "adding this release's status columns to the table of an older one");
    match client.query(&alter).execute().await {
        Ok(()) => Ok(()),
        Err(error) => match add_status_columns(flavor, tables, &status_columns(client, tables).await?) {
            None => Ok(()), // another server added them meanwhile
            Some(_) => Err(error),
        },
    }
}

/// Drops `readings_1m_live` if an older release created it (its definition
/// lacks [`crate::rollup::LIVE_VIEW_MARK`]), so that [`ensure`] creates the
/// current one: a view holds no data, and 18.16 has no `CREATE OR REPLACE
/// VIEW`. Servers starting together may each drop and create it; all create
/// the same definition.
async fn replace_outdated_view(client: &Client, tables: &Tables) -> Result<(), clickhouse::error::Error> {
    let existing: Vec<String> = client
        .query("SELECT create_table_query FROM system.tables WHERE database = ? AND name = 'readings_1m_live'")
        .bind(tables.database.as_str())
        .fetch_all()
        .await?;
    if existing.iter().any(|definition| !definition.contains(crate::rollup::LIVE_VIEW_MARK)) {
        tracing::info!(view = %tables.readings_1m_live, "replacing the live rollup view created by an older release");
        let drop = format!("DROP TABLE IF EXISTS {}{}", tables.readings_1m_live, tables.on_cluster_clause());
        client.query(&drop).execute().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_pick_the_flavor() {
        assert_eq!(Flavor::for_version("18.16.1"), Flavor::Legacy);
        assert_eq!(Flavor::for_version("19.17.4.11"), Flavor::Legacy);
        assert_eq!(Flavor::for_version("20.3.1"), Flavor::Current);
        assert_eq!(Flavor::for_version("24.8.4.13"), Flavor::Current);
        assert_eq!(Flavor::for_version("garbage"), Flavor::Legacy);
    }

    #[test]
    fn legacy_ddl_avoids_what_18_16_lacks() {
        let ddl = ddl(Flavor::Legacy, &Tables::new("t"), 30).join("\n");
        for absent in ["DateTime64", "CODEC", "TTL", "LowCardinality"] {
            assert!(!ddl.contains(absent), "{absent} in legacy DDL");
        }
    }

    /// The `agent_status` statement of `flavor`'s DDL.
    fn status_ddl(flavor: Flavor) -> String {
        let tables = Tables::new("t");
        let mut found = ddl(flavor, &tables, 0).into_iter().filter(|s| s.contains(tables.agent_status.as_str()));
        let statement = found.next().expect("an agent_status statement");
        assert!(found.next().is_none(), "one agent_status statement");
        statement
    }

    #[test]
    fn both_flavours_create_the_added_status_columns_with_the_listed_types() {
        for flavor in [Flavor::Legacy, Flavor::Current] {
            let create = status_ddl(flavor);
            for (name, ty) in ADDED_STATUS_COLUMNS {
                assert!(create.contains(&format!("\n    {name} {ty}")), "{flavor:?}: {name} {ty} in {create}");
            }
        }
    }

    #[test]
    fn only_missing_status_columns_are_added_and_only_current_says_if_not_exists() {
        let t = Tables::new("db");
        let old: Vec<String> = ["client_id", "ts", "outbox_rows", "connected", "received_at"].map(str::to_owned).into();
        let legacy = add_status_columns(Flavor::Legacy, &t, &old).expect("all eleven are missing");
        assert_eq!(
            legacy,
            "ALTER TABLE `db`.`agent_status` ADD COLUMN drain_per_s Nullable(Float64), \
             ADD COLUMN drain_eta_s Nullable(Float64), ADD COLUMN bytes_per_reading Nullable(Float64), \
             ADD COLUMN ingest_present Nullable(UInt8), ADD COLUMN echo_held_batches Nullable(UInt64), \
             ADD COLUMN echo_ahead_readings Nullable(UInt64), ADD COLUMN last_command_id Nullable(String), \
             ADD COLUMN last_command_name Nullable(String), ADD COLUMN last_command_ok Nullable(UInt8), \
             ADD COLUMN last_command_ts_ms Nullable(Int64), ADD COLUMN last_command_summary Nullable(String)"
        );
        assert!(!legacy.contains("IF NOT EXISTS"), "18.16 refuses it: {legacy}");
        let mut partly = old.clone();
        partly.extend(["drain_per_s", "drain_eta_s", "bytes_per_reading", "ingest_present"].map(str::to_owned));
        assert_eq!(
            add_status_columns(Flavor::Current, &t, &partly).as_deref(),
            Some(
                "ALTER TABLE `db`.`agent_status` ADD COLUMN IF NOT EXISTS echo_held_batches Nullable(UInt64), \
                 ADD COLUMN IF NOT EXISTS echo_ahead_readings Nullable(UInt64), \
                 ADD COLUMN IF NOT EXISTS last_command_id Nullable(String), \
                 ADD COLUMN IF NOT EXISTS last_command_name Nullable(String), \
                 ADD COLUMN IF NOT EXISTS last_command_ok Nullable(UInt8), \
                 ADD COLUMN IF NOT EXISTS last_command_ts_ms Nullable(Int64), \
                 ADD COLUMN IF NOT EXISTS last_command_summary Nullable(String)"
            )
        );
        // A table from the release that added the first six gains the last five.
        let mut six = old.clone();
        six.extend(ADDED_STATUS_COLUMNS[..6].iter().map(|(name, _)| (*name).to_owned()));
        assert_eq!(
            add_status_columns(Flavor::Legacy, &t, &six).as_deref(),
            Some(
                "ALTER TABLE `db`.`agent_status` ADD COLUMN last_command_id Nullable(String), \
                 ADD COLUMN last_command_name Nullable(String), ADD COLUMN last_command_ok Nullable(UInt8), \
                 ADD COLUMN last_command_ts_ms Nullable(Int64), ADD COLUMN last_command_summary Nullable(String)"
            )
        );
        partly.extend(ADDED_STATUS_COLUMNS.map(|(name, _)| name.to_owned()));
        assert_eq!(add_status_columns(Flavor::Legacy, &t, &partly), None);
        assert_eq!(add_status_columns(Flavor::Current, &t, &partly), None);
    }

    #[test]
    fn the_cluster_form_has_a_replicated_local_and_a_distributed_table_per_table() {
        for flavor in [Flavor::Legacy, Flavor::Current] {
            let tables = Tables::new("db").on_cluster("telemetry");
            let statements = ddl(flavor, &tables, 30);
            assert_eq!(statements[0], "CREATE DATABASE IF NOT EXISTS `db` ON CLUSTER telemetry");
            let single = ddl(flavor, &Tables::new("db"), 30);
            assert_eq!(statements.len(), 1 + 2 * (single.len() - 2) + 1, "{flavor:?}");
            for (name, engine) in [
                ("readings", "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/readings', '{replica}')"),
                (
                    "readings_1m",
                    "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/readings_1m', '{replica}', version)",
                ),
                (
                    "ingested_ranges",
                    "ReplicatedMergeTree('/clickhouse/tables/{shard}/db/ingested_ranges', '{replica}')",
                ),
                ("ingest_errors", "ReplicatedMergeTree('/clickhouse/tables/{shard}/db/ingest_errors', '{replica}')"),
                (
                    "agent_status",
                    "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/agent_status', '{replica}', ts)",
                ),
                (
                    "rollup_queue",
                    "ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/db/rollup_queue', '{replica}', pending)",
                ),
            ] {
                let local = statements
                    .iter()
                    .find(|s| {
                        s.starts_with(&format!("CREATE TABLE IF NOT EXISTS `db`.`{name}_local` ON CLUSTER telemetry ("))
                    })
                    .unwrap_or_else(|| panic!("{flavor:?}: no local {name}"));
                assert!(local.contains(&format!("ENGINE = {engine}")), "{local}");
                let original = single.iter().find(|s| created_table(s) == Some(name)).expect("single form");
                // Same columns, partitioning, order and TTL as the single-server table.
                let tail = |s: &str| {
                    s.split_once(") ENGINE = ").map(|(_, t)| t.split_once(')').map(|(_, r)| r.to_owned())).unwrap()
                };
                assert_eq!(tail(local), tail(original), "{name}");
                let distributed = statements
                    .iter()
                    .find(|s| {
                        s.starts_with(&format!("CREATE TABLE IF NOT EXISTS `db`.`{name}` ON CLUSTER telemetry ("))
                    })
                    .unwrap_or_else(|| panic!("{flavor:?}: no Distributed {name}"));
                assert!(
                    distributed.ends_with(&format!(
                        "ENGINE = Distributed(telemetry, db, {name}_local, cityHash64(client_id))"
                    )),
                    "{distributed}"
                );
                assert!(!distributed.contains("MATERIALIZED"), "{distributed}");
            }
            let view = statements.last().expect("the view");
            assert!(view.starts_with("CREATE VIEW IF NOT EXISTS `db`.`readings_1m_live` ON CLUSTER telemetry AS"));
            assert!(view.contains("GLOBAL IN") && !view.contains(") IN ("), "{view}");
        }
        let legacy = ddl(Flavor::Legacy, &Tables::new("db").on_cluster("telemetry"), 0).join("\n");
        assert!(legacy.contains("dt DateTime ALIAS toDateTime(intDiv(ts, 1000000))"), "{legacy}");
        // The upgrade goes to the replicated tables, on every node.
        let alter = add_status_columns(Flavor::Legacy, &Tables::new("db").on_cluster("c"), &[]).expect("all missing");
        assert!(
            alter.starts_with("ALTER TABLE `db`.`agent_status_local` ON CLUSTER c ADD COLUMN drain_per_s"),
            "{alter}"
        );
        assert!(Tables::new("db").on_cluster("").cluster.is_none());
    }

    #[test]
    fn current_ddl_has_ttl_only_when_asked() {
        let with = ddl(Flavor::Current, &Tables::new("t"), 30).join("\n");
        assert!(with.contains("TTL toDateTime(ts) + INTERVAL 30 DAY"));
        let without = ddl(Flavor::Current, &Tables::new("t"), 0).join("\n");
        assert!(!without.contains("TTL"));
    }
}
