//! Inputs that coverage-guided fuzzing (`fuzz/`, see docs/reliability.md)
//! found to misbehave, kept as regression tests. Each file under
//! `tests/fuzz-regressions/` is run through every decoder the way the fuzz
//! targets do; the named cases also check the exact typed error.

use bytes::BytesMut;
use telemetry_wire::{frame, AckFrameCodec, Batch, DecodeError, IngestAck, SensorFrameCodec};
use tokio_util::codec::Decoder;

fn all_decoders(data: &[u8]) {
    let mut codec = SensorFrameCodec::default();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
    let _ = frame::decode_readings_payload(data, 1 << 20);
    let _ = Batch::decode(data, 1 << 20);
    let _ = Batch::decode_header(data, 1 << 20);
    let _ = IngestAck::decode(data, 1 << 20);
    let _ = AckFrameCodec::decode_payload(data);
    let _ = telemetry_wire::json::parse_line(&String::from_utf8_lossy(data));
}

#[test]
fn every_saved_fuzz_input_is_rejected_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("regression directory") {
        let data = std::fs::read(entry.expect("entry").path()).expect("readable input");
        all_decoders(&data);
        if let Some(stream) = data.get(1..) {
            all_decoders(stream);
        }
        n += 1;
    }
    assert!(n > 0, "no regression inputs found");
}

/// Found by `sensor_frames` (first run): the first frame's sensor-name length
/// prefix claimed ~40 MB, and bincode allocated it (zeroed) before noticing the
/// payload was 60 bytes. Now refused by the length check before decoding.
#[test]
fn a_sensor_name_longer_than_the_frame_is_truncated_not_allocated() {
    let data = include_bytes!("fuzz-regressions/sensor_frames-string-length-oom.bin");
    let stream = &data[1..]; // the harness's first byte is the chunk size
    let len = u32::from_le_bytes(stream[..4].try_into().unwrap()) as usize;
    let payload = &stream[4..4 + len];
    assert_eq!(frame::decode_readings_payload(payload, 1 << 20), Err(DecodeError::Truncated));
}

fn with_version(body: &[u8]) -> Vec<u8> {
    let mut v = vec![1u8];
    v.extend_from_slice(body);
    v
}

#[test]
fn forged_counts_and_lengths_in_every_payload_are_truncated() {
    // A reading count of 2^21 in a 9-byte frame payload.
    let frame_payload = with_version(&(1u64 << 21).to_le_bytes());
    assert_eq!(frame::decode_readings_payload(&frame_payload, 1 << 20), Err(DecodeError::Truncated));
    // A client id of 60 MB in a batch.
    let batch = with_version(&60_000_000u64.to_le_bytes());
    assert_eq!(Batch::decode(&batch, 1 << 20), Err(DecodeError::Truncated));
    assert_eq!(Batch::decode_header(&batch, 1 << 20), Err(DecodeError::Truncated));
    // A batch whose header is fine but whose reading count is 2^40.
    let mut body = 1u64.to_le_bytes().to_vec();
    body.push(b'a');
    body.extend_from_slice(&[0; 24]);
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert_eq!(Batch::decode(&with_version(&body), 1 << 20), Err(DecodeError::Truncated));
    // 2^20 seq ranges in an 9-byte ack.
    assert_eq!(IngestAck::decode(&with_version(&(1u64 << 20).to_le_bytes()), 1 << 20), Err(DecodeError::Truncated));
}
