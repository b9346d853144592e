//! Sensor emulators: processes that play temperature, pressure and height
//! sensors and stream their readings to an edge agent over TCP or a Unix
//! socket, in the binary frame codec or as JSON lines.
//!
//! # Layout
//! - [`signal`]: plausible signals (baseline + random walk + noise) and
//!   strictly increasing per-sensor timestamps. Pure, seedable.
//! - [`stream`]: the connection life: connect with backoff, send frames at a
//!   rate, read acks, keep unacked frames and resend them after a reconnect
//!   (`--reliable`).
//! - [`cli`]: flags and the progress line.
//! - [`fleet`]: the `fleet` load generator: many simulated agents publishing
//!   batches over MQTT (the ingest server's load, without agents).
//!
//! The binaries `temperature`, `pressure` and `height` are thin wrappers
//! around [`cli::main`]. Tests drive [`stream::run`] directly.

pub mod cli;
pub mod fleet;
pub mod signal;
pub mod stream;

pub use signal::{SensorKind, Signal};
pub use stream::{run, Codec, Endpoint, Rate, StreamConfig, StreamStats};
