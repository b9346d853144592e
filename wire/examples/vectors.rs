//! Prints the hex test vectors of `docs/wire-format.md`.
use bytes::BytesMut;
use telemetry_wire::{AckFrameCodec, Batch, IngestAck, Reading, SensorFrameCodec, SeqRange};
use tokio_util::codec::Encoder;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn main() {
    let readings =
        vec![Reading::new("t0", 1_700_000_000_000_000, 21.5), Reading::new("t0", 1_700_000_000_000_001, -0.25)];
    let mut buf = BytesMut::new();
    SensorFrameCodec::default().encode(&readings[..], &mut buf).unwrap();
    println!("sensor frame: {}", hex(&buf));
    let mut buf = BytesMut::new();
    AckFrameCodec::default().encode(3, &mut buf).unwrap();
    println!("ack frame: {}", hex(&buf));
    let b = Batch { client_id: "dev-1".into(), epoch: 0x0102030405060708, first_seq: 10, last_seq: 11, readings };
    println!("batch: {}", hex(&b.encode()));
    let a = IngestAck::stored(vec![SeqRange { epoch: 0x0102030405060708, first_seq: 10, last_seq: 11 }]);
    println!("ack: {}", hex(&a.encode()));
    let r = IngestAck {
        ranges: vec![SeqRange { epoch: 0x0102030405060708, first_seq: 10, last_seq: 11 }],
        rejected: vec![SeqRange { epoch: 0x0102030405060708, first_seq: 12, last_seq: 12 }],
    };
    println!("ack with rejected: {}", hex(&r.encode()));
}
