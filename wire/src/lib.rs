//! Every byte that crosses a process boundary in the telemetry pipeline.
//!
//! The data model ([`Reading`], [`Batch`], [`IngestAck`]) and all of its
//! encodings live here so that the format can change in exactly one place and
//! so that every decoder is tested (and fuzzed) once. The exact byte layout,
//! with hex test vectors, is in `docs/wire-format.md`; the unit tests in
//! `tests/vectors.rs` check the same vectors.
//!
//! # Layout
//! - [`reading`]: the [`Reading`] type and its validity rules (finite value,
//!   plausible timestamp, sane sensor name).
//! - [`frame`]: the binary sensor stream (length-delimited frames, bincode
//!   payloads) and the ack frames the agent sends back, as tokio-util codecs.
//! - [`json`]: the text sensor stream, one JSON object per line.
//! - [`batch`]: the MQTT payload an agent publishes for a range of outbox rows.
//! - [`ack`]: the MQTT payload the ingest server publishes for stored ranges.
//! - [`status`]: the retained agent status message (JSON) for dashboards.
//! - [`command`]: remote commands to agents and their replies (JSON).
//!
//! # Conventions
//! Every binary payload starts with one format version byte, then bincode
//! 2.0.1 with *fixed-width little-endian integers* ([`bincode_config`]), so a
//! consumer in another language needs no varint decoder. Decoders never panic
//! and never allocate more than a bounded multiple of their input: they return
//! a typed [`DecodeError`].

pub mod ack;
pub mod batch;
mod bounds;
mod codec;
pub mod command;
pub mod compact;
mod error;
pub mod frame;
pub mod json;
pub mod reading;
pub mod status;

pub use ack::{IngestAck, SeqRange};
pub use batch::Batch;
pub use codec::{bincode_config, BincodeConfig, MAX_PAYLOAD_BYTES};
pub use command::{Action, Command, CommandError, CommandName, ErrorKind, Reply};
pub use compact::{CompactBatch, Sample};
pub use error::DecodeError;
pub use frame::{AckFrameCodec, FrameError, SensorFrameCodec, DEFAULT_MAX_FRAME_BYTES};
pub use json::JsonError;
pub use reading::{Reading, ReadingError};
pub use status::{AgentStatus, LastCommand};
