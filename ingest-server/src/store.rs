//! The ClickHouse side shared by every stage that talks to it: the client,
//! the table names and SQL flavour, the sorting of errors into retriable and
//! permanent, and the one retry policy (exponential backoff with jitter,
//! bounded per request by `insert_timeout_secs`).
//!
//! The writer (inserts of jobs), the rollup (closing minutes) and start-up
//! (schema, stored ranges) each hold a [`Store`]; none depends on another.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Metrics, TableLabel};
use crate::schema::{Flavor, Tables};

/// How a ClickHouse error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, timeouts, a server restarting, known overload or
    /// operator states: back off and retry, without limit.
    Retriable,
    /// The server refused the request with a code of no known meaning here
    /// (or one that may depend on the data, such as a memory limit): retried,
    /// but a job's readings insert gives up after `insert_retry_budget` of
    /// these and is bisected to find the messages ClickHouse refuses.
    Unknown,
    /// The data or the statement is wrong: retrying cannot help.
    Permanent,
}

/// Error codes (ClickHouse's `Code: N`) that mean "this data is wrong".
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    184, // ILLEGAL_AGGREGATION
];

/// Error codes that mean "the server is busy, down or being fixed", never
/// "this data": retried without limit, whatever the budget.
const TRANSIENT_CODES: &[u32] = &[
    60,  // UNKNOWN_TABLE (an operator recreating it)
    81,  // UNKNOWN_DATABASE
    159, // TIMEOUT_EXCEEDED
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    242, // TABLE_IS_READ_ONLY
    279, // ALL_CONNECTION_TRIES_FAILED
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    369, // ALL_REPLICAS_ARE_STALE (a rollup read on a cluster waits for a replica to catch up)
    394, // QUERY_WAS_CANCELLED
    999, // KEEPER_EXCEPTION
];

/// The `Code: N` of a server error message, if any.
#[must_use]
pub fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Sorts a `clickhouse` crate error into retriable or permanent.
#[must_use]
pub fn classify(error: &clickhouse::error::Error) -> ErrorClass {
    use clickhouse::error::Error as E;
    match error {
        E::Network(_) | E::TimedOut => ErrorClass::Retriable,
        E::BadResponse(message) => match error_code(message) {
            Some(code) if PERMANENT_CODES.contains(&code) => ErrorClass::Permanent,
            Some(code) if TRANSIENT_CODES.contains(&code) => ErrorClass::Retriable,
            // Other codes, including 241 (memory limit) and 252 (too many
            // parts or partitions), which a huge or strange job can cause
            // every time as well as an overload once.
            Some(_) => ErrorClass::Unknown,
            // An HTTP error without a ClickHouse code: a proxy, a restart.
            None => ErrorClass::Retriable,
        },
        // Serialisation and client-side data problems.
        E::InvalidParams(_)
        | E::SequenceMustHaveLength
        | E::DeserializeAnyNotSupported
        | E::NotEnoughData
        | E::InvalidUtf8Encoding(_)
        | E::InvalidTagEncoding(_)
        | E::Custom(_)
        | E::SchemaMismatch(_)
        | E::Unsupported(_) => ErrorClass::Permanent,
        _ => ErrorClass::Retriable,
    }
}

/// Why a request gave up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A permanent error: the data cannot be stored as it is.
    #[error("permanent ClickHouse error: {0}")]
    Permanent(clickhouse::error::Error),
    /// The server refused the request `budget` times with errors of
    /// [`ErrorClass::Unknown`]; the last one.
    #[error("ClickHouse refused the request {attempts} times: {error}")]
    Exhausted {
        /// Refusals counted against the budget.
        attempts: u32,
        /// The last refusal.
        error: clickhouse::error::Error,
    },
    /// The stop token was cancelled while retrying.
    #[error("stopped while retrying")]
    Stopped,
}

/// A ClickHouse client for `config` (no database set: every name is qualified).
#[must_use]
pub fn client(config: &Config) -> Client {
    let mut client =
        Client::default().with_url(&config.clickhouse_url).with_user(&config.clickhouse_user).with_validation(false);
    if !config.clickhouse_password.is_empty() {
        client = client.with_password(config.clickhouse_password.expose());
    }
    if !config.clickhouse_cluster.is_empty() {
        client = client
            // An INSERT into a Distributed table returns only once every
            // shard it touches has its block (the default queues it on this
            // node and sends it later): durable before the PUBACK, and the
            // readings on their shard before their rollup markers.
            .with_setting("insert_distributed_sync", "1")
            // One replica per shard, the first listed that is up, for reads
            // and inserts alike: reads see this server's inserts, which
            // replication has not necessarily copied to the other replicas
            // yet (deploy/clickhouse-schema.md, "On a cluster").
            .with_setting("load_balancing", "in_order");
    }
    client
}

/// A client, the tables, the flavour and the retry policy.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    tables: Tables,
    flavor: Flavor,
    metrics: Arc<Metrics>,
    retry_min: Duration,
    retry_max: Duration,
    timeout: Duration,
    budget: u32,
    stop: CancellationToken,
}

impl Store {
    /// A store for `config`'s database in `flavor`; retries end at `stop`.
    #[must_use]
    pub fn new(config: &Config, flavor: Flavor, metrics: Arc<Metrics>, stop: CancellationToken) -> Self {
        Self {
            client: client(config),
            tables: Tables::for_config(config),
            flavor,
            metrics,
            retry_min: Duration::from_millis(config.retry_min_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
            timeout: Duration::from_secs(config.insert_timeout_secs.max(1)),
            budget: config.insert_retry_budget.max(1),
            stop,
        }
    }

    /// The same store in another flavour (start-up learns it from the server).
    #[must_use]
    pub fn with_flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    /// The same store with retries ending at `stop`.
    #[must_use]
    pub fn with_stop(mut self, stop: CancellationToken) -> Self {
        self.stop = stop;
        self
    }

    /// The tables.
    #[must_use]
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The SQL flavour.
    #[must_use]
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The ClickHouse client.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The longest retry delay.
    #[must_use]
    pub fn retry_max(&self) -> Duration {
        self.retry_max
    }

    /// The metrics registry.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Waits `delay`, or less if the stop token is cancelled first.
    ///
    /// # Errors
    /// [`StoreError::Stopped`] when the stop token ended the wait.
    pub async fn pause(&self, delay: Duration) -> Result<(), StoreError> {
        tokio::select! {
            () = self.stop.cancelled() => Err(StoreError::Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the stop token.
    ///
    /// # Errors
    /// [`StoreError::Permanent`] or [`StoreError::Stopped`].
    pub async fn retry<T, F, Fut>(&self, table: &'static str, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, clickhouse::error::Error>>,
    {
        self.retry_within(table, None, attempt).await
    }

    /// [`Store::retry`], but after `insert_retry_budget` refusals of
    /// [`ErrorClass::Unknown`] it gives up with [`StoreError::Exhausted`]
    /// (outages and overload codes never count): for requests whose data
    /// may be what the server refuses, so that the caller can isolate it.
    ///
    /// # Errors
    /// [`StoreError::Permanent`], [`StoreError::Exhausted`] or [`StoreError::Stopped`].
    pub async fn retry_budgeted<T, F, Fut>(&self, table: &'static str, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, clickhouse::error::Error>>,
    {
        self.retry_within(table, Some(self.budget), attempt).await
    }

    /// [`Store::retry_budgeted`] that gives up at the first refusal (an
    /// outage is still retried): for the pieces of a job being bisected,
    /// where the whole job already spent the budget.
    ///
    /// # Errors
    /// As [`Store::retry_budgeted`].
    pub async fn retry_until_refused<T, F, Fut>(&self, table: &'static str, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, clickhouse::error::Error>>,
    {
        self.retry_within(table, Some(1), attempt).await
    }

    async fn retry_within<T, F, Fut>(
        &self,
        table: &'static str,
        budget: Option<u32>,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, clickhouse::error::Error>>,
    {
        let mut delays = telemetry_link::backoff(self.retry_min, self.retry_max);
        let (mut attempts, mut refusals) = (0u32, 0u32);
        loop {
            if self.stop.is_cancelled() {
                return Err(StoreError::Stopped);
            }
            let result = match tokio::time::timeout(self.timeout, attempt()).await {
                Ok(result) => result,
                Err(_) => Err(clickhouse::error::Error::TimedOut),
            };
            let error = match result {
                Ok(value) => {
                    if attempts > 0 {
                        tracing::info!(table, attempts, "ClickHouse request succeeded after retries");
                    }
                    return Ok(value);
                }
                Err(error) => error,
            };
            match classify(&error) {
                ErrorClass::Permanent => {
                    tracing::error!(table, %error, "permanent ClickHouse error");
                    return Err(StoreError::Permanent(error));
                }
                ErrorClass::Unknown => {
                    refusals += 1;
                    if budget.is_some_and(|b| refusals >= b) {
                        // The caller says what it does next (the writer: bisect).
                        tracing::debug!(table, refusals, %error, "ClickHouse keeps refusing this request");
                        return Err(StoreError::Exhausted { attempts: refusals, error });
                    }
                }
                ErrorClass::Retriable => {}
            }
            attempts += 1;
            self.metrics.insert_retries.get_or_create(&TableLabel { table: table.to_owned() }).inc();
            let delay = delays.next().unwrap_or(self.retry_max);
            tracing::warn!(table, attempts, %error, retry_in_ms = delay.as_millis() as u64, "ClickHouse request failed; retrying");
            tokio::select! {
                () = self.stop.cancelled() => return Err(StoreError::Stopped),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_parsed_from_both_message_styles() {
        assert_eq!(error_code("Code: 60, e.displayText() = DB::Exception: Table x doesn't exist"), Some(60));
        assert_eq!(error_code("Code: 27. DB::Exception: Cannot parse input"), Some(27));
        assert_eq!(error_code("bad gateway"), None);
    }

    #[test]
    fn data_errors_are_permanent_and_outages_retriable() {
        use clickhouse::error::Error as E;
        assert_eq!(classify(&E::BadResponse("Code: 27. DB::Exception: Cannot parse".into())), ErrorClass::Permanent);
        assert_eq!(classify(&E::BadResponse("Code: 241. Memory limit exceeded".into())), ErrorClass::Unknown);
        assert_eq!(classify(&E::BadResponse("Code: 252. Too many partitions".into())), ErrorClass::Unknown);
        assert_eq!(classify(&E::BadResponse("Code: 1002. Something new".into())), ErrorClass::Unknown);
        assert_eq!(classify(&E::BadResponse("Code: 60. Table does not exist".into())), ErrorClass::Retriable);
        assert_eq!(classify(&E::BadResponse("Code: 202. Too many simultaneous queries".into())), ErrorClass::Retriable);
        assert_eq!(classify(&E::BadResponse("502 Bad Gateway".into())), ErrorClass::Retriable);
        assert_eq!(classify(&E::TimedOut), ErrorClass::Retriable);
        assert_eq!(classify(&E::NotEnoughData), ErrorClass::Permanent);
    }
}
