//! Remote commands: what the agent decides about a command payload, apart
//! from carrying it out ([`crate::remote`] does that). Pure: no broker, no
//! clock of its own (time is an argument), unit-tested.
//!
//! Rules (the payloads are in `telemetry_wire::command`):
//! - a payload that does not decode, names an unknown command or carries
//!   arguments the command does not take is refused with a typed error, and
//!   nothing changes;
//! - a command past its `expires_at_ms` is ignored (counted, no reply: the
//!   operator stopped waiting for it);
//! - a command whose id was answered before is answered again from memory,
//!   not run twice (QoS 1 redelivers; operators retry);
//! - the memory of answered ids is bounded ([`REMEMBERED`]); an id is only
//!   needed until its command expires.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{Map, Value};
pub use telemetry_wire::command::Action;
use telemetry_wire::command::{Command, CommandError, ErrorKind};

use crate::config::Config;

/// Answered ids kept for repeats, at most.
pub const REMEMBERED: usize = 256;

/// What to do with one command payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Answered before: publish this reply again.
    Repeat(Vec<u8>),
    /// Carry it out.
    Run {
        /// Its id.
        id: String,
        /// When it expires (Unix ms), to remember the answer that long.
        expires_at_ms: i64,
        /// What to do.
        action: Action,
    },
    /// Do not run it: answer with this error.
    Refuse {
        /// Its id, when it had a readable one.
        id: Option<String>,
        /// When it expires, when readable.
        expires_at_ms: Option<i64>,
        /// Its name, when readable.
        name: Option<String>,
        /// Why.
        error: CommandError,
    },
    /// Past its expiry: ignore it.
    Expired {
        /// Its id.
        id: String,
    },
}

/// The answered ids, for repeats.
#[derive(Debug, Default)]
pub struct CommandBook {
    answers: HashMap<String, (i64, Vec<u8>)>,
    order: VecDeque<String>,
}

impl CommandBook {
    /// Decides what to do with `payload` received at `now_ms`.
    pub fn decide(&mut self, payload: &[u8], now_ms: i64) -> Decision {
        let command = match Command::decode(payload) {
            Ok(c) => c,
            Err((id, error)) => return Decision::Refuse { id, expires_at_ms: None, name: None, error },
        };
        if now_ms > command.expires_at_ms {
            return Decision::Expired { id: command.id };
        }
        if let Some((_, reply)) = self.answers.get(&command.id) {
            return Decision::Repeat(reply.clone());
        }
        let refuse = |error| Decision::Refuse {
            id: Some(command.id.clone()),
            expires_at_ms: Some(command.expires_at_ms),
            name: Some(command.name.clone()),
            error,
        };
        match command.action().and_then(check_filter) {
            Ok(action) => Decision::Run { id: command.id, expires_at_ms: command.expires_at_ms, action },
            Err(error) => refuse(error),
        }
    }

    /// Remembers the reply to `id` (kept while the command has not expired,
    /// and among the last [`REMEMBERED`]).
    pub fn answered(&mut self, id: &str, expires_at_ms: i64, reply: Vec<u8>, now_ms: i64) {
        self.answers.retain(|_, (expires, _)| *expires >= now_ms);
        self.order.retain(|i| self.answers.contains_key(i));
        if self.answers.insert(id.to_owned(), (expires_at_ms, reply)).is_none() {
            self.order.push_back(id.to_owned());
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }

    /// Ids remembered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether none is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

/// A log filter must parse as a `tracing` directive (the wire checks only
/// that it is a short string).
fn check_filter(action: Action) -> Result<Action, CommandError> {
    if let Action::SetLogLevel { filter } = &action {
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(filter) {
            return Err(CommandError::new(ErrorKind::BadArguments, format!("\"filter\" is not a log filter: {error}")));
        }
    }
    Ok(action)
}

/// Keys a `reload` applies to the running agent; every other key that
/// changed needs a restart and is reported as such.
pub const LIVE_KEYS: &[&str] = &[
    "batch_linger_ms",
    "confirm_timeout_ms",
    "replay_max_rate",
    "status_interval_secs",
    "echo_ahead_max_readings",
    "echo_ahead_max_bytes",
    "echo_ahead_timeout_secs",
];

/// What a `reload` does: the keys it applies (with their new values) and
/// the changed keys that need a restart (running and file values).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadPlan {
    /// Live keys that changed: applied.
    pub applied: BTreeMap<String, Value>,
    /// Other keys that changed: not applied, `(running, in the file)`.
    pub needs_restart: BTreeMap<String, (Value, Value)>,
}

/// The configuration as an operator may see it: every key, the secrets
/// redacted (`Secret` serialises as `<redacted>`; a password written into
/// `postgres_url` is cut out here).
#[must_use]
pub fn shown(config: &Config) -> Map<String, Value> {
    let mut map = match serde_json::to_value(config) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    if let Some(Value::String(url)) = map.get_mut("postgres_url") {
        *url = redact_password(url);
    }
    map
}

/// `url` (a libpq connection string, `key=value` pairs or a
/// `postgres://user:password@host/...` URL) without its password.
#[must_use]
pub fn redact_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                let query = redact_pairs(tail, '&');
                return format!("{scheme}://{user}:<redacted>@{host}{query}");
            }
        }
        return format!("{scheme}://{authority}{}", redact_pairs(tail, '&'));
    }
    redact_pairs(url, ' ')
}

/// `password=...` among `sep`-separated pairs replaced (a quoted value too).
fn redact_pairs(text: &str, sep: char) -> String {
    let Some(at) = text.find("password=") else { return text.to_owned() };
    let value = &text[at + "password=".len()..];
    let end = if let Some(quoted) = value.strip_prefix('\'') {
        quoted.find('\'').map_or(value.len(), |i| i + 2)
    } else {
        value.find(sep).unwrap_or(value.len())
    };
    format!("{}password=<redacted>{}", &text[..at], &value[end..])
}

/// Compares the running configuration with the one just loaded.
#[must_use]
pub fn reload_plan(running: &Config, loaded: &Config) -> ReloadPlan {
    let (old, new) = (shown(running), shown(loaded));
    let mut plan = ReloadPlan::default();
    // Keys whose shown values hide a change: reported without the values.
    let hidden = [
        ("postgres_url", running.postgres_url != loaded.postgres_url),
        ("postgres_password", running.postgres_password.expose() != loaded.postgres_password.expose()),
        ("mqtt_password", running.mqtt_password.expose() != loaded.mqtt_password.expose()),
    ];
    for (key, changed) in hidden {
        if changed && old.get(key) == new.get(key) {
            let redacted = Value::from("<redacted>");
            plan.needs_restart.insert(key.to_owned(), (redacted.clone(), redacted));
        }
    }
    for (key, value) in new {
        let before = old.get(&key).cloned().unwrap_or(Value::Null);
        if before == value {
            continue;
        }
        if LIVE_KEYS.contains(&key.as_str()) {
            plan.applied.insert(key, value);
        } else {
            plan.needs_restart.insert(key, (before, value));
        }
    }
    plan
}

/// `running` with the live keys of `loaded` (what a reload applied).
#[must_use]
pub fn with_live_keys(running: &Config, loaded: &Config) -> Config {
    Config {
        batch_linger_ms: loaded.batch_linger_ms,
        confirm_timeout_ms: loaded.confirm_timeout_ms,
        replay_max_rate: loaded.replay_max_rate,
        status_interval_secs: loaded.status_interval_secs,
        echo_ahead_max_readings: loaded.echo_ahead_max_readings,
        echo_ahead_max_bytes: loaded.echo_ahead_max_bytes,
        echo_ahead_timeout_secs: loaded.echo_ahead_timeout_secs,
        ..running.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(id: &str, name: &str, args: Value, expires_at_ms: i64) -> Vec<u8> {
        serde_json::to_vec(&json!({"id": id, "name": name, "args": args, "expires_at_ms": expires_at_ms})).unwrap()
    }

    #[test]
    fn a_valid_command_runs_once_and_a_redelivery_repeats_the_answer() {
        let mut book = CommandBook::default();
        let p = payload("c1", "flush", json!({}), 2000);
        let Decision::Run { id, action, expires_at_ms } = book.decide(&p, 1000) else { panic!("should run") };
        assert_eq!((id.as_str(), action, expires_at_ms), ("c1", Action::Flush, 2000));
        book.answered("c1", 2000, b"reply-1".to_vec(), 1000);
        assert_eq!(book.decide(&p, 1500), Decision::Repeat(b"reply-1".to_vec()));
        assert_eq!(book.decide(&p, 2001), Decision::Expired { id: "c1".into() }, "expired even if answered");
    }

    #[test]
    fn expired_commands_are_ignored() {
        let mut book = CommandBook::default();
        let p = payload("old", "pause_intake", json!({}), 999);
        assert_eq!(book.decide(&p, 1000), Decision::Expired { id: "old".into() });
    }

    #[test]
    fn bad_commands_are_refused_with_their_kind() {
        let mut book = CommandBook::default();
        let kind = |d: Decision| match d {
            Decision::Refuse { error, .. } => error.kind,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(kind(book.decide(b"{not json", 0)), ErrorKind::Malformed);
        assert_eq!(kind(book.decide(&payload("a", "rm_rf", json!({}), 9), 0)), ErrorKind::UnknownCommand);
        assert_eq!(kind(book.decide(&payload("a", "flush", json!({"now": true}), 9), 0)), ErrorKind::BadArguments);
        assert_eq!(kind(book.decide(&payload("a", "set_log_level", json!({}), 9), 0)), ErrorKind::BadArguments);
        assert_eq!(
            kind(book.decide(&payload("a", "set_log_level", json!({"filter": 3}), 9), 0)),
            ErrorKind::BadArguments
        );
        assert_eq!(
            kind(book.decide(&payload("a", "set_log_level", json!({"filter": "edge_agent=loud"}), 9), 0)),
            ErrorKind::BadArguments,
            "not a level"
        );
        assert_eq!(kind(book.decide(&vec![b'x'; 20_000], 0)), ErrorKind::TooLarge);
        let ok = book.decide(&payload("b", "set_log_level", json!({"filter": "edge_agent=debug,warn"}), 9), 0);
        assert!(
            matches!(ok, Decision::Run { action: Action::SetLogLevel { filter }, .. } if filter == "edge_agent=debug,warn")
        );
    }

    #[test]
    fn a_refusal_names_the_id_so_it_can_be_repeated() {
        let mut book = CommandBook::default();
        match book.decide(&payload("z9", "nope", json!({}), 9), 0) {
            Decision::Refuse { id, expires_at_ms, name, .. } => {
                assert_eq!((id.as_deref(), expires_at_ms, name.as_deref()), (Some("z9"), Some(9), Some("nope")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_memory_of_answers_is_bounded_and_forgets_expired_ids() {
        let mut book = CommandBook::default();
        for i in 0..REMEMBERED + 50 {
            book.answered(&format!("id{i}"), 10_000, vec![], 0);
        }
        assert_eq!(book.len(), REMEMBERED);
        assert!(matches!(book.decide(&payload("id0", "flush", json!({}), 10_000), 0), Decision::Run { .. }));
        book.answered("late", 20_000, vec![], 15_000);
        assert_eq!(book.len(), 1, "every other answer expired at 10,000");
    }

    #[test]
    fn a_password_in_the_postgres_url_is_never_shown() {
        for (url, shown) in [
            ("host=db user=edge password=s3cret dbname=x", "host=db user=edge password=<redacted> dbname=x"),
            ("host=db password='s3 cret' user=edge", "host=db password=<redacted> user=edge"),
            (
                "postgres://edge:s3cret@db:5432/x?sslmode=require",
                "postgres://edge:<redacted>@db:5432/x?sslmode=require",
            ),
            (
                "postgresql://edge@db/x?password=s3cret&sslmode=require",
                "postgresql://edge@db/x?password=<redacted>&sslmode=require",
            ),
            ("postgres://postgres@127.0.0.1:25432/postgres", "postgres://postgres@127.0.0.1:25432/postgres"),
            ("host=127.0.0.1 user=postgres", "host=127.0.0.1 user=postgres"),
        ] {
            assert_eq!(redact_password(url), shown, "{url}");
        }
        let config = Config { postgres_url: "postgres://edge:s3cret@db/x".into(), ..Config::default() };
        assert!(!Value::Object(shown(&config)).to_string().contains("s3cret"));
        let other = Config { postgres_url: "postgres://edge:0ther@db/x".into(), ..Config::default() };
        let plan = reload_plan(&config, &other);
        assert!(!format!("{plan:?}").contains("s3cret") && !format!("{plan:?}").contains("0ther"));
        assert!(plan.needs_restart.contains_key("postgres_url"), "a changed password is still reported");
        let rotated = Config { mqtt_password: telemetry_settings::Secret::new("new"), ..config.clone() };
        let before = Config { mqtt_password: telemetry_settings::Secret::new("old"), ..config.clone() };
        let plan = reload_plan(&before, &rotated);
        assert_eq!(plan.needs_restart.keys().collect::<Vec<_>>(), vec!["mqtt_password"]);
        assert_eq!(plan.needs_restart["mqtt_password"], (json!("<redacted>"), json!("<redacted>")));
    }

    #[test]
    fn a_reload_applies_live_keys_and_reports_the_rest() {
        let running = Config::default();
        let loaded = Config {
            replay_max_rate: 5000,
            batch_linger_ms: running.batch_linger_ms + 1,
            quota_rows: 7,
            mqtt_password: telemetry_settings::Secret::new("s3cret"),
            ..Config::default()
        };
        let plan = reload_plan(&running, &loaded);
        assert_eq!(plan.applied.keys().collect::<Vec<_>>(), vec!["batch_linger_ms", "replay_max_rate"]);
        assert_eq!(plan.applied["replay_max_rate"], json!(5000));
        assert_eq!(plan.needs_restart.keys().collect::<Vec<_>>(), vec!["mqtt_password", "quota_rows"]);
        assert_eq!(plan.needs_restart["mqtt_password"], (json!(""), json!("<redacted>")), "never the secret");
        let now = with_live_keys(&running, &loaded);
        assert_eq!((now.replay_max_rate, now.quota_rows), (5000, running.quota_rows));
        assert_eq!(reload_plan(&now, &now), ReloadPlan::default());
    }
}
