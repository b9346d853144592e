//! The `pressure` sensor emulator; see `emulators --help` for the flags.

fn main() -> std::process::ExitCode {
    emulators::cli::main(emulators::SensorKind::Pressure)
}
