//! The JSON-lines sensor stream: each line of the input is parsed as a
//! reading and as an ack line. Oracles: no panic, and a parsed reading with a
//! finite value writes back to a line that parses to the same reading.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry_wire::json;

fuzz_target!(|data: &[u8]| {
    for raw in data.split(|&b| b == b'\n') {
        // The agent decodes lines as UTF-8 and rejects the rest; lossy here so
        // that invalid sequences still reach the parser.
        let line = String::from_utf8_lossy(raw);
        if let Ok(reading) = json::parse_line(&line) {
            if reading.value.is_finite() {
                let mut out = Vec::new();
                json::write_line(&reading, &mut out);
                let text = std::str::from_utf8(&out).expect("write_line writes UTF-8");
                let back = json::parse_line(text.trim_end_matches('\n')).expect("a written line parses");
                assert_eq!(back.sensor, reading.sensor);
                assert_eq!(back.ts, reading.ts);
                assert_eq!(back.value.to_bits(), reading.value.to_bits());
            }
        }
        let _ = json::parse_ack_line(&line);
    }
});
