//! Completes stored jobs **in the order they were flushed**: updates the
//! dedup state, PUBACKs the messages, then publishes one ingest ack per
//! client naming the exact ranges that are stored.
//!
//! # Invariants
//! - Nothing is PUBACKed or acked before its job's inserts returned.
//! - Jobs complete in flush order, so a duplicate whose first copy sits in an
//!   earlier in-flight job is acked only after that job is stored.
//! - An ack names `message range ∩ stored`, computed after this job's ranges
//!   were marked stored: never a seq that is not in ClickHouse.
//! - An abandoned job (shutdown deadline while ClickHouse was down) is not
//!   acked at all; the broker redelivers it to the persistent session.
//! - A message is PUBACKed only on the connection that delivered it: if
//!   that connection is gone, the broker redelivers the message on the new
//!   one, where it is a duplicate of what this job stored and is acked then.
//!   (The check and the PUBACK's trip through rumqttc's request channel are
//!   not atomic: a reconnect in that instant can still put an old packet id
//!   on the new connection, a window of microseconds instead of a whole
//!   insert.)
//! - A failed insert task (a panic) releases its claims, so the redelivered
//!   copies are stored, not skipped as duplicates.
//! - Ranges ClickHouse refused for good ([`crate::job::Job::rejected`]: isolated by
//!   bisection, dead-lettered) are released and named as rejected in the
//!   ack, so that the agent deletes them and stops republishing; the rest
//!   of the job is acked as stored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use rumqttc::{AsyncClient, QoS};
use telemetry_wire::{IngestAck, SeqRange};
use tokio::sync::mpsc;

use crate::dedup::DedupState;
use crate::job::{Claim, InFlight};
use crate::metrics::Metrics;
use crate::subscriber::{Generation, Topics};

/// Everything the acker needs.
#[derive(Debug)]
pub struct Acker {
    /// The MQTT client (acks go through its request channel).
    pub client: AsyncClient,
    /// Shared with the batcher.
    pub dedup: Arc<Mutex<DedupState>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Topic layout.
    pub topics: Topics,
    /// The current MQTT connection.
    pub generation: Generation,
    /// An insert not completed after this long is a stall: logged, counted,
    /// and reported by `/healthz` until it completes.
    pub stall_after: std::time::Duration,
}

impl Acker {
    /// Completes in-flight jobs until the channel closes.
    pub async fn run(self, mut rx: mpsc::Receiver<InFlight>) {
        while let Some((mut handle, claims)) = rx.recv().await {
            let mut waited = std::time::Duration::ZERO;
            let joined = loop {
                tokio::select! {
                    joined = &mut handle => break joined,
                    () = tokio::time::sleep(self.stall_after) => {
                        waited += self.stall_after;
                        if self.metrics.insert_stalled.get() == 0 {
                            self.metrics.insert_stalls.inc();
                        }
                        self.metrics.insert_stalled.set(1);
                        tracing::warn!(waited_s = waited.as_secs(), "no insert completed for this long: ClickHouse is slow or down (retrying; nothing is acked meanwhile)");
                    }
                }
            };
            if self.metrics.insert_stalled.get() == 1 {
                tracing::info!(waited_s = waited.as_secs(), "inserts complete again");
            }
            self.metrics.insert_stalled.set(0);
            let outcome = match joined {
                Ok(outcome) => outcome,
                Err(error) => {
                    // The store task panicked or was aborted: its messages stay
                    // unacked, and its claims must not make their redelivered
                    // copies look like duplicates.
                    tracing::error!(%error, "insert task failed; its messages are left for redelivery");
                    self.metrics.inflight_inserts.dec();
                    self.metrics.insert_task_failures.inc();
                    self.release(&claims);
                    continue;
                }
            };
            self.metrics.inflight_inserts.dec();
            let job = outcome.job;
            if outcome.abandoned {
                tracing::warn!(messages = job.messages.len(), "batch abandoned; left for redelivery");
                self.metrics.unacked_messages.dec_by(job.messages.len() as i64);
                self.release(&claims);
                continue;
            }
            let acks = {
                // Invariant: plain map operations; see batcher.
                let mut dedup = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
                for claim @ (client_id, epoch, lo, hi) in &claims {
                    if outcome.stored && !job.rejected.contains(claim) {
                        dedup.mark_stored(client_id, *epoch, *lo, *hi);
                    } else {
                        dedup.release(client_id, *epoch, *lo, *hi);
                    }
                }
                let mut per_client: BTreeMap<&str, IngestAck> = BTreeMap::new();
                for item in &job.acks {
                    let r = item.range;
                    for (first_seq, last_seq) in dedup.stored_within(&item.client_id, r.epoch, r.first_seq, r.last_seq)
                    {
                        per_client.entry(&item.client_id).or_default().ranges.push(SeqRange {
                            epoch: r.epoch,
                            first_seq,
                            last_seq,
                        });
                    }
                }
                for (client_id, epoch, first_seq, last_seq) in &job.rejected {
                    let range = SeqRange { epoch: *epoch, first_seq: *first_seq, last_seq: *last_seq };
                    per_client.entry(client_id).or_default().rejected.push(range);
                }
                per_client
                    .into_iter()
                    .map(|(c, ack)| {
                        (c.to_owned(), IngestAck { ranges: merge(ack.ranges), rejected: merge(ack.rejected) })
                    })
                    .collect::<Vec<_>>()
            };
            // PUBACK first: the broker may forget these messages now.
            let mut stale = 0u64;
            self.metrics.unacked_messages.dec_by(job.messages.len() as i64);
            for message in &job.messages {
                if !self.generation.is_current(message.generation) {
                    stale += 1;
                    continue;
                }
                if let Err(error) = self.client.ack(&message.publish).await {
                    tracing::error!(%error, "cannot queue PUBACK");
                }
                self.metrics.acked_messages.inc();
            }
            if stale > 0 {
                self.metrics.stale_pubacks.inc_by(stale);
                tracing::info!(messages = stale, "stored, but delivered on a connection that is gone: not PUBACKed there; the broker redelivers them and they are acked as duplicates");
            }
            for (client_id, ack) in acks {
                let payload = ack.encode();
                match self.client.publish(self.topics.ack(&client_id), QoS::AtLeastOnce, false, payload).await {
                    Ok(()) => {
                        self.metrics.acks_published.inc();
                    }
                    Err(error) => tracing::error!(%error, %client_id, "cannot queue ingest ack"),
                }
            }
            self.metrics.batches.inc();
            tracing::debug!(messages = job.messages.len(), rows = job.rows, stored = outcome.stored, "batch acked");
        }
    }

    /// Gives back claims whose readings were not stored, so that their
    /// redelivered copies are inserted, not skipped as duplicates.
    fn release(&self, claims: &[Claim]) {
        let mut dedup = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
        for (client_id, epoch, lo, hi) in claims {
            dedup.release(client_id, *epoch, *lo, *hi);
        }
    }
}

/// Sorts ranges and merges overlapping or adjacent ones of the same epoch.
#[must_use]
pub fn merge(mut ranges: Vec<SeqRange>) -> Vec<SeqRange> {
    ranges.sort();
    let mut out: Vec<SeqRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.epoch == r.epoch && last.last_seq.saturating_add(1) >= r.first_seq => {
                last.last_seq = last.last_seq.max(r.last_seq);
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(epoch: u64, a: u64, b: u64) -> SeqRange {
        SeqRange { epoch, first_seq: a, last_seq: b }
    }

    #[test]
    fn adjacent_ranges_of_one_epoch_merge_and_others_stay() {
        let merged = merge(vec![r(1, 11, 20), r(1, 1, 10), r(2, 21, 30), r(1, 30, 40)]);
        assert_eq!(merged, vec![r(1, 1, 20), r(1, 30, 40), r(2, 21, 30)]);
    }
}
