//! Plausible sensor signals. Each sensor is a random walk around its kind's
//! baseline, pulled back towards it (an Ornstein–Uhlenbeck-like process) so it
//! never drifts off, plus a little measurement noise.

use telemetry_wire::Reading;

/// The kinds of sensor an emulator can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorKind {
    /// Air temperature in °C, around 22 (stays within roughly 15–30).
    Temperature,
    /// Barometric pressure in hPa, around 1013.
    Pressure,
    /// Height above ground in metres, around 100 (a slowly moving platform).
    Height,
}

impl SensorKind {
    /// Name used as the sensor name prefix, e.g. `temperature-0`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Temperature => "temperature",
            Self::Pressure => "pressure",
            Self::Height => "height",
        }
    }

    /// (baseline, walk step, pull-back factor, noise, hard min, hard max)
    fn params(self) -> (f64, f64, f64, f64, f64, f64) {
        match self {
            Self::Temperature => (22.0, 0.05, 0.001, 0.02, 15.0, 30.0),
            Self::Pressure => (1013.25, 0.02, 0.001, 0.05, 950.0, 1060.0),
            Self::Height => (100.0, 0.1, 0.0005, 0.01, 0.0, 500.0),
        }
    }
}

/// One sensor's signal generator: values plus strictly increasing timestamps.
#[derive(Debug, Clone)]
pub struct Signal {
    kind: SensorKind,
    name: String,
    level: f64,
    last_ts: i64,
    /// With a synthetic clock, `Some(step)`: ts advances by `step` µs per
    /// reading from the start value, so a test can predict every reading.
    ts_step: Option<i64>,
    rng: fastrand::Rng,
}

impl Signal {
    /// A sensor of `kind` named `name`. With `synthetic = Some((start, step))`
    /// timestamps are `start, start + step, ...`; otherwise wall-clock
    /// microseconds, bumped by 1 µs when the clock has not advanced.
    #[must_use]
    pub fn new(kind: SensorKind, name: String, seed: u64, synthetic: Option<(i64, i64)>) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (base, ..) = kind.params();
        let level = base + (rng.f64() - 0.5);
        let (last_ts, ts_step) = match synthetic {
            Some((start, step)) => (start - step.max(1), Some(step.max(1))),
            None => (i64::MIN, None),
        };
        Self { kind, name, level, last_ts, ts_step, rng }
    }

    /// The sensor's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next reading. `now_micros` is only used with the wall clock.
    pub fn next_reading(&mut self, now_micros: i64) -> Reading {
        let (base, step, pull, noise, lo, hi) = self.kind.params();
        self.level += (self.rng.f64() - 0.5) * 2.0 * step + (base - self.level) * pull;
        self.level = self.level.clamp(lo, hi);
        let value = (self.level + (self.rng.f64() - 0.5) * 2.0 * noise).clamp(lo, hi);
        let ts = match self.ts_step {
            Some(step) => self.last_ts + step,
            None => now_micros.max(self.last_ts + 1),
        };
        self.last_ts = ts;
        Reading { sensor: self.name.clone(), ts, value }
    }
}

pub use telemetry_wire::reading::now_micros;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_strictly_increase_even_when_the_clock_stands_still() {
        let mut s = Signal::new(SensorKind::Temperature, "t".into(), 1, None);
        let mut last = i64::MIN;
        for _ in 0..1000 {
            let r = s.next_reading(1_700_000_000_000_000);
            assert!(r.ts > last);
            last = r.ts;
        }
    }

    #[test]
    fn temperatures_stay_plausible_over_a_long_run() {
        let mut s = Signal::new(SensorKind::Temperature, "t".into(), 7, None);
        for i in 0..1_000_000 {
            let r = s.next_reading(1_700_000_000_000_000 + i);
            assert!((15.0..=30.0).contains(&r.value), "{}", r.value);
            assert_eq!(r.validate(), Ok(()));
        }
    }

    #[test]
    fn pressure_hovers_around_1013_hpa() {
        let mut s = Signal::new(SensorKind::Pressure, "p".into(), 3, None);
        let n = 100_000;
        let mean = (0..n).map(|i| s.next_reading(1_700_000_000_000_000 + i).value).sum::<f64>() / n as f64;
        assert!((1000.0..1025.0).contains(&mean), "{mean}");
    }

    #[test]
    fn a_seeded_synthetic_signal_is_reproducible() {
        let mut a = Signal::new(SensorKind::Height, "h".into(), 9, Some((1_700_000_000_000_000, 1000)));
        let mut b = Signal::new(SensorKind::Height, "h".into(), 9, Some((1_700_000_000_000_000, 1000)));
        let first = a.next_reading(0);
        assert_eq!(first.ts, 1_700_000_000_000_000);
        assert_eq!(first, b.next_reading(12345));
        assert_eq!(a.next_reading(0).ts, 1_700_000_000_001_000);
    }
}
