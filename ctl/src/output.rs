//! What `telemetry-ctl` prints: a table for people, a JSON array for
//! scripts, and the exit code.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::replies::{Answer, Outcome};

/// Longest DETAIL cell of an `ok` row, in characters (`--json` has it all).
pub const DETAIL_MAX_CHARS: usize = 100;

/// Exit code: every target answered `ok`.
pub const EXIT_OK: u8 = 0;
/// Exit code: some target answered with an error or not at all.
pub const EXIT_NOT_ALL_OK: u8 = 1;
/// Exit code: bad usage, or the broker could not be used.
pub const EXIT_USAGE: u8 = 2;

/// The exit code for `outcomes`.
#[must_use]
pub fn exit_code(outcomes: &[Outcome]) -> u8 {
    if outcomes.iter().all(Outcome::is_ok) {
        EXIT_OK
    } else {
        EXIT_NOT_ALL_OK
    }
}

/// A table with a header, one row per outcome (in the given order):
/// CLIENT, RESULT (`ok`, the error kind, or `no reply`) and DETAIL (a
/// one-line summary of the result, or the error message).
#[must_use]
pub fn table(outcomes: &[Outcome], timeout: Duration) -> String {
    let rows: Vec<[String; 3]> = outcomes
        .iter()
        .map(|o| {
            let (result, detail) = match &o.answer {
                Answer::Ok(value) => ("ok".to_owned(), summary(value, DETAIL_MAX_CHARS)),
                Answer::Error(e) => (e.kind.as_str().to_owned(), one_line(&e.message)),
                Answer::NoReply => ("no reply".to_owned(), format!("nothing within {}", human(timeout))),
            };
            [o.client_id.clone(), result, detail]
        })
        .collect();
    let header = ["CLIENT".to_owned(), "RESULT".to_owned(), "DETAIL".to_owned()];
    let width = |col: usize| rows.iter().chain([&header]).map(|r| r[col].chars().count()).max().unwrap_or(0);
    let (w0, w1) = (width(0), width(1));
    let mut out = String::new();
    for [client, result, detail] in [&header].into_iter().chain(&rows) {
        let line = format!("{client:<w0$}  {result:<w1$}  {detail}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// A JSON array, one object per outcome: `{client_id, ok, result?, error?,
/// timeout?: true}`.
#[must_use]
pub fn json(outcomes: &[Outcome]) -> String {
    let items: Vec<Value> = outcomes
        .iter()
        .map(|o| match &o.answer {
            Answer::Ok(result) if result.is_null() => json!({"client_id": o.client_id, "ok": true}),
            Answer::Ok(result) => json!({"client_id": o.client_id, "ok": true, "result": result}),
            Answer::Error(error) => json!({"client_id": o.client_id, "ok": false, "error": error}),
            Answer::NoReply => json!({"client_id": o.client_id, "ok": false, "timeout": true}),
        })
        .collect();
    // Invariant: a Value always serialises.
    let mut text = serde_json::to_string_pretty(&Value::Array(items)).expect("a JSON value serialises");
    text.push('\n');
    text
}

/// Longest nested value shown whole in a summary; longer ones are counted.
const NESTED_MAX_CHARS: usize = 40;

/// A compact one-line view of a result: an object as `key=value` pairs,
/// scalars first (strings without quotes where that is unambiguous), then
/// nested values as compact JSON when short or as `{…N keys}` / `[…N]`;
/// anything else as compact JSON; `null` and `{}` as nothing. Cut to `max`
/// characters with a trailing `…`.
#[must_use]
pub fn summary(value: &Value, max: usize) -> String {
    let text = match value {
        Value::Null => String::new(),
        Value::Object(map) => {
            let nested = |v: &Value| matches!(v, Value::Object(_) | Value::Array(_));
            let (scalars, nests): (Vec<_>, Vec<_>) = map.iter().partition(|(_, v)| !nested(v));
            scalars.into_iter().chain(nests).map(|(k, v)| format!("{k}={}", brief(v))).collect::<Vec<_>>().join(" ")
        }
        other => brief(other),
    };
    truncate(&one_line(&text), max)
}

fn brief(value: &Value) -> String {
    match value {
        Value::String(s) if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '=') => {
            s.clone()
        }
        Value::Object(map) if value.to_string().chars().count() > NESTED_MAX_CHARS => {
            format!("{{…{} {}}}", map.len(), if map.len() == 1 { "key" } else { "keys" })
        }
        Value::Array(items) if value.to_string().chars().count() > NESTED_MAX_CHARS => format!("[…{}]", items.len()),
        other => other.to_string(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `5s`, `1.5s`, `250ms`: how the timeout is shown.
#[must_use]
pub fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_wire::{CommandError, ErrorKind};

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome { client_id: "edge-1".into(), answer: Answer::Ok(json!({"flushed_batches": 2, "paused": false})) },
            Outcome {
                client_id: "edge-10".into(),
                answer: Answer::Error(CommandError::new(ErrorKind::BadArguments, "args.filter:\n  not a string")),
            },
            Outcome { client_id: "edge-2".into(), answer: Answer::NoReply },
        ]
    }

    #[test]
    fn the_table_aligns_columns_and_names_each_result() {
        let text = table(&outcomes(), Duration::from_secs(5));
        let expected = "\
CLIENT   RESULT         DETAIL
edge-1   ok             flushed_batches=2 paused=false
edge-10  bad_arguments  args.filter: not a string
edge-2   no reply       nothing within 5s
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_has_one_object_per_target_with_only_the_fields_that_apply() {
        let value: Value = serde_json::from_str(&json(&outcomes())).unwrap();
        assert_eq!(
            value,
            json!([
                {"client_id": "edge-1", "ok": true, "result": {"flushed_batches": 2, "paused": false}},
                {"client_id": "edge-10", "ok": false,
                 "error": {"kind": "bad_arguments", "message": "args.filter:\n  not a string"}},
                {"client_id": "edge-2", "ok": false, "timeout": true},
            ])
        );
        let bare = vec![Outcome { client_id: "a".into(), answer: Answer::Ok(Value::Null) }];
        assert_eq!(serde_json::from_str::<Value>(&json(&bare)).unwrap(), json!([{"client_id": "a", "ok": true}]));
    }

    #[test]
    fn summaries_are_one_short_line() {
        assert_eq!(summary(&Value::Null, 50), "");
        assert_eq!(summary(&json!({}), 50), "");
        assert_eq!(
            summary(&json!({"filter": "edge_agent=debug,warn", "note": "two words", "n": 1.5, "c": {"a": [1]}}), 200),
            r#"filter="edge_agent=debug,warn" n=1.5 note="two words" c={"a":[1]}"#,
            "scalars first, short nested values whole"
        );
        let status = json!({"config": {"a_long_key_name": 1, "another_long_key": 2, "k3": 3}, "intake_paused": false,
            "status": {"outbox_rows": 0}, "list": (0..20).collect::<Vec<_>>()});
        assert_eq!(
            summary(&status, 200),
            r#"intake_paused=false config={…3 keys} list=[…20] status={"outbox_rows":0}"#,
            "long nested values are counted"
        );
        let one = json!({"needs_restart": {"mqtt_host": {"running": "10.0.0.5", "file": "10.0.0.6"}}});
        assert_eq!(summary(&one, 200), "needs_restart={…1 key}");
        assert_eq!(summary(&json!("plain"), 50), "plain");
        assert_eq!(summary(&json!([1, 2]), 50), "[1,2]");
        let long = summary(&json!({"text": "x".repeat(300)}), 20);
        assert_eq!(long.chars().count(), 20);
        assert!(long.ends_with('…') && long.starts_with("text=xxx"), "{long}");
    }

    #[test]
    fn exit_codes_say_whether_all_went_well() {
        assert_eq!(exit_code(&outcomes()), EXIT_NOT_ALL_OK);
        assert_eq!(exit_code(&outcomes()[..1]), EXIT_OK);
        assert_eq!(exit_code(&outcomes()[2..]), EXIT_NOT_ALL_OK);
    }

    #[test]
    fn timeouts_print_briefly() {
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
    }
}
