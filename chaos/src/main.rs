//! `chaos`: run the fault suite (see the library docs and `scripts/chaos`).
//! Exit status 0 only if every scenario passes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chaos::scenario::{self, Env, Fault, Form};
use clap::Parser;

/// Fault suite with a conservation oracle: every reading acked by the agent
/// must be in ClickHouse exactly once, with its value, after each fault.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The long form: 60 s outages, higher rate (default: the short form).
    #[arg(long)]
    long: bool,
    /// Run only these scenarios (repeatable; default: all).
    #[arg(long, value_enum)]
    scenario: Vec<Fault>,
    /// Write the results table into this Markdown file (its section for the form).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Directory for the processes' logs (default: a fresh one under /tmp).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the logs even when everything passes.
    #[arg(long)]
    keep_logs: bool,
    /// Keep each scenario's ClickHouse database even when it passes.
    #[arg(long)]
    keep_data: bool,
    /// Directory of the binaries (default: the one this program is in).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("chaos: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("chaos: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let Some(stack) = test_support::stack(&[
        test_support::Service::Mqtt,
        test_support::Service::Postgres,
        test_support::Service::ClickHouse,
    ]) else {
        bail!("the stack is not up: run `scripts/stack up` (or use scripts/chaos, which does)");
    };
    let bins = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("the executable's directory")?.to_path_buf(),
    };
    for bin in ["edge-agent", "ingest-server", "temperature", "pressure"] {
        if !bins.join(bin).exists() {
            bail!("{} is missing: build the workspace's binaries (scripts/chaos does)", bins.join(bin).display());
        }
    }
    let work = args.work_dir.unwrap_or_else(|| std::env::temp_dir().join(test_support::unique_name("chaos")));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let form = if args.long { Form::long() } else { Form::short() };
    let env = Env { bins, stack, work: work.clone(), form: form.clone(), keep_data: args.keep_data };
    let faults = if args.scenario.is_empty() { Fault::ALL.to_vec() } else { args.scenario };
    let whole_suite = faults == Fault::ALL;

    let started = Instant::now();
    eprintln!(
        "chaos: {} form, {} scenarios, logs in {}",
        if form.long { "long" } else { "short" },
        faults.len(),
        work.display()
    );
    let mut outcomes = Vec::new();
    for fault in faults {
        // A missing cluster fails its scenarios (run says why), unless a
        // developer asked to skip what needs a missing service (never in CI).
        if fault.on_cluster() && test_support::skips_allowed() {
            if let Err(e) = chaos::cluster::require() {
                eprintln!("chaos: {}: SKIPPED: {e:#}", fault.name());
                continue;
            }
        }
        eprintln!("chaos: {} ...", fault.name());
        let o = scenario::run(&env, fault).await;
        let v = o.verdict.unwrap_or_default();
        eprintln!(
            "chaos: {} {}: obligations {} lost {} duplicated {} unexpected {} corrupted {} fault {:.1}s recovery {} ({:.0}s){}",
            fault.name(),
            if o.pass() { "PASS" } else { "FAIL" },
            v.obligations,
            v.lost,
            v.duplicated,
            v.unexpected,
            v.corrupted,
            o.fault_duration.as_secs_f64(),
            o.recovery.map_or_else(|| "-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
            o.wall.as_secs_f64(),
            o.error.as_deref().map(|e| format!("\n  error: {e}")).unwrap_or_default()
        );
        for e in &o.examples {
            eprintln!("  {e}");
        }
        outcomes.push(o);
    }
    let command = std::env::var("CHAOS_COMMAND").unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let section = chaos::report::render(&form, &outcomes, &command, started.elapsed());
    println!("{section}");
    if let Some(path) = &args.report {
        chaos::report::write(path, &form, whole_suite, &section)?;
        eprintln!("chaos: results written to {}", path.display());
    }
    let pass = outcomes.iter().all(scenario::Outcome::pass);
    if pass && !args.keep_logs {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("chaos: logs kept in {}", work.display());
    }
    eprintln!(
        "chaos: {} ({:.0} s)",
        if pass { "all scenarios pass" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    Ok(pass)
}
