//! `edge-agent`: parses flags, loads the configuration and runs the agent
//! until SIGTERM or ctrl-c.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use edge_agent::config::{Config, LogFormat, Overrides};
use edge_agent::remote::{Controls, LogControl, Reloader};
use edge_agent::Agent;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter};

/// Edge agent: durable outbox for sensor readings, published over MQTT.
///
/// Every setting can come from the TOML file, an environment variable
/// (EDGE_AGENT_<KEY>) or a flag; flags win over the environment, which wins
/// over the file. With no file at all the defaults use `scripts/stack`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short, env = "EDGE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // rustls' ring provider as the process default (rumqttc is built without one).
    telemetry_link::install_crypto_provider();
    let config = match Config::load(args.config.as_deref(), args.overrides) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("edge-agent: {error}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Behind a reload layer, so that the `set_log_level` remote command can
    // replace it while the agent runs.
    let (filter, filter_handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Text => registry.with(fmt::layer()).init(),
        LogFormat::Json => registry.with(fmt::layer().json()).init(),
    }
    let log: LogControl = Arc::new(move |directive: &str| {
        let filter = EnvFilter::builder().parse(directive).map_err(|e| e.to_string())?;
        filter_handle.reload(filter).map_err(|e| e.to_string())
    });
    // `reload` loads the configuration as at start: the file again, under
    // the same environment and flags.
    let reload: Reloader = Arc::new(|| {
        let args = Args::try_parse_from(std::env::args_os()).map_err(|e| e.to_string())?;
        Config::load(args.config.as_deref(), args.overrides).map_err(|e| e.to_string())
    });
    let controls = Controls { log: Some(log), reload: Some(reload) };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("edge-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(cancel.clone()));
        match Agent::start_with(config, controls, cancel.clone()).await {
            Ok(agent) => {
                tracing::info!(listen = ?agent.listen_addrs, http = ?agent.http_addr, "edge agent running");
                agent.join().await;
                ExitCode::SUCCESS
            }
            Err(edge_agent::AgentError::Cancelled) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "edge agent failed to start");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_on_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot install the SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("ctrl-c"),
    }
    cancel.cancel();
}
