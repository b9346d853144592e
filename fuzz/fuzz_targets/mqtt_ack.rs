//! The ingest ack payload (ingest server -> agent). Oracles: no panic, and a
//! payload that decodes is canonical (re-encodes to the same bytes) and holds
//! no inverted range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry_wire::IngestAck;

fuzz_target!(|data: &[u8]| {
    if let Ok(ack) = IngestAck::decode(data, 1 << 20) {
        assert_eq!(ack.encode(), data, "decoded ack is not canonical");
        assert!(ack.ranges.iter().all(|r| r.first_seq <= r.last_seq));
    }
});
