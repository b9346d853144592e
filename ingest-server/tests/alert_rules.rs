//! `deploy/prometheus/alerts.yml` names only metrics that exist: every
//! `telemetry_agent_*` / `telemetry_ingest_*` name in it is rendered by the
//! agent's or the ingest server's `/metrics` (a renamed metric would leave
//! an alert that never fires).

use std::collections::BTreeSet;

/// Sample names each daemon can render, from its `# TYPE` lines (a
/// counter's samples carry `_total`). A labelled family renders only once
/// it has a label set, so each gets one here.
fn rendered() -> BTreeSet<String> {
    use edge_agent::metrics::Reason;
    use ingest_server::metrics::{KindLabel, ReasonLabel, TableLabel};
    let agent = edge_agent::metrics::Metrics::default();
    for family in [&agent.readings_rejected, &agent.frames_rejected, &agent.confirmations_rejected] {
        family.get_or_create(&Reason { reason: "x" }).inc();
    }
    let ingest = ingest_server::Metrics::new();
    ingest.received_messages.get_or_create(&KindLabel { kind: "x".into() }).inc();
    ingest.dead_letters.get_or_create(&ReasonLabel { reason: "x".into() }).inc();
    ingest.insert_retries.get_or_create(&TableLabel { table: "x".into() }).inc();
    let text = agent.render() + &ingest.render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.strip_prefix("# TYPE ").unwrap_or_default().split_whitespace();
        if let (Some(name), Some(kind)) = (words.next(), words.next()) {
            names.insert(name.to_owned());
            if kind == "counter" {
                names.insert(format!("{name}_total"));
            }
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Every metric name of ours in `text`.
fn named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("telemetry_") {
        let name: String = text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if name.starts_with("telemetry_agent_") || name.starts_with("telemetry_ingest_") {
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_metric_in_the_alert_rules_exists() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let rules = std::fs::read_to_string(&path).expect("read alerts.yml");
    let used = named_in(&rules);
    assert!(used.len() >= 10, "too few metrics found in the rules: {used:?}");
    let have = rendered();
    let missing: Vec<_> = used.difference(&have).collect();
    assert!(missing.is_empty(), "alerts.yml names metrics no daemon renders: {missing:?}");
}

#[test]
fn a_misspelt_metric_would_be_found() {
    let have = rendered();
    assert!(have.contains("telemetry_agent_outbox_rows"));
    assert!(have.contains("telemetry_ingest_inserted_readings_total"));
    assert!(!have.contains("telemetry_agent_outbox_row"));
    assert_eq!(named_in("x telemetry_agent_a_b{y} + up"), BTreeSet::from(["telemetry_agent_a_b".to_owned()]));
}
