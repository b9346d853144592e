//! State shared by the agent's tasks: metrics, the outbox size (for the
//! quota and the status message), and the highest committed seq.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use telemetry_wire::LastCommand;
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;

/// Shared by every task of one agent.
#[derive(Debug, Default)]
pub struct Shared {
    /// Counters.
    pub metrics: Metrics,
    rows: AtomicU64,
    bytes: AtomicU64,
    committed_high: AtomicU64,
    rescan: AtomicBool,
    /// Notified whenever rows leave the outbox (quota waiters).
    pub space_freed: Notify,
    /// `true` while sensor intake is paused (a remote command).
    intake_paused: watch::Sender<bool>,
    /// The last remote command answered, for the status message.
    last_command: Mutex<Option<LastCommand>>,
}

impl Shared {
    /// Sets the outbox size read at start-up.
    pub fn init_rows(&self, rows: u64, bytes: u64) {
        self.rows.store(rows, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.publish_size();
    }

    /// Rows were committed.
    pub fn add_rows(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.publish_size();
    }

    /// Rows were deleted or dropped.
    pub fn sub_rows(&self, rows: u64, bytes: u64) {
        let sub = |a: &AtomicU64, v: u64| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(x.saturating_sub(v)));
        };
        sub(&self.rows, rows);
        sub(&self.bytes, bytes);
        self.publish_size();
        self.space_freed.notify_waiters();
    }

    /// (rows, bytes) in the outbox.
    #[must_use]
    pub fn outbox_size(&self) -> (u64, u64) {
        (self.rows.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    fn publish_size(&self) {
        let (rows, bytes) = self.outbox_size();
        self.metrics.outbox_rows.set(i64::try_from(rows).unwrap_or(i64::MAX));
        self.metrics.outbox_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Whether the broker connection is up (the `mqtt_connected` gauge).
    #[must_use]
    pub fn connected(&self) -> bool {
        self.metrics.mqtt_connected.get() == 1
    }

    /// The highest seq committed so far.
    #[must_use]
    pub fn committed_high(&self) -> u64 {
        self.committed_high.load(Ordering::Relaxed)
    }

    /// Records the highest committed seq.
    pub fn set_committed_high(&self, seq: u64) {
        self.committed_high.store(seq, Ordering::Relaxed);
    }

    /// Asks the publisher to replay the whole outbox (rows reappeared: the
    /// outbox was rolled back under the agent).
    pub fn request_rescan(&self) {
        self.rescan.store(true, Ordering::Release);
    }

    /// Pauses (`true`) or resumes sensor intake; the previous setting.
    pub fn set_intake_paused(&self, paused: bool) -> bool {
        self.metrics.intake_paused.set(i64::from(paused));
        self.intake_paused.send_replace(paused)
    }

    /// Whether sensor intake is paused.
    #[must_use]
    pub fn intake_paused(&self) -> bool {
        *self.intake_paused.borrow()
    }

    /// Follows the intake setting (for each sensor connection).
    #[must_use]
    pub fn watch_intake(&self) -> watch::Receiver<bool> {
        self.intake_paused.subscribe()
    }

    /// Records the last remote command answered.
    pub fn set_last_command(&self, command: LastCommand) {
        *self.last_command.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(command);
    }

    /// The last remote command answered, if any.
    #[must_use]
    pub fn last_command(&self) -> Option<LastCommand> {
        self.last_command.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether a rescan was asked for since the last call.
    pub fn take_rescan(&self) -> bool {
        self.rescan.swap(false, Ordering::AcqRel)
    }
}
