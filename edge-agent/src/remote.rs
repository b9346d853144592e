//! Carrying out remote commands: the I/O shell around [`crate::command`].
//! Payloads arrive from the MQTT event loop; each is decided on by the
//! [`CommandBook`], carried out through the handles it needs (the
//! publisher's control channel, the intake switch, the log filter, the
//! configuration loader) and answered on `<prefix>/cmd-reply/<client_id>`.
//! Every command, run or not, is counted and logged; the last one is shown
//! in the status message.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};
use telemetry_wire::command::{CommandError, ErrorKind, Reply};
use telemetry_wire::LastCommand;
use tokio::sync::{mpsc, oneshot};

use crate::command::{reload_plan, with_live_keys, Action, CommandBook, Decision};
use crate::config::Config;
use crate::metrics::{Command as CommandLabel, Reason};
use crate::publisher::{Control, Tunables};
use crate::shared::Shared;

/// Replaces the process's log filter (an `EnvFilter` directive); the
/// binary passes one built on `tracing_subscriber::reload`.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Loads the configuration again the way the process loaded it at start
/// (file, environment, flags), validated, secrets read.
pub type Reloader = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// What the embedding process lets remote commands change. An agent
/// without them (embedded in tests or another program) answers
/// `set_log_level` and `reload` with a `failed` error.
#[derive(Clone, Default)]
pub struct Controls {
    /// For `set_log_level`.
    pub log: Option<LogControl>,
    /// For `reload`.
    pub reload: Option<Reloader>,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls").field("log", &self.log.is_some()).field("reload", &self.reload.is_some()).finish()
    }
}

/// The command task's handles.
#[derive(Debug)]
pub struct Remote {
    /// Replies go out here.
    pub client: AsyncClient,
    /// `<prefix>/cmd-reply/<client_id>`.
    pub reply_topic: String,
    /// The running configuration (live keys updated by `reload`).
    pub config: Config,
    /// Metrics, intake switch, last command.
    pub shared: Arc<Shared>,
    /// To the publisher.
    pub publisher: mpsc::Sender<Control>,
    /// Log filter and reloader.
    pub controls: Controls,
}

impl Remote {
    /// Answers every payload from `rx` until it closes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Bytes>) {
        let mut book = CommandBook::default();
        while let Some(payload) = rx.recv().await {
            let now_ms = now_ms();
            match book.decide(&payload, now_ms) {
                Decision::Repeat(reply) => {
                    self.shared.metrics.commands_repeated.inc();
                    tracing::info!("remote command redelivered: answered again, not run again");
                    self.send(reply);
                }
                Decision::Expired { id } => {
                    self.shared.metrics.commands_rejected.get_or_create(&Reason { reason: "expired" }).inc();
                    tracing::warn!(%id, "remote command past its expiry: ignored");
                }
                Decision::Refuse { id, expires_at_ms, name, error } => {
                    self.shared.metrics.commands_rejected.get_or_create(&Reason { reason: error.kind.as_str() }).inc();
                    tracing::warn!(id = ?id, name = ?name, kind = error.kind.as_str(), message = %error.message, "remote command refused");
                    let reply = self.answer(id.clone(), name, Err(error));
                    if let (Some(id), Some(expires)) = (id, expires_at_ms) {
                        book.answered(&id, expires, reply, now_ms);
                    }
                }
                Decision::Run { id, expires_at_ms, action } => {
                    let name = action.name();
                    tracing::info!(%id, command = name.as_str(), "remote command");
                    let outcome = self.carry_out(action).await;
                    match &outcome {
                        Ok(_) => {
                            self.shared
                                .metrics
                                .commands_run
                                .get_or_create(&CommandLabel { command: name.as_str() })
                                .inc();
                        }
                        Err(e) => {
                            self.shared
                                .metrics
                                .commands_rejected
                                .get_or_create(&Reason { reason: e.kind.as_str() })
                                .inc();
                            tracing::warn!(%id, command = name.as_str(), message = %e.message, "remote command failed");
                        }
                    }
                    let reply = self.answer(Some(id.clone()), Some(name.as_str().to_owned()), outcome);
                    book.answered(&id, expires_at_ms, reply, now_ms);
                }
            }
        }
    }

    /// Builds, records (for the status) and publishes a reply; its bytes.
    fn answer(&self, id: Option<String>, name: Option<String>, outcome: Result<Value, CommandError>) -> Vec<u8> {
        let ts_ms = now_ms();
        let (ok, result, error) = match outcome {
            Ok(v) => (true, Some(v), None),
            Err(e) => (false, None, Some(e)),
        };
        if let Some(id) = &id {
            let summary = error
                .as_ref()
                .map_or_else(|| "ok".to_owned(), |e| truncate(&format!("{}: {}", e.kind.as_str(), e.message), 200));
            let name = name.clone().unwrap_or_default();
            self.shared.set_last_command(LastCommand { id: id.clone(), name, ok, ts_ms, summary });
        }
        let reply = Reply { id, client_id: self.config.client_id.clone(), name, ts_ms, ok, result, error }.encode();
        self.send(reply.clone());
        reply
    }

    fn send(&self, reply: Vec<u8>) {
        if let Err(error) = self.client.try_publish(&self.reply_topic, QoS::AtLeastOnce, false, reply) {
            tracing::warn!(%error, "cannot queue the command reply (the operator may retry with the same id)");
        }
    }

    /// Carries out a checked command.
    async fn carry_out(&mut self, action: Action) -> Result<Value, CommandError> {
        match action {
            Action::Status => {
                let status = self.ask(Control::Status).await?;
                Ok(json!({
                    "status": status,
                    "intake_paused": self.shared.intake_paused(),
                    "config": crate::command::shown(&self.config),
                }))
            }
            Action::Flush => Ok(json!(self.ask(Control::Flush).await?)),
            Action::PauseIntake | Action::ResumeIntake => {
                let pause = action == Action::PauseIntake;
                let was = self.shared.set_intake_paused(pause);
                if pause != was {
                    tracing::warn!(
                        paused = pause,
                        "sensor intake {} by a remote command",
                        if pause { "paused" } else { "resumed" }
                    );
                }
                Ok(json!({ "intake_paused": pause, "was_paused": was }))
            }
            Action::SetLogLevel { filter } => {
                let control = self
                    .controls
                    .log
                    .as_ref()
                    .ok_or_else(|| failed("this agent's log filter cannot be changed (embedded agent)"))?;
                control(&filter).map_err(|e| failed(format!("log filter not changed: {e}")))?;
                tracing::warn!(%filter, "log filter changed by a remote command");
                Ok(json!({ "filter": filter }))
            }
            Action::Reload => {
                let reload = self
                    .controls
                    .reload
                    .as_ref()
                    .ok_or_else(|| failed("this agent has no configuration file to re-read (embedded agent)"))?;
                let loaded =
                    reload().map_err(|e| failed(format!("the configuration does not load; nothing changed: {e}")))?;
                let plan = reload_plan(&self.config, &loaded);
                if !plan.applied.is_empty() {
                    let next = with_live_keys(&self.config, &loaded);
                    self.ask(|tx| Control::Retune(tunables(&next), tx)).await?;
                    self.config = next;
                }
                let needs_restart: serde_json::Map<String, Value> = plan
                    .needs_restart
                    .iter()
                    .map(|(k, (running, file))| (k.clone(), json!({ "running": running, "file": file })))
                    .collect();
                if !needs_restart.is_empty() {
                    let keys: Vec<&String> = needs_restart.keys().collect();
                    tracing::warn!(?keys, "reload: these keys changed in the configuration but need a restart");
                }
                tracing::info!(applied = ?plan.applied.keys().collect::<Vec<_>>(), "reload done");
                Ok(json!({ "applied": plan.applied, "needs_restart": needs_restart }))
            }
        }
    }

    /// Sends the publisher a request and waits for its answer.
    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Control) -> Result<T, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.publisher.send(request(tx)).await.map_err(|_| failed("the agent is shutting down"))?;
        rx.await.map_err(|_| failed("the agent is shutting down"))
    }
}

/// The publisher's live settings in `config`.
#[must_use]
pub fn tunables(config: &Config) -> Tunables {
    Tunables {
        batch_linger: std::time::Duration::from_millis(config.batch_linger_ms),
        confirm_timeout: config.confirm_timeout(),
        replay_max_rate: config.replay_max_rate,
        status_interval: std::time::Duration::from_secs(config.status_interval_secs),
        ahead_max_readings: config.echo_ahead_max_readings,
        ahead_max_bytes: config.echo_ahead_max_bytes,
        ahead_timeout: std::time::Duration::from_secs(config.echo_ahead_timeout_secs),
    }
}

fn failed(message: impl Into<String>) -> CommandError {
    CommandError::new(ErrorKind::Failed, message)
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn now_ms() -> i64 {
    crate::now_micros() / 1000
}
