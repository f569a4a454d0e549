//! The `fptserve` binary: parse the command line, set up logging, run a subcommand.

use std::io::IsTerminal;

use clap::Parser;
use fptserve::cli;
use fptserve::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("FPTSERVE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        "human" => builder.init(),
        "json" => builder.json().flatten_event(true).init(),
        other => anyhow::bail!("log format {other:?}: use human or json"),
    }
    Ok(())
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    init_logging(&cli.log_format)?;
    match cli.command {
        Command::Serve(args) => {
            let config = (*args).resolve()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let served = runtime.block_on(cli::serve::run(config));
            // decoding left running by calls abandoned at the drain timeout is not waited for
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            served?;
        }
        Command::Classify(args) => cli::classify::run(args)?,
        Command::Inspect(args) => cli::inspect::run(args)?,
        Command::Decode(args) => return cli::decode::run(args),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
