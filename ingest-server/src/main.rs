//! `ingest-server`: parses flags, loads the configuration, installs logging
//! and signal handling, and calls [`ingest_server::run`].

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => anyhow::bail!("unknown log format {other:?} (text or json)"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = ingest_server::config::Cli::parse();
    // rustls' ring provider as the process default (rumqttc is built without one).
    telemetry_link::install_crypto_provider();
    init_logging(&cli.log_format)?;
    let print_schema = cli.print_schema.clone();
    let config = cli.load().context("loading configuration")?;
    if let Some(flavor) = print_schema {
        let flavor = if flavor == "current" {
            ingest_server::schema::Flavor::Current
        } else {
            ingest_server::schema::Flavor::Legacy
        };
        let tables = ingest_server::schema::Tables::for_config(&config);
        for statement in ingest_server::schema::ddl(flavor, &tables, config.retention_days) {
            println!("{statement};\n");
        }
        return Ok(());
    }
    tracing::info!(?config, "starting");

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, "cannot install SIGTERM handler");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("ctrl-c: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        signals.cancel();
    });
    ingest_server::run(config, shutdown).await.context("ingest server")?;
    Ok(())
}
