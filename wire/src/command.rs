//! Remote commands to agents over MQTT: an operator publishes a [`Command`]
//! on `<prefix>/cmd/<client_id>` (QoS 1); the agent answers with a
//! [`Reply`] on `<prefix>/cmd-reply/<client_id>`. JSON both ways: small,
//! rare, and typed by people with `mosquitto_pub` as often as by
//! `telemetry-ctl`. Layout and examples: `docs/wire-format.md`.
//!
//! A command is idempotent by its `id` (a redelivered command is answered
//! again, not run twice) and is ignored after `expires_at_ms`. Anything the
//! agent cannot take gets a reply with a typed [`ErrorKind`], never a change.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest command payload an agent reads; larger ones are answered
/// [`ErrorKind::TooLarge`] without being parsed.
pub const COMMAND_MAX_BYTES: usize = 16 * 1024;

/// Longest command id.
pub const COMMAND_ID_MAX_LEN: usize = 64;

/// The commands an agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandName {
    /// Everything the status message has, plus the configuration in effect
    /// (secrets redacted).
    Status,
    /// Publish what is committed now, without waiting for the linger.
    Flush,
    /// Stop reading the sensor sockets (sensors are held, as under
    /// back-pressure; nothing is acked that is not committed).
    PauseIntake,
    /// Read the sensor sockets again.
    ResumeIntake,
    /// Replace the log filter (`args.filter`, e.g. `"debug"` or
    /// `"edge_agent=debug,warn"`).
    SetLogLevel,
    /// Re-read the configuration file; keys that cannot change while the
    /// agent runs are reported, not applied.
    Reload,
}

impl CommandName {
    /// Every command, in documentation order.
    pub const ALL: [CommandName; 6] = [
        CommandName::Status,
        CommandName::Flush,
        CommandName::PauseIntake,
        CommandName::ResumeIntake,
        CommandName::SetLogLevel,
        CommandName::Reload,
    ];

    /// The name on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Status => "status",
            CommandName::Flush => "flush",
            CommandName::PauseIntake => "pause_intake",
            CommandName::ResumeIntake => "resume_intake",
            CommandName::SetLogLevel => "set_log_level",
            CommandName::Reload => "reload",
        }
    }

    /// The command called `name`, if there is one.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A known command with its arguments checked: what an operator asks for
/// and what an agent carries out (one type for both ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `status`.
    Status,
    /// `flush`.
    Flush,
    /// `pause_intake`.
    PauseIntake,
    /// `resume_intake`.
    ResumeIntake,
    /// `set_log_level` with `args.filter`.
    SetLogLevel {
        /// An `EnvFilter` directive such as `debug` or `edge_agent=debug,warn`
        /// (1 to [`FILTER_MAX_LEN`] characters; its syntax is the agent's
        /// to check).
        filter: String,
    },
    /// `reload`.
    Reload,
}

/// Longest log filter `set_log_level` takes.
pub const FILTER_MAX_LEN: usize = 512;

impl Action {
    /// The command's name.
    #[must_use]
    pub fn name(&self) -> CommandName {
        match self {
            Action::Status => CommandName::Status,
            Action::Flush => CommandName::Flush,
            Action::PauseIntake => CommandName::PauseIntake,
            Action::ResumeIntake => CommandName::ResumeIntake,
            Action::SetLogLevel { .. } => CommandName::SetLogLevel,
            Action::Reload => CommandName::Reload,
        }
    }

    /// Its arguments on the wire.
    #[must_use]
    pub fn args(&self) -> Map<String, Value> {
        let mut args = Map::new();
        if let Action::SetLogLevel { filter } = self {
            args.insert("filter".into(), Value::from(filter.as_str()));
        }
        args
    }

    /// The command `name` with `args`, checked.
    ///
    /// # Errors
    /// [`ErrorKind::BadArguments`]: missing, unexpected or mistyped
    /// arguments.
    pub fn from_parts(name: CommandName, args: &Map<String, Value>) -> Result<Self, CommandError> {
        let bad = |message: String| Err(CommandError::new(ErrorKind::BadArguments, message));
        let none = |action: Action| {
            if args.is_empty() {
                Ok(action)
            } else {
                let keys: Vec<&str> = args.keys().map(String::as_str).collect();
                bad(format!("{name} takes no arguments (got {})", keys.join(", ")))
            }
        };
        match name {
            CommandName::Status => none(Action::Status),
            CommandName::Flush => none(Action::Flush),
            CommandName::PauseIntake => none(Action::PauseIntake),
            CommandName::ResumeIntake => none(Action::ResumeIntake),
            CommandName::Reload => none(Action::Reload),
            CommandName::SetLogLevel => {
                if let Some(extra) = args.keys().find(|k| *k != "filter") {
                    return bad(format!("set_log_level takes only \"filter\" (got {extra:?})"));
                }
                let Some(filter) = args.get("filter") else {
                    return bad("set_log_level needs \"filter\", e.g. \"debug\" or \"edge_agent=debug,warn\"".into());
                };
                let Some(filter) = filter.as_str() else {
                    return bad(format!("\"filter\" must be a string, not {filter}"));
                };
                if filter.trim().is_empty() || filter.len() > FILTER_MAX_LEN {
                    return bad(format!("\"filter\" must be 1 to {FILTER_MAX_LEN} characters"));
                }
                Ok(Action::SetLogLevel { filter: filter.to_owned() })
            }
        }
    }
}

/// A command as published by an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Unique per command (1 to 64 of `A-Z a-z 0-9 . _ : -`); the agent
    /// answers a repeated id from memory instead of running it again.
    pub id: String,
    /// Which command (see [`CommandName`]); kept as text so an unknown name
    /// gets a typed error rather than a parse failure.
    pub name: String,
    /// Its arguments (an object; empty for most commands).
    #[serde(default)]
    pub args: Map<String, Value>,
    /// Unix milliseconds after which the agent ignores it.
    pub expires_at_ms: i64,
}

/// Why a command was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, not a command object, or a bad id.
    Malformed,
    /// Larger than [`COMMAND_MAX_BYTES`].
    TooLarge,
    /// A name the agent does not know.
    UnknownCommand,
    /// Missing, unexpected or mistyped arguments.
    BadArguments,
    /// A valid command that could not be carried out (e.g. the config file
    /// does not load); nothing was changed.
    Failed,
}

impl ErrorKind {
    /// The label used in metrics and logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::UnknownCommand => "unknown_command",
            ErrorKind::BadArguments => "bad_arguments",
            ErrorKind::Failed => "failed",
        }
    }
}

/// A typed error in a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// For people.
    pub message: String,
}

impl CommandError {
    /// An error of `kind` saying `message`.
    #[must_use]
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// An agent's answer to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The command's id; absent when the command was too unreadable to
    /// have one.
    pub id: Option<String>,
    /// The agent that answers.
    pub client_id: String,
    /// The command's name, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the agent answered, Unix milliseconds.
    pub ts_ms: i64,
    /// Whether the command was carried out.
    pub ok: bool,
    /// What it did (when `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why not (when not `ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
}

impl Reply {
    /// Encodes as JSON.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        // Invariant: plain data serialises into memory.
        serde_json::to_vec(self).expect("serialising into memory cannot fail")
    }

    /// Decodes from JSON.
    ///
    /// # Errors
    /// Malformed JSON or missing fields.
    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

impl Command {
    /// A command `name` with `args`, id `id`, expiring at `expires_at_ms`.
    #[must_use]
    pub fn new(id: impl Into<String>, name: CommandName, args: Map<String, Value>, expires_at_ms: i64) -> Self {
        Self { id: id.into(), name: name.as_str().to_owned(), args, expires_at_ms }
    }

    /// The command for `action`, id `id`, expiring at `expires_at_ms`.
    #[must_use]
    pub fn for_action(id: impl Into<String>, action: &Action, expires_at_ms: i64) -> Self {
        Self::new(id, action.name(), action.args(), expires_at_ms)
    }

    /// What this command asks for, checked.
    ///
    /// # Errors
    /// [`ErrorKind::UnknownCommand`] or [`ErrorKind::BadArguments`].
    pub fn action(&self) -> Result<Action, CommandError> {
        Action::from_parts(self.command_name()?, &self.args)
    }

    /// Encodes as JSON.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        // Invariant: plain data serialises into memory.
        serde_json::to_vec(self).expect("serialising into memory cannot fail")
    }

    /// Decodes and checks a command payload. On failure, the error and the
    /// command's id when one could still be read (so the reply can name it).
    ///
    /// # Errors
    /// [`ErrorKind::TooLarge`], [`ErrorKind::Malformed`] (with the id if
    /// the payload was a JSON object with a string `id`).
    pub fn decode(payload: &[u8]) -> Result<Self, (Option<String>, CommandError)> {
        if payload.len() > COMMAND_MAX_BYTES {
            let message = format!("{} bytes; at most {COMMAND_MAX_BYTES}", payload.len());
            return Err((None, CommandError::new(ErrorKind::TooLarge, message)));
        }
        let command: Command = serde_json::from_slice(payload).map_err(|e| {
            let id = serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
                .filter(|id| valid_id(id));
            (id, CommandError::new(ErrorKind::Malformed, e.to_string()))
        })?;
        if !valid_id(&command.id) {
            let message = format!(
                "id must be 1 to {COMMAND_ID_MAX_LEN} characters of A-Z a-z 0-9 . _ : - (got {:?})",
                command.id
            );
            return Err((None, CommandError::new(ErrorKind::Malformed, message)));
        }
        Ok(command)
    }

    /// The known command this names; `UnknownCommand` otherwise.
    ///
    /// # Errors
    /// [`ErrorKind::UnknownCommand`].
    pub fn command_name(&self) -> Result<CommandName, CommandError> {
        CommandName::parse(&self.name).ok_or_else(|| {
            let known: Vec<&str> = CommandName::ALL.iter().map(|c| c.as_str()).collect();
            CommandError::new(
                ErrorKind::UnknownCommand,
                format!("unknown command {:?}; known: {}", self.name, known.join(", ")),
            )
        })
    }
}

/// Whether `id` is a usable command id.
#[must_use]
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= COMMAND_ID_MAX_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_round_trips_and_names_a_known_command() {
        let mut args = Map::new();
        args.insert("filter".into(), Value::from("debug"));
        let c = Command::new("op-1", CommandName::SetLogLevel, args, 1_800_000_000_000);
        let back = Command::decode(&c.encode()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.command_name().unwrap(), CommandName::SetLogLevel);
        let bare = Command::decode(br#"{"id":"a","name":"flush","expires_at_ms":1}"#).unwrap();
        assert!(bare.args.is_empty(), "args default to none");
    }

    #[test]
    fn bad_payloads_get_typed_errors_with_the_id_when_readable() {
        let (id, e) = Command::decode(b"not json").unwrap_err();
        assert_eq!((id, e.kind), (None, ErrorKind::Malformed));
        let (id, e) = Command::decode(br#"{"id":"x-1","name":"flush"}"#).unwrap_err();
        assert_eq!((id.as_deref(), e.kind), (Some("x-1"), ErrorKind::Malformed), "no expiry");
        let (_, e) = Command::decode(br#"{"id":"x","name":"flush","expires_at_ms":1,"args":[1]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed, "args must be an object");
        let (_, e) = Command::decode(br#"{"id":"a b","name":"flush","expires_at_ms":1}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed, "bad id characters");
        let (_, e) = Command::decode(&vec![b' '; COMMAND_MAX_BYTES + 1]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        let unknown = Command::decode(br#"{"id":"a","name":"format_disk","expires_at_ms":1}"#).unwrap();
        assert_eq!(unknown.command_name().unwrap_err().kind, ErrorKind::UnknownCommand);
    }

    #[test]
    fn actions_round_trip_and_bad_arguments_are_refused() {
        let filter = Action::SetLogLevel { filter: "edge_agent=debug,warn".into() };
        for action in [Action::Status, Action::Flush, Action::PauseIntake, Action::ResumeIntake, Action::Reload, filter]
        {
            let c = Command::decode(&Command::for_action("a", &action, 1).encode()).unwrap();
            assert_eq!(c.action().unwrap(), action);
        }
        let kind = |json: &str| Command::decode(json.as_bytes()).unwrap().action().unwrap_err().kind;
        assert_eq!(kind(r#"{"id":"a","name":"flush","args":{"now":1},"expires_at_ms":1}"#), ErrorKind::BadArguments);
        assert_eq!(kind(r#"{"id":"a","name":"set_log_level","expires_at_ms":1}"#), ErrorKind::BadArguments);
        assert_eq!(
            kind(r#"{"id":"a","name":"set_log_level","args":{"filter":3},"expires_at_ms":1}"#),
            ErrorKind::BadArguments
        );
        assert_eq!(
            kind(r#"{"id":"a","name":"set_log_level","args":{"filter":" "},"expires_at_ms":1}"#),
            ErrorKind::BadArguments
        );
        assert_eq!(
            kind(r#"{"id":"a","name":"set_log_level","args":{"filter":"x","y":1},"expires_at_ms":1}"#),
            ErrorKind::BadArguments
        );
        assert_eq!(kind(r#"{"id":"a","name":"nope","expires_at_ms":1}"#), ErrorKind::UnknownCommand);
    }

    #[test]
    fn a_reply_round_trips_in_both_shapes() {
        let ok = Reply {
            id: Some("a".into()),
            client_id: "dev-1".into(),
            name: Some("flush".into()),
            ts_ms: 5,
            ok: true,
            result: Some(serde_json::json!({"batches": 2})),
            error: None,
        };
        assert_eq!(Reply::decode(&ok.encode()).unwrap(), ok);
        let err = Reply {
            id: None,
            client_id: "dev-1".into(),
            name: None,
            ts_ms: 5,
            ok: false,
            result: None,
            error: Some(CommandError::new(ErrorKind::TooLarge, "big")),
        };
        let text = String::from_utf8(err.encode()).unwrap();
        assert!(text.contains(r#""kind":"too_large""#), "{text}");
        assert_eq!(Reply::decode(text.as_bytes()).unwrap(), err);
    }
}
