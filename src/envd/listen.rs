//! Where the agent listens, and what it serves on each connection.
//!
//! - `--vsock`: AF_VSOCK (any CID) port [`ENVD_PORT`] serves the envd
//!   HTTP API and port [`FORWARD_PORT`] the TCP forwarder.
//! - `--uds PATH` (host mode): a Unix socket speaking the same handshake
//!   as the host side of stasis' vsock device: the client writes
//!   `CONNECT <port>\n`, the agent answers `OK <port>\n` and serves that
//!   port as in a guest (other ports: closed without an answer).
//! - `--tcp ADDR` (tests): the HTTP API on TCP.
//!
//! The forwarder: the client writes `<tcp-port>\n`; the agent connects to
//! `127.0.0.1:<tcp-port>`, answers `OK\n` or `ERR <reason>\n` (and
//! closes), then splices bytes both ways.

use crate::vsock::{ENVD_PORT, FORWARD_PORT};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How many times (100 ms apart) to retry creating a vsock listener.
const VSOCK_RETRIES: u32 = 100;
/// Longest handshake line accepted.
const MAX_LINE: usize = 64;

/// Errors of the listeners.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding or listening failed.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The address.
        what: String,
        /// The failure.
        source: io::Error,
    },
    /// Accepting failed.
    #[error("accept on {what}: {source}")]
    Accept {
        /// The address.
        what: String,
        /// The failure.
        source: io::Error,
    },
}

/// Serves HTTP/1.1 on one connection until it closes.
pub async fn serve_http<S>(router: Router, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!("envd connection ended: {e}");
    }
}

/// Reads one `\n`-terminated line (without the `\n`), at most
/// [`MAX_LINE`] bytes, byte by byte so that nothing after it is consumed.
pub async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if line.len() >= MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handshake line too long",
            ));
        }
        line.push(b);
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "handshake line is not UTF-8"))
}

/// Parses `CONNECT <port>`.
pub fn parse_connect(line: &str) -> Option<u32> {
    line.trim_end_matches('\r')
        .strip_prefix("CONNECT ")?
        .trim()
        .parse()
        .ok()
}

/// Ports the forwarder sends elsewhere (host mode: each sandbox's
/// code-interpreter server listens on its own port, see
/// [`super::interpreter`]).
static PORT_MAP: std::sync::RwLock<Vec<(u16, u16)>> = std::sync::RwLock::new(Vec::new());

/// From now on, the forwarder connects `from` to `to`.
pub fn map_port(from: u16, to: u16) {
    let mut m = PORT_MAP.write().unwrap_or_else(|e| e.into_inner());
    m.retain(|(f, _)| *f != from);
    m.push((from, to));
}

fn mapped_port(port: u16) -> u16 {
    let m = PORT_MAP.read().unwrap_or_else(|e| e.into_inner());
    m.iter().find(|(f, _)| *f == port).map_or(port, |(_, t)| *t)
}

/// The TCP forwarder on one connection.
pub async fn forward<S>(mut s: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let line = match read_line(&mut s).await {
        Ok(l) => l,
        Err(e) => {
            let _ = s.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
    };
    let port: u16 = match line.trim().parse() {
        Ok(p) if p != 0 => p,
        _ => {
            let _ = s
                .write_all(format!("ERR invalid port '{}'\n", line.trim()).as_bytes())
                .await;
            return;
        }
    };
    let port = mapped_port(port);
    let mut tcp = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => t,
        Err(e) => {
            let _ = s
                .write_all(format!("ERR connect 127.0.0.1:{port}: {e}\n").as_bytes())
                .await;
            return;
        }
    };
    if s.write_all(b"OK\n").await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut s, &mut tcp).await;
}

/// Serves the port a connection asked for.
async fn serve_port<S>(router: Router, port: u32, s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match port {
        ENVD_PORT => serve_http(router, s).await,
        FORWARD_PORT => forward(s).await,
        _ => {}
    }
}

/// `--tcp ADDR`: calls `ready` with the bound address, then serves HTTP.
pub async fn serve_tcp(
    router: Router,
    addr: &str,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), Error> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            what: addr.to_string(),
            source,
        })?;
    let local = l.local_addr().map_err(|source| Error::Listen {
        what: addr.to_string(),
        source,
    })?;
    ready(local);
    loop {
        let (s, _) = l.accept().await.map_err(|source| Error::Accept {
            what: addr.to_string(),
            source,
        })?;
        let _ = s.set_nodelay(true);
        tokio::spawn(serve_http(router.clone(), s));
    }
}

/// `--uds PATH`: the CONNECT handshake, then the port's service.
pub async fn serve_uds(
    router: Router,
    path: &Path,
    ready: impl FnOnce(&Path),
) -> Result<(), Error> {
    let what = || format!("unix:{}", path.display());
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path).map_err(|source| Error::Listen {
        what: what(),
        source,
    })?;
    ready(path);
    loop {
        let (mut s, _) = l.accept().await.map_err(|source| Error::Accept {
            what: what(),
            source,
        })?;
        let router = router.clone();
        tokio::spawn(async move {
            let Ok(line) = read_line(&mut s).await else {
                return;
            };
            let Some(port) = parse_connect(&line) else {
                return;
            };
            if port != ENVD_PORT && port != FORWARD_PORT {
                return; // refused, like a guest with nothing on that port
            }
            if s.write_all(format!("OK {port}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            serve_port(router, port, s).await;
        });
    }
}

fn vsock_listener(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes plain integers.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() returned a new descriptor that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: bind reads a sockaddr_vm of the size given, alive for the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

async fn vsock_accept_loop(router: Router, port: u32) -> Result<(), Error> {
    let what = || format!("vsock port {port}");
    // The vsock transport may come up just after init starts the agent:
    // retry for a while when the address family isn't there yet.
    let mut tries = 0;
    let l = loop {
        match vsock_listener(port) {
            Ok(l) => break l,
            Err(e)
                if tries < VSOCK_RETRIES
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT | libc::ENODEV | libc::EADDRNOTAVAIL)
                    ) =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(source) => {
                return Err(Error::Listen {
                    what: what(),
                    source,
                })
            }
        }
    };
    // SAFETY: the OwnedFd is open, owned by the AsyncFd from here on, and
    // always yields the same descriptor.
    let l = unsafe { AsyncFd::register(l) }.map_err(|e| Error::Listen {
        what: what(),
        source: e.into_parts().1,
    })?;
    loop {
        let mut guard = l.readable().await.map_err(|source| Error::Accept {
            what: what(),
            source,
        })?;
        let accepted = guard.try_io(|fd| {
            // SAFETY: accept4 on our listening socket; a null address is allowed.
            let c = unsafe {
                libc::accept4(
                    fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if c < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(c)
            }
        });
        let c = match accepted {
            Ok(Ok(c)) => c,
            Ok(Err(e))
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EMFILE | libc::ENFILE)
                ) =>
            {
                tracing::warn!("{}: accept: {e}", what());
                continue;
            }
            Ok(Err(source)) => {
                return Err(Error::Accept {
                    what: what(),
                    source,
                })
            }
            Err(_would_block) => continue,
        };
        // SAFETY: accept4 returned a new connected stream socket that we
        // own. tokio's UnixStream only reads, writes and shuts down through
        // it, which work on any stream socket, vsock included; its
        // Unix-address methods are never called.
        let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(c) };
        let stream = match tokio::net::UnixStream::from_std(std_stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{}: registering a connection: {e}", what());
                continue;
            }
        };
        tokio::spawn(serve_port(router.clone(), port, stream));
    }
}

/// `--vsock`: the envd API and the forwarder on their vsock ports.
pub async fn serve_vsock(router: Router) -> Result<(), Error> {
    tokio::try_join!(
        vsock_accept_loop(router.clone(), ENVD_PORT),
        vsock_accept_loop(router, FORWARD_PORT)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect("CONNECT 49983"), Some(49983));
        assert_eq!(parse_connect("CONNECT 49982\r"), Some(49982));
        assert_eq!(parse_connect("CONNECT x"), None);
        assert_eq!(parse_connect("GET / HTTP/1.1"), None);
    }

    #[tokio::test]
    async fn forwarder_splices_and_refuses() {
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = target.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = target.accept().await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap(); // echo
        });
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::spawn(forward(server));
        client
            .write_all(format!("{port}\nping").as_bytes())
            .await
            .unwrap();
        let mut reply = [0u8; 7];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"OK\nping");

        let (mut client, server) = tokio::io::duplex(1024);
        tokio::spawn(forward(server));
        client.write_all(b"notaport\n").await.unwrap();
        let mut s = String::new();
        client.read_to_string(&mut s).await.unwrap();
        assert!(s.starts_with("ERR invalid port"), "{s}");

        let mut long = vec![b'1'; 200];
        long.push(b'\n');
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::spawn(forward(server));
        client.write_all(&long).await.unwrap();
        let mut s = String::new();
        client.read_to_string(&mut s).await.unwrap();
        assert!(s.starts_with("ERR"), "{s}");
    }
}
