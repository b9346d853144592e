//! The hex test vectors of `docs/wire-format.md`, checked both ways, and
//! checked to be present verbatim in the document.

use bytes::BytesMut;
use telemetry_wire::{AckFrameCodec, Batch, IngestAck, Reading, SensorFrameCodec, SeqRange};
use tokio_util::codec::{Decoder, Encoder};

const DOC: &str = include_str!("../../docs/wire-format.md");

const SENSOR_FRAME: &str = "3d0000000102000000000000000200000000000000743000401e18240a060000000000008035400200000000000000743001401e18240a0600000000000000d0bf";
const ACK_FRAME: &str = "09000000010300000000000000";
const BATCH: &str = "0105000000000000006465762d3108070605040302010a000000000000000b0000000000000002000000000000000200000000000000743000401e18240a060000000000008035400200000000000000743001401e18240a0600000000000000d0bf";
const INGEST_ACK: &str = "01010000000000000008070605040302010a000000000000000b00000000000000";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn readings() -> Vec<Reading> {
    vec![Reading::new("t0", 1_700_000_000_000_000, 21.5), Reading::new("t0", 1_700_000_000_000_001, -0.25)]
}

fn batch() -> Batch {
    Batch { client_id: "dev-1".into(), epoch: 0x0102_0304_0506_0708, first_seq: 10, last_seq: 11, readings: readings() }
}

#[test]
fn every_vector_appears_in_the_document() {
    let flat: String = DOC.split_whitespace().collect();
    for v in [SENSOR_FRAME, ACK_FRAME, BATCH, INGEST_ACK] {
        assert!(flat.contains(v), "vector {v} missing from docs/wire-format.md");
    }
}

#[test]
fn sensor_frame_vector() {
    let mut buf = BytesMut::new();
    SensorFrameCodec::default().encode(&readings()[..], &mut buf).unwrap();
    assert_eq!(hex(&buf), SENSOR_FRAME);
    let mut src = BytesMut::from(&unhex(SENSOR_FRAME)[..]);
    assert_eq!(SensorFrameCodec::default().decode(&mut src).unwrap(), Some(readings()));
}

#[test]
fn ack_frame_vector() {
    let mut buf = BytesMut::new();
    AckFrameCodec::default().encode(3, &mut buf).unwrap();
    assert_eq!(hex(&buf), ACK_FRAME);
    let mut src = BytesMut::from(&unhex(ACK_FRAME)[..]);
    assert_eq!(AckFrameCodec::default().decode(&mut src).unwrap(), Some(3));
}

#[test]
fn batch_vector() {
    assert_eq!(hex(&batch().encode()), BATCH);
    assert_eq!(Batch::decode(&unhex(BATCH), 1 << 20), Ok(batch()));
}

#[test]
fn ingest_ack_vector() {
    let ack = IngestAck::stored(vec![SeqRange { epoch: 0x0102_0304_0506_0708, first_seq: 10, last_seq: 11 }]);
    assert_eq!(hex(&ack.encode()), INGEST_ACK);
    assert_eq!(IngestAck::decode(&unhex(INGEST_ACK), 1 << 20), Ok(ack));
}

/// The compressed form of [`BATCH`]: a zstd frame is decoded the same by
/// every zstd version, but encoders may differ, so this vector is checked
/// one way (decoding) plus a round trip of this build's own encoding.
const BATCH_ZSTD: &str = "026100000000000000";

#[test]
fn compressed_batch_vector() {
    let flat: String = DOC.split_whitespace().collect();
    let vector = flat.split("Compressedvector:`").nth(1).and_then(|r| r.split('`').next()).expect("vector in the doc");
    assert!(vector.starts_with(BATCH_ZSTD), "the doc's vector starts with the version and the body length");
    assert_eq!(Batch::decode(&unhex(vector), 1 << 20), Ok(batch()));
    assert_eq!(Batch::decode(&batch().encode_zstd(), 1 << 20), Ok(batch()));
}
