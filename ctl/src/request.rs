//! From a parsed command line to the [`Command`] on the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use telemetry_wire::command::Action;
use telemetry_wire::command::COMMAND_MAX_BYTES;
use telemetry_wire::Command;

use crate::UsageError;

/// A fresh command id, `ctl-` and 16 hex digits.
#[must_use]
pub fn new_command_id() -> String {
    format!("ctl-{:016x}", fastrand::u64(..))
}

/// Unix milliseconds now.
#[must_use]
pub fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// The command `action` with id `id`, expiring `timeout` after `now_ms`
/// (the agents ignore it once the operator has stopped waiting).
///
/// # Errors
/// An empty log filter, or a command larger than the agents accept.
pub fn build(action: &Action, id: &str, now_ms: i64, timeout: Duration) -> Result<Command, UsageError> {
    if let Action::SetLogLevel { filter } = action {
        if filter.trim().is_empty() {
            return Err(UsageError(
                "set-log-level needs a filter such as \"debug\" or \"edge_agent=debug,warn\"".into(),
            ));
        }
    }
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let command = Command::for_action(id, action, now_ms.saturating_add(timeout_ms));
    let size = command.encode().len();
    if size > COMMAND_MAX_BYTES {
        return Err(UsageError(format!("the command is {size} bytes; agents take at most {COMMAND_MAX_BYTES}")));
    }
    Ok(command)
}

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h`, or a bare
/// number of seconds (`5s`, `1500ms`, `0.5s`, `2m`, `3`). Must be positive.
///
/// # Errors
/// Anything else, as a message for clap.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("{text:?} is not a duration (e.g. 5s, 500ms, 2m)"));
    }
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h, e.g. 5s or 500ms)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 5s, 500ms, 2m)"))?;
    let duration = Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{text:?}: {e}"))?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use telemetry_wire::CommandName;

    #[test]
    fn commands_carry_their_name_args_and_expiry() {
        let c = build(&Action::Flush, "ctl-1", 1_000, Duration::from_secs(5)).unwrap();
        assert_eq!((c.name.as_str(), c.expires_at_ms), ("flush", 6_000));
        assert!(c.args.is_empty());
        let filter = "edge_agent=debug,warn".to_owned();
        let c = build(&Action::SetLogLevel { filter }, "ctl-2", 0, Duration::from_millis(1500)).unwrap();
        assert_eq!(c.name, "set_log_level");
        assert_eq!(c.expires_at_ms, 1500);
        assert_eq!(c.args.get("filter"), Some(&Value::from("edge_agent=debug,warn")));
        // What the agent will decode.
        let back = Command::decode(&c.encode()).unwrap();
        assert_eq!(back.command_name().unwrap(), CommandName::SetLogLevel);
        let names: Vec<&str> = [Action::Status, Action::PauseIntake, Action::ResumeIntake, Action::Reload]
            .iter()
            .map(|a| a.name().as_str())
            .collect();
        assert_eq!(names, ["status", "pause_intake", "resume_intake", "reload"]);
    }

    #[test]
    fn empty_filters_and_oversize_commands_are_refused() {
        let empty = Action::SetLogLevel { filter: " ".into() };
        assert!(build(&empty, "a", 0, Duration::from_secs(1)).unwrap_err().0.contains("needs a filter"));
        let huge = Action::SetLogLevel { filter: "x".repeat(COMMAND_MAX_BYTES) };
        assert!(build(&huge, "a", 0, Duration::from_secs(1)).unwrap_err().0.contains("at most"));
    }

    #[test]
    fn ids_are_fresh_and_valid_on_the_wire() {
        let (a, b) = (new_command_id(), new_command_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 16);
        assert!(a.starts_with("ctl-") && telemetry_wire::command::valid_id(&a), "{a}");
        assert!(now_ms() > 1_700_000_000_000);
    }

    #[test]
    fn durations_take_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "5x", "-1s", "0", "0ms", "1.2.3s", "5 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
