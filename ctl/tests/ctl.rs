//! `telemetry-ctl` (the built binary) against the stack's real Mosquitto,
//! with a fake fleet: one MQTT client that publishes retained statuses for
//! some client ids and answers the commands on `<prefix>/cmd/+` the way an
//! agent does, by client id:
//! - `*bad*`: a `bad_arguments` error reply;
//! - `*silent*`: no reply at all;
//! - anything else: first a reply to another command id and then the real
//!   `ok` reply, then a repeat that says `failed` (telemetry-ctl must ignore
//!   the first and the last).
//!
//! Each test uses its own topic prefix, and clears the retained statuses it
//! published (also when it fails).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use telemetry_wire::{AgentStatus, Command, CommandError, ErrorKind, Reply};
use test_support::{Service, Stack};

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-ctl");

/// What the fake fleet received: (client id from the topic, command).
type Received = Arc<Mutex<Vec<(String, Command)>>>;

struct Fleet {
    client: AsyncClient,
    prefix: String,
    statuses: Vec<String>,
    received: Received,
    pubacks: Arc<AtomicUsize>,
    pump: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Connects, subscribes to `<prefix>/cmd/+` (waiting for the SUBACK) and
    /// publishes a retained status for each of `statuses` (waiting for the
    /// broker to take them).
    async fn start(stack: &Stack, prefix: &str, statuses: &[&str]) -> Self {
        let mut options = MqttOptions::new(test_support::unique_name("fake-fleet"), "127.0.0.1", stack.mqtt_port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let received: Received = Arc::default();
        let pubacks = Arc::new(AtomicUsize::new(0));
        let subscribed = Arc::new(AtomicUsize::new(0));
        let pump = {
            let (client, received, pubacks, subscribed) =
                (client.clone(), received.clone(), pubacks.clone(), subscribed.clone());
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            answer(&client, &prefix, &p.topic, &p.payload, &received);
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            pubacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => panic!("fake fleet lost the broker: {e}"),
                    }
                }
            })
        };
        client.subscribe(format!("{prefix}/cmd/+"), QoS::AtLeastOnce).await.unwrap();
        eventually("fake fleet subscribed", || subscribed.load(Ordering::SeqCst) == 1).await;
        for id in statuses {
            let status = AgentStatus {
                version: telemetry_wire::status::STATUS_VERSION,
                client_id: (*id).to_owned(),
                connected: true,
                ..AgentStatus::default()
            };
            client.publish(format!("{prefix}/status/{id}"), QoS::AtLeastOnce, true, status.encode()).await.unwrap();
        }
        eventually("retained statuses taken", || pubacks.load(Ordering::SeqCst) >= statuses.len()).await;
        Self {
            client,
            prefix: prefix.to_owned(),
            statuses: statuses.iter().map(|s| (*s).to_owned()).collect(),
            received,
            pubacks,
            pump,
        }
    }

    fn received(&self) -> Vec<(String, Command)> {
        let mut r = self.received.lock().unwrap().clone();
        r.sort_by(|a, b| a.0.cmp(&b.0));
        r
    }

    /// Clears the retained statuses (empty retained payloads) and disconnects.
    async fn stop(self) {
        let before = self.pubacks.load(Ordering::SeqCst);
        for id in &self.statuses {
            let topic = format!("{}/status/{id}", self.prefix);
            self.client.publish(topic, QoS::AtLeastOnce, true, Vec::new()).await.unwrap();
        }
        let pubacks = self.pubacks.clone();
        let n = self.statuses.len();
        eventually("retained statuses cleared", || pubacks.load(Ordering::SeqCst) >= before + n).await;
        self.client.disconnect().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.pump).await.expect("fleet disconnects").unwrap();
    }
}

/// Answers one command like an agent (see the module doc).
fn answer(client: &AsyncClient, prefix: &str, topic: &str, payload: &[u8], received: &Received) {
    let Some(id) = topic.strip_prefix(&format!("{prefix}/cmd/")) else { return };
    let command = Command::decode(payload).expect("telemetry-ctl sends well-formed commands");
    received.lock().unwrap().push((id.to_owned(), command.clone()));
    let reply = |cid: &str, result: Result<Value, CommandError>| Reply {
        id: Some(cid.to_owned()),
        client_id: id.to_owned(),
        name: Some(command.name.clone()),
        ts_ms: 1,
        ok: result.is_ok(),
        result: result.as_ref().ok().cloned(),
        error: result.err(),
    };
    let replies = if id.contains("silent") {
        vec![]
    } else if id.contains("bad") {
        vec![reply(&command.id, Err(CommandError::new(ErrorKind::BadArguments, "args: this agent wants none")))]
    } else {
        let result = json!({"answered_by": id, "command": command.name, "args": command.args});
        vec![
            reply("ctl-0000000000000000", Err(CommandError::new(ErrorKind::Failed, "another command"))),
            reply(&command.id, Ok(result)),
            reply(&command.id, Err(CommandError::new(ErrorKind::Failed, "a repeat must not count"))),
        ]
    };
    let (client, topic) = (client.clone(), format!("{prefix}/cmd-reply/{id}"));
    // Not from the polling task itself: a full request queue would stall it.
    tokio::spawn(async move {
        for r in replies {
            client.publish(topic.clone(), QoS::AtLeastOnce, false, r.encode()).await.unwrap();
        }
    });
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs telemetry-ctl against the stack's broker under `prefix`.
async fn ctl(stack: &Stack, prefix: &str, args: &[&str]) -> Run {
    let start = Instant::now();
    let out = tokio::process::Command::new(BIN)
        .args(["--mqtt-host", &stack.mqtt_host, "--mqtt-port", &stack.mqtt_port.to_string(), "--topic-prefix", prefix])
        .args(args)
        .env_remove("TELEMETRY_CTL_PASSWORD")
        .output()
        .await
        .expect("run telemetry-ctl");
    let run = Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
        took: start.elapsed(),
    };
    eprintln!("$ telemetry-ctl {}\n{}{}(exit {}, {:?})", args.join(" "), run.stdout, run.stderr, run.code, run.took);
    run
}

/// Runs `checks` with `fleet` up, then stops the fleet (clearing its
/// retained statuses) whether or not the checks passed, then reports them.
async fn with_fleet<F>(fleet: Fleet, checks: impl FnOnce(Arc<Fleet>) -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let fleet = Arc::new(fleet);
    let outcome = tokio::spawn(checks(fleet.clone())).await;
    let fleet = Arc::into_inner(fleet).expect("the checks hold no fleet any more");
    fleet.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The table's rows (header dropped), split into columns.
fn rows(table: &str) -> Vec<Vec<String>> {
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    assert!(header.starts_with("CLIENT") && header.contains("RESULT") && header.contains("DETAIL"), "{header}");
    lines
        // Columns are separated by two spaces or more; RESULT may be `no reply`.
        .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_glob_reaches_every_discovered_agent_and_prints_a_table_and_json() {
    let Some(stack) = test_support::stack(&[Service::Mqtt]) else { return };
    let prefix = test_support::topic_prefix();
    let fleet = Fleet::start(&stack, &prefix, &["edge-a1", "edge-a2", "edge-a3", "other-1"]).await;
    let st = stack.clone();
    let p = prefix.clone();
    with_fleet(fleet, move |fleet| async move {
        let (stack, prefix) = (st, p);
        // A long timeout: it must return as soon as all three have answered.
        let before_ms = telemetry_ctl::request::now_ms();
        let run = ctl(&stack, &prefix, &["status", "--to", "edge-a*", "--timeout", "30s"]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(run.took < Duration::from_secs(10), "stops when all answered: {:?}", run.took);
        let table = rows(&run.stdout);
        let clients: Vec<&str> = table.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(clients, ["edge-a1", "edge-a2", "edge-a3"], "sorted, and only what the glob matches");
        for row in &table {
            assert_eq!(row[1], "ok", "{row:?}");
            assert!(
                row[2].contains(&format!("answered_by={}", row[0])) && row[2].contains("command=status"),
                "{row:?}"
            );
        }
        let received = fleet.received();
        let ids: Vec<&str> = received.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(ids, ["edge-a1", "edge-a2", "edge-a3"], "one command per target, none to other-1");
        let first = &received[0].1;
        assert_eq!(first.name, "status");
        assert!(first.args.is_empty());
        assert!(first.id.starts_with("ctl-") && first.id.len() == 20, "{}", first.id);
        assert!(received.iter().all(|(_, c)| c.id == first.id), "one id per invocation");
        // Sent after the discovery wait, expiring when telemetry-ctl stops waiting.
        let expiry = first.expires_at_ms - before_ms;
        let latest = 30_000 + i64::try_from(run.took.as_millis()).unwrap();
        assert!((30_000..=latest).contains(&expiry), "expires with the timeout: {expiry} ms");

        let filter = "edge_agent=debug,warn";
        let run =
            ctl(&stack, &prefix, &["set-log-level", filter, "--to", "edge-a[12]", "--to", "edge-a3", "--json"]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        let items: Vec<Value> = serde_json::from_str(&run.stdout).expect("--json prints a JSON array");
        assert_eq!(items.len(), 3);
        for (item, id) in items.iter().zip(["edge-a1", "edge-a2", "edge-a3"]) {
            assert_eq!(item["client_id"], id);
            assert_eq!(item["ok"], true);
            assert_eq!(item["result"]["answered_by"], id);
            assert_eq!(item["result"]["args"], json!({"filter": filter}));
            assert!(item.get("error").is_none() && item.get("timeout").is_none(), "{item}");
        }
        let new_id = fleet.received().into_iter().find(|(_, c)| c.name == "set_log_level").unwrap().1.id;
        assert_ne!(new_id, first.id, "a fresh id for each invocation");

        let sent = fleet.received().len();
        let run = ctl(&stack, &prefix, &["flush", "--to", "edge-a1", "--to", "site-*"]).await;
        assert_eq!(run.code, 2);
        assert!(run.stderr.contains(r#"--to "site-*" matches no client id"#), "{}", run.stderr);
        assert!(run.stdout.is_empty());
        assert_eq!(fleet.received().len(), sent, "nothing is sent when a glob matches nothing");
    })
    .await;

    // The statuses are gone: the glob finds nothing now.
    let run = ctl(&stack, &prefix, &["status", "--to", "edge-a*", "--discover-wait", "500ms"]).await;
    assert_eq!(run.code, 2, "retained statuses were cleared");
    assert!(run.stderr.contains("no agent status was found"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_and_silent_agents_show_per_agent_and_exit_1() {
    let Some(stack) = test_support::stack(&[Service::Mqtt]) else { return };
    let prefix = test_support::topic_prefix();
    let fleet = Fleet::start(&stack, &prefix, &[]).await;
    let st = stack.clone();
    with_fleet(fleet, move |fleet| async move {
        let stack = st;
        let targets = ["--to", "edge-ok,edge-bad", "--to", "edge-silent"];
        let run = ctl(&stack, &prefix, &[&["flush", "--timeout", "1500ms"][..], &targets[..]].concat()).await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.took >= Duration::from_millis(1500), "waited for the silent one: {:?}", run.took);
        let table = rows(&run.stdout);
        assert_eq!(table.len(), 3);
        assert_eq!(table[0], ["edge-bad", "bad_arguments", "args: this agent wants none"]);
        assert_eq!(table[1][..2], ["edge-ok", "ok"]);
        assert!(table[1][2].contains("command=flush"), "{:?}", table[1]);
        assert_eq!(table[2], ["edge-silent", "no reply", "nothing within 1.5s"]);
        assert!(run.stderr.contains("1 of 3 agents did not answer within 1.5s"), "{}", run.stderr);
        assert_eq!(fleet.received().len(), 3, "all three were sent the command");

        let run =
            ctl(&stack, &prefix, &[&["pause-intake", "--timeout", "1s", "--json"][..], &targets[..]].concat()).await;
        assert_eq!(run.code, 1);
        let items: Value = serde_json::from_str(&run.stdout).expect("--json prints a JSON array");
        assert_eq!(
            items[0],
            json!({"client_id": "edge-bad", "ok": false,
            "error": {"kind": "bad_arguments", "message": "args: this agent wants none"}})
        );
        assert_eq!(items[1]["client_id"], "edge-ok");
        assert_eq!(items[1]["ok"], true);
        assert_eq!(items[1]["result"]["command"], "pause_intake");
        assert_eq!(items[2], json!({"client_id": "edge-silent", "ok": false, "timeout": true}));

        // Only the bad one: an error reply alone is exit 1 too.
        let run = ctl(&stack, &prefix, &["resume-intake", "--to", "edge-bad"]).await;
        assert_eq!(run.code, 1);
        assert!(run.stdout.contains("bad_arguments"), "{}", run.stdout);
        let run = ctl(&stack, &prefix, &["reload", "--to", "edge-ok"]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error_with_exit_2() {
    let port = test_support::free_port();
    let out = tokio::process::Command::new(BIN)
        .args(["--mqtt-port", &port.to_string(), "status", "--to", "edge-1"])
        .output()
        .await
        .expect("run telemetry-ctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the broker at 127.0.0.1:{port}")), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn usage_errors_exit_2_before_connecting() {
    // Port 1: nothing listens, so a run that got as far as connecting would say so.
    for (args, says) in [
        (&["status", "--to", "edge/1"][..], "is not a client id"),
        (&["status"][..], "--to"),
        (&["set-log-level", "", "--to", "edge-1"][..], "needs a filter"),
        (&["status", "--to", "edge-1", "--timeout", "soon"][..], "not a duration"),
    ] {
        let out = tokio::process::Command::new(BIN).args(["--mqtt-port", "1"]).args(args).output().await.expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says) && !stderr.contains("cannot reach"), "{args:?}: {stderr}");
    }
}
