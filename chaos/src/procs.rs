//! The real binaries as child processes: start with flags, wait until ready,
//! SIGKILL, SIGTERM, read `/metrics`. Every child logs to its own file under
//! the run's work directory and is killed if the suite drops it.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use test_support::http::{http_get, metric_value};
use tokio::process::{Child, Command};

/// How to start one process again and again (same flags, same ports).
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name for logs and messages (`agent`, `ingest-1`, ...).
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Appended to by every start.
    pub log: PathBuf,
}

impl Spec {
    /// A spec for `program` logging to `<dir>/<name>.log`.
    #[must_use]
    pub fn new(name: &str, program: PathBuf, dir: &Path) -> Self {
        Self { name: name.to_owned(), program, args: Vec::new(), env: Vec::new(), log: dir.join(format!("{name}.log")) }
    }

    /// Adds `--flag value`.
    #[must_use]
    pub fn flag(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(format!("--{flag}"));
        self.args.push(value.to_string());
        self
    }

    /// Adds a bare argument.
    #[must_use]
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    fn spawn(&self) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let err = log.try_clone().context("clone the log file handle")?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        cmd.spawn().with_context(|| format!("start {} ({})", self.name, self.program.display()))
    }
}

/// A daemon (agent or ingest server) with an HTTP `/metrics` address.
#[derive(Debug)]
pub struct Daemon {
    /// How it is started.
    pub spec: Spec,
    /// `host:port` of its HTTP listener.
    pub http: String,
    /// The `/metrics` line that says it is ready (`name value`), if any.
    ready_line: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts it and waits (up to `within`) until `/metrics` answers and, if
    /// given, contains `ready_line`.
    ///
    /// # Errors
    /// It does not start, exits, or is not ready in time.
    pub async fn start(spec: Spec, http: String, ready_line: Option<&str>, within: Duration) -> Result<Self> {
        let mut me = Self { spec, http, ready_line: ready_line.map(str::to_owned), child: None };
        me.restart(within).await?;
        Ok(me)
    }

    /// Starts it again with the same spec (after [`Daemon::kill`]).
    ///
    /// # Errors
    /// As [`Daemon::start`].
    pub async fn restart(&mut self, within: Duration) -> Result<()> {
        self.child = Some(self.spec.spawn()?);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{} exited during start-up ({status}); see {}", self.spec.name, self.spec.log.display());
            }
            if let Some(body) = http_get(&self.http, "/metrics").await {
                if self.ready_line.as_ref().is_none_or(|l| body.lines().any(|x| x == l)) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {within:?}; see {}", self.spec.name, self.spec.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (no flush, no acks, no goodbye) and reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM, wait up to `within`, then SIGKILL. The exit status if it
    /// stopped by itself.
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, "TERM");
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        }
    }

    /// Peak resident memory of the running process (`VmHWM`), in MiB.
    #[must_use]
    pub fn peak_rss_mib(&self) -> Option<u64> {
        test_support::peak_rss_mib(self.child.as_ref()?.id()?)
    }

    /// The sum of every sample of metric `name` (all label sets), if the
    /// daemon answers and has it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(&self.http, "/metrics").await?;
        metric_value(&body, name)
    }
}

/// Sends `SIG<sig>` to the child by its pid (the `kill` utility: this crate
/// forbids `unsafe`, so no `libc::kill`).
pub fn signal(child: &Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    }
}

/// An emulator process and what it reports when it ends.
#[derive(Debug)]
pub struct Emulator {
    spec: Spec,
    child: Child,
}

/// An emulator's final figures (its `done:` line) and exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EmulatorDone {
    /// Readings generated.
    pub generated: u64,
    /// Readings the agent acked (the first `acked` generated ones: acks are
    /// cumulative and frames are resent in order).
    pub acked: u64,
    /// Readings sent again after reconnects.
    pub resent: u64,
    /// Connections made.
    pub connects: u64,
    /// Exit code 0: every reading acked.
    pub success: bool,
}

impl Emulator {
    /// Starts it.
    ///
    /// # Errors
    /// The binary cannot be started.
    pub fn start(spec: Spec) -> Result<Self> {
        let child = spec.spawn()?;
        Ok(Self { spec, child })
    }

    /// Waits up to `within` for it to finish; then interrupts it (it drains
    /// for a few seconds, then exits non-zero with its counts).
    ///
    /// # Errors
    /// It ended without a `done:` line (a crash).
    pub async fn finish(mut self, within: Duration) -> Result<EmulatorDone> {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                signal(&self.child, "INT");
                match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
                    Ok(status) => status?,
                    Err(_) => {
                        let _ = self.child.start_kill();
                        self.child.wait().await?
                    }
                }
            }
        };
        let log = std::fs::read_to_string(&self.spec.log).unwrap_or_default();
        let Some(mut done) = log.lines().rev().find_map(parse_done) else {
            bail!("{} ended ({status}) without a summary; see {}", self.spec.name, self.spec.log.display());
        };
        done.success = status.success();
        Ok(done)
    }
}

/// Parses `done: generated=.. sent=.. acked=.. resent=.. unacked=.. connects=.. ...`.
#[must_use]
pub fn parse_done(line: &str) -> Option<EmulatorDone> {
    let rest = line.strip_prefix("done: ")?;
    let mut done = EmulatorDone::default();
    let mut seen = 0;
    for field in rest.split_whitespace() {
        let Some((key, value)) = field.split_once('=') else { continue };
        let slot = match key {
            "generated" => &mut done.generated,
            "acked" => &mut done.acked,
            "resent" => &mut done.resent,
            "connects" => &mut done.connects,
            _ => continue,
        };
        *slot = value.parse().ok()?;
        seen += 1;
    }
    (seen == 4).then_some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emulator_summary_line_is_parsed() {
        let line = "done: generated=100 sent=120 acked=90 resent=20 unacked=10 connects=2 elapsed=1.00s rate=100/s \
                    send_rate=100/s";
        let done = parse_done(line).expect("parses");
        assert_eq!((done.generated, done.acked, done.resent, done.connects), (100, 90, 20, 2));
        assert_eq!(parse_done("sent=1 acked=1"), None);
    }
}
