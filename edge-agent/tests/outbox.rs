//! The outbox's own rules against real Postgres: the guarded insert (seqs
//! are never given out twice, a second writer or a retried commit is
//! caught before any row is written), and rows read back exactly.

mod common;

use common::stack_or_skip;
use edge_agent::config::Secret;
use edge_agent::outbox::{Outbox, OutboxError};
use telemetry_wire::Reading;
use test_support::{drop_pg_database, fresh_pg_database, Service};

fn readings(from: i64, n: i64) -> Vec<Reading> {
    (from..from + n).map(|i| Reading { sensor: format!("s-{}-ü", i % 3), ts: i, value: i as f64 / 3.0 }).collect()
}

#[tokio::test]
async fn the_guarded_insert_gives_out_no_seq_twice() {
    let Some(stack) = stack_or_skip(&[Service::Postgres]) else { return };
    let url = fresh_pg_database(&stack).await;
    let mut outbox = Outbox::new(&url, &Secret::default(), "edge").unwrap();
    let state = outbox.migrate().await.unwrap();
    assert_eq!(state.next_seq, 1);

    let first = readings(0, 3000);
    outbox.insert(1, &first).await.unwrap();
    assert_eq!(outbox.next_seq().await.unwrap(), 3001);

    // A retry of that commit, or a second writer that still expects seq 1:
    // refused, and nothing of it written.
    match outbox.insert(1, &readings(10_000, 5)).await {
        Err(OutboxError::SeqConflict { expected: 1, found: 3001 }) => {}
        other => panic!("expected a seq conflict, got {other:?}"),
    }
    // The same from a second connection (another agent on this outbox).
    let mut other = Outbox::new(&url, &Secret::default(), "edge").unwrap();
    assert!(matches!(other.insert(2000, &readings(20_000, 5)).await, Err(OutboxError::SeqConflict { .. })));
    assert_eq!(outbox.size().await.unwrap().0, 3000, "no row of a refused insert");

    outbox.insert(3001, &readings(3000, 2)).await.unwrap();
    let all = outbox.load(0, 10_000).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=3002).collect::<Vec<u64>>());
    let back: Vec<Reading> = all.into_iter().map(|(_, r)| r).collect();
    assert_eq!(back, readings(0, 3002), "sensor, ts and value round-trip exactly");
    drop((outbox, other));
    drop_pg_database(&stack, &url).await;
}
