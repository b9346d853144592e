//! The binary sensor stream as the agent reads it: bytes arrive in arbitrary
//! chunks (the first input byte picks the chunk size), frames are decoded
//! until the codec wants more, then the stream ends (`decode_eof`). Oracles:
//! no panic, no runaway allocation (libFuzzer's -malloc_limit_mb), and every
//! decoded frame re-encodes to bytes that decode to the same readings.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use telemetry_wire::{frame, AckFrameCodec, Reading, SensorFrameCodec};
use tokio_util::codec::{Decoder, Encoder};

fn same(a: &[Reading], b: &[Reading]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| x.sensor == y.sensor && x.ts == y.ts && x.value.to_bits() == y.value.to_bits())
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    // A small limit, like a tight max_frame_bytes, and the default one.
    for max in [64usize, telemetry_wire::DEFAULT_MAX_FRAME_BYTES] {
        let mut codec = SensorFrameCodec::new(max);
        let mut buf = BytesMut::new();
        let mut failed = false;
        'feed: for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(readings)) => {
                        let mut again = BytesMut::new();
                        let mut enc = SensorFrameCodec::new(max);
                        enc.encode(&readings[..], &mut again).expect("a decoded frame re-encodes within its limit");
                        let back = enc.decode(&mut again).expect("re-encoded frame decodes").expect("whole frame");
                        assert!(same(&readings, &back), "round trip changed the readings");
                    }
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break 'feed;
                    }
                }
            }
        }
        if !failed {
            let _ = codec.decode_eof(&mut buf);
        }
    }
    // The payload decoder on its own, and the agent -> sensor ack frames.
    let _ = frame::decode_readings_payload(stream, telemetry_wire::DEFAULT_MAX_FRAME_BYTES);
    let _ = AckFrameCodec::decode_payload(stream);
    let mut acks = AckFrameCodec::default();
    let mut buf = BytesMut::from(stream);
    while let Ok(Some(_)) = acks.decode(&mut buf) {}
});
