//! Remote commands (issue 15) against the real broker and a real agent:
//! every command, idempotence by id, expiry, bad input, and the last
//! command in the status message.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use edge_agent::config::Config;
use edge_agent::metrics::family_total;
use edge_agent::remote::{Controls, LogControl, Reloader};
use edge_agent::Agent;
use emulators::stream::Rate;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use telemetry_wire::command::{Reply, COMMAND_MAX_BYTES};
use telemetry_wire::AgentStatus;
use test_support::{fresh_pg_database, topic_prefix, Service};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PG_MQTT: &[Service] = &[Service::Postgres, Service::Mqtt];

/// An operator on the broker: sends commands to `dev-1`, collects replies
/// and the agent's retained statuses.
struct Operator {
    client: AsyncClient,
    prefix: String,
    replies: mpsc::UnboundedReceiver<(Vec<u8>, Reply)>,
    statuses: Arc<Mutex<Vec<AgentStatus>>>,
}

impl Operator {
    async fn start(port: u16, prefix: &str) -> Self {
        let mut options = MqttOptions::new(test_support::unique_name("operator"), "127.0.0.1", port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(format!("{prefix}/cmd-reply/+"), QoS::AtLeastOnce).await.unwrap();
        client.subscribe(format!("{prefix}/status/+"), QoS::AtLeastOnce).await.unwrap();
        let (tx, replies) = mpsc::unbounded_channel();
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let (seen, status_prefix) = (statuses.clone(), format!("{prefix}/status/"));
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic.starts_with(&status_prefix) => {
                        if let Ok(s) = AgentStatus::decode(&p.payload) {
                            seen.lock().unwrap().push(s);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let reply = Reply::decode(&p.payload).expect("a reply decodes");
                        let _ = tx.send((p.payload.to_vec(), reply));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for _ in 0..2 {
            subscribed.recv().await.unwrap();
        }
        Self { client, prefix: prefix.to_owned(), replies, statuses }
    }

    async fn send_raw(&self, payload: Vec<u8>) {
        self.client.publish(format!("{}/cmd/dev-1", self.prefix), QoS::AtLeastOnce, false, payload).await.unwrap();
    }

    async fn send(&self, id: &str, name: &str, args: Value) {
        let expires = now_ms() + 30_000;
        self.send_raw(
            serde_json::to_vec(&json!({"id": id, "name": name, "args": args, "expires_at_ms": expires})).unwrap(),
        )
        .await;
    }

    async fn reply(&mut self) -> (Vec<u8>, Reply) {
        tokio::time::timeout(Duration::from_secs(10), self.replies.recv()).await.expect("a reply in time").unwrap()
    }

    async fn ask(&mut self, id: &str, name: &str, args: Value) -> Reply {
        self.send(id, name, args).await;
        let (_, reply) = self.reply().await;
        assert_eq!(reply.id.as_deref(), Some(id));
        assert_eq!(reply.client_id, "dev-1");
        reply
    }

    /// Waits until the agent answers (it subscribes to its command topic at
    /// its ConnAck; a command sent before that reaches nobody).
    async fn ready(&mut self) {
        for attempt in 0..50 {
            self.send(&format!("probe-{attempt}"), "status", json!({})).await;
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), self.replies.recv()).await {
                // Late answers to earlier probes are not replies to anything else.
                while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), self.replies.recv()).await {}
                return;
            }
        }
        panic!("the agent never answered a command");
    }

    /// No reply within `wait` (an absence check).
    async fn no_reply(&mut self, wait: Duration) {
        if let Ok(Some((_, r))) = tokio::time::timeout(wait, self.replies.recv()).await {
            panic!("unexpected reply {r:?}");
        }
    }
}

fn now_ms() -> i64 {
    edge_agent::now_micros() / 1000
}

async fn agent(stack: &test_support::Stack, controls: Controls, tweak: impl FnOnce(&mut Config)) -> (Agent, String) {
    let pg = fresh_pg_database(stack).await;
    let prefix = topic_prefix();
    let mut config = agent_config(&pg, stack.mqtt_port, &prefix);
    tweak(&mut config);
    let agent = Agent::start_with(config, controls, CancellationToken::new()).await.unwrap();
    eventually(Duration::from_secs(10), "connected", || agent.shared.connected()).await;
    (agent, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_flush_and_pause_resume_work_over_mqtt() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let (agent, prefix) = agent(&stack, Controls::default(), |c| {
        c.batch_linger_ms = 600_000; // a partial batch waits for the flush
        c.postgres_password = edge_agent::config::Secret::new("hunter2");
    })
    .await;
    let mut op = Operator::start(stack.mqtt_port, &prefix).await;
    op.ready().await;

    let status = op.ask("s-1", "status", json!({})).await;
    assert!(status.ok, "{status:?}");
    let result = status.result.unwrap();
    assert_eq!(result["status"]["client_id"], "dev-1");
    assert_eq!(result["status"]["connected"], true);
    assert_eq!(result["config"]["batch_linger_ms"], 600_000);
    assert_eq!(result["config"]["postgres_password"], "<redacted>");
    assert!(!result.to_string().contains("hunter2"), "a secret in the reply");

    // Five readings: committed, but a partial batch lingers.
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 5, Rate::Max, "f"));
    assert_eq!(emu.await.unwrap().acked, 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.shared.metrics.readings_published.get(), 0, "lingering");
    let flush = op.ask("f-1", "flush", json!({})).await;
    assert!(flush.ok);
    assert!(flush.result.as_ref().unwrap()["published_batches"].as_u64().unwrap() >= 1, "{flush:?}");
    eventually(Duration::from_secs(10), "the flushed rows are confirmed", || agent.shared.outbox_size().0 == 0).await;

    // Paused: nothing is read (so nothing acked); resumed: everything.
    let paused = op.ask("p-1", "pause_intake", json!({})).await;
    assert_eq!(paused.result.unwrap(), json!({"intake_paused": true, "was_paused": false}));
    assert_eq!(agent.shared.metrics.intake_paused.get(), 1);
    let received = agent.shared.metrics.readings_received.get();
    let (progress, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 2000, Rate::Max, "p"));
    tokio::time::sleep(Duration::from_secs(1)).await; // an absence check: a paused agent reads nothing
    assert_eq!(agent.shared.metrics.readings_received.get(), received, "read while paused");
    assert_eq!(progress.acked.load(std::sync::atomic::Ordering::Relaxed), 0, "acked while paused");
    let resumed = op.ask("r-1", "resume_intake", json!({})).await;
    assert_eq!(resumed.result.unwrap(), json!({"intake_paused": false, "was_paused": true}));
    assert_eq!(emu.await.unwrap().acked, 2000);

    let m = &agent.shared.metrics;
    assert_eq!(m.commands_run.get_or_create(&edge_agent::metrics::Command { command: "flush" }).get(), 1);
    // The status message names the last command.
    eventually(Duration::from_secs(10), "the status shows the last command", || {
        op.statuses.lock().unwrap().iter().any(|s| s.last_command.as_ref().is_some_and(|c| c.id == "r-1" && c.ok))
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_command_is_answered_again_not_run_twice_and_an_expired_one_is_ignored() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let (agent, prefix) = agent(&stack, Controls::default(), |_| {}).await;
    let mut op = Operator::start(stack.mqtt_port, &prefix).await;
    op.ready().await;
    let expires = now_ms() + 30_000;
    let pause = serde_json::to_vec(&json!({"id": "once", "name": "pause_intake", "expires_at_ms": expires})).unwrap();
    op.send_raw(pause.clone()).await;
    let (first, _) = op.reply().await;
    assert!(op.ask("r", "resume_intake", json!({})).await.ok);
    op.send_raw(pause).await;
    let (again, _) = op.reply().await;
    assert_eq!(again, first, "the same answer");
    assert!(!agent.shared.intake_paused(), "not run a second time");
    assert_eq!(agent.shared.metrics.commands_repeated.get(), 1);

    let stale = json!({"id": "stale", "name": "pause_intake", "expires_at_ms": now_ms() - 1});
    op.send_raw(serde_json::to_vec(&stale).unwrap()).await;
    op.no_reply(Duration::from_secs(1)).await;
    assert!(!agent.shared.intake_paused(), "an expired command is not run");
    assert_eq!(family_total(&agent.shared.metrics.commands_rejected, &["expired"]), 1);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_get_typed_errors_and_change_nothing() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let (agent, prefix) = agent(&stack, Controls::default(), |_| {}).await;
    let mut op = Operator::start(stack.mqtt_port, &prefix).await;
    op.ready().await;
    let kind = |r: &Reply| r.error.as_ref().map(|e| e.kind.as_str()).unwrap_or("none").to_owned();

    op.send_raw(b"{\"id\": \"x\", \"name\": ".to_vec()).await;
    let (_, r) = op.reply().await;
    assert_eq!((r.ok, kind(&r).as_str(), r.id.clone()), (false, "malformed", None));
    op.send_raw(vec![b'{'; COMMAND_MAX_BYTES + 10]).await;
    let (_, r) = op.reply().await;
    assert_eq!(kind(&r), "too_large");
    assert_eq!(kind(&op.ask("u", "format_disk", json!({})).await), "unknown_command");
    assert_eq!(kind(&op.ask("a1", "pause_intake", json!({"now": true})).await), "bad_arguments");
    assert_eq!(kind(&op.ask("a2", "set_log_level", json!({"filter": 7})).await), "bad_arguments");
    let embedded = op.ask("a3", "set_log_level", json!({"filter": "debug"})).await;
    assert_eq!(kind(&embedded), "failed", "no log control in an embedded agent");
    assert_eq!(kind(&op.ask("a4", "reload", json!({})).await), "failed");

    assert!(!agent.shared.intake_paused());
    let rejected = family_total(
        &agent.shared.metrics.commands_rejected,
        &["malformed", "too_large", "unknown_command", "bad_arguments", "failed"],
    );
    assert_eq!(rejected, 7);
    // Still working.
    assert!(op.ask("ok", "status", json!({})).await.ok);
    let (_, emu, _) = spawn_emulator(emulator(endpoint(&agent.listen_addrs[0]), 100, Rate::Max, "b"));
    assert_eq!(emu.await.unwrap().acked, 100);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_log_level_and_reload_change_what_they_may_and_report_the_rest() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let filters = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = filters.clone();
    let log: LogControl = Arc::new(move |f: &str| {
        seen.lock().unwrap().push(f.to_owned());
        Ok(())
    });
    let dir = std::env::temp_dir().join(test_support::unique_name("reload"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    let path = file.clone();
    // As in a deployment: the whole configuration is in the file.
    let reload: Reloader = Arc::new(move || {
        let config = Config::from_file(&path).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    });
    let (agent, prefix) = agent(&stack, Controls { log: Some(log), reload: Some(reload) }, |_| {}).await;
    let mut op = Operator::start(stack.mqtt_port, &prefix).await;
    op.ready().await;
    let status = op.ask("st", "status", json!({})).await;
    let running: Config = serde_json::from_value(status.result.unwrap()["config"].clone()).unwrap();
    let write = |change: &dyn Fn(&mut Config)| {
        let mut c = running.clone();
        change(&mut c);
        // JSON scalars and string arrays are TOML values as written.
        let Value::Object(keys) = serde_json::to_value(&c).unwrap() else { panic!("an object") };
        let text: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        std::fs::write(&file, text).unwrap();
    };

    let r = op.ask("l1", "set_log_level", json!({"filter": "edge_agent=debug,warn"})).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(*filters.lock().unwrap(), vec!["edge_agent=debug,warn".to_owned()]);

    write(&|c| {
        c.replay_max_rate = 1234;
        c.quota_rows = 99;
    });
    let r = op.ask("re1", "reload", json!({})).await;
    assert!(r.ok, "{r:?}");
    let result = r.result.unwrap();
    assert_eq!(result["applied"], json!({"replay_max_rate": 1234}));
    assert_eq!(result["needs_restart"]["quota_rows"]["file"], 99);
    let after = op.ask("st2", "status", json!({})).await.result.unwrap();
    assert_eq!(after["config"]["replay_max_rate"], 1234, "applied");
    assert_ne!(after["config"]["quota_rows"], 99, "not applied: needs a restart");

    std::fs::write(&file, "replay_max_rate = \"fast\"\n").unwrap(); // not a number
    let bad = op.ask("re2", "reload", json!({})).await;
    assert_eq!(bad.error.map(|e| e.kind.as_str()), Some("failed"));
    let after = op.ask("st3", "status", json!({})).await.result.unwrap();
    assert_eq!(after["config"]["replay_max_rate"], 1234, "nothing changed");
    let _ = std::fs::remove_dir_all(&dir);
    agent.shutdown().await;
}

/// The binary wires `set_log_level` to its real log filter and `reload` to
/// its configuration file (the in-process tests above pass closures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_changes_its_log_filter_and_reloads_its_file() {
    let Some(stack) = stack_or_skip(PG_MQTT) else { return };
    let pg = fresh_pg_database(&stack).await;
    let prefix = topic_prefix();
    let dir = std::env::temp_dir().join(test_support::unique_name("agent_bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    let config = |rate: u64| {
        format!(
            "client_id = \"dev-1\"\npostgres_url = \"{pg}\"\nmqtt_port = {}\ntopic_prefix = \"{prefix}\"\n\
             listen = [\"tcp://127.0.0.1:0\"]\nhttp_listen = \"\"\nreplay_max_rate = {rate}\n",
            stack.mqtt_port
        )
    };
    std::fs::write(&file, config(0)).unwrap();
    // The agent logs to standard output.
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let _agent = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("--config")
            .arg(&file)
            .arg("--mqtt-client-id")
            .arg(test_support::unique_name("agent_bin"))
            .env("RUST_LOG", "warn")
            .env_remove("EDGE_AGENT_CONFIG")
            .stdout(log)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start edge-agent"),
    );
    let mut op = Operator::start(stack.mqtt_port, &prefix).await;
    op.ready().await;
    let logged = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    // Each command is logged at info: filtered out under RUST_LOG=warn.
    assert!(!logged().contains("remote command"), "info lines under RUST_LOG=warn: {}", logged());

    let r = op.ask("lvl", "set_log_level", json!({"filter": "edge_agent=info"})).await;
    assert!(r.ok, "{r:?}");
    op.send("after-change", "status", json!({})).await;
    let _ = op.reply().await;
    eventually(Duration::from_secs(10), "the next command's info line in the agent's log", || {
        logged().lines().any(|l| l.contains("INFO") && l.contains("remote command") && l.contains("after-change"))
    })
    .await;

    std::fs::write(&file, config(777)).unwrap();
    let r = op.ask("rl", "reload", json!({})).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.result.unwrap()["applied"], json!({"replay_max_rate": 777}));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
