//! The unit of work between the batcher, the writer and the acker: a
//! [`Job`] of MQTT messages gathered for one insert.
//!
//! Its own module so that the stages that pass it along (batcher → writer →
//! acker, and the rollup reading its minutes) depend on these types, not on
//! each other.

use rumqttc::Publish;
use telemetry_wire::{AgentStatus, CompactBatch, Sample, SeqRange};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::deadletter::DeadLetter;

/// A decoded batch and the seqs of it that are new (to insert).
#[derive(Debug)]
pub struct BatchPart {
    /// The decoded batch (sensor names held once).
    pub batch: CompactBatch,
    /// Ranges of it nobody stored or claimed before (non-empty).
    pub fresh: Vec<(u64, u64)>,
    /// Index of its message in [`Job::messages`].
    pub message: usize,
}

impl BatchPart {
    /// The new readings with their seqs, in seq order.
    pub fn fresh_readings(&self) -> impl Iterator<Item = (u64, &Sample)> + '_ {
        self.fresh.iter().flat_map(move |&(lo, hi)| {
            // Invariant: CompactBatch::decode checked readings.len() == last - first + 1,
            // and fresh ranges lie within first_seq..=last_seq.
            (lo..=hi).map(move |seq| (seq, &self.batch.readings[(seq - self.batch.first_seq) as usize]))
        })
    }
}

#[cfg(test)]
impl BatchPart {
    /// A part of message 0 holding `readings` of `client` from `first_seq`
    /// on, decoded as the batcher decodes it; `fresh` its new ranges.
    pub(crate) fn for_test(
        client: &str,
        epoch: u64,
        first_seq: u64,
        readings: Vec<telemetry_wire::Reading>,
        fresh: Vec<(u64, u64)>,
    ) -> Self {
        let last_seq = first_seq + readings.len() as u64 - 1;
        let batch = telemetry_wire::Batch { client_id: client.into(), epoch, first_seq, last_seq, readings };
        // Invariant (test input): the batch encodes and decodes.
        Self { batch: CompactBatch::decode(&batch.encode(), 1 << 24).expect("a valid test batch"), fresh, message: 0 }
    }
}

/// What an ack on `<prefix>/ack/<client_id>` should confirm once stored.
#[derive(Debug, Clone)]
pub struct AckItem {
    /// The device.
    pub client_id: String,
    /// The batch's whole range; the ack names the stored part of it.
    pub range: SeqRange,
}

/// A received MQTT message and the connection that delivered it: a PUBACK
/// may only go out on that connection (packet ids belong to it).
#[derive(Debug)]
pub struct Message {
    /// The publish.
    pub publish: Publish,
    /// The connection generation (1 for the first ConnAck, +1 per reconnect).
    pub generation: u64,
}

/// Messages gathered for one insert.
#[derive(Debug, Default)]
pub struct Job {
    /// Every message, to PUBACK once the job is stored.
    pub messages: Vec<Message>,
    /// New readings, per batch.
    pub parts: Vec<BatchPart>,
    /// Ranges to confirm to agents.
    pub acks: Vec<AckItem>,
    /// Agent statuses and their receive time.
    pub statuses: Vec<(AgentStatus, u32)>,
    /// Messages for `ingest_errors`.
    pub dead: Vec<DeadLetter>,
    /// Ranges ClickHouse refused for good (their messages were isolated by
    /// bisection and dead-lettered): released, and reported to their agents
    /// as rejected.
    pub rejected: Vec<Claim>,
    /// New readings in [`Job::parts`].
    pub rows: usize,
    /// Payload bytes of [`Job::messages`].
    pub bytes: usize,
    /// When the first message arrived (the flush timer starts there).
    pub opened: Option<Instant>,
}

impl Job {
    /// Whether the job holds no message.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// What happened to a job.
#[derive(Debug)]
pub struct Outcome {
    /// The job, returned for acking.
    pub job: Job,
    /// Whether its new readings (if any) are stored, their minutes queued
    /// for the rollup and their ranges recorded.
    pub stored: bool,
    /// Shutdown's deadline passed: nothing of this job may be acked.
    pub abandoned: bool,
}

/// A dedup claim: `(client_id, epoch, first_seq, last_seq)`.
pub type Claim = (String, u64, u64, u64);

impl Job {
    /// The claims this job holds (released if its task fails).
    #[must_use]
    pub fn claims(&self) -> Vec<Claim> {
        self.parts
            .iter()
            .flat_map(|p| p.fresh.iter().map(|&(lo, hi)| (p.batch.client_id.clone(), p.batch.epoch, lo, hi)))
            .collect()
    }
}

/// A job being stored and its claims. The acker's channel holds at most
/// `max_inflight_inserts` of these, which bounds the jobs in memory.
pub type InFlight = (JoinHandle<Outcome>, Vec<Claim>);
