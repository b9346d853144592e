//! The command line, and turning it into a [`Plan`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use telemetry_link::{Secret, TlsFiles};

use crate::request::{self, parse_duration, Action};
use crate::session::{Broker, Plan};
use crate::targets::Targets;
use crate::topics::Topics;
use crate::UsageError;

/// The variable that may hold the broker password (instead of `--password-file`).
pub const PASSWORD_ENV: &str = "TELEMETRY_CTL_PASSWORD";

const EXAMPLES: &str = "\
Examples:
  telemetry-ctl status --to edge-1
  telemetry-ctl flush --to 'site-a-*' --timeout 10s
  telemetry-ctl pause-intake --to edge-1,edge-2 --to edge-7
  telemetry-ctl set-log-level 'edge_agent=debug,warn' --to edge-1 --json
  TELEMETRY_CTL_MQTT_HOST=broker.example telemetry-ctl reload --to '*'

Targets: --to takes client ids and globs (*, ?, [a-z], [!0-9]); globs are
matched against the client ids whose retained status is on
<prefix>/status/+ (collected for --discover-wait). A glob that matches no
client id is an error.

Output: a table (CLIENT, RESULT, DETAIL) sorted by client id, or with --json
an array of {client_id, ok, result?, error?, timeout?}.

Exit status: 0 every agent answered ok; 1 an agent answered with an error or
not at all; 2 bad usage, or the broker could not be used (unreachable,
refused the login, refused the subscription).

Broker password: --password-file, or the variable TELEMETRY_CTL_PASSWORD.
With the secure broker profile, log in as a user that may write
<prefix>/cmd/+ and read <prefix>/cmd-reply/+ (and <prefix>/status/+ for
globs).";

/// Send remote commands to edge agents over MQTT and print their replies.
///
/// Publishes one command (QoS 1) on `<prefix>/cmd/<client_id>` for each
/// target, waits for the agents' replies on `<prefix>/cmd-reply/<client_id>`
/// until all have answered or --timeout has passed, and prints one line per
/// agent. A command expires when the wait ends: an agent that gets it later
/// ignores it.
#[derive(Debug, Parser)]
#[command(name = "telemetry-ctl", version, about, long_about, after_help = EXAMPLES)]
pub struct Cli {
    /// How to reach the broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// What to send.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Broker connection flags (accepted before or after the command).
#[derive(Debug, Args)]
#[command(next_help_heading = "Broker")]
pub struct BrokerArgs {
    /// Broker host name or address.
    #[arg(long, env = "TELEMETRY_CTL_MQTT_HOST", default_value = "127.0.0.1", global = true)]
    pub mqtt_host: String,
    /// Broker port.
    #[arg(long, env = "TELEMETRY_CTL_MQTT_PORT", default_value_t = 21883, global = true)]
    pub mqtt_port: u16,
    /// The agents' topic prefix (their `topic_prefix`).
    #[arg(long, env = "TELEMETRY_CTL_TOPIC_PREFIX", default_value = "/telemetry", global = true)]
    pub topic_prefix: String,
    /// Broker user name.
    #[arg(long, env = "TELEMETRY_CTL_USERNAME", global = true)]
    pub username: Option<String>,
    /// File holding the broker password (one trailing newline ignored);
    /// or set TELEMETRY_CTL_PASSWORD.
    #[arg(long, env = "TELEMETRY_CTL_PASSWORD_FILE", value_name = "FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) of the broker: connect over TLS.
    #[arg(long, env = "TELEMETRY_CTL_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM), for brokers that require one (with --tls-key).
    #[arg(long, env = "TELEMETRY_CTL_TLS_CERT", value_name = "FILE", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "TELEMETRY_CTL_TLS_KEY", value_name = "FILE", global = true)]
    pub tls_key: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Everything the agent's status message has, plus the configuration in
    /// effect (secrets redacted).
    Status(SendArgs),
    /// Publish what is committed now, without waiting for the linger.
    Flush(SendArgs),
    /// Stop reading the sensor sockets (sensors are held, as under
    /// back-pressure; acks stay honest).
    PauseIntake(SendArgs),
    /// Read the sensor sockets again.
    ResumeIntake(SendArgs),
    /// Replace the agent's log filter.
    SetLogLevel {
        /// An EnvFilter directive, e.g. `debug` or `edge_agent=debug,warn`.
        filter: String,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Re-read the configuration file; keys that cannot change while the
    /// agent runs are reported, not applied.
    Reload(SendArgs),
}

/// Where to send a command and how long to wait.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Target client id or glob (`*`, `?`, `[...]`); repeat the flag or
    /// separate with commas.
    #[arg(long, short = 't', value_name = "ID|GLOB", required = true)]
    pub to: Vec<String>,
    /// How long to wait for the replies (also the command's expiry): e.g. 5s, 500ms, 1m.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// With a glob: how long to collect retained agent statuses to match it against.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub discover_wait: Duration,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    /// What to do, checked; `env_password` is the value of
    /// [`PASSWORD_ENV`], if set. Reads the password file.
    ///
    /// # Errors
    /// Inconsistent flags, bad targets or prefix, an unreadable password file.
    pub fn into_plan(self, env_password: Option<String>) -> Result<Plan, UsageError> {
        let (action, send) = match self.command {
            CtlCommand::Status(s) => (Action::Status, s),
            CtlCommand::Flush(s) => (Action::Flush, s),
            CtlCommand::PauseIntake(s) => (Action::PauseIntake, s),
            CtlCommand::ResumeIntake(s) => (Action::ResumeIntake, s),
            CtlCommand::SetLogLevel { filter, send } => (Action::SetLogLevel { filter }, send),
            CtlCommand::Reload(s) => (Action::Reload, s),
        };
        let topics = Topics::new(&self.broker.topic_prefix)?;
        // Checked now, before connecting; built for real (fresh id, expiry) when sent.
        request::build(&action, "ctl-0000000000000000", 0, send.timeout)?;
        Ok(Plan {
            broker: self.broker.into_broker(env_password)?,
            topics,
            targets: Targets::parse(&send.to)?,
            action,
            timeout: send.timeout,
            discover_wait: send.discover_wait,
            json: send.json,
        })
    }
}

impl BrokerArgs {
    fn into_broker(self, env_password: Option<String>) -> Result<Broker, UsageError> {
        let username = self.username.filter(|u| !u.is_empty());
        let password = match (self.password_file, env_password.filter(|p| !p.is_empty())) {
            (Some(_), Some(_)) => {
                return Err(UsageError(format!("set either --password-file or {PASSWORD_ENV}, not both")));
            }
            (Some(file), None) => {
                Some(Secret::new(telemetry_link::read_secret_file(&file).map_err(|e| UsageError(e.to_string()))?))
            }
            (None, password) => password.map(Secret::new),
        };
        if password.is_some() && username.is_none() {
            return Err(UsageError("a password needs --username (TELEMETRY_CTL_USERNAME)".into()));
        }
        let tls = match (self.tls_ca, self.tls_cert, self.tls_key) {
            (None, None, None) => None,
            (None, _, _) => return Err(UsageError("--tls-cert and --tls-key need --tls-ca".into())),
            (Some(_), cert, key) if cert.is_some() != key.is_some() => {
                return Err(UsageError("set both --tls-cert and --tls-key, or neither".into()));
            }
            (Some(ca), client_cert, client_key) => Some(TlsFiles { ca, client_cert, client_key }),
        };
        Ok(Broker { host: self.mqtt_host, port: self.mqtt_port, username, password, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn plan(args: &[&str], env_password: Option<&str>) -> Result<Plan, UsageError> {
        let cli = Cli::try_parse_from(std::iter::once("telemetry-ctl").chain(args.iter().copied()))
            .map_err(|e| UsageError(e.to_string()))?;
        cli.into_plan(env_password.map(str::to_owned))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn commands_targets_and_waits_parse() {
        let p = plan(&["set-log-level", "edge_agent=debug,warn", "--to", "a,b", "-t", "c*", "--timeout", "2s"], None)
            .unwrap();
        assert_eq!(p.action, Action::SetLogLevel { filter: "edge_agent=debug,warn".into() });
        assert_eq!(p.timeout, Duration::from_secs(2));
        assert_eq!(p.discover_wait, Duration::from_secs(1));
        assert!(p.targets.has_globs() && !p.json);
        assert_eq!(p.topics.command("a"), "/telemetry/cmd/a");
        let p = plan(&["pause-intake", "--to", "a", "--json", "--mqtt-port", "1884", "--topic-prefix", "/x"], None)
            .unwrap();
        assert_eq!(p.action, Action::PauseIntake);
        assert!(p.json);
        assert_eq!((p.broker.host.as_str(), p.broker.port), ("127.0.0.1", 1884), "connection flags after the command");
        assert_eq!(p.topics.command("a"), "/x/cmd/a");
        for (name, action) in [
            ("status", Action::Status),
            ("flush", Action::Flush),
            ("resume-intake", Action::ResumeIntake),
            ("reload", Action::Reload),
        ] {
            assert_eq!(plan(&[name, "--to", "a"], None).unwrap().action, action);
        }
    }

    #[test]
    fn usage_mistakes_are_refused() {
        assert!(plan(&["status"], None).is_err(), "--to is required");
        assert!(plan(&["status", "--to", "a/b"], None).is_err());
        assert!(plan(&["status", "--to", "a", "--timeout", "0s"], None).is_err());
        assert!(plan(&["set-log-level", " ", "--to", "a"], None).unwrap_err().0.contains("needs a filter"));
        assert!(plan(&["status", "--to", "a", "--topic-prefix", "/t/"], None).is_err());
        assert!(plan(&["frobnicate", "--to", "a"], None).is_err());
        let e = plan(&["status", "--to", "a"], Some("pw")).unwrap_err().0;
        assert!(e.contains("--username"), "{e}");
        let e = plan(&["status", "--to", "a", "--tls-cert", "c.pem", "--tls-key", "k.pem"], None).unwrap_err().0;
        assert!(e.contains("--tls-ca"), "{e}");
        let e = plan(&["status", "--to", "a", "--tls-ca", "ca.pem", "--tls-cert", "c.pem"], None).unwrap_err().0;
        assert!(e.contains("both"), "{e}");
        let e = plan(&["status", "--to", "a", "--username", "op", "--password-file", "/nonexistent/pw"], None)
            .unwrap_err()
            .0;
        assert!(e.contains("/nonexistent/pw"), "{e}");
    }

    #[test]
    fn the_password_comes_from_a_file_or_the_environment_never_both() {
        let dir = std::env::temp_dir().join(format!("telemetry_ctl_pw_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let p = plan(&["status", "--to", "a", "--username", "op", "--password-file", path], None).unwrap();
        assert_eq!(p.broker.password.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(!format!("{:?}", p.broker).contains("s3cret"), "Debug never shows the password");
        let p = plan(&["status", "--to", "a", "--username", "op"], Some("env-pw")).unwrap();
        assert_eq!(p.broker.password.as_ref().map(Secret::expose), Some("env-pw"));
        let e = plan(&["status", "--to", "a", "--username", "op", "--password-file", path], Some("x")).unwrap_err().0;
        assert!(e.contains("not both"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
