//! `telemetry-ctl`: remote commands to edge agents over MQTT.
//!
//! An operator names agents (`--to` ids or globs) and a command; the tool
//! publishes one [`telemetry_wire::Command`] per agent on
//! `<prefix>/cmd/<client_id>`, collects the [`telemetry_wire::Reply`]s from
//! `<prefix>/cmd-reply/<client_id>` until all have answered or the timeout
//! passes, and prints a table or JSON.
//!
//! # Layout
//! Everything that decides is pure and unit-tested; only [`session`] talks
//! to the broker.
//! - [`cli`]: the clap command line and its checks, giving a [`session::Plan`].
//! - [`targets`] and [`glob`]: `--to` entries, and globs resolved against the
//!   client ids of the retained agent statuses.
//! - [`request`]: the command on the wire (id, arguments, expiry) and durations.
//! - [`replies`]: which targets answered the command, and what.
//! - [`output`]: the table, the JSON and the exit code.
//! - [`topics`]: topic names under the prefix, and client ids from topics.
//! - [`session`]: the MQTT connection (TLS, login), subscriptions, publishes.

pub mod cli;
pub mod glob;
pub mod output;
pub mod replies;
pub mod request;
pub mod session;
pub mod targets;
pub mod topics;

use std::io::Write as _;

use crate::replies::Answer;

/// A mistake on the command line, said plainly (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Runs `plan`: sends, collects, prints the table or JSON on stdout and
/// problems on stderr. Returns the exit code (see [`output::EXIT_OK`] and
/// its siblings).
pub async fn execute(plan: &session::Plan) -> u8 {
    let report = match session::run(plan).await {
        Ok(report) => report,
        Err(fatal) => {
            eprintln!("telemetry-ctl: {fatal}");
            return output::EXIT_USAGE;
        }
    };
    let text = if plan.json { output::json(&report.outcomes) } else { output::table(&report.outcomes, plan.timeout) };
    // A closed stdout (`| head`) is not worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
    if let Some(lost) = &report.lost {
        eprintln!("telemetry-ctl: {lost}");
        return output::EXIT_USAGE;
    }
    let silent = report.outcomes.iter().filter(|o| o.answer == Answer::NoReply).count();
    if silent > 0 {
        eprintln!(
            "telemetry-ctl: {silent} of {} {} did not answer within {} (down, not subscribed, clock ahead by \
             more than the timeout, or not allowed by the broker's ACL)",
            report.outcomes.len(),
            if report.outcomes.len() == 1 { "agent" } else { "agents" },
            output::human(plan.timeout)
        );
    }
    output::exit_code(&report.outcomes)
}
