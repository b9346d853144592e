//! The one bincode configuration every payload uses.

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};

/// Largest binary payload any decoder accepts (16 MiB), whatever the caller's
/// own (usually much smaller) limit. It bounds what a forged length prefix can
/// make a decoder allocate.
pub const MAX_PAYLOAD_BYTES: usize = 16 << 20;

/// bincode's claim limit: a decoded value may claim at most this many bytes of
/// memory. In-memory readings are larger than their encoding (a `String` is 24
/// bytes before its contents), so the limit is a multiple of the payload cap.
const DECODE_LIMIT: usize = 4 * MAX_PAYLOAD_BYTES;

/// The bincode configuration type used for every payload.
pub type BincodeConfig = Configuration<LittleEndian, Fixint, Limit<DECODE_LIMIT>>;

/// Fixed-width little-endian integers (no varints) and a decode allocation
/// limit. Lengths of strings and sequences are `u64` little-endian.
#[must_use]
pub const fn bincode_config() -> BincodeConfig {
    bincode::config::legacy().with_limit::<DECODE_LIMIT>()
}
