//! `stasis-envd`: the in-guest agent (see `stasis::envd`). In a guest, init
//! starts it as `stasis-envd --vsock`; on a host, tests run it with
//! `--uds PATH` or `--tcp ADDR` and `--root DIR`.

use clap::Parser;
use stasis::envd::{self, listen};
use std::path::PathBuf;
use std::process::ExitCode;

/// The stasis in-guest agent: the envd API (commands, files) for the SDK.
#[derive(Parser, Debug)]
#[command(name = "stasis-envd", version = envd::VERSION)]
struct Args {
    /// Listen on AF_VSOCK: the envd API on port 49983, the TCP forwarder on 49982.
    #[arg(long)]
    vsock: bool,
    /// Host mode: listen on this Unix socket with the `CONNECT <port>` handshake.
    #[arg(long)]
    uds: Option<PathBuf>,
    /// Host mode: serve the envd API on this TCP address (e.g. 127.0.0.1:0).
    #[arg(long)]
    tcp: Option<String>,
    /// Host mode: home directory and default cwd of every request.
    #[arg(long)]
    root: Option<PathBuf>,
    /// The user of requests that name none (default: `user` if it exists, else `root`).
    #[arg(long)]
    default_user: Option<String>,
    /// Host mode: also run the code-interpreter server (port 49999 of the
    /// forwarder) with this Python, which needs jupyter-client and ipykernel.
    #[arg(long, value_name = "PYTHON")]
    interpreter: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !args.vsock && args.uds.is_none() && args.tcp.is_none() {
        eprintln!("stasis-envd: give --vsock, --uds PATH or --tcp ADDR");
        return ExitCode::from(2);
    }
    if args.vsock && args.root.is_some() {
        eprintln!("stasis-envd: --root is for host mode (--uds/--tcp) only");
        return ExitCode::from(2);
    }
    if args.vsock && args.interpreter.is_some() {
        eprintln!("stasis-envd: --interpreter is for host mode (--uds/--tcp) only; in a guest, init runs it");
        return ExitCode::from(2);
    }
    let cfg = envd::Config {
        host_mode: !args.vsock,
        root: args.root.clone(),
        default_user: args.default_user.clone(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stasis-envd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let router = envd::router(envd::Agent::new(cfg));
    if let Some(python) = args.interpreter.clone() {
        let cwd = args
            .root
            .clone()
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| "/".into()));
        let dir = match &args.uds {
            Some(p) => p.parent().map_or_else(|| cwd.clone(), |d| d.to_path_buf()),
            None => std::env::temp_dir(),
        };
        rt.spawn(async move {
            if let Err(e) = envd::interpreter::supervise(python, dir, cwd).await {
                tracing::error!("{e}");
                eprintln!("stasis-envd: ERROR: {e}");
            }
        });
    }
    let res = rt.block_on(async move {
        let vsock = async {
            if args.vsock {
                listen::serve_vsock(router.clone()).await
            } else {
                std::future::pending().await
            }
        };
        let uds = async {
            match &args.uds {
                Some(p) => {
                    listen::serve_uds(router.clone(), p, |p| {
                        println!("stasis-envd: listening on unix:{}", p.display())
                    })
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let tcp = async {
            match &args.tcp {
                Some(a) => {
                    listen::serve_tcp(router.clone(), a, |a| {
                        println!("stasis-envd: listening on http://{a}")
                    })
                    .await
                }
                None => std::future::pending().await,
            }
        };
        if args.vsock {
            tracing::info!(
                "stasis-envd {} listening on vsock ports 49983, 49982",
                envd::VERSION
            );
        }
        tokio::try_join!(vsock, uds, tcp).map(|_| ())
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis-envd: {e}");
            ExitCode::FAILURE
        }
    }
}
