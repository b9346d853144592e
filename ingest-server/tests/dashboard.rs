//! The dashboard and its JSON API against the real stack: parameter
//! validation (400s for injection attempts, bound values that match nothing),
//! API numbers against ClickHouse, and the page in headless Chromium.
//!
//! Chromium (Debian package `chromium`) is required under `CI=true`; on a
//! developer machine its test is skipped when it is missing. With
//! `DASHBOARD_SCREENSHOT=1` the browser test also writes
//! `docs/img/dashboard.png` (or to the path given instead of `1`).

mod harness;

use std::collections::BTreeMap;
use std::f64::consts::TAU;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clickhouse::Row;
use harness::{wait_for_async, Agent, Server, World};
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::Value;
use telemetry_wire::{AgentStatus, Batch, LastCommand, Reading};

/// A sensor name that is HTML: the page must show it as text.
const HTML_SENSOR: &str = "<i>x</i>";
/// A client with data only from three hours ago.
const OLD_CLIENT: &str = "dash-old";
/// An agent of an older release: its status lacks every optional field.
const OLD_AGENT: &str = "dash-c";
/// An agent whose outbox has rows and is not shrinking.
const STALLED_AGENT: &str = "dash-d";
/// The optional status fields, absent from older agents.
const OPTIONAL_STATUS_FIELDS: [&str; 7] = [
    "drain_per_s",
    "drain_eta_s",
    "bytes_per_reading",
    "ingest_present",
    "echo_held_batches",
    "echo_ahead_readings",
    "last_command",
];
/// The `agent_status` columns of the optional fields (`last_command` takes five).
const OPTIONAL_STATUS_COLUMNS: [&str; 11] = [
    "drain_per_s",
    "drain_eta_s",
    "bytes_per_reading",
    "ingest_present",
    "echo_held_batches",
    "echo_ahead_readings",
    "last_command_id",
    "last_command_name",
    "last_command_ok",
    "last_command_ts_ms",
    "last_command_summary",
];
/// A failed command's summary, as a device could send it: markup, and longer
/// than the fleet table shows.
const HTML_SUMMARY: &str =
    "bad_arguments: <img src=x onerror=alert(1)> is not a level; expected error, warn, info, debug or trace";

// ---- fixture ---------------------------------------------------------------------

/// A running server with an HTTP listener and a fleet's worth of data near now.
struct Seeded {
    world: World,
    server: Server,
    agent: Agent,
    http: String,
    readings: u64,
    /// The retained statuses published, one per agent.
    statuses: Vec<AgentStatus>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// `(sensor, interval ms, span minutes, value(t seconds))` per client.
type SensorSpec = (&'static str, i64, i64, fn(f64) -> f64);

fn fleet() -> Vec<(&'static str, Vec<SensorSpec>)> {
    vec![
        (
            "dash-a",
            vec![
                ("temperature", 1000, 45, |t| 21.0 + 2.5 * (TAU * t / 1200.0).sin() + 0.3 * (t * 1.7).sin()),
                ("pressure", 2000, 45, |t| 1013.0 + 4.0 * (TAU * t / 2100.0).sin() + 0.4 * (t * 0.9).cos()),
            ],
        ),
        (
            "dash-b",
            vec![
                ("height", 500, 20, |t| 120.0 + 15.0 * (TAU * t / 420.0).sin() + 2.0 * (t * 2.3).sin()),
                (HTML_SENSOR, 10_000, 10, |t| (t / 10.0).rem_euclid(7.0).floor()),
            ],
        ),
    ]
}

/// The readings of `client`'s sensors, oldest first. Times are whole
/// milliseconds + 500 µs, so they never sit on a window boundary (the API's
/// windows start at whole milliseconds).
fn readings(sensors: &[SensorSpec], t0_ms: i64) -> Vec<Reading> {
    let mut out = Vec::new();
    for &(name, interval_ms, span_min, f) in sensors {
        let n = span_min * 60_000 / interval_ms;
        for k in 1..=n {
            let ms = t0_ms - k * interval_ms;
            out.push(Reading::new(name, ms * 1000 + 500, f(ms as f64 / 1000.0)));
        }
    }
    out.sort_by_key(|r| r.ts);
    out
}

fn status(client_id: &str, outbox_rows: u64, oldest_age_s: f64, rate: f64, connected: bool) -> AgentStatus {
    AgentStatus {
        version: telemetry_wire::status::STATUS_VERSION,
        client_id: client_id.to_owned(),
        ts: now_ms() * 1000,
        outbox_rows,
        outbox_bytes: outbox_rows * 48,
        oldest_age_s,
        received_per_s: rate,
        confirmed_per_s: if connected { rate } else { 0.0 },
        connected,
        ..Default::default()
    }
}

/// The agents' statuses: every kind of backlog outlook the fleet table shows.
fn statuses() -> Vec<AgentStatus> {
    vec![
        // Echo mode, an ingest server announced, the backlog draining.
        AgentStatus {
            drain_per_s: Some(0.1),
            drain_eta_s: Some(120.0),
            bytes_per_reading: Some(9.5),
            ingest_present: Some(true),
            echo_held_batches: Some(0),
            echo_ahead_readings: Some(1200),
            // A flush three hours ago.
            last_command: Some(LastCommand {
                id: "op-1".into(),
                name: "flush".into(),
                ok: true,
                ts_ms: now_ms() - 3 * 3_600_000,
                summary: "ok".into(),
            }),
            ..status("dash-a", 12, 0.4, 1.5, true)
        },
        // Ingest mode (no echo fields), the outbox empty.
        AgentStatus {
            drain_per_s: Some(0.0),
            drain_eta_s: Some(0.0),
            bytes_per_reading: Some(31.5),
            ..status("dash-b", 0, 0.0, 2.1, true)
        },
        // An older agent, which sends none of the optional fields: offline with a backlog.
        status(OLD_AGENT, 5321, 842.0, 0.0, false),
        // Echo mode, no ingest server announced: batches held, the outbox growing.
        AgentStatus {
            drain_per_s: Some(-2.5),
            drain_eta_s: None,
            bytes_per_reading: Some(12.0),
            ingest_present: Some(false),
            echo_held_batches: Some(3),
            echo_ahead_readings: Some(6000),
            // A refused command two days ago.
            last_command: Some(LastCommand {
                id: "op-<b>2</b>".into(),
                name: "set_log_level".into(),
                ok: false,
                ts_ms: now_ms() - 2 * 86_400_000,
                summary: HTML_SUMMARY.into(),
            }),
            ..status(STALLED_AGENT, 800, 65.0, 2.5, true)
        },
    ]
}

impl Seeded {
    async fn start() -> Option<Self> {
        let world = World::new()?;
        let http = format!("127.0.0.1:{}", test_support::free_port());
        let server = Server::start(ingest_server::Config { http_address: http.clone(), ..world.config() }).await;
        let agent = Agent::connect(&world).await;
        let t0 = now_ms();
        let mut total = 0;
        for (client_id, sensors) in fleet() {
            let all = readings(&sensors, t0);
            total += all.len() as u64;
            let batches: Vec<Batch> = all
                .chunks(500)
                .enumerate()
                .map(|(i, chunk)| {
                    let first = 1 + (i * 500) as u64;
                    Batch {
                        client_id: client_id.to_owned(),
                        epoch: 1,
                        first_seq: first,
                        last_seq: first + chunk.len() as u64 - 1,
                        readings: chunk.to_vec(),
                    }
                })
                .collect();
            agent.publish(&batches).await;
        }
        // A client last heard of three hours ago: listed, its chart empty.
        let old: Vec<Reading> = (0..10)
            .map(|k| Reading::new("flow", (t0 - 3 * 3_600_000 - k * 60_000) * 1000 + 500, k as f64))
            .rev()
            .collect();
        total += old.len() as u64;
        agent
            .publish(&[Batch { client_id: OLD_CLIENT.into(), epoch: 1, first_seq: 1, last_seq: 10, readings: old }])
            .await;
        // Retained statuses, as agents publish them: see `statuses`.
        let statuses = statuses();
        for s in &statuses {
            let topic = format!("{}/status/{}", world.prefix, s.client_id);
            agent.client.publish(topic, QoS::AtLeastOnce, true, s.encode()).await.expect("queue status");
        }
        // A payload that is not a batch: one dead letter.
        agent.publish_raw("dash-a", b"\xffnot a batch".to_vec()).await;
        agent.flushed().await;
        world.wait_stored(total, Duration::from_secs(60)).await;
        let m = server.metrics.clone();
        harness::wait_for("statuses and dead letter stored", Duration::from_secs(30), || {
            m.received_messages.get_or_create(&ingest_server::metrics::KindLabel { kind: "status".into() }).get()
                == statuses.len() as u64
                && m.dead_letters_total() == 1
                && m.unacked_messages.get() == 0
        })
        .await;
        assert_eq!(world.count("SELECT count() FROM DB.agent_status FINAL").await, statuses.len() as u64);
        Some(Self { world, server, agent, http, readings: total, statuses })
    }

    async fn stop(self) {
        // Clear the retained statuses so the broker does not keep them.
        for s in &self.statuses {
            let topic = format!("{}/status/{}", self.world.prefix, s.client_id);
            self.agent.client.publish(topic, QoS::AtLeastOnce, true, Vec::new()).await.expect("queue clear");
        }
        self.agent.flushed().await;
        self.server.stop().await;
    }

    /// Deduplicated count and mean of one sensor's readings with `ts >= from_us`.
    async fn raw_latest(&self, client_id: &str, sensor: &str) -> (f64, i64) {
        let sql = format!(
            "SELECT argMax(value, ts), max(ts) FROM `{db}`.readings WHERE client_id = ? AND sensor = ?",
            db = self.world.database
        );
        self.world.ch().query(&sql).bind(client_id).bind(sensor).fetch_one::<(f64, i64)>().await.unwrap()
    }

    async fn raw_window(&self, client_id: &str, sensor: &str, from_us: i64) -> (u64, f64) {
        #[derive(Row, Deserialize)]
        struct R {
            n: u64,
            mean: f64,
        }
        let sql = format!(
            "SELECT count() AS n, avg(value) AS mean FROM (
                SELECT ts, any(value) AS value FROM `{db}`.readings WHERE client_id = ? AND sensor = ? GROUP BY ts
            ) WHERE ts >= ?",
            db = self.world.database
        );
        let r: R = self.world.ch().query(&sql).bind(client_id).bind(sensor).bind(from_us).fetch_one().await.unwrap();
        (r.n, r.mean)
    }

    /// Per minute from `from_s` on, from deduplicated raw readings (not the rollup).
    async fn raw_minutes(&self, client_id: &str, sensor: &str, from_s: i64) -> Vec<RawMinute> {
        let sql = format!(
            "SELECT toUInt32(toStartOfMinute(toDateTime(intDiv(ts, 1000000)))) AS m, count() AS n,
                    avg(value) AS mean, min(value) AS lo, max(value) AS hi
             FROM (SELECT ts, any(value) AS value FROM `{db}`.readings WHERE client_id = ? AND sensor = ? GROUP BY ts)
             GROUP BY m HAVING m >= ? ORDER BY m",
            db = self.world.database
        );
        self.world.ch().query(&sql).bind(client_id).bind(sensor).bind(from_s).fetch_all().await.unwrap()
    }

    /// Distinct readings of `client_id` with `ts >= from_us`, and the latest ts (of all).
    async fn raw_recent(&self, client_id: &str, from_us: i64) -> (u64, i64) {
        let db = &self.world.database;
        let count = format!(
            "SELECT count() FROM (SELECT sensor, ts FROM `{db}`.readings WHERE client_id = ? AND ts >= ? GROUP BY sensor, ts)"
        );
        let n: u64 = self.world.ch().query(&count).bind(client_id).bind(from_us).fetch_one().await.unwrap();
        let last = format!("SELECT max(ts) FROM `{db}`.readings WHERE client_id = ?");
        let last: i64 = self.world.ch().query(&last).bind(client_id).fetch_one().await.unwrap();
        (n, last)
    }
}

#[derive(Debug, Row, Deserialize)]
struct RawMinute {
    m: u32,
    n: u64,
    mean: f64,
    lo: f64,
    hi: f64,
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

// ---- HTTP --------------------------------------------------------------------------

/// GET over plain HTTP/1.1: status code and body.
async fn get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTP listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read response");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a complete response");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (code, body.to_owned())
}

/// GET a JSON answer that must be 200.
async fn get_json(addr: &str, path: &str) -> Value {
    let (code, body) = get(addr, path).await;
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Percent-encodes everything but unreserved characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---- API ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_bad_parameters_and_binds_hostile_values() {
    let Some(seeded) = Seeded::start().await else { return };
    let http = &seeded.http;
    let injections = ["' OR 1=1 --", "dash-a' OR '1'='1", "a`b", "`dash-a`", "dév", "👀", "dash-a; DROP TABLE x", ""];
    let mut refused: Vec<String> = Vec::new();
    for id in injections {
        for endpoint in ["series", "averages", "errors"] {
            refused.push(format!("/api/{endpoint}?client_id={}", enc(id)));
        }
    }
    refused.extend(
        [
            "/api/series?client_id=dash-a&minutes=-5",
            "/api/series?client_id=dash-a&minutes=0",
            "/api/series?client_id=dash-a&minutes=1441",
            "/api/series?client_id=dash-a&minutes=99999999999999999999999",
            "/api/series?client_id=dash-a&minutes=1e3",
            "/api/series?client_id=dash-a&minutes=60%20OR%201",
            "/api/series?client_id=dash-a&sensor=",
            "/api/series?client_id=dash-a&sensor=a%0Ab",
            "/api/series?client_id=dash-a&sensor=%FF%FE",
            "/api/series?client_id=dash-a&client_id=dash-b",
            "/api/series?minutes=5",
            "/api/averages",
            "/api/averages?client_id=dash-a&minutes=5",
            "/api/errors?limit=0",
            "/api/errors?limit=-1",
            "/api/errors?limit=1001",
            "/api/clients?window_s=0",
            "/api/clients?window_s=3601",
            "/api/clients?limit=18446744073709551617",
            "/api/clients?database=system",
            "/api/health?x=1",
        ]
        .map(str::to_owned),
    );
    refused.push(format!("/api/series?client_id=dash-a&sensor={}", "s".repeat(129)));
    refused.push(format!("/api/series?client_id={}", "a".repeat(65)));
    for path in &refused {
        let (code, body) = get(http, path).await;
        assert_eq!(code, 400, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        assert_eq!(body["error"], "bad_request", "{path}: {body}");
        assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{path}: {body}");
    }
    let (code, body) = get(http, "/api/nothing").await;
    assert_eq!((code, serde_json::from_str::<Value>(&body).unwrap()["error"].as_str()), (404, Some("not_found")));

    // Legal sensor names that look like SQL are bound, so they match nothing
    // (a spliced `' OR 1=1 --` would return every sensor of the client).
    for sensor in ["' OR 1=1 --", "temperature' OR '1'='1", "temperature\\", "a?b", "`temperature`", "température"] {
        for endpoint in ["series", "averages"] {
            let answer = get_json(http, &format!("/api/{endpoint}?client_id=dash-a&sensor={}", enc(sensor))).await;
            let key = if endpoint == "series" { "series" } else { "sensors" };
            assert_eq!(answer[key], Value::Array(vec![]), "{endpoint} with sensor {sensor:?}: {answer}");
        }
    }
    // The HTML-looking sensor is a real one and is found by its exact name.
    let answer = get_json(http, &format!("/api/series?client_id=dash-b&sensor={}", enc(HTML_SENSOR))).await;
    assert_eq!(answer["series"][0]["sensor"], HTML_SENSOR);
    // Nothing was harmed.
    seeded.world.wait_stored(seeded.readings, Duration::from_secs(5)).await;
    seeded.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_numbers_match_clickhouse() {
    let Some(seeded) = Seeded::start().await else { return };
    let http = &seeded.http;

    // Clients: every one, with rates, last reading and backlog.
    let clients = get_json(http, "/api/clients?window_s=120").await;
    let (now_ms, window_s) = (clients["now_ms"].as_i64().unwrap(), clients["window_s"].as_i64().unwrap());
    assert_eq!(window_s, 120);
    let by_id: BTreeMap<&str, &Value> =
        clients["clients"].as_array().unwrap().iter().map(|c| (c["client_id"].as_str().unwrap(), c)).collect();
    assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), ["dash-a", "dash-b", OLD_AGENT, STALLED_AGENT, OLD_CLIENT]);
    assert_eq!(by_id[OLD_CLIENT]["recent_readings"], 0);
    assert_eq!(by_id[OLD_CLIENT]["sensors"], serde_json::json!(["flow"]));
    let old_last = seeded.raw_recent(OLD_CLIENT, 0).await.1.div_euclid(60_000_000) * 60_000;
    assert_eq!(by_id[OLD_CLIENT]["last_seen_ms"], old_last, "the start of its last minute");
    let old = get_json(http, &format!("/api/series?client_id={OLD_CLIENT}")).await;
    assert_eq!(old["series"], Value::Array(vec![]));
    let old = get_json(http, &format!("/api/averages?client_id={OLD_CLIENT}")).await;
    assert_eq!(old["sensors"], Value::Array(vec![]));
    // The rate window is whole minutes: from the start of the minute
    // window_s before now.
    let from_ms = clients["from_ms"].as_i64().unwrap();
    assert_eq!(from_ms, (now_ms - window_s * 1000).div_euclid(60_000) * 60_000);
    for id in ["dash-a", "dash-b"] {
        let (n, last) = seeded.raw_recent(id, from_ms * 1000).await;
        assert!(n > 0);
        assert_eq!(by_id[id]["recent_readings"], n, "{id}");
        let per_s = n as f64 * 1000.0 / (now_ms - from_ms) as f64;
        assert!(close(by_id[id]["readings_per_s"].as_f64().unwrap(), per_s), "{id}");
        assert!(by_id[id]["last_seen_ms"].as_i64().unwrap() >= last.div_euclid(60_000_000) * 60_000, "{id}");
    }
    assert_eq!(by_id["dash-a"]["sensors"], serde_json::json!(["pressure", "temperature"]));
    assert_eq!(by_id["dash-a"]["status"]["outbox_rows"], 12);
    assert_eq!(by_id[OLD_AGENT]["status"]["outbox_rows"], 5321);
    assert_eq!(by_id[OLD_AGENT]["status"]["connected"], false);
    assert_eq!(by_id[OLD_AGENT]["recent_readings"], 0);
    assert!(by_id[OLD_AGENT]["last_seen_ms"].as_i64().unwrap() > now_ms - 60_000);
    assert_eq!(by_id[OLD_CLIENT]["status"], Value::Null, "no status at all");
    // The backlog outlook and echo state round-trip from each published
    // status: a field the agent sent is its value, one it left out is an
    // explicit null.
    for sent in &seeded.statuses {
        let id = sent.client_id.as_str();
        let shown = by_id[id]["status"].as_object().unwrap_or_else(|| panic!("{id}: a status"));
        let sent_json = serde_json::to_value(sent).unwrap();
        for field in OPTIONAL_STATUS_FIELDS {
            let want = sent_json.get(field).cloned().unwrap_or(Value::Null);
            assert_eq!(shown.get(field), Some(&want), "{id}: {field}");
        }
    }
    let a = &by_id["dash-a"]["status"];
    assert_eq!(
        (&a["drain_per_s"], &a["drain_eta_s"], &a["bytes_per_reading"]),
        (&serde_json::json!(0.1), &serde_json::json!(120.0), &serde_json::json!(9.5))
    );
    assert_eq!(
        (&a["ingest_present"], &a["echo_held_batches"], &a["echo_ahead_readings"]),
        (&Value::Bool(true), &serde_json::json!(0), &serde_json::json!(1200))
    );
    let stalled = &by_id[STALLED_AGENT]["status"];
    assert_eq!((&stalled["drain_per_s"], &stalled["drain_eta_s"]), (&serde_json::json!(-2.5), &Value::Null));
    assert_eq!(stalled["ingest_present"], false);
    assert_eq!(by_id["dash-b"]["status"]["echo_ahead_readings"], Value::Null, "ingest mode: no echo fields");
    assert_eq!(by_id["dash-b"]["status"]["last_command"], Value::Null, "no command yet");
    let stalled_command = &by_id[STALLED_AGENT]["status"]["last_command"];
    assert_eq!(
        (&stalled_command["id"], &stalled_command["name"], &stalled_command["ok"], &stalled_command["summary"]),
        (&Value::from("op-<b>2</b>"), &Value::from("set_log_level"), &Value::Bool(false), &Value::from(HTML_SUMMARY))
    );
    for field in OPTIONAL_STATUS_FIELDS {
        assert_eq!(by_id[OLD_AGENT]["status"][field], Value::Null, "older agent: {field}");
    }
    // ...stored as NULL, not as a stand-in value.
    let nulls = format!(
        "SELECT count() FROM DB.agent_status FINAL WHERE client_id = '{OLD_AGENT}' AND {}",
        OPTIONAL_STATUS_COLUMNS.map(|f| format!("isNull({f})")).join(" AND ")
    );
    assert_eq!(seeded.world.count(&nulls).await, 1);

    // A late reading in a minute that is already folded in, marked by a peer
    // server (whose marker this server leaves alone for rollup_orphan_secs):
    // until a pass folds it in, that minute must come from raw rows.
    wait_for_async("rollup markers consumed", Duration::from_secs(30), || async {
        seeded.world.pending_markers().await == 0
    })
    .await;
    let late_minute = seeded.raw_minutes("dash-a", "temperature", 0).await[0].m;
    let db = &seeded.world.database;
    let late = format!(
        "INSERT INTO `{db}`.readings (client_id, sensor, ts, value, epoch, seq) VALUES ('dash-a', 'temperature', {}, 1e6, 99, 1)",
        i64::from(late_minute) * 1_000_000 + 1
    );
    seeded.world.ch().query(&late).execute().await.unwrap();
    let marker = format!(
        "INSERT INTO `{db}`.rollup_queue (client_id, minute, token, owner, marked_at, pending) VALUES ('dash-a', {late_minute}, 42, 'peer', now(), 1)"
    );
    seeded.world.ch().query(&marker).execute().await.unwrap();
    let folded = format!(
        "SELECT toUInt64(max) FROM `{db}`.readings_1m FINAL WHERE client_id = 'dash-a' AND sensor = 'temperature' AND minute = {late_minute}"
    );
    assert!(seeded.world.count(&folded).await < 1_000_000, "the rollup table does not have the late reading yet");

    // Series: the rollup equals per-minute aggregates of the raw readings.
    for (client_id, sensors) in fleet() {
        let answer = get_json(http, &format!("/api/series?client_id={client_id}&minutes=60")).await;
        let from_s = answer["from_ms"].as_i64().unwrap() / 1000;
        let series = answer["series"].as_array().unwrap();
        assert_eq!(series.len(), sensors.len(), "{client_id}");
        for s in series {
            let sensor = s["sensor"].as_str().unwrap();
            let raw = seeded.raw_minutes(client_id, sensor, from_s).await;
            let points = s["points"].as_array().unwrap();
            assert_eq!(points.len(), raw.len(), "{client_id}/{sensor}");
            for (p, r) in points.iter().zip(&raw) {
                assert_eq!(p["t"], i64::from(r.m) * 1000);
                assert_eq!(p["count"], r.n);
                assert!(close(p["avg"].as_f64().unwrap(), r.mean), "{p} vs {r:?}");
                assert_eq!(p["min"].as_f64().unwrap(), r.lo);
                assert_eq!(p["max"].as_f64().unwrap(), r.hi);
            }
        }
    }
    let late = get_json(http, "/api/series?client_id=dash-a&sensor=temperature&minutes=60").await;
    let points = late["series"][0]["points"].as_array().unwrap();
    let point = points.iter().find(|p| p["t"] == i64::from(late_minute) * 1000).expect("the late reading's minute");
    assert_eq!(point["max"], 1e6, "the pending minute is answered from raw rows");
    let one = get_json(http, "/api/series?client_id=dash-a&sensor=temperature&minutes=5").await;
    assert_eq!(one["series"].as_array().unwrap().len(), 1);
    assert!(one["series"][0]["points"].as_array().unwrap().len() <= 5);

    // Rolling averages over 1, 5 and 30 minutes.
    for (client_id, sensors) in fleet() {
        let answer = get_json(http, &format!("/api/averages?client_id={client_id}")).await;
        let now_ms = answer["now_ms"].as_i64().unwrap();
        let rows = answer["sensors"].as_array().unwrap();
        assert_eq!(rows.len(), sensors.len());
        for row in rows {
            let sensor = row["sensor"].as_str().unwrap();
            let (value, ts) = seeded.raw_latest(client_id, sensor).await;
            assert_eq!(row["last_ms"], ts.div_euclid(1000), "{client_id}/{sensor}: latest reading's time");
            assert_eq!(row["last"].as_f64(), Some(value), "{client_id}/{sensor}: latest value");
            for w in row["windows"].as_array().unwrap() {
                let minutes = w["minutes"].as_i64().unwrap();
                let from_ms = w["from_ms"].as_i64().unwrap();
                assert_eq!(from_ms, (now_ms - minutes * 60_000).div_euclid(60_000) * 60_000, "whole minutes");
                let (n, mean) = seeded.raw_window(client_id, sensor, from_ms * 1000).await;
                assert_eq!(w["count"], n, "{client_id}/{sensor}/{minutes}");
                match w["avg"].as_f64() {
                    Some(avg) => assert!(close(avg, mean), "{client_id}/{sensor}/{minutes}: {avg} vs {mean}"),
                    None => assert_eq!(n, 0),
                }
            }
        }
    }

    // Health: the server's own counters.
    let health = get_json(http, "/api/health").await;
    let m = &seeded.server.metrics;
    assert_eq!(health["received_readings"], m.received_readings.get());
    assert_eq!(health["inserted_readings"], seeded.readings);
    assert_eq!(health["dead_letters"], 1);
    assert_eq!(health["unacked_messages"], 0);
    assert_eq!(health["subscribed"], true);
    assert!(health["insert_count"].as_u64().unwrap() >= 1);
    assert!(health["insert_mean_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(health["clickhouse"]["reachable"], true);
    assert_eq!(health["clickhouse"]["flavor"], "legacy");

    // Dead letters.
    let errors = get_json(http, "/api/errors?limit=5").await;
    assert_eq!(errors["total"], seeded.world.count("SELECT count() FROM DB.ingest_errors").await);
    assert_eq!(errors["total"], 1);
    assert_eq!(errors["recent"][0]["client_id"], "dash-a");
    assert_eq!(errors["recent"][0]["payload_bytes"], 12);
    assert!(errors["recent"][0]["payload_head"].as_str().unwrap().starts_with("FF6E6F74"));
    let none = get_json(http, "/api/errors?client_id=dash-b").await;
    assert_eq!(none["total"], 0);
    seeded.stop().await;
}

/// The API's statements on current ClickHouse (chdb), with every value bound.
#[test]
fn api_queries_run_on_current_clickhouse_in_chdb() {
    use ingest_server::api::queries;
    use ingest_server::schema::{ddl, Flavor, Tables};
    if !harness::has_chdb() {
        return;
    }
    let tables = Tables::new("telemetry");
    let mut setup = ddl(Flavor::Current, &tables, 0);
    let now_us = now_ms() * 1000;
    let ts = |us: i64| format!("fromUnixTimestamp64Micro(toInt64({us}), 'UTC')");
    let values: Vec<String> = (1..=4)
        .map(|k| format!("('a', 's', {}, {}.0, 1, {k})", ts(now_us - k * 20_000_000 - 500), k))
        .chain(["('a', 's', ".to_owned() + &ts(now_us - 20_000_500) + ", 1.0, 1, 1)"]) // a duplicate
        .collect();
    setup.push(format!(
        "INSERT INTO {} (client_id, sensor, ts, value, epoch, seq) VALUES {}",
        tables.readings,
        values.join(", ")
    ));
    setup.push(format!(
        "INSERT INTO {t} (client_id, sensor, minute, count, sum, avg, min, max, version)
         SELECT client_id, sensor, toStartOfMinute(ts), count(), sum(value), avg(value), min(value), max(value), 1
         FROM (SELECT client_id, sensor, ts, any(value) AS value FROM {r} GROUP BY client_id, sensor, ts)
         GROUP BY client_id, sensor, toStartOfMinute(ts)",
        t = tables.readings_1m,
        r = tables.readings
    ));
    setup.push(format!(
        "INSERT INTO {} (client_id, ts, outbox_rows, outbox_bytes, oldest_age_s, received_per_s, confirmed_per_s, connected, received_at,
         drain_per_s, drain_eta_s, bytes_per_reading, ingest_present, echo_held_batches, echo_ahead_readings,
         last_command_id, last_command_name, last_command_ok, last_command_ts_ms, last_command_summary)
         VALUES ('a', 1, 7, 8, 0.5, 1.0, 1.0, 1, now(), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                ('a', 2, 9, 8, 0.5, 1.0, 1.0, 1, now(), -2.5, NULL, 9.75, 0, 3, 6000, 'op-1', 'flush', 0, 1700000000123,
                 'failed: <x>')",
        tables.agent_status
    ));
    // An older agent's status: the optional columns left out.
    setup.push(format!(
        "INSERT INTO {} (client_id, ts, outbox_rows, outbox_bytes, oldest_age_s, received_per_s, confirmed_per_s, connected, received_at)
         VALUES ('b', 1, 3, 8, 0.5, 1.0, 1.0, 0, now())",
        tables.agent_status
    ));
    setup.push(format!(
        "INSERT INTO {} (received_at, topic, client_id, reason, error, payload) VALUES (now(), 't/client/a', 'a', 'empty', 'e', 'xyz')",
        tables.ingest_errors
    ));
    let c = clickhouse::Client::default();
    let flavor = Flavor::Current;
    let now_s = now_us / 1_000_000;
    // The rate window: whole minutes from the one 50 s ago (folded: the rollup answers).
    let from_s = (now_s - 50).div_euclid(60) * 60;
    let in_window = (1..=4).filter(|k| now_us - k * 20_000_000 - 500 >= from_s * 1_000_000).count();
    let recent = format!("a\t{in_window}\t");
    // Averages over whole minutes: count and sum of the distinct readings
    // (value k at now - k * 20 s) whose minute starts at or after each window.
    let averages = {
        let mut out = "s".to_owned();
        for minutes in queries::AVERAGE_WINDOWS {
            let start = queries::window_start(now_us, minutes);
            let ks: Vec<i64> =
                (1..=4).filter(|k| (now_us - k * 20_000_000 - 500).div_euclid(60_000_000) * 60 >= start).collect();
            out.push_str(&format!("\t{}\t{}", ks.len(), ks.iter().sum::<i64>()));
        }
        out + "\t"
    };
    let checks: Vec<(clickhouse::query::Query, &str)> = vec![
        (queries::rollup_clients(&c, &tables, now_s, 10), "a\t['s']\t"),
        (queries::recent_clients(&c, &tables, flavor, from_s), &recent),
        (queries::statuses(&c, &tables, 10), "a\t2\t9\t"),
        (
            queries::statuses(&c, &tables, 10),
            "\t-2.5\t\\N\t9.75\t0\t3\t6000\top-1\tflush\t0\t1700000000123\tfailed: <x>\nb\t1\t3\t",
        ),
        (queries::statuses(&c, &tables, 10), "\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\n"),
        (queries::series(&c, &tables, flavor, "a", Some("s"), now_s - 3600, &[]), "s\t"),
        (queries::averages(&c, &tables, flavor, "a", None, now_us), &averages),
        (queries::latest(&c, &tables, flavor, "a", None, from_s * 1_000_000), "s\t1\t"),
        (queries::recent_errors(&c, &tables, Some("a"), 5), "t/client/a\ta\tempty\te\t3\t78797A"),
        (queries::error_counts(&c, &tables, None), "empty\t1"),
    ];
    for (query, want) in checks {
        let sql = query.sql_display().to_string();
        let mut statements = setup.clone();
        statements.push(sql.clone());
        let out = harness::run_chdb(&statements);
        assert!(out.contains(want), "{sql}\n=> {out:?}, want it to contain {want:?}");
    }
}

// ---- browser -------------------------------------------------------------------------

/// The Chromium binary, if installed (`CHROMIUM` overrides the name).
fn chromium_binary() -> Option<String> {
    let name = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
    let found = std::process::Command::new(&name).arg("--version").output().is_ok_and(|o| o.status.success());
    found.then_some(name)
}

/// Runs headless Chromium with a fresh profile; its standard output.
async fn chromium(binary: &str, args: &[String]) -> String {
    // Headless Chromium itself sometimes fails to start on a loaded 2-core
    // machine (exit status != 0 before loading the page); that is retried
    // once. What the page shows is never retried: the assertions judge it.
    let mut failure = String::new();
    for attempt in 1..=2 {
        let profile = std::env::temp_dir().join(test_support::unique_name("chromium"));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("chromium finished within 120 s")
            .expect("run chromium");
        let _ = std::fs::remove_dir_all(&profile);
        if out.status.success() {
            return String::from_utf8(out.stdout).expect("UTF-8 DOM");
        }
        failure = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
        eprintln!("chromium attempt {attempt} failed: {failure}");
    }
    panic!("chromium failed twice: {failure}");
}

/// A start tag of the dumped DOM.
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
}

impl Tag {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    fn num(&self, name: &str) -> f64 {
        let v = self.attr(name).unwrap_or_else(|| panic!("no {name} on {self:?}"));
        v.parse().unwrap_or_else(|_| panic!("{name}={v:?} on {self:?} is not a number"))
    }

    fn has_class(&self, class: &str) -> bool {
        self.attr("class").is_some_and(|c| c.split(' ').any(|x| x == class))
    }
}

/// Start tags in document order, with decoded attribute values. Enough for
/// the serialised DOM Chromium prints (double-quoted attributes, no inline script).
fn tags(html: &str) -> Vec<Tag> {
    fn decode(v: &str) -> String {
        v.replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&nbsp;", "\u{a0}")
            .replace("&amp;", "&")
    }
    let b = html.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = html[i..].find('<') {
        i += off + 1;
        if i >= b.len() || !b[i].is_ascii_alphabetic() {
            continue; // end tag, comment, doctype
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-') {
            i += 1;
        }
        let name = html[start..i].to_ascii_lowercase();
        let mut attrs = BTreeMap::new();
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= b.len() || b[i] == b'>' || b[i] == b'/' {
                break;
            }
            let a = i;
            while i < b.len() && !b[i].is_ascii_whitespace() && !matches!(b[i], b'=' | b'>' | b'/') {
                i += 1;
            }
            let attr = html[a..i].to_ascii_lowercase();
            let mut value = String::new();
            if i < b.len() && b[i] == b'=' && b.get(i + 1) == Some(&b'"') {
                let end = html[i + 2..].find('"').expect("closing quote") + i + 2;
                value = decode(&html[i + 2..end]);
                i = end + 1;
            }
            attrs.insert(attr, value);
        }
        out.push(Tag { name, attrs });
    }
    out
}

/// The fleet table's cell `col` (its `data-col`) in the row of `client`: its
/// start tag and its text (tags stripped, entities decoded).
fn fleet_cell(dom: &str, client: &str, col: &str) -> (Tag, String) {
    let table = dom.find(r#"id="fleet-table""#).expect("the fleet table");
    let table_end = table + dom[table..].find("</table>").expect("the fleet table's end");
    let row = table
        + dom[table..table_end]
            .find(&format!(r#"data-client="{client}""#))
            .unwrap_or_else(|| panic!("fleet row {client}"));
    let row_end = row + dom[row..].find("</tr>").expect("the row's end");
    let attr =
        row + dom[row..row_end].find(&format!(r#"data-col="{col}""#)).unwrap_or_else(|| panic!("{client}: {col}"));
    let start = dom[..attr].rfind("<td").expect("a cell");
    let open_end = attr + dom[attr..].find('>').expect("the cell's start tag") + 1;
    let close = open_end + dom[open_end..].find("</td>").expect("the cell's end");
    let tag = tags(&dom[start..open_end]).pop().expect("the cell's tag");
    let mut text = String::new();
    let mut in_tag = false;
    for ch in dom[open_end..close].chars() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&nbsp;", "\u{a0}").replace("&amp;", "&");
    (tag, text)
}

/// The tags named `name` that satisfy `pred`.
fn find<'a>(tags: &'a [Tag], name: &str, pred: &dyn Fn(&Tag) -> bool) -> Vec<&'a Tag> {
    tags.iter().filter(|t| t.name == name && pred(t)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_charts_and_numbers_in_chromium() {
    let binary = chromium_binary();
    if !test_support::require(binary.is_some(), "chromium is not installed (Debian package chromium)") {
        return;
    }
    let Some(binary) = binary else { return };
    let Some(seeded) = Seeded::start().await else { return };
    let url = format!("http://{}/", seeded.http);
    let dom = chromium(&binary, &["--virtual-time-budget=8000".into(), "--dump-dom".into(), url.clone()]).await;
    let tags = tags(&dom);
    let find = |name: &str, pred: &dyn Fn(&Tag) -> bool| find(&tags, name, pred);

    // The page finished a refresh without errors.
    let body: Vec<&Tag> = find("body", &|_| true);
    assert_eq!(body[0].attr("data-state"), Some("ready"), "page state: {:?}", body[0].attrs);
    assert!(body[0].num("data-refreshes") >= 1.0);

    // Health tiles show the server's own counters.
    let metric = |name: &str| -> f64 {
        let t: Vec<&Tag> = find("div", &|t| t.attr("data-metric") == Some(name));
        assert_eq!(t.len(), 1, "tile {name}");
        t[0].num("data-value")
    };
    let m = &seeded.server.metrics;
    assert_eq!(metric("received_readings"), m.received_readings.get() as f64);
    assert_eq!(metric("inserted_readings"), seeded.readings as f64);
    assert_eq!(metric("dead_letters"), 1.0);
    assert_eq!(metric("unacked_messages"), 0.0);
    assert_eq!(metric("subscribed"), 1.0);
    assert_eq!(metric("clickhouse"), 1.0);
    assert!(metric("insert_mean_ms") > 0.0);

    // Fleet rows: every client, its rate over the page's window, its backlog.
    let table: Vec<&Tag> = find("table", &|t| t.attr("id") == Some("fleet-table"));
    let (now_ms, from_ms) = (table[0].num("data-now-ms") as i64, table[0].num("data-from-ms") as i64);
    let window_s = table[0].num("data-window-s") as i64;
    assert_eq!(from_ms, (now_ms - window_s * 1000).div_euclid(60_000) * 60_000, "whole minutes");
    let rows: Vec<&Tag> = find("tr", &|t| t.attr("data-client").is_some());
    let row = |id: &str| *rows.iter().find(|r| r.attr("data-client") == Some(id)).unwrap_or_else(|| panic!("row {id}"));
    assert_eq!(rows.len(), 5, "{rows:?}");
    for id in ["dash-a", "dash-b"] {
        let (n, last) = seeded.raw_recent(id, from_ms * 1000).await;
        assert!(n > 0);
        assert_eq!(row(id).num("data-recent-readings"), n as f64, "{id}");
        assert!(close(row(id).num("data-readings-per-s"), n as f64 * 1000.0 / (now_ms - from_ms) as f64), "{id}");
        assert!(row(id).num("data-last-seen-ms") >= (last.div_euclid(60_000_000) * 60_000) as f64, "{id}");
    }
    assert_eq!(row("dash-a").num("data-outbox-rows"), 12.0);
    assert_eq!(row(OLD_AGENT).num("data-outbox-rows"), 5321.0);
    assert_eq!(row(OLD_AGENT).attr("data-connected"), Some("0"));

    // The backlog outlook and echo state: the row's data-* attributes carry
    // the published numbers (absent when the agent did not send them), its
    // cells show them for people.
    for sent in &seeded.statuses {
        let r = row(&sent.client_id);
        let id = &sent.client_id;
        let as_attr = |v: Option<f64>| v.map(|v| v.to_string());
        assert_eq!(r.attr("data-drain-per-s").map(str::to_owned), as_attr(sent.drain_per_s), "{id}");
        assert_eq!(r.attr("data-drain-eta-s").map(str::to_owned), as_attr(sent.drain_eta_s), "{id}");
        assert_eq!(r.attr("data-bytes-per-reading").map(str::to_owned), as_attr(sent.bytes_per_reading), "{id}");
        assert_eq!(
            r.attr("data-ingest-present").map(str::to_owned),
            sent.ingest_present.map(|p| u8::from(p).to_string())
        );
        assert_eq!(r.attr("data-echo-held-batches").map(str::to_owned), sent.echo_held_batches.map(|n| n.to_string()));
        assert_eq!(
            r.attr("data-echo-ahead-readings").map(str::to_owned),
            sent.echo_ahead_readings.map(|n| n.to_string())
        );
    }
    let shown = |client: &str| -> Vec<String> {
        ["outbox-rows", "drain", "drain-eta", "bytes-per-reading", "echo"]
            .map(|col| fleet_cell(&dom, client, col).1)
            .into()
    };
    assert_eq!(shown("dash-a"), ["12", "0.1 /s", "2.0 min", "9.5 B", "ingest · 0 held · 1,200 ahead"]);
    assert_eq!(shown("dash-b"), ["0", "0.0 /s", "–", "31.5 B", "–"], "ingest mode, nothing to drain");
    assert_eq!(shown(OLD_AGENT), ["5,321", "–", "–", "–", "–"], "an older agent: unknown");
    assert_eq!(shown(STALLED_AGENT), ["800", "-2.5 /s", "stalled", "12.0 B", "no ingest · 3 held · 6,000 ahead"]);
    assert_eq!(shown(OLD_CLIENT), ["–", "–", "–", "–", "–"], "no status at all");
    let class = |client: &str, col: &str| fleet_cell(&dom, client, col).0.attr("class").unwrap_or_default().to_owned();
    assert_eq!(class(STALLED_AGENT, "drain-eta"), "bad", "stalled is marked");
    assert_eq!(class(STALLED_AGENT, "echo"), "bad", "no ingest server is marked");
    assert_eq!(class("dash-a", "drain-eta"), "", "a draining backlog is not");
    assert_eq!(class("dash-a", "echo"), "", "nor echo mode with an ingest server and nothing held");

    // The last command: name, ✓/✗, age; a failure also the start of its
    // summary; the whole summary in the tooltip. What the device sent is
    // text, never markup.
    let command = |client: &str| fleet_cell(&dom, client, "last-command");
    assert_eq!(command("dash-a").1, "flush ✓ · 3.0 h ago");
    assert_eq!(class("dash-a", "last-command"), "");
    assert!(command("dash-a")
        .0
        .attr("title")
        .is_some_and(|t| t.starts_with("flush (id op-1) at ") && t.ends_with(": ok")));
    let shortened: String = HTML_SUMMARY.chars().take(59).collect();
    assert_eq!(command(STALLED_AGENT).1, format!("set_log_level ✗ · 2.0 d ago · {shortened}…"));
    assert_eq!(class(STALLED_AGENT, "last-command"), "bad", "a failed command is marked");
    let title = command(STALLED_AGENT).0.attr("title").unwrap_or_default().to_owned();
    assert!(title.starts_with("set_log_level (id op-<b>2</b>) at "), "{title}");
    assert!(title.ends_with(&format!(": {HTML_SUMMARY}")), "{title}");
    for sent in &seeded.statuses {
        let r = row(&sent.client_id);
        let c = sent.last_command.as_ref();
        assert_eq!(r.attr("data-last-command-id"), c.map(|c| c.id.as_str()), "{}", sent.client_id);
        assert_eq!(r.attr("data-last-command-ok").map(str::to_owned), c.map(|c| u8::from(c.ok).to_string()));
        assert_eq!(r.attr("data-last-command-ts-ms").map(str::to_owned), c.map(|c| c.ts_ms.to_string()));
    }
    for client in ["dash-b", OLD_AGENT, OLD_CLIENT] {
        assert_eq!(command(client).1, "–", "{client}: no command (yet), an older agent, no status");
    }
    assert!(tags.iter().all(|t| t.name != "img" && t.name != "b"), "a command's summary or id became an element");
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "the summary is shown as text");

    // One chart per client and sensor: its minutes and numbers equal the raw
    // data's, and it drew one bar per minute and a mean line.
    let mut charts: Vec<(&Tag, usize, Option<&str>)> = Vec::new();
    for t in &tags {
        if t.name == "figure" && t.has_class("chart") {
            charts.push((t, 0, None));
        } else if let Some((_, bars, line)) = charts.last_mut() {
            if t.name == "rect" && t.has_class("band") {
                *bars += 1;
            } else if t.name == "path" && t.has_class("avg") {
                *line = t.attr("d");
            }
        }
    }
    let expected: usize = fleet().iter().map(|(_, s)| s.len()).sum();
    assert_eq!(charts.len(), expected + 1, "one chart per client and sensor");
    for (figure, bars, line) in &charts {
        let (client_id, sensor) = (figure.attr("data-client").unwrap(), figure.attr("data-sensor").unwrap());
        if client_id == OLD_CLIENT {
            assert_eq!((sensor, figure.attr("data-points"), figure.attr("data-count")), ("flow", Some("0"), Some("0")));
            assert_eq!((*bars, figure.attr("data-min")), (0, None), "an empty chart");
            continue;
        }
        let raw = seeded.raw_minutes(client_id, sensor, figure.num("data-from-ms") as i64 / 1000).await;
        let what = format!("chart {client_id}/{sensor}");
        assert!(!raw.is_empty(), "{what}");
        assert_eq!(figure.num("data-points") as usize, raw.len(), "{what}");
        assert_eq!(*bars, raw.len(), "{what}: bars");
        assert!(line.is_some_and(|d| d.matches(['M', 'L']).count() == raw.len()), "{what}: line {line:?}");
        assert_eq!(figure.num("data-count"), raw.iter().map(|r| r.n).sum::<u64>() as f64, "{what}");
        assert_eq!(figure.num("data-min"), raw.iter().map(|r| r.lo).fold(f64::INFINITY, f64::min), "{what}");
        assert_eq!(figure.num("data-max"), raw.iter().map(|r| r.hi).fold(f64::NEG_INFINITY, f64::max), "{what}");
    }

    // Rolling averages per client and sensor, over the page's own instant.
    let mut cells = 0;
    let mut current: Option<(&str, i64)> = None;
    let mut sensor: Option<&str> = None;
    for t in &tags {
        if t.name == "table" && t.has_class("averages") {
            current = Some((t.attr("data-client").unwrap(), t.num("data-now-ms") as i64));
            sensor = None;
        } else if t.name == "tr" && current.is_some() && t.attr("data-sensor").is_some() {
            sensor = t.attr("data-sensor");
        } else if let (Some((client_id, now_ms)), Some(sensor), Some(w)) = (current, sensor, t.attr("data-window")) {
            let minutes: i64 = w.parse().unwrap();
            let from_ms = (now_ms - minutes * 60_000).div_euclid(60_000) * 60_000;
            let (n, mean) = seeded.raw_window(client_id, sensor, from_ms * 1000).await;
            let what = format!("average {client_id}/{sensor}/{minutes} min");
            assert_eq!(t.num("data-count"), n as f64, "{what}");
            if n > 0 {
                assert!(close(t.num("data-avg"), mean), "{what}: {} vs {mean}", t.num("data-avg"));
            }
            cells += 1;
        }
    }
    assert_eq!(cells, expected * 3, "three windows per sensor");

    // Dead letters.
    let errors: Vec<&Tag> = find("section", &|t| t.attr("id") == Some("errors"));
    assert_eq!(errors[0].attr("data-total"), Some("1"));

    // A sensor named like HTML is text, never markup.
    assert!(tags.iter().all(|t| t.name != "i"), "the sensor name became an element");
    assert!(tags.iter().any(|t| t.attr("data-sensor") == Some(HTML_SENSOR)));
    assert!(dom.contains("&lt;i&gt;x&lt;/i&gt;"), "the sensor name is shown as text");

    // A screenshot: always taken (it must work), kept when asked.
    let shot = std::env::temp_dir().join(format!("{}.png", test_support::unique_name("dashboard")));
    chromium(
        &binary,
        &[
            "--virtual-time-budget=8000".into(),
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1000".into(),
            url,
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real PNG");
    if let Ok(target) = std::env::var("DASHBOARD_SCREENSHOT") {
        let target =
            if target == "1" { test_support::repo_root().join("docs/img/dashboard.png") } else { target.into() };
        std::fs::create_dir_all(target.parent().expect("a file path")).expect("create the screenshot folder");
        std::fs::copy(&shot, &target).expect("keep the screenshot");
        eprintln!("screenshot: {}", target.display());
    }
    let _ = std::fs::remove_file(&shot);
    seeded.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_user_reads_but_cannot_write() {
    // Every API test runs as telemetry_api (the harness config); this one
    // shows what its profile in deploy/clickhouse/users.xml.in enforces.
    let Some(world) = World::new() else { return };
    let server = Server::start(world.config()).await;
    let api = world.ch().with_user("telemetry_api");
    let db = &world.database;
    let n: u64 = api.query(&format!("SELECT count() FROM `{db}`.readings")).fetch_one().await.expect("it reads");
    assert_eq!(n, 0);
    let write = api
        .query(&format!("INSERT INTO `{db}`.ingest_errors (topic) VALUES ('forged')"))
        .execute()
        .await
        .expect_err("a read-only user cannot write");
    assert!(write.to_string().contains("Code: 164"), "readonly refusal (164), got {write}");
    let limit: String = api
        .query("SELECT value FROM system.settings WHERE name = 'max_execution_time'")
        .fetch_one()
        .await
        .expect("settings");
    assert_eq!(limit, "10", "its profile bounds every query");
    server.stop().await;
}
