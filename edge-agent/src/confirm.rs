//! Deleting confirmed rows (durability rule 2): a range is deleted only once
//! its echo or ingest ack arrived. Deletes run in their own task with their
//! own connection, so a slow or restarting Postgres never stalls the MQTT
//! side; ranges wait in memory and are retried until deleted.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::outbox::Outbox;
use crate::shared::Shared;

/// Most ranges deleted in one statement.
const MAX_RANGES_PER_DELETE: usize = 512;

/// Deletes every range it receives until the sender is dropped and all
/// ranges are deleted (or, at shutdown, Postgres stays down).
pub async fn run_deleter(mut rx: mpsc::UnboundedReceiver<(u64, u64)>, mut outbox: Outbox, shared: Arc<Shared>) {
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut backoff = crate::backoff(Duration::from_millis(20), Duration::from_secs(2));
    let mut closed = false;
    let mut failures = 0u32;
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match rx.recv().await {
                Some(r) => pending.push(r),
                None => return,
            }
        }
        while pending.len() < MAX_RANGES_PER_DELETE {
            match rx.try_recv() {
                Ok(r) => pending.push(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let take = pending.len().min(MAX_RANGES_PER_DELETE);
        match outbox.delete_ranges(&pending[..take]).await {
            Ok((rows, bytes)) => {
                pending.drain(..take);
                failures = 0;
                backoff = crate::backoff(Duration::from_millis(20), Duration::from_secs(2));
                shared.metrics.rows_deleted.inc_by(rows);
                shared.sub_rows(rows, bytes);
            }
            Err(error) => {
                shared.metrics.postgres_errors.inc();
                outbox.reset();
                failures += 1;
                if closed && failures > 20 {
                    tracing::warn!(ranges = pending.len(), "giving up deleting at shutdown; they replay next start");
                    return;
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(%error, ?delay, ranges = pending.len(), "deleting confirmed rows failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
