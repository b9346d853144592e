//! Group commit: readings from every connection go to the outbox in one
//! transaction per `commit_max_rows` readings or `commit_max_delay`, and only
//! then are their frames acked to the sensors (durability rule 1).
//!
//! The committer also enforces the outbox quota (back-pressure or
//! drop-oldest) and hands each committed block to the publisher, so the hot
//! path never reads back what it just wrote.

use std::sync::Arc;
use std::time::{Duration, Instant};

use telemetry_wire::Reading;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::QuotaPolicy;
use crate::listener::Submission;
use crate::outbox::{row_bytes, Outbox, OutboxError};
use crate::shared::Shared;

/// Readings committed as seqs `first_seq..first_seq + readings.len()`.
#[derive(Debug)]
pub struct Block {
    /// Seq of `readings[0]`.
    pub first_seq: u64,
    /// The committed readings, in seq order.
    pub readings: Vec<Reading>,
    /// When it was committed (the publisher lingers briefly to fill batches).
    pub committed_at: Instant,
}

/// Settings of the committer.
#[derive(Debug, Clone)]
pub struct CommitterConfig {
    /// Readings per transaction, at most.
    pub max_rows: usize,
    /// Longest wait for more readings before committing.
    pub max_delay: Duration,
    /// Quota in rows.
    pub quota_rows: u64,
    /// Quota in bytes.
    pub quota_bytes: u64,
    /// What to do at quota.
    pub policy: QuotaPolicy,
    /// After shutdown starts, give up retrying a commit after this long
    /// (the readings stay unacked: sensors resend them).
    pub shutdown_timeout: Duration,
}

/// Runs until every submission sender is dropped (all connections closed).
pub async fn run(
    mut rx: mpsc::Receiver<Submission>,
    mut outbox: Outbox,
    mut next_seq: u64,
    shared: Arc<Shared>,
    handoff: mpsc::Sender<Block>,
    config: CommitterConfig,
    cancel: CancellationToken,
) {
    while let Some(first) = rx.recv().await {
        let mut subs = vec![first];
        let mut rows = subs[0].readings.len();
        let deadline = tokio::time::Instant::now() + config.max_delay;
        while rows < config.max_rows {
            match rx.try_recv() {
                Ok(s) => {
                    rows += s.readings.len();
                    subs.push(s);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => {
                        rows += s.readings.len();
                        subs.push(s);
                    }
                    _ => break,
                },
            }
        }
        let mut readings = Vec::with_capacity(rows);
        for s in &mut subs {
            readings.append(&mut s.readings);
        }
        let bytes: u64 = readings.iter().map(row_bytes).sum();

        if !readings.is_empty() {
            if config.policy == QuotaPolicy::Backpressure
                && !make_room(&mut outbox, &shared, readings.len() as u64, bytes, &config, &cancel).await
            {
                tracing::warn!(readings = readings.len(), "shutdown while the outbox was full; readings not acked");
                return;
            }
            let started = Instant::now();
            let Some(first_seq) = commit(&mut outbox, &mut next_seq, &readings, &shared, &config, &cancel).await else {
                tracing::warn!(readings = readings.len(), "shutdown before Postgres came back; readings not acked");
                return;
            };
            shared.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
            shared.metrics.commits.inc();
            shared.metrics.readings_committed.inc_by(readings.len() as u64);
            shared.add_rows(readings.len() as u64, bytes);
            shared.set_committed_high(next_seq - 1);
            if config.policy == QuotaPolicy::DropOldest {
                // New readings are never refused under this policy: commit,
                // then trim the oldest rows back to the quota.
                make_room(&mut outbox, &shared, 0, 0, &config, &cancel).await;
            }
            // Ack every connection whose frames are in this transaction.
            for s in &subs {
                s.ack.send_modify(|n| *n += s.units);
                shared.metrics.ack_latency_seconds.observe(s.received_at.elapsed().as_secs_f64());
            }
            shared.metrics.readings_acked.inc_by(readings.len() as u64);
            // The publisher reloads from the outbox when it misses a block,
            // so a full hand-off channel only costs a query, never a row.
            let _ = handoff.try_send(Block { first_seq, readings, committed_at: Instant::now() });
        } else {
            for s in &subs {
                s.ack.send_modify(|n| *n += s.units);
            }
        }
    }
}

/// Applies the quota before a commit of `rows`/`bytes`. Returns false when
/// shutdown gave up waiting for room.
async fn make_room(
    outbox: &mut Outbox,
    shared: &Shared,
    rows: u64,
    bytes: u64,
    config: &CommitterConfig,
    cancel: &CancellationToken,
) -> bool {
    let mut held_since: Option<Instant> = None;
    loop {
        let (have_rows, have_bytes) = shared.outbox_size();
        let excess_rows = (have_rows + rows).saturating_sub(config.quota_rows);
        let excess_bytes = (have_bytes + bytes).saturating_sub(config.quota_bytes);
        // A commit larger than the whole quota goes into an empty outbox,
        // or it could never go anywhere.
        if (excess_rows == 0 && excess_bytes == 0) || (have_rows == 0 && rows > 0) {
            if let Some(since) = held_since {
                tracing::info!(held_for = ?since.elapsed(), "outbox below quota again; reading sensors");
            }
            return true;
        }
        match config.policy {
            QuotaPolicy::Backpressure => {
                if held_since.is_none() {
                    held_since = Some(Instant::now());
                    shared.metrics.quota_backpressure.inc();
                    tracing::warn!(
                        rows = have_rows,
                        bytes = have_bytes,
                        quota_rows = config.quota_rows,
                        quota_bytes = config.quota_bytes,
                        "outbox at quota; holding sensors until rows are confirmed"
                    );
                }
                if cancel.is_cancelled() && held_since.is_some_and(|s| s.elapsed() > config.shutdown_timeout) {
                    return false;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), shared.space_freed.notified()).await;
            }
            QuotaPolicy::DropOldest => {
                // Rows to drop: the row excess, or enough average-size rows to
                // cover the byte excess.
                let avg = (have_bytes / have_rows.max(1)).max(1);
                let n = excess_rows.max(excess_bytes.div_ceil(avg)).max(1);
                match outbox.drop_oldest(n).await {
                    Ok((0, _)) => return true, // nothing left to drop
                    Ok((dropped, dropped_bytes)) => {
                        shared.sub_rows(dropped, dropped_bytes);
                        shared.metrics.rows_dropped.inc_by(dropped);
                        tracing::warn!(
                            dropped,
                            "outbox at quota; dropped the oldest rows (quota_policy = drop_oldest)"
                        );
                    }
                    Err(error) => {
                        shared.metrics.postgres_errors.inc();
                        tracing::warn!(%error, "dropping oldest rows failed; retrying");
                        outbox.reset();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

/// Commits `readings`, retrying Postgres errors with backoff. Returns the
/// first seq, or `None` if shutdown gave up.
async fn commit(
    outbox: &mut Outbox,
    next_seq: &mut u64,
    readings: &[Reading],
    shared: &Shared,
    config: &CommitterConfig,
    cancel: &CancellationToken,
) -> Option<u64> {
    let n = readings.len() as u64;
    let mut backoff = crate::backoff(Duration::from_millis(20), Duration::from_secs(2));
    let mut failing_since: Option<Instant> = None;
    loop {
        let first = *next_seq;
        match outbox.insert(first, readings).await {
            Ok(()) => {
                *next_seq = first + n;
                if let Some(since) = failing_since {
                    tracing::info!(after = ?since.elapsed(), "outbox commits resumed");
                }
                return Some(first);
            }
            // A previous attempt of this very commit went through before its
            // connection died: the table already holds these rows.
            Err(OutboxError::SeqConflict { found, .. }) if failing_since.is_some() && found == first + n => {
                *next_seq = found;
                tracing::info!(first, "an interrupted commit had succeeded");
                return Some(first);
            }
            Err(OutboxError::SeqConflict { found, expected }) if found < expected => {
                rolled_back(outbox, found, expected, shared).await;
            }
            Err(OutboxError::SeqConflict { found, expected }) => {
                shared.metrics.postgres_errors.inc();
                tracing::error!(expected, found, "outbox seq moved under us (a second agent on this outbox?)");
                *next_seq = found;
            }
            Err(error) => {
                shared.metrics.postgres_errors.inc();
                outbox.reset();
                let since = *failing_since.get_or_insert_with(Instant::now);
                if cancel.is_cancelled() && since.elapsed() > config.shutdown_timeout {
                    return None;
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(%error, ?delay, "outbox commit failed; sensors are not acked until it succeeds");
                tokio::time::sleep(delay).await;
                if failing_since.is_some() {
                    // Find out whether the failed attempt committed after all.
                    if let Ok(found) = outbox.next_seq().await {
                        if found == first + n {
                            *next_seq = found;
                            tracing::info!(first, "an interrupted commit had succeeded");
                            return Some(first);
                        }
                        if found < first {
                            rolled_back(outbox, found, first, shared).await;
                        } else {
                            *next_seq = found;
                        }
                    }
                }
            }
        }
    }
}

/// The table's `next_seq` (`found`) is behind `ours`, a seq this agent
/// already gave out: the outbox was rolled back under the running agent (a
/// restored backup, a failover to a lagging replica). Reusing those seqs
/// would make new readings look like duplicates to the ingest server, which
/// would ack them unstored; so the table is moved forward to `ours` and the
/// agent goes on from there. Rows that reappeared with the old state are
/// recounted and published again (the publisher replays the whole outbox);
/// those already stored are duplicates by identity. Counted and logged; the
/// caller retries its insert (a failed move is seen again by it).
async fn rolled_back(outbox: &mut Outbox, found: u64, ours: u64, shared: &Shared) {
    shared.metrics.outbox_rollbacks.inc();
    tracing::error!(
        table_next_seq = found,
        agent_next_seq = ours,
        "the outbox was rolled back under the agent (restored backup or lagging replica?): moving next_seq \
         forward, no seq is reused; rows that reappeared are published again"
    );
    let moved = async {
        outbox.advance_next_seq(found, ours).await?;
        outbox.size().await
    };
    match moved.await {
        Ok((rows, bytes)) => {
            shared.init_rows(rows, bytes);
            shared.request_rescan();
        }
        Err(error) => {
            shared.metrics.postgres_errors.inc();
            outbox.reset();
            tracing::warn!(%error, "moving next_seq forward failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
