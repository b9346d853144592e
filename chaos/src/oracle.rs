//! The conservation oracle.
//!
//! Every emulator runs with `--seed` and `--start-ts`, so each reading it
//! generates is known in advance: reading `j` (0-based, in generation order)
//! belongs to sensor `<prefix>-<j % sensors>`, and it is that sensor's
//! `j / sensors`-th value of `Signal::new(kind, name, seed + i, Some((start,
//! step)))`. The agent acks frames cumulatively and the emulator resends
//! unacked frames in order, so "the agent acked `a` readings" means the
//! first `a` generated readings: those are the **obligations**. Readings
//! generated but never acked may or may not be stored.
//!
//! Against what ClickHouse holds (`readings FINAL` grouped by identity, and
//! `readings_1m FINAL`) the oracle counts:
//! - **lost**: obligations absent from `readings`, plus readings of the raw
//!   table that the rollup does not count (rollup count below the distinct
//!   identities of its minute);
//! - **duplicated**: extra copies of an identity visible through `FINAL`,
//!   plus rollup counts above the distinct identities of their minute;
//! - **unexpected**: stored identities that no emulator generated;
//! - **corrupted**: stored identities whose value differs (bit for bit) from
//!   the recomputed one, plus rollup minutes whose sum/min/max differ from
//!   the recomputed values of the identities stored in that minute.

use std::collections::{BTreeMap, HashMap};

use emulators::{SensorKind, Signal};

/// One emulator's run: what it was told and what it reported.
#[derive(Debug, Clone)]
pub struct EmittedStream {
    /// The agent's client id the emulator sent to.
    pub client_id: String,
    /// Kind of sensor.
    pub kind: SensorKind,
    /// Sensor name prefix.
    pub prefix: String,
    /// Number of sensors.
    pub sensors: usize,
    /// `--seed`.
    pub seed: u64,
    /// `--start-ts`, µs.
    pub start_ts: i64,
    /// `--ts-step`, µs.
    pub ts_step: i64,
    /// Readings generated.
    pub generated: u64,
    /// Readings acked by the agent (obligations), `<= generated`.
    pub acked: u64,
}

/// The key of a reading: `(client_id, sensor, ts)`.
pub type Identity = (String, String, i64);

#[derive(Debug, Clone, Copy)]
struct Want {
    value: f64,
    obligation: bool,
}

/// Every reading the emulators generated, by identity.
#[derive(Debug, Default)]
pub struct Expected {
    readings: HashMap<Identity, Want>,
    obligations: u64,
}

impl Expected {
    /// Recomputes every reading of `streams`.
    #[must_use]
    pub fn new(streams: &[EmittedStream]) -> Self {
        let mut me = Self::default();
        for s in streams {
            let sensors = s.sensors.max(1);
            let mut signals: Vec<Signal> = (0..sensors)
                .map(|i| {
                    let name = format!("{}-{i}", s.prefix);
                    Signal::new(s.kind, name, s.seed.wrapping_add(i as u64), Some((s.start_ts, s.ts_step)))
                })
                .collect();
            for j in 0..s.generated {
                let r = signals[(j % sensors as u64) as usize].next_reading(0);
                let obligation = j < s.acked;
                me.obligations += u64::from(obligation);
                me.readings.insert((s.client_id.clone(), r.sensor, r.ts), Want { value: r.value, obligation });
            }
        }
        me
    }

    /// Releases the obligations of the readings `refused` picks (ClickHouse
    /// refuses them by the scenario's design: they must be dead-lettered,
    /// which the scenario checks, not stored). Returns how many were acked.
    pub fn excuse(&mut self, refused: impl Fn(&Identity) -> bool) -> u64 {
        let mut excused = 0;
        for (id, want) in &mut self.readings {
            if want.obligation && refused(id) {
                want.obligation = false;
                excused += 1;
            }
        }
        self.obligations -= excused;
        excused
    }

    /// Number of obligations.
    #[must_use]
    pub fn obligations(&self) -> u64 {
        self.obligations
    }
}

/// One identity as `readings FINAL` shows it.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Deserialize)]
pub struct StoredReading {
    /// Client id.
    pub client_id: String,
    /// Sensor.
    pub sensor: String,
    /// Timestamp, µs.
    pub ts: i64,
    /// Rows with this identity visible through `FINAL` (1 when deduplicated).
    pub copies: u64,
    /// Smallest stored value.
    pub min_value: f64,
    /// Largest stored value.
    pub max_value: f64,
}

/// One rollup row as `readings_1m FINAL` shows it.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Deserialize)]
pub struct RollupRow {
    /// Client id.
    pub client_id: String,
    /// Sensor.
    pub sensor: String,
    /// Start of the minute, Unix seconds.
    pub minute: u32,
    /// Readings counted.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Their minimum.
    pub min: f64,
    /// Their maximum.
    pub max: f64,
}

/// The oracle's verdict for one scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Readings the agent acked.
    pub obligations: u64,
    /// Distinct identities stored.
    pub stored: u64,
    /// Acked but absent (raw), or stored but missing from the rollup count.
    pub lost: u64,
    /// Visible more than once (raw `FINAL`), or counted more than once (rollup).
    pub duplicated: u64,
    /// Stored but never generated.
    pub unexpected: u64,
    /// Stored with another value (raw), or a rollup minute with wrong aggregates.
    pub corrupted: u64,
    /// Of `lost`: the part found in the rollup comparison.
    pub rollup_short: u64,
    /// Of `duplicated`: the part found in the rollup comparison.
    pub rollup_excess: u64,
    /// Of `corrupted`: the part found in the rollup comparison.
    pub rollup_corrupted: u64,
}

impl Verdict {
    /// Pass = nothing lost, duplicated, unexpected or corrupted.
    #[must_use]
    pub fn pass(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0 && self.corrupted == 0
    }
}

#[derive(Debug, Default)]
struct MinuteAgg {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl MinuteAgg {
    fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v;
    }
}

/// Classifies what ClickHouse holds against what was generated. `examples`
/// collects up to a few human-readable findings for the report.
#[must_use]
pub fn classify(
    expected: &Expected,
    stored: &[StoredReading],
    rollup: &[RollupRow],
    examples: &mut Vec<String>,
) -> Verdict {
    let mut note = |s: String| {
        if examples.len() < 5 {
            examples.push(s);
        }
    };
    let mut v = Verdict { obligations: expected.obligations, stored: stored.len() as u64, ..Verdict::default() };
    let mut present_obligations = 0;
    let mut present: std::collections::HashSet<(&str, &str, i64)> = std::collections::HashSet::new();
    // Per (client, sensor, minute): the recomputed aggregates of the distinct
    // identities stored, which the rollup must equal.
    let mut minutes: BTreeMap<(String, String, u32), MinuteAgg> = BTreeMap::new();
    for r in stored {
        let key = (r.client_id.clone(), r.sensor.clone(), r.ts);
        present.insert((&r.client_id, &r.sensor, r.ts));
        let minute = u32::try_from(r.ts.div_euclid(60_000_000) * 60).unwrap_or(0);
        let agg = minutes.entry((r.client_id.clone(), r.sensor.clone(), minute)).or_default();
        if r.copies > 1 {
            v.duplicated += r.copies - 1;
            note(format!("duplicated: {key:?} visible {} times in FINAL", r.copies));
        }
        match expected.readings.get(&key) {
            None => {
                v.unexpected += 1;
                note(format!("unexpected: {key:?} value {}", r.min_value));
                agg.add(r.min_value);
            }
            Some(want) => {
                present_obligations += u64::from(want.obligation);
                if r.min_value.to_bits() != want.value.to_bits() || r.max_value.to_bits() != want.value.to_bits() {
                    v.corrupted += 1;
                    note(format!("corrupted: {key:?} stored {}..{}, emitted {}", r.min_value, r.max_value, want.value));
                }
                agg.add(want.value);
            }
        }
    }
    v.lost = expected.obligations - present_obligations.min(expected.obligations);
    if v.lost > 0 {
        let mut missing: Vec<&Identity> = expected
            .readings
            .iter()
            .filter(|(k, w)| w.obligation && !present.contains(&(k.0.as_str(), k.1.as_str(), k.2)))
            .map(|(k, _)| k)
            .collect();
        missing.sort();
        missing.truncate(3);
        for k in missing {
            note(format!("lost: {k:?}"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for row in rollup {
        let key = (row.client_id.clone(), row.sensor.clone(), row.minute);
        if !seen.insert(key.clone()) {
            v.rollup_excess += row.count;
            note(format!("duplicated: rollup minute {key:?} appears twice in FINAL"));
            continue;
        }
        let want = minutes.get(&key);
        let want_count = want.map_or(0, |a| a.count);
        if row.count > want_count {
            v.rollup_excess += row.count - want_count;
            note(format!("duplicated: rollup {key:?} counts {}, raw has {want_count}", row.count));
        } else if row.count < want_count {
            v.rollup_short += want_count - row.count;
            note(format!("lost: rollup {key:?} counts {}, raw has {want_count}", row.count));
        } else if let Some(a) = want {
            let tolerance = 1e-9 * a.sum.abs().max(1.0);
            if (row.sum - a.sum).abs() > tolerance || row.min != a.min || row.max != a.max {
                v.corrupted += 1;
                v.rollup_corrupted += 1;
                note(format!(
                    "corrupted: rollup {key:?} sum/min/max {}/{}/{}, recomputed {}/{}/{}",
                    row.sum, row.min, row.max, a.sum, a.min, a.max
                ));
            }
        }
    }
    for (key, a) in &minutes {
        if !seen.contains(key) {
            v.rollup_short += a.count;
            note(format!("lost: rollup has no row for {key:?} ({} readings stored)", a.count));
        }
    }
    v.lost += v.rollup_short;
    v.duplicated += v.rollup_excess;
    v
}

impl Verdict {
    /// Adds the rollup findings of `other`, a verdict over the same raw
    /// rows against another view of the rollup (its raw findings are these).
    pub fn add_rollup_findings(&mut self, other: &Verdict) {
        self.lost += other.rollup_short;
        self.rollup_short += other.rollup_short;
        self.duplicated += other.rollup_excess;
        self.rollup_excess += other.rollup_excess;
        self.corrupted += other.rollup_corrupted;
        self.rollup_corrupted += other.rollup_corrupted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: i64 = 1_700_000_000_000_000;

    fn stream(generated: u64, acked: u64) -> EmittedStream {
        EmittedStream {
            client_id: "c".into(),
            kind: SensorKind::Temperature,
            prefix: "t".into(),
            sensors: 2,
            seed: 7,
            start_ts: START,
            ts_step: 10_000_000,
            generated,
            acked,
        }
    }

    /// Everything `expected` holds, stored once each, and its exact rollup.
    fn perfect(streams: &[EmittedStream]) -> (Vec<StoredReading>, Vec<RollupRow>) {
        let expected = Expected::new(streams);
        let mut stored: Vec<StoredReading> = expected
            .readings
            .iter()
            .map(|((c, s, ts), w)| StoredReading {
                client_id: c.clone(),
                sensor: s.clone(),
                ts: *ts,
                copies: 1,
                min_value: w.value,
                max_value: w.value,
            })
            .collect();
        stored.sort_by(|a, b| (&a.sensor, a.ts).cmp(&(&b.sensor, b.ts)));
        let mut minutes: BTreeMap<(String, String, u32), MinuteAgg> = BTreeMap::new();
        for r in &stored {
            let minute = u32::try_from(r.ts / 60_000_000 * 60).unwrap();
            minutes.entry((r.client_id.clone(), r.sensor.clone(), minute)).or_default().add(r.min_value);
        }
        let rollup = minutes
            .into_iter()
            .map(|((client_id, sensor, minute), a)| RollupRow {
                client_id,
                sensor,
                minute,
                count: a.count,
                sum: a.sum,
                min: a.min,
                max: a.max,
            })
            .collect();
        (stored, rollup)
    }

    #[test]
    fn readings_are_recomputed_exactly_as_the_emulator_generates_them() {
        let expected = Expected::new(&[stream(4, 4)]);
        let mut s0 = Signal::new(SensorKind::Temperature, "t-0".into(), 7, Some((START, 10_000_000)));
        let mut s1 = Signal::new(SensorKind::Temperature, "t-1".into(), 8, Some((START, 10_000_000)));
        for r in [s0.next_reading(0), s1.next_reading(0), s0.next_reading(0), s1.next_reading(0)] {
            let want = expected.readings[&("c".to_owned(), r.sensor.clone(), r.ts)];
            assert_eq!(want.value.to_bits(), r.value.to_bits());
        }
        assert_eq!(expected.obligations(), 4);
    }

    #[test]
    fn everything_stored_once_passes() {
        let streams = [stream(100, 100)];
        let (stored, rollup) = perfect(&streams);
        let v = classify(&Expected::new(&streams), &stored, &rollup, &mut Vec::new());
        assert!(v.pass(), "{v:?}");
        assert_eq!((v.obligations, v.stored), (100, 100));
    }

    #[test]
    fn unacked_readings_may_be_absent_but_acked_ones_may_not() {
        let (mut stored, _) = perfect(&[stream(100, 100)]);
        stored.retain(|r| r.ts < START + 10_000_000 * 45); // 90 readings over 2 sensors
        let rollup = perfect(&[stream(90, 90)]).1;
        let ok = classify(&Expected::new(&[stream(100, 90)]), &stored, &rollup, &mut Vec::new());
        assert!(ok.pass(), "{ok:?}");
        let bad = classify(&Expected::new(&[stream(100, 95)]), &stored, &rollup, &mut Vec::new());
        assert_eq!(bad.lost, 5);
    }

    #[test]
    fn copies_foreign_readings_and_changed_values_are_each_counted() {
        let streams = [stream(20, 20)];
        let (mut stored, rollup) = perfect(&streams);
        stored[0].copies = 3;
        stored[1].max_value += 1.0;
        stored.push(StoredReading {
            client_id: "c".into(),
            sensor: "intruder".into(),
            ts: START,
            copies: 1,
            min_value: 1.0,
            max_value: 1.0,
        });
        let mut examples = Vec::new();
        let v = classify(&Expected::new(&streams), &stored, &rollup, &mut examples);
        // The intruder's minute has no rollup row: the rollup misses a stored
        // reading, which counts as lost too.
        assert_eq!((v.lost, v.duplicated, v.unexpected, v.corrupted), (1, 2, 1, 1), "{examples:?}");
        assert_eq!(v.rollup_short, 1);
    }

    #[test]
    fn a_rollup_that_counts_a_reading_twice_is_a_duplicate_and_one_that_misses_it_a_loss() {
        let streams = [stream(50, 50)];
        let (stored, mut rollup) = perfect(&streams);
        rollup[0].count += 1;
        rollup[1].count -= 1;
        let v = classify(&Expected::new(&streams), &stored, &rollup, &mut Vec::new());
        assert_eq!((v.rollup_excess, v.rollup_short, v.duplicated, v.lost), (1, 1, 1, 1));
    }

    #[test]
    fn a_rollup_with_a_wrong_sum_is_corrupted() {
        let streams = [stream(50, 50)];
        let (stored, mut rollup) = perfect(&streams);
        rollup[0].sum += 0.5;
        let v = classify(&Expected::new(&streams), &stored, &rollup, &mut Vec::new());
        assert_eq!((v.corrupted, v.lost, v.duplicated), (1, 0, 0));
    }
}
