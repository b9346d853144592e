//! `telemetry-ctl` (the built binary) against real edge agents (in this
//! process) on the stack's broker: discovery by glob over their retained
//! statuses, commands carried out on exactly the agents named, and an
//! agent's error reply turned into exit code 1.

use std::time::{Duration, Instant};

use edge_agent::config::ListenAddr;
use edge_agent::{Agent, Config};
use serde_json::Value;
use test_support::{fresh_pg_database, topic_prefix, Service, Stack};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_telemetry-ctl");

async fn start_agent(stack: &Stack, prefix: &str, client_id: &str) -> Agent {
    let config = Config {
        client_id: client_id.into(),
        mqtt_client_id: test_support::unique_name("ctl_agent"),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        postgres_url: fresh_pg_database(stack).await,
        mqtt_port: stack.mqtt_port,
        topic_prefix: prefix.into(),
        http_listen: String::new(),
        status_interval_secs: 1,
        ..Config::default()
    };
    Agent::start(config, CancellationToken::new()).await.expect("agent starts")
}

/// Runs telemetry-ctl; (exit code, stdout).
async fn ctl(stack: &Stack, prefix: &str, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["--mqtt-port", &stack.mqtt_port.to_string(), "--topic-prefix", prefix])
        .args(args)
        .args(["--timeout", "5s"])
        .output()
        .await
        .expect("run telemetry-ctl");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    eprintln!("$ telemetry-ctl {}\n{stdout}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    (out.status.code().expect("exited"), stdout)
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(15), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_ctl_commands_real_agents() {
    let Some(stack) = test_support::stack(&[Service::Postgres, Service::Mqtt]) else { return };
    let prefix = topic_prefix();
    let (a1, a2) = (start_agent(&stack, &prefix, "ctl-a1").await, start_agent(&stack, &prefix, "ctl-a2").await);
    let other = start_agent(&stack, &prefix, "ctl-b1").await;
    until("connected", || a1.shared.connected() && a2.shared.connected() && other.shared.connected()).await;
    // The glob is resolved from the agents' retained statuses: ask until
    // both have published theirs (each does within a status interval).
    let mut attempt = 0;
    let out = loop {
        let (code, out) = ctl(&stack, &prefix, &["status", "--to", "ctl-a*", "--json"]).await;
        let found: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
        if code == 0 && found.len() == 2 {
            break out;
        }
        attempt += 1;
        assert!(attempt < 20, "never saw both agents: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let replies: Vec<Value> = serde_json::from_str(&out).expect("a JSON array");
    let ids: Vec<&str> = replies.iter().map(|r| r["client_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["ctl-a1", "ctl-a2"], "the glob names exactly the two");
    for r in &replies {
        assert_eq!(r["ok"], true);
        assert_eq!(r["result"]["status"]["client_id"], r["client_id"]);
    }

    let (code, out) = ctl(&stack, &prefix, &["pause-intake", "--to", "ctl-a1"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(a1.shared.intake_paused() && !a2.shared.intake_paused() && !other.shared.intake_paused());

    // An embedded agent cannot change its log filter: an error reply, exit 1.
    let (code, out) = ctl(&stack, &prefix, &["set-log-level", "debug", "--to", "ctl-a2"]).await;
    assert_eq!(code, 1);
    assert!(out.contains("failed"), "{out}");

    let (code, _) = ctl(&stack, &prefix, &["resume-intake", "--to", "ctl-a1"]).await;
    assert_eq!(code, 0);
    assert!(!a1.shared.intake_paused());
    for agent in [a1, a2, other] {
        agent.shutdown().await;
    }
}
