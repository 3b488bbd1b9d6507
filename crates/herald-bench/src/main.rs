//! The `herald-bench` binary: parses the command line and runs a scenario
//! (as the coordinator) or, under the hidden `worker` subcommand, one worker.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use herald_bench::cli::{Cli, Command};
use herald_bench::{WorkerLauncher, process_stats, worker};
use tokio::io::BufReader;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    // A worker's stdin is read on a blocking thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    process_stats::raise_open_file_limit();
    let Some(config) = command.into_config() else {
        return worker::run(BufReader::new(tokio::io::stdin()), tokio::io::stdout()).await;
    };
    let (config, json) = config?;
    let exe = std::env::current_exe().context("finding this executable to start workers")?;
    let report = herald_bench::run(&config, &WorkerLauncher::Subprocess(exe)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("reports serialize"));
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
