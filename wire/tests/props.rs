//! Property tests: every encoder round-trips, and no byte sequence makes a
//! decoder panic (it returns a typed error instead).

use bytes::BytesMut;
use proptest::prelude::*;
use telemetry_wire::reading::{MAX_TS_MICROS, MIN_TS_MICROS};
use telemetry_wire::{json, AckFrameCodec, Batch, CompactBatch, IngestAck, Reading, SensorFrameCodec, SeqRange};
use tokio_util::codec::{Decoder, Encoder};

fn reading() -> impl Strategy<Value = Reading> {
    ("[a-z][a-z0-9_.-]{0,20}", MIN_TS_MICROS..=MAX_TS_MICROS, -1e12f64..1e12).prop_map(|(sensor, ts, value)| Reading {
        sensor,
        ts,
        value,
    })
}

fn batch() -> impl Strategy<Value = Batch> {
    ("[A-Za-z0-9_.-]{1,64}", any::<u64>(), 0u64..u64::MAX / 2, prop::collection::vec(reading(), 1..50)).prop_map(
        |(client_id, epoch, first_seq, readings)| Batch {
            client_id,
            epoch,
            first_seq,
            last_seq: first_seq + readings.len() as u64 - 1,
            readings,
        },
    )
}

/// A batch whose readings share a few names (as a device's do), some of
/// them invalid, and sometimes a bad value or timestamp.
fn batch_of_few_names() -> impl Strategy<Value = Batch> {
    let name = prop::sample::select(vec!["t", "p", "temperature-0", "", "bad\u{1}", "h"]);
    let value = prop::sample::select(vec![1.5, -2.0, f64::NAN, f64::INFINITY]);
    let ts = prop::sample::select(vec![MIN_TS_MICROS, MAX_TS_MICROS, 0, 1_700_000_000_000_000]);
    let reading = (name, ts, value).prop_map(|(n, ts, value)| Reading::new(n, ts, value));
    (any::<u64>(), prop::collection::vec(reading, 1..40)).prop_map(|(epoch, readings)| Batch {
        client_id: "dev-1".into(),
        epoch,
        first_seq: 1,
        last_seq: readings.len() as u64,
        readings,
    })
}

/// The compact decoder agrees with the plain one: same batch, or same error.
fn decoders_agree(bytes: &[u8]) -> Result<(), TestCaseError> {
    prop_assert_eq!(CompactBatch::decode(bytes, 1 << 20).map(Batch::from), Batch::decode(bytes, 1 << 20));
    Ok(())
}

proptest! {
    #[test]
    fn the_compact_decoder_agrees_with_the_plain_one(b in batch_of_few_names(), zstd in any::<bool>()) {
        decoders_agree(&if zstd { b.encode_zstd() } else { b.encode() })?;
    }

    #[test]
    fn the_compact_decoder_agrees_on_every_truncation_and_on_valid_batches(b in batch(), cut in any::<prop::sample::Index>()) {
        let bytes = b.encode();
        decoders_agree(&bytes)?;
        decoders_agree(&bytes[..cut.index(bytes.len())])?;
    }

    #[test]
    fn sensor_frames_round_trip(frames in prop::collection::vec(prop::collection::vec(reading(), 0..20), 1..5)) {
        let mut codec = SensorFrameCodec::default();
        let mut buf = BytesMut::new();
        for f in &frames {
            codec.encode(&f[..], &mut buf).unwrap();
        }
        for f in &frames {
            prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(f.clone()));
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn batches_round_trip(b in batch()) {
        prop_assert_eq!(Batch::decode(&b.encode(), 16 << 20), Ok(b));
    }

    #[test]
    fn acks_round_trip(
        ranges in prop::collection::vec((any::<u64>(), 0u64..1 << 40, 0u64..1 << 20), 0..20),
        rejected in prop::collection::vec((any::<u64>(), 0u64..1 << 40, 0u64..1 << 20), 0..5),
    ) {
        let to = |v: Vec<(u64, u64, u64)>| -> Vec<SeqRange> {
            v.into_iter().map(|(epoch, first_seq, n)| SeqRange { epoch, first_seq, last_seq: first_seq + n }).collect()
        };
        let ack = IngestAck { ranges: to(ranges), rejected: to(rejected) };
        prop_assert_eq!(IngestAck::decode(&ack.encode(), 1 << 20), Ok(ack));
    }

    #[test]
    fn json_lines_round_trip(r in reading()) {
        let mut out = Vec::new();
        json::write_line(&r, &mut out);
        let line = std::str::from_utf8(&out).unwrap().trim_end();
        prop_assert_eq!(json::parse_line(line), Ok(r));
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decoders_agree(&bytes)?;
        let _ = IngestAck::decode(&bytes, 1 << 20);
        let _ = telemetry_wire::frame::decode_readings_payload(&bytes, 1 << 20);
        let _ = AckFrameCodec::decode_payload(&bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = SensorFrameCodec::new(1 << 16);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
        let _ = codec.decode_eof(&mut buf);
        let _ = json::parse_line(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn versioned_prefixes_with_arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        // Starting with a valid version byte drives the decoders past the
        // version check into bincode, where length prefixes are forged.
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(&body);
        decoders_agree(&bytes)?;
        let _ = IngestAck::decode(&bytes, 1 << 20);
        let _ = telemetry_wire::frame::decode_readings_payload(&bytes, 1 << 20);
    }

    #[test]
    fn every_truncation_of_a_batch_is_an_error(b in batch(), cut in any::<prop::sample::Index>()) {
        let bytes = b.encode();
        let at = cut.index(bytes.len());
        prop_assert!(Batch::decode(&bytes[..at], 16 << 20).is_err());
    }
}
