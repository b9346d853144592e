//! `telemetry-ctl`: parses the command line and runs it; see `--help`.

use std::process::ExitCode;

use clap::Parser;
use telemetry_ctl::cli::{Cli, PASSWORD_ENV};
use telemetry_ctl::output::EXIT_USAGE;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan = match cli.into_plan(std::env::var(PASSWORD_ENV).ok()) {
        Ok(plan) => plan,
        Err(error) => {
            eprintln!("telemetry-ctl: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("telemetry-ctl: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    ExitCode::from(runtime.block_on(telemetry_ctl::execute(&plan)))
}
