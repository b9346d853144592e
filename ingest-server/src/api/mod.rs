//! The JSON API under `/api/`, used by the dashboard and callable by scripts.
//!
//! | endpoint | parameters | answer |
//! | --- | --- | --- |
//! | `GET /api/clients` | `window_s` (1..=3600, default 60), `limit` (1..=10000, default 1000) | every client with data in the last 7 days or a status: sensors, last seen, stored readings/s by reading time over whole minutes, from the start of the minute `window_s` ago (`from_ms`) until now, read from the rollup (raw rows only for minutes not folded yet), latest agent status (outbox backlog, rates, connected; drain rate and ETA, bytes per reading and, in echo mode, ingest presence, held batches and echo-ahead readings, the last remote command answered as `{id, name, ok, ts_ms, summary}`; each `null` when the agent did not send it) |
//! | `GET /api/series` | `client_id` (required), `sensor` (optional: all), `minutes` (1..=1440, default 60) | the 1-minute rollup: count, avg, min, max per minute |
//! | `GET /api/averages` | `client_id` (required), `sensor` (optional) | per sensor: count and mean of the deduplicated readings over the whole minutes since the start of the minute 1, 5 and 30 minutes ago (`from_ms` per window; from the rollup, raw rows only for minutes not folded yet), and the latest value (raw rows of its last minute) |
//! | `GET /api/health` | none | the server's own counters: received, stored, duplicates, dead letters, insert latency, unacked; ClickHouse reachability |
//! | `GET /api/errors` | `client_id` (optional), `limit` (1..=1000, default 20) | dead letters per reason, and the latest ones (payload size and first 32 bytes in hex) |
//!
//! Times are Unix milliseconds (`*_ms`). Windows end at the server's clock;
//! each answer carries the `now_ms` it used so a caller can reproduce it.
//! A mean over no readings is `null`.
//!
//! # Errors
//! Every error is JSON `{"error": kind, "reason": text}`: 400 `bad_request`
//! for invalid parameters (see [`params`]), 404 `not_found`, 502
//! `clickhouse` when ClickHouse failed, 504 `timeout` when it did not answer
//! in time, 503 `busy` (with `Retry-After: 1`) when `api_max_concurrent`
//! requests were being answered for all of [`SLOT_WAIT`].
//!
//! # Isolation from the inserts
//! The API shares ClickHouse with the writer, so it is bounded on both
//! sides: at most `api_max_concurrent` requests at once (more wait up to
//! [`SLOT_WAIT`], then are refused rather than queued), and every query runs as `api_clickhouse_user`
//! (a user with its own profile) with `readonly=2`, `max_execution_time`
//! ([`QUERY_TIMEOUT`]), `max_memory_usage` (`api_max_memory_bytes`) and
//! `max_threads` (`api_max_threads`). The fleet view reads the rollup for
//! folded minutes and raw rows only for pending ones.

pub mod params;
pub mod queries;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clickhouse::Client;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::{KindLabel, Metrics, DEAD_LETTER_REASONS};
use crate::schema::{Flavor, Tables};
use params::{BadRequest, Params, CLIENTS_LIMIT, ERRORS_LIMIT, MINUTES, RATE_WINDOW};
use queries::{AVERAGE_WINDOWS, CLIENT_LOOKBACK_S, MAX_SERIES_ROWS};

/// How long one API request may wait for ClickHouse.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Invalid parameters (HTTP 400).
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
    /// No such endpoint (HTTP 404).
    #[error("no such endpoint")]
    NotFound,
    /// ClickHouse failed (HTTP 502).
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    /// ClickHouse did not answer within [`QUERY_TIMEOUT`] (HTTP 504).
    #[error("ClickHouse did not answer within {} s", QUERY_TIMEOUT.as_secs())]
    Timeout,
    /// `api_max_concurrent` requests are being answered (HTTP 503).
    #[error("{0} API requests are being answered; try again shortly")]
    Busy(usize),
}

impl ApiError {
    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::ClickHouse(_) => (StatusCode::BAD_GATEWAY, "clickhouse"),
            Self::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        if matches!(self, Self::Busy(_)) {
            tracing::debug!(error = %self, "API request refused");
            let mut response = json(status, &ErrorBody { error: kind, reason: self.to_string() });
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
        if status.is_server_error() {
            tracing::warn!(error = %self, "API request failed");
        }
        json(status, &ErrorBody { error: kind, reason: self.to_string() })
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // Invariant: the answer types are plain structs, maps with string keys and
    // numbers (non-finite floats become null): serialising them cannot fail.
    let text = serde_json::to_string(body).expect("API answers serialise");
    (status, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], text).into_response()
}

/// Where the API reads from.
#[derive(Debug, Clone)]
pub struct Api {
    client: Client,
    tables: Tables,
    flavor: Flavor,
    metrics: Arc<Metrics>,
    started: Instant,
    slots: Arc<tokio::sync::Semaphore>,
    max_concurrent: usize,
}

impl Api {
    /// An API over the tables of `config` in `flavor`, reporting `metrics`.
    #[must_use]
    pub fn new(config: &Config, flavor: Flavor, metrics: Arc<Metrics>) -> Self {
        let mut client = crate::store::client(config);
        if !config.api_clickhouse_user.is_empty() {
            client = client.with_user(&config.api_clickhouse_user);
            client = client.with_password(config.api_clickhouse_password.expose());
        }
        let client = client
            .with_setting("readonly", "2")
            .with_setting("max_execution_time", QUERY_TIMEOUT.as_secs().to_string())
            .with_setting("max_memory_usage", config.api_max_memory_bytes.to_string())
            .with_setting("max_threads", config.api_max_threads.to_string());
        Self {
            client,
            tables: Tables::for_config(config),
            flavor,
            metrics,
            started: Instant::now(),
            slots: Arc::new(tokio::sync::Semaphore::new(config.api_max_concurrent)),
            max_concurrent: config.api_max_concurrent,
        }
    }

    /// The request slots (`api_max_concurrent`); a request holds one while
    /// it is answered.
    #[must_use]
    pub fn slots(&self) -> Arc<tokio::sync::Semaphore> {
        self.slots.clone()
    }

    /// The `/api/` routes (mounted under `/api`).
    pub fn router(self) -> Router {
        let api = Arc::new(self);
        Router::new()
            .route("/clients", get(clients))
            .route("/series", get(series))
            .route("/averages", get(averages))
            .route("/health", get(health))
            .route("/errors", get(errors))
            .fallback(|| async { ApiError::NotFound })
            .layer(axum::middleware::from_fn_with_state(api.clone(), limit))
            .with_state(api)
    }

    async fn fetch<T>(&self, query: clickhouse::query::Query) -> Result<Vec<T>, ApiError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        match tokio::time::timeout(QUERY_TIMEOUT, query.fetch_all::<T>()).await {
            Ok(rows) => Ok(rows?),
            Err(_) => Err(ApiError::Timeout),
        }
    }
}

/// Now in µs, truncated to the millisecond: windows then start exactly at
/// `now_ms - length`, so a caller given `now_ms` can reproduce every answer.
fn now_us() -> i64 {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    ms * 1000
}

fn answer<T: Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(body) => json(StatusCode::OK, &body),
        Err(error) => error.into_response(),
    }
}

// ---- /api/clients -------------------------------------------------------------

/// One client in `/api/clients`.
#[derive(Debug, Serialize)]
pub struct ClientView {
    /// The device.
    pub client_id: String,
    /// Its sensors (from the rollup, sorted).
    pub sensors: Vec<String>,
    /// The latest of: the start of its last minute with readings (rollup or
    /// rate window), its last status's arrival.
    pub last_seen_ms: Option<i64>,
    /// Distinct readings with a time from `from_ms` on.
    pub recent_readings: u64,
    /// `recent_readings` per second since `from_ms`.
    pub readings_per_s: f64,
    /// The agent's latest status, if it sent one.
    pub status: Option<StatusView>,
}

/// An agent's latest status.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// When the agent took it.
    pub ts_ms: i64,
    /// When the ingest server stored it.
    pub received_at_ms: i64,
    /// Rows waiting in its outbox (the backlog).
    pub outbox_rows: u64,
    /// Their approximate bytes.
    pub outbox_bytes: u64,
    /// Age of the oldest outbox row, s.
    pub oldest_age_s: f64,
    /// Readings from sensors per second.
    pub received_per_s: f64,
    /// Readings confirmed per second.
    pub confirmed_per_s: f64,
    /// Connected to the broker.
    pub connected: bool,
    /// Net outbox rows leaving per second lately, smoothed (negative: the
    /// backlog grows). Here and below `null` when the agent did not send the
    /// field (older agents).
    pub drain_per_s: Option<f64>,
    /// Seconds until the outbox is empty at that rate (0 when empty); `null`
    /// also while it is not shrinking.
    pub drain_eta_s: Option<f64>,
    /// Payload bytes on the wire per reading published (`null` also before
    /// the agent's first publish).
    pub bytes_per_reading: Option<f64>,
    /// Echo mode: whether an ingest server announces a durable subscription
    /// (`null` also in ingest mode, like the other echo fields).
    pub ingest_present: Option<bool>,
    /// Echo mode: batches echoed while none was announced, held in the outbox.
    pub echo_held_batches: Option<u64>,
    /// Echo mode: readings echoed and not yet acked by an ingest server.
    pub echo_ahead_readings: Option<u64>,
    /// The last remote command the agent answered (`null` before its first
    /// one since it started, and from older agents).
    pub last_command: Option<LastCommandView>,
}

/// The last remote command an agent answered, as its status carried it.
#[derive(Debug, Serialize)]
pub struct LastCommandView {
    /// The command's id.
    pub id: String,
    /// Its name (`flush`, `status`, ...).
    pub name: String,
    /// Whether it was carried out.
    pub ok: bool,
    /// When the agent answered it, Unix ms.
    pub ts_ms: i64,
    /// `ok`, or the error kind and message (at most
    /// [`crate::writer::LAST_COMMAND_TEXT_MAX`] characters).
    pub summary: String,
}

impl LastCommandView {
    /// The command from a status row's five columns: all set, or none (a row
    /// with only some set, which the writer never stores, reads as none).
    fn from_row(s: &queries::StatusRow) -> Option<Self> {
        match (
            &s.last_command_id,
            &s.last_command_name,
            s.last_command_ok,
            s.last_command_ts_ms,
            &s.last_command_summary,
        ) {
            (Some(id), Some(name), Some(ok), Some(ts_ms), Some(summary)) => {
                Some(Self { id: id.clone(), name: name.clone(), ok: ok != 0, ts_ms, summary: summary.clone() })
            }
            _ => None,
        }
    }
}

#[derive(Debug, Serialize)]
struct ClientsAnswer {
    now_ms: i64,
    window_s: u32,
    /// Start of the rate window: the start of the minute `window_s` before `now_ms`.
    from_ms: i64,
    lookback_s: i64,
    clients: Vec<ClientView>,
}

/// How long a request waits for a slot before it is refused with 503
/// `busy`: long enough for one dashboard refresh (a handful of requests at
/// once) to pass in turns, short enough that a storm is shed, not queued.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);

/// Answers the request once a slot is free (waiting at most [`SLOT_WAIT`]);
/// otherwise 503 `busy`.
async fn limit(State(api): State<Arc<Api>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, api.slots.clone().acquire_owned()).await else {
        api.metrics.api_busy.inc();
        return ApiError::Busy(api.max_concurrent).into_response();
    };
    next.run(request).await
}

async fn clients(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    answer(api.clients(raw.as_deref()).await)
}

impl Api {
    async fn clients(&self, raw: Option<&str>) -> Result<ClientsAnswer, ApiError> {
        let p = Params::parse(raw, &["window_s", "limit"])?;
        let (window_s, limit) = (p.int(RATE_WINDOW)?, p.int(CLIENTS_LIMIT)?);
        let now = now_us();
        let (c, t) = (&self.client, &self.tables);
        // Whole minutes, so that folded ones come from the rollup.
        let from_s = (now.div_euclid(1_000_000) - i64::from(window_s)).div_euclid(60) * 60;
        let (rollup, recent, statuses) = tokio::try_join!(
            self.fetch::<queries::RollupClient>(queries::rollup_clients(c, t, now / 1_000_000, limit)),
            self.fetch::<queries::RecentClient>(queries::recent_clients(c, t, self.flavor, from_s)),
            self.fetch::<queries::StatusRow>(queries::statuses(c, t, limit)),
        )?;
        let mut by_id: BTreeMap<String, ClientView> = BTreeMap::new();
        for r in rollup {
            let v = view(&mut by_id, &r.client_id);
            let mut sensors = r.sensors;
            sensors.sort();
            v.sensors = sensors;
            bump(&mut v.last_seen_ms, i64::from(r.last_minute) * 1000);
        }
        for r in recent {
            let v = view(&mut by_id, &r.client_id);
            v.recent_readings = r.recent;
            v.readings_per_s = r.recent as f64 * 1e6 / (now - from_s * 1_000_000) as f64;
            bump(&mut v.last_seen_ms, i64::from(r.last_minute) * 1000);
        }
        for s in statuses {
            let v = view(&mut by_id, &s.client_id);
            let received_at_ms = i64::from(s.received_at) * 1000;
            bump(&mut v.last_seen_ms, received_at_ms);
            v.status = Some(StatusView {
                ts_ms: s.ts.div_euclid(1000),
                received_at_ms,
                outbox_rows: s.outbox_rows,
                outbox_bytes: s.outbox_bytes,
                oldest_age_s: s.oldest_age_s,
                received_per_s: s.received_per_s,
                confirmed_per_s: s.confirmed_per_s,
                connected: s.connected != 0,
                drain_per_s: s.drain_per_s,
                drain_eta_s: s.drain_eta_s,
                bytes_per_reading: s.bytes_per_reading,
                ingest_present: s.ingest_present.map(|p| p != 0),
                echo_held_batches: s.echo_held_batches,
                echo_ahead_readings: s.echo_ahead_readings,
                last_command: LastCommandView::from_row(&s),
            });
        }
        let clients = by_id.into_values().take(limit as usize).collect();
        Ok(ClientsAnswer {
            now_ms: now.div_euclid(1000),
            window_s,
            from_ms: from_s * 1000,
            lookback_s: CLIENT_LOOKBACK_S,
            clients,
        })
    }
}

fn view<'a>(by_id: &'a mut BTreeMap<String, ClientView>, id: &str) -> &'a mut ClientView {
    by_id.entry(id.to_owned()).or_insert_with(|| ClientView {
        client_id: id.to_owned(),
        sensors: Vec::new(),
        last_seen_ms: None,
        recent_readings: 0,
        readings_per_s: 0.0,
        status: None,
    })
}

fn bump(slot: &mut Option<i64>, candidate: i64) {
    *slot = Some(slot.map_or(candidate, |v| v.max(candidate)));
}

// ---- /api/series --------------------------------------------------------------

/// One minute of a series.
#[derive(Debug, Serialize)]
pub struct Point {
    /// Start of the minute.
    pub t: i64,
    /// Readings.
    pub count: u64,
    /// Mean.
    pub avg: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// The minutes of one sensor.
#[derive(Debug, Serialize)]
pub struct Series {
    /// The sensor.
    pub sensor: String,
    /// Its minutes, oldest first.
    pub points: Vec<Point>,
}

#[derive(Debug, Serialize)]
struct SeriesAnswer {
    client_id: String,
    now_ms: i64,
    minutes: u32,
    from_ms: i64,
    truncated: bool,
    series: Vec<Series>,
}

async fn series(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    answer(api.series(raw.as_deref()).await)
}

impl Api {
    async fn series(&self, raw: Option<&str>) -> Result<SeriesAnswer, ApiError> {
        let p = Params::parse(raw, &["client_id", "sensor", "minutes"])?;
        let (client_id, sensor, minutes) = (p.client_id()?, p.optional_sensor()?, p.int(MINUTES)?);
        let now = now_us();
        // `minutes` whole minutes, the current (partial) one included.
        let from_s = now.div_euclid(60_000_000) * 60 - (i64::from(minutes) - 1) * 60;
        // The pending set is read once and bound into both sides of the
        // series, so no minute is counted from both the rollup and raw rows.
        let pending =
            self.fetch::<u32>(queries::pending_minutes(&self.client, &self.tables, &client_id, from_s)).await?;
        let rows = self
            .fetch::<queries::MinuteRow>(queries::series(
                &self.client,
                &self.tables,
                self.flavor,
                &client_id,
                sensor.as_deref(),
                from_s,
                &pending,
            ))
            .await?;
        let truncated = rows.len() >= MAX_SERIES_ROWS as usize;
        let mut series: Vec<Series> = Vec::new();
        for r in rows {
            let point = Point { t: i64::from(r.minute) * 1000, count: r.count, avg: r.avg, min: r.min, max: r.max };
            match series.last_mut() {
                Some(s) if s.sensor == r.sensor => s.points.push(point),
                _ => series.push(Series { sensor: r.sensor, points: vec![point] }),
            }
        }
        Ok(SeriesAnswer { client_id, now_ms: now.div_euclid(1000), minutes, from_ms: from_s * 1000, truncated, series })
    }
}

// ---- /api/averages ------------------------------------------------------------

/// Count and mean over one window.
#[derive(Debug, Serialize)]
pub struct Window {
    /// Its length.
    pub minutes: u32,
    /// Its start: the start of the minute `minutes` before `now_ms`.
    pub from_ms: i64,
    /// Readings in it.
    pub count: u64,
    /// Their mean (`null` without readings).
    pub avg: Option<f64>,
}

/// Rolling averages of one sensor.
#[derive(Debug, Serialize)]
pub struct SensorAverages {
    /// The sensor.
    pub sensor: String,
    /// Its latest value in the longest window.
    pub last: f64,
    /// That value's time.
    pub last_ms: i64,
    /// One entry per window, shortest first.
    pub windows: Vec<Window>,
}

#[derive(Debug, Serialize)]
struct AveragesAnswer {
    client_id: String,
    now_ms: i64,
    windows_min: [u32; 3],
    sensors: Vec<SensorAverages>,
}

async fn averages(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    answer(api.averages(raw.as_deref()).await)
}

impl Api {
    async fn averages(&self, raw: Option<&str>) -> Result<AveragesAnswer, ApiError> {
        let p = Params::parse(raw, &["client_id", "sensor"])?;
        let (client_id, sensor) = (p.client_id()?, p.optional_sensor()?);
        let now = now_us();
        let (c, t, flavor, sensor_ref) = (&self.client, &self.tables, self.flavor, sensor.as_deref());
        let rows =
            self.fetch::<queries::AverageRow>(queries::averages(c, t, flavor, &client_id, sensor_ref, now)).await?;
        // The latest values: raw rows from the earliest of the sensors' last minutes.
        let latest = match rows.iter().map(|r| r.last_minute).min() {
            Some(from) => {
                let query = queries::latest(c, t, flavor, &client_id, sensor_ref, i64::from(from) * 1_000_000);
                self.fetch::<queries::LatestRow>(query).await?
            }
            None => Vec::new(),
        };
        let latest: BTreeMap<String, (f64, i64)> =
            latest.into_iter().map(|l| (l.sensor, (l.last, l.last_ts))).collect();
        let mean = |count: u64, sum: f64| (count > 0).then(|| sum / count as f64);
        let [w1, w5, w30] = AVERAGE_WINDOWS;
        let window = |minutes: u32, count: u64, sum: f64| Window {
            minutes,
            from_ms: queries::window_start(now, minutes) * 1000,
            count,
            avg: mean(count, sum),
        };
        let sensors = rows
            .into_iter()
            .map(|r| {
                let (last, last_ts) = latest.get(&r.sensor).copied().unwrap_or((f64::NAN, 0));
                SensorAverages {
                    last,
                    last_ms: last_ts.div_euclid(1000),
                    windows: vec![window(w1, r.c1, r.s1), window(w5, r.c5, r.s5), window(w30, r.c30, r.s30)],
                    sensor: r.sensor,
                }
            })
            .collect();
        Ok(AveragesAnswer { client_id, now_ms: now.div_euclid(1000), windows_min: AVERAGE_WINDOWS, sensors })
    }
}

// ---- /api/health --------------------------------------------------------------

#[derive(Debug, Serialize)]
struct HealthAnswer {
    now_ms: i64,
    uptime_s: f64,
    subscribed: bool,
    received_messages: BTreeMap<&'static str, u64>,
    received_readings: u64,
    inserted_readings: u64,
    duplicate_readings: u64,
    duplicate_messages: u64,
    dead_letters: u64,
    dead_letters_by_reason: BTreeMap<&'static str, u64>,
    batches: u64,
    insert_seconds_sum: f64,
    insert_count: u64,
    insert_mean_ms: Option<f64>,
    insert_retries: u64,
    rollup_errors: u64,
    acked_messages: u64,
    acks_published: u64,
    unacked_messages: i64,
    inflight_inserts: i64,
    mqtt_connection_errors: u64,
    clickhouse: ClickHouseHealth,
}

#[derive(Debug, Serialize)]
struct ClickHouseHealth {
    database: String,
    flavor: &'static str,
    reachable: bool,
    version: Option<String>,
    error: Option<String>,
}

async fn health(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    answer(api.health(raw.as_deref()).await)
}

impl Api {
    async fn health(&self, raw: Option<&str>) -> Result<HealthAnswer, ApiError> {
        Params::parse(raw, &[])?;
        let m = &self.metrics;
        let version =
            tokio::time::timeout(Duration::from_secs(2), self.client.query("SELECT version()").fetch_one::<String>())
                .await;
        let (version, error) = match version {
            Ok(Ok(v)) => (Some(v), None),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (None, Some("no answer within 2 s".to_owned())),
        };
        let kinds = ["batch", "status", "other"];
        let received_messages = kinds
            .iter()
            .map(|k| (*k, m.received_messages.get_or_create(&KindLabel { kind: (*k).to_owned() }).get()))
            .collect();
        let dead_letters_by_reason = DEAD_LETTER_REASONS
            .iter()
            .map(|r| (*r, m.dead_letters.get_or_create(&crate::metrics::reason(r)).get()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let (sum, count) = insert_duration(&m.render());
        Ok(HealthAnswer {
            now_ms: now_us().div_euclid(1000),
            uptime_s: self.started.elapsed().as_secs_f64(),
            subscribed: m.subscribed.get() == 1,
            received_messages,
            received_readings: m.received_readings.get(),
            inserted_readings: m.inserted_readings.get(),
            duplicate_readings: m.duplicate_readings.get(),
            duplicate_messages: m.duplicate_messages.get(),
            dead_letters: m.dead_letters_total(),
            dead_letters_by_reason,
            batches: m.batches.get(),
            insert_seconds_sum: sum,
            insert_count: count,
            insert_mean_ms: (count > 0).then(|| sum / count as f64 * 1000.0),
            insert_retries: m.insert_retries_total(),
            rollup_errors: m.rollup_errors.get(),
            acked_messages: m.acked_messages.get(),
            acks_published: m.acks_published.get(),
            unacked_messages: m.unacked_messages.get(),
            inflight_inserts: m.inflight_inserts.get(),
            mqtt_connection_errors: m.mqtt_connection_errors.get(),
            clickhouse: ClickHouseHealth {
                database: self.tables.database.clone(),
                flavor: match self.flavor {
                    Flavor::Legacy => "legacy",
                    Flavor::Current => "current",
                },
                reachable: version.is_some(),
                version,
                error,
            },
        })
    }
}

/// Sum (seconds) and count of the insert-duration histogram, from the
/// Prometheus text (prometheus-client reads them back only in its tests).
fn insert_duration(text: &str) -> (f64, u64) {
    let value = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    let sum = value("telemetry_ingest_insert_duration_seconds_sum");
    // Invariant: a count is a non-negative integer well below 2^53.
    let count = value("telemetry_ingest_insert_duration_seconds_count") as u64;
    (sum, count)
}

// ---- /api/errors --------------------------------------------------------------

/// One dead letter.
#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    /// When it was received.
    pub received_at_ms: i64,
    /// Its topic.
    pub topic: String,
    /// The client id from the topic.
    pub client_id: String,
    /// Fixed reason name.
    pub reason: String,
    /// The error text.
    pub error: String,
    /// Payload size.
    pub payload_bytes: u64,
    /// First 32 payload bytes in hex.
    pub payload_head: String,
}

#[derive(Debug, Serialize)]
struct ErrorsAnswer {
    total: u64,
    by_reason: BTreeMap<String, u64>,
    recent: Vec<DeadLetterView>,
}

async fn errors(State(api): State<Arc<Api>>, RawQuery(raw): RawQuery) -> Response {
    answer(api.errors(raw.as_deref()).await)
}

impl Api {
    async fn errors(&self, raw: Option<&str>) -> Result<ErrorsAnswer, ApiError> {
        let p = Params::parse(raw, &["client_id", "limit"])?;
        let (client_id, limit) = (p.optional_client_id()?, p.int(ERRORS_LIMIT)?);
        let (c, t, id) = (&self.client, &self.tables, client_id.as_deref());
        let (counts, recent) = tokio::try_join!(
            self.fetch::<queries::ReasonCount>(queries::error_counts(c, t, id)),
            self.fetch::<queries::ErrorRow>(queries::recent_errors(c, t, id, limit)),
        )?;
        let by_reason: BTreeMap<String, u64> = counts.into_iter().map(|r| (r.reason, r.count)).collect();
        let recent = recent
            .into_iter()
            .map(|r| DeadLetterView {
                received_at_ms: i64::from(r.received_at) * 1000,
                topic: r.topic,
                client_id: r.client_id,
                reason: r.reason,
                error: r.error,
                payload_bytes: r.payload_bytes,
                payload_head: r.payload_head,
            })
            .collect();
        Ok(ErrorsAnswer { total: by_reason.values().sum(), by_reason, recent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET `path` over a fresh connection; the status line and body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    #[tokio::test]
    async fn requests_beyond_api_max_concurrent_wait_briefly_then_get_503_busy() {
        // No ClickHouse at this address: only the limiter is under test.
        let config = Config { api_max_concurrent: 1, clickhouse_url: "http://127.0.0.1:9".into(), ..Config::default() };
        let metrics = Arc::new(Metrics::new());
        let api = Api::new(&config, Flavor::Legacy, metrics.clone());
        let slots = api.slots();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, Router::new().nest("/api", api.router())).await });

        let held = slots.clone().try_acquire_owned().expect("the one slot");
        let started = Instant::now();
        let busy = get(addr, "/api/errors").await;
        assert!(started.elapsed() >= SLOT_WAIT, "it waited for a slot first");
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        assert!(busy.to_ascii_lowercase().contains("retry-after: 1"), "{busy}");
        assert!(busy.contains(r#""error":"busy""#), "{busy}");
        assert_eq!(metrics.api_busy.get(), 1);

        drop(held);
        let answered = get(addr, "/api/errors").await;
        assert!(!answered.starts_with("HTTP/1.1 503"), "a free slot lets the request through: {answered}");
        assert_eq!(slots.available_permits(), 1, "the request gave its slot back");
    }

    #[test]
    fn insert_latency_is_read_from_the_histogram() {
        let m = Metrics::new();
        m.insert_duration.observe(0.25);
        m.insert_duration.observe(0.5);
        assert_eq!(insert_duration(&m.render()), (0.75, 2));
        assert_eq!(insert_duration(&Metrics::new().render()), (0.0, 0));
    }

    #[test]
    fn errors_are_json_with_a_status_and_a_reason() {
        let response =
            ApiError::BadRequest(BadRequest("minutes must be an integer from 1 to 1440".into())).into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(ApiError::Timeout.into_response().status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ApiError::NotFound.into_response().status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn last_seen_keeps_the_latest_candidate() {
        let mut slot = None;
        bump(&mut slot, 5);
        bump(&mut slot, 3);
        assert_eq!(slot, Some(5));
    }
}
