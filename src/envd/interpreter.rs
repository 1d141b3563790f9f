//! The code-interpreter server in host mode (the fake backend).
//!
//! In a Linux sandbox the image's init runs the code-interpreter server
//! (`rootfs/interpreter/stasis_interpreter.py`) on port 49999, and the SDK's
//! `run_code` reaches it through the proxy and the agent's TCP forwarder. On
//! a host, many sandboxes share one network stack, so each host agent runs
//! its own copy of the server on a free loopback port and maps the
//! forwarder's port 49999 to it ([`super::listen::map_port`]). The server is
//! the agent's child, so a pause (SIGSTOP of the agent's process tree)
//! freezes it and its kernels with everything else, and a kill ends them.
//!
//! The script is compiled into the agent, so a host needs only a Python with
//! jupyter-client and ipykernel (Debian's python3-jupyter-client and
//! python3-ipykernel, as in the image): `--interpreter PYTHON` names it. A
//! server that exits is restarted, a second later, like init does in a guest.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The server's source, as shipped in the image.
pub const SCRIPT: &str = include_str!("../../rootfs/interpreter/stasis_interpreter.py");
/// The port the SDK addresses (`JUPYTER_PORT`).
pub const JUPYTER_PORT: u16 = 49999;
/// How long a new server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the script or spawning Python failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The server did not say where it listens.
    #[error("the code-interpreter server ({python}) did not start: {reason}")]
    NoStart {
        /// The Python used.
        python: String,
        /// What happened instead.
        reason: String,
    },
}

/// Parses the server's `stasis-interpreter: listening on HOST:PORT` line.
fn listening_port(line: &str) -> Option<u16> {
    line.trim()
        .strip_prefix("stasis-interpreter: listening on ")?
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}

/// Starts one server; returns the child and its port.
async fn start(
    python: &str,
    script: &Path,
    cwd: &Path,
) -> Result<(tokio::process::Child, u16), Error> {
    let mut child = Command::new(python)
        .arg(script)
        .args(["--host", "127.0.0.1", "--port", "0", "--cwd"])
        .arg(cwd)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Io {
            what: format!("starting {python} {}", script.display()),
            source,
        })?;
    let stdout = child.stdout.take().ok_or_else(|| Error::NoStart {
        python: python.to_owned(),
        reason: "no stdout".into(),
    })?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
    let port = match first {
        Ok(Ok(Some(l))) => listening_port(&l).ok_or_else(|| Error::NoStart {
            python: python.to_owned(),
            reason: format!("unexpected first line {l:?}"),
        })?,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            return Err(Error::NoStart {
                python: python.to_owned(),
                reason: format!("it exited ({status:?}); is jupyter-client installed for it?"),
            });
        }
        Err(_) => {
            return Err(Error::NoStart {
                python: python.to_owned(),
                reason: format!("no listening line within {START_TIMEOUT:?}"),
            })
        }
    };
    // Anything else it prints goes to the agent's own log (the console).
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("{l}");
        }
    });
    Ok((child, port))
}

/// Writes the script into `dir` and keeps a server running for as long as
/// the agent lives, with port [`JUPYTER_PORT`] of the forwarder mapped to it.
pub async fn supervise(python: String, dir: PathBuf, cwd: PathBuf) -> Result<(), Error> {
    let script = dir.join("stasis_interpreter.py");
    tokio::fs::write(&script, SCRIPT)
        .await
        .map_err(|source| Error::Io {
            what: format!("writing {}", script.display()),
            source,
        })?;
    let mut restarts = 0u64;
    loop {
        match start(&python, &script, &cwd).await {
            Ok((mut child, port)) => {
                super::listen::map_port(JUPYTER_PORT, port);
                tracing::info!(port, restarts, "code-interpreter server listening");
                let status = child.wait().await;
                tracing::warn!(?status, "code-interpreter server exited; restarting in 1 s");
            }
            Err(e) if restarts == 0 => return Err(e),
            Err(e) => tracing::warn!("{e}; retrying in 1 s"),
        }
        restarts += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_is_parsed() {
        assert_eq!(
            listening_port("stasis-interpreter: listening on 127.0.0.1:40123\n"),
            Some(40123)
        );
        assert_eq!(listening_port("something else"), None);
        assert_eq!(
            listening_port("stasis-interpreter: listening on 127.0.0.1:x"),
            None
        );
    }
}
