//! `stasis`: the CLI. (Temporary wiring on the `api` branch; the lead owns
//! this file and reconciles it.)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stasis", version, about = "Sandbox engine on KVM")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the sandbox lifecycle API.
    Serve(stasis::api::ServeArgs),
    /// Internal: run one sandbox's VM, driven by the server over a socket.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Serve(args) => args
            .into_options()
            .and_then(stasis::api::serve_blocking)
            .map_err(|e| e.to_string()),
        Cmd::Worker { socket } => stasis::worker::run_worker(&socket).map_err(|e| e.to_string()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis: {e}");
            ExitCode::FAILURE
        }
    }
}
