//! The MQTT batch payload (agent -> broker -> ingest server and the agent's
//! own echo). Oracles: no panic; a payload that decodes is canonical (it
//! re-encodes to the same bytes); the header-only decoder agrees with the full
//! one; the ingest server's compact decoder agrees with the plain one; and
//! the agent status JSON (same topics' neighbour) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry_wire::{AgentStatus, Batch, CompactBatch};

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let full = Batch::decode(data, MAX);
    assert_eq!(CompactBatch::decode(data, MAX).map(Batch::from), full, "the ingest server's decoder disagrees");
    let header = Batch::decode_header(data, MAX);
    if let Ok(batch) = &full {
        assert_eq!(batch.encode(), data, "decoded batch is not canonical");
        let (client_id, range) = header.expect("header of a valid batch decodes");
        assert_eq!(client_id, batch.client_id);
        assert_eq!(range, batch.range());
    }
    let _ = AgentStatus::decode(data);
});
