//! The `fptserve` binary: parse the command line, set up logging, run a subcommand.

use clap::Parser;
use fptserve::config::{Cli, Command};
use fptserve::{cli, telemetry};

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let telemetry = {
                let _inside = runtime.enter();
                telemetry::init(&cli.log_format, cli.otlp_endpoint.as_deref())?
            };
            let config = (*args).resolve()?;
            let served = runtime.block_on(cli::serve::run(config));
            // spans of the last calls go out before the runtime stops
            drop(telemetry);
            // decoding left running by calls abandoned at the drain timeout is not waited for
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            served?;
        }
        command => {
            let _telemetry = telemetry::init(&cli.log_format, None)?;
            match command {
                Command::Classify(args) => cli::classify::run(args)?,
                Command::Inspect(args) => cli::inspect::run(args)?,
                Command::Decode(args) => return cli::decode::run(args),
                Command::Serve(_) => unreachable!("handled above"),
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
