//! The batcher: decodes each message, deduplicates it against the stored and
//! claimed seq ranges, and gathers messages into a [`Job`] that it flushes to
//! a writer task.
//!
//! # Flush rules
//! A job is flushed when it holds `batch_max_rows` new readings, or
//! `batch_max_messages` unacked messages (the broker stops sending at its
//! `max_inflight_messages`, so waiting for rows alone could stall), or
//! `batch_max_bytes` of payload, or `batch_max_delay_ms` after its first
//! message, or at shutdown.
//!
//! # Bounded memory, without starving the MQTT connection
//! At most `max_inflight_inserts` readings INSERTs run at once (a
//! semaphore; a job gives its permit back once its readings are in, while
//! its small marker and range inserts finish), and at most
//! `max_inflight_inserts` more jobs wait for the acker (its channel). When
//! both are full the batcher waits and its inbound
//! queue grows; the MQTT poll task never waits on it (it must keep polling
//! to answer the broker's keep-alive). What bounds the queue is the
//! broker's in-flight limit for this client (`max_inflight_messages` in
//! `deploy/mosquitto.conf`): it sends no more than that many messages
//! un-PUBACKed. Memory is bounded by that limit times the largest message.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Publish;
use telemetry_wire::{AgentStatus, CompactBatch};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deadletter::{unix_seconds, DeadLetter};
use crate::dedup::DedupState;
use crate::job::{AckItem, BatchPart, InFlight, Job, Message};
use crate::metrics::{KindLabel, Metrics};
use crate::subscriber::{Inbound, TopicKind, Topics};
use crate::writer::Writer;

/// The batcher's state.
#[derive(Debug)]
pub struct Batcher {
    topics: Topics,
    max_payload: usize,
    max_rows: usize,
    max_messages: usize,
    max_bytes: usize,
    max_delay: Duration,
    dedup_horizon_s: u64,
    dedup: Arc<Mutex<DedupState>>,
    metrics: Arc<Metrics>,
    writer: Arc<Writer>,
    permits: Arc<Semaphore>,
    inflight_tx: mpsc::Sender<InFlight>,
    hard_stop: CancellationToken,
}

impl Batcher {
    /// A batcher feeding `writer`, handing in-flight jobs to the acker via `inflight_tx`.
    #[must_use]
    pub fn new(
        config: &Config,
        dedup: Arc<Mutex<DedupState>>,
        metrics: Arc<Metrics>,
        writer: Arc<Writer>,
        inflight_tx: mpsc::Sender<InFlight>,
        hard_stop: CancellationToken,
    ) -> Self {
        Self {
            topics: Topics::new(&config.topic_prefix),
            max_payload: config.max_payload_bytes,
            max_rows: config.batch_max_rows,
            max_messages: config.batch_max_messages,
            max_bytes: config.batch_max_bytes,
            max_delay: Duration::from_millis(config.batch_max_delay_ms),
            dedup_horizon_s: u64::from(config.dedup_horizon_days) * 86_400,
            dedup,
            metrics,
            writer,
            permits: Arc::new(Semaphore::new(config.max_inflight_inserts)),
            inflight_tx,
            hard_stop,
        }
    }

    /// Reads `rx` until `shutdown` (or the channel closes), then flushes.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Inbound>, shutdown: CancellationToken) {
        let mut job = Job::default();
        let mut evict = tokio::time::interval(Duration::from_secs(60));
        loop {
            let deadline =
                job.opened.map_or_else(|| Instant::now() + Duration::from_secs(3600), |t| t + self.max_delay);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = evict.tick() => self.evict_idle_streams(),
                () = tokio::time::sleep_until(deadline), if job.opened.is_some() => {
                    self.flush(&mut job).await;
                }
                inbound = rx.recv() => match inbound {
                    None => break,
                    Some(Inbound::Connected { session_present, generation }) => {
                        tracing::debug!(session_present, generation, "batcher sees a (re)connection");
                    }
                    Some(Inbound::Publish(message)) => {
                        self.metrics.inbound_queue.dec();
                        self.accept(&mut job, message);
                        if job.rows >= self.max_rows
                            || job.messages.len() >= self.max_messages
                            || job.bytes >= self.max_bytes
                        {
                            self.flush(&mut job).await;
                        }
                    }
                },
            }
        }
        self.flush(&mut job).await;
        tracing::debug!("batcher stopped");
    }

    /// Hands the job to a writer task (waiting for a permit: back-pressure).
    async fn flush(&self, job: &mut Job) {
        if job.is_empty() {
            return;
        }
        let permit = tokio::select! {
            () = self.hard_stop.cancelled() => return,
            permit = self.permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return, // closed: shutting down
            },
        };
        let job = std::mem::take(job);
        self.metrics.batch_rows.observe(job.rows as f64);
        self.metrics.inflight_inserts.inc();
        tracing::debug!(messages = job.messages.len(), rows = job.rows, dead = job.dead.len(), "flushing batch");
        let claims = job.claims();
        let handle = tokio::spawn(self.writer.clone().store(job, permit));
        if self.inflight_tx.send((handle, claims)).await.is_err() {
            tracing::error!("acker is gone; batch will not be acked (redelivered later)");
        }
    }

    /// Decodes and sorts one message into `job`.
    fn accept(&self, job: &mut Job, message: Message) {
        let publish = &message.publish;
        self.metrics.unacked_messages.inc();
        if job.opened.is_none() {
            job.opened = Some(Instant::now());
        }
        let index = job.messages.len();
        job.bytes += publish.payload.len();
        match self.topics.classify(&publish.topic) {
            TopicKind::Client(client_id) => {
                self.count("batch");
                match CompactBatch::decode(&publish.payload, self.max_payload) {
                    Err(error) => {
                        job.dead.push(dead(publish, client_id, error.kind(), error.to_string()));
                    }
                    Ok(batch) if batch.client_id != client_id => {
                        let error = format!("payload client id {:?} is not the topic's {client_id:?}", batch.client_id);
                        job.dead.push(dead(publish, client_id, "client_id_mismatch", error));
                    }
                    Ok(batch) => self.accept_batch(job, batch, index),
                }
            }
            TopicKind::Status(client_id) => {
                self.count("status");
                if publish.payload.is_empty() {
                    // A cleared retained status: nothing to store.
                } else {
                    match AgentStatus::decode(&publish.payload) {
                        Ok(status) if status.client_id == client_id => job.statuses.push((status, unix_seconds())),
                        Ok(status) => {
                            let error =
                                format!("status client id {:?} is not the topic's {client_id:?}", status.client_id);
                            job.dead.push(dead(publish, client_id, "client_id_mismatch", error));
                        }
                        Err(error) => job.dead.push(dead(publish, client_id, "bad_status", error.to_string())),
                    }
                }
            }
            TopicKind::Other => {
                self.count("other");
                job.dead.push(dead(publish, "", "unknown_topic", "topic outside the layout".into()));
            }
        }
        job.messages.push(message);
    }

    fn accept_batch(&self, job: &mut Job, batch: CompactBatch, index: usize) {
        let total = batch.readings.len();
        self.metrics.received_readings.inc_by(total as u64);
        let fresh = {
            // Invariant: the lock is only held for plain map operations that
            // do not panic; a poisoned lock still holds consistent data.
            let mut dedup = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
            dedup.touch(&batch.client_id, batch.epoch, u64::from(unix_seconds()));
            dedup.claim(&batch.client_id, batch.epoch, batch.first_seq, batch.last_seq)
        };
        let new: u64 = fresh.iter().map(|(a, b)| b - a + 1).sum();
        let duplicates = total as u64 - new;
        if duplicates > 0 {
            self.metrics.duplicate_readings.inc_by(duplicates);
            tracing::debug!(client_id = %batch.client_id, epoch = batch.epoch, first_seq = batch.first_seq,
                last_seq = batch.last_seq, duplicates, "duplicate readings skipped");
        }
        job.acks.push(AckItem { client_id: batch.client_id.clone(), range: batch.range() });
        if new == 0 {
            self.metrics.duplicate_messages.inc();
            return;
        }
        job.rows += new as usize;
        job.parts.push(BatchPart { batch, fresh, message: index });
    }

    /// Forgets streams idle beyond the dedup horizon (bounded memory).
    fn evict_idle_streams(&self) {
        let evicted = {
            let mut dedup = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
            dedup.evict_idle(u64::from(unix_seconds()), self.dedup_horizon_s)
        };
        if evicted > 0 {
            self.metrics.dedup_streams_evicted.inc_by(evicted as u64);
            tracing::info!(evicted, "idle streams beyond the dedup horizon forgotten");
        }
    }

    fn count(&self, kind: &str) {
        self.metrics.received_messages.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }
}

fn dead(publish: &Publish, client_id: &str, reason: &'static str, error: String) -> DeadLetter {
    tracing::warn!(topic = %publish.topic, reason, %error, bytes = publish.payload.len(), "dead letter");
    DeadLetter::now(&publish.topic, client_id, reason, error, Bytes::clone(&publish.payload))
}
