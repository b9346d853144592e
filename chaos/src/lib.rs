//! Fault suite with a conservation oracle (issue 6, section 1).
//!
//! Runs the real `edge-agent`, `ingest-server` and emulator binaries against
//! real Mosquitto, PostgreSQL and ClickHouse (`scripts/stack`), injects one
//! fault per scenario, and checks with an oracle over reading identities that
//! every reading the agent acked is in ClickHouse exactly once, with its
//! value, and counted once in the rollup. `scripts/chaos` builds and runs it;
//! the results go to `docs/reliability.md`.
//!
//! # Layout
//! - [`scenario`]: the faults, the short and long forms, one scenario's
//!   story (world, stream, fault, recovery, judgement).
//! - [`oracle`]: recompute every emitted reading; classify lost, duplicated,
//!   unexpected, corrupted. Pure, unit-tested.
//! - [`cluster`]: the shared ClickHouse cluster of the cluster scenarios
//!   (faults, restoration, replicas' convergence).
//! - [`procs`]: the binaries as child processes (start, ready, SIGKILL,
//!   SIGTERM, `/metrics`).
//! - [`report`]: the Markdown table and its section in the report file.

pub mod cluster;
pub mod oracle;
pub mod procs;
pub mod report;
pub mod scenario;
