//! Routing of in-sandbox traffic: HTTP requests meant for a sandbox's agent
//! (the envd API) or for any TCP port a process listens on inside it are
//! forwarded there instead of reaching the lifecycle API.
//!
//! Which requests (what the novita-sandbox SDK sends):
//! - with `NOVITA_SANDBOX_URL` set (and in debug mode), every envd request
//!   carries `Novita-Sandbox-Id: <id>` and `Novita-Sandbox-Port: 49983`
//!   (`E2b-Sandbox-Id`/`-Port` are accepted too). The SDK's `connect` call
//!   also carries them, on a lifecycle route: lifecycle paths
//!   (`/sandboxes...`, `/v2/...`) with the envd port stay with the API;
//! - otherwise the SDK addresses `https://{port}-{sandboxID}.{domain}`: a
//!   `Host` whose first label is `{port}-{id}` is routed the same way;
//! - a sandbox object made by the static `Sandbox.connect(id)` sends neither
//!   header nor such a host, only `X-Access-Token`: a secured sandbox (the
//!   SDK's default) is found by that token, for the envd port.
//!
//! - a signed file URL (`/files?…&signature=v1_…`, what `download_url` /
//!   `upload_url` build) with none of the above names no sandbox: it goes to
//!   the secured sandbox whose envd token made the signature (401 "invalid
//!   signature" if none did).
//!
//! A secured sandbox's envd port is reached only with its token (401
//! otherwise), except `/files` with a valid, unexpired signature made with
//! that token (checked here and again by the agent, with envd's messages);
//! user ports don't need it.
//!
//! Header names keep their case (the listener records it: [`serve_http`])
//! and order; hop-by-hop fields (RFC 9110 §7.6.1) are dropped and `Via` is
//! added; an `Upgrade` (WebSocket) handshake is passed on and, on 101, both
//! upgraded streams are joined until either ends or the gate closes.
//!
//! How: connect to the sandbox's Unix socket (the vsock device's host side,
//! or the host agent's socket), `CONNECT 49983\n` → `OK <n>\n` for envd;
//! for another port `CONNECT 49982\n` → `OK <n>\n`, then `<port>\n` → `OK\n`
//! (the agent's TCP forwarder). Then HTTP/1.1 over that stream (hyper),
//! bodies streamed both ways, hop-by-hop headers stripped.
//!
//! With a sandbox domain configured (`--domain D`), only a Host under D
//! routes ([`route_of_in`]): the same `{port}-{id}.` shape under any other
//! domain is answered 421 (Misdirected Request), never forwarded.
//!
//! Limits ([`serve_http_limited`], [`ConnLimits`]): a connection must send
//! a complete request head within the header-read timeout (after it was
//! accepted, or after its previous response) or it is closed (slowloris);
//! one client IP address may hold at most so many connections (beyond: a
//! raw 429 and close). Per-request log lines are limited per sandbox
//! ([`LOG_LINES_PER_SEC`]).
//!
//! Proxied traffic needs no API key (the SDK sends none; envd's own
//! `X-Access-Token` is passed through). Each running sandbox has a [`Gate`];
//! pause and kill close it, which aborts every open proxied exchange of that
//! sandbox (the client sees the connection end with an error).
//!
//! Network controls ([`crate::net::spec`]): a sandbox created with
//! `allowPublicTraffic: false` answers on its user ports only to requests
//! carrying its token in `e2b-traffic-access-token` (403 otherwise; the
//! envd port has its own token); with `maskRequestHost` the sandbox sees
//! that `Host` (`${PORT}` replaced by the port) instead of the client's.
//!
//! Errors are JSON `{"code", "message"}`: 400 for a malformed routing
//! header; 502 when the sandbox cannot be reached — unknown, paused, being
//! paused/resumed, no agent, the agent refusing or not answering the
//! handshake within [`HANDSHAKE_TIMEOUT`], nothing listening on a user port.
//! 502 is what the SDK expects (`is_running()` is false on 502; envd's own
//! 404 means a missing file).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Frame;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::error::ApiError;
use super::models;
use super::routes::AppState;
use crate::envd::files;
use crate::vsock::{ENVD_PORT, FORWARD_PORT};

/// Longest wait for the agent to accept a connection (both handshakes).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest handshake line we read.
const MAX_LINE: usize = 256;

/// Why reaching a sandbox's agent failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the sandbox's agent socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the sandbox's agent connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the sandbox's agent did not accept the connection within {0:?}")]
    Timeout(Duration),
    #[error("the sandbox refused the connection to port {port}: {why}")]
    Refused { port: u16, why: String },
    #[error("the sandbox's agent answered {0}")]
    Unhealthy(String),
}

/// Open/closed switch for one running incarnation of a sandbox: proxied
/// exchanges end when it closes.
#[derive(Debug)]
pub struct Gate {
    tx: watch::Sender<bool>,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate {
            tx: watch::channel(false).0,
        })
    }

    /// Closes the gate: every exchange through it is aborted.
    pub fn close(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the gate is closed.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub sandbox_id: String,
    pub port: u16,
}

fn header_str<'a>(h: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| h.get(*n))
        .map(|v| v.to_str().unwrap_or(""))
}

pub(super) fn is_lifecycle_path(path: &str) -> bool {
    path == "/sandboxes"
        || path.starts_with("/sandboxes/")
        || path.starts_with("/v1/")
        || path.starts_with("/v2/")
        || path.starts_with("/v3/")
        || ["/templates", "/volumes", "/snapshots"]
            .iter()
            .any(|p| path == *p || path.starts_with(&format!("{p}/")))
        || path == "/openapi.json"
}

/// `{port}-{id}.rest` (a `:port` suffix allowed) → the route.
fn route_from_host(host: &str) -> Option<Route> {
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let (label, rest) = host.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if port == 0 || !models::valid_name(id, false) {
        return None;
    }
    Some(Route {
        sandbox_id: id.to_string(),
        port,
    })
}

/// Like [`route_of`], for a server with a configured sandbox domain: a
/// `{port}-{id}.D` Host routes only when D is that domain (ASCII case
/// ignored); a Host of that shape under any other domain is answered 421
/// (Misdirected Request) instead of reaching a sandbox, and every other Host
/// is an API request. Without a domain, [`route_of`]'s rule (any domain).
pub fn route_of_in(
    method_path: &str,
    headers: &HeaderMap,
    uri: &Uri,
    domain: Option<&str>,
) -> Result<Option<Route>, ApiError> {
    let route = route_of(method_path, headers, uri)?;
    let (Some(domain), Some(r)) = (domain, &route) else {
        return Ok(route);
    };
    if header_str(headers, &["novita-sandbox-id", "e2b-sandbox-id"]).is_some() {
        return Ok(route);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    if host_in_domain(host, domain) {
        return Ok(route);
    }
    Err(ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "host {host:?} is not under this server's sandbox domain {domain:?} (sandbox {} port {} is reached at {}-{}.{domain})",
            r.sandbox_id, r.port, r.port, r.sandbox_id
        ),
    ))
}

/// Whether `host` (`label.rest[:port]`) has exactly `domain` after its first
/// label.
fn host_in_domain(host: &str, domain: &str) -> bool {
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let domain = domain.trim_end_matches('.');
    host.trim_end_matches('.')
        .split_once('.')
        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(domain))
}

/// Decides whether `req` is in-sandbox traffic. `Ok(None)`: a lifecycle API
/// request.
pub fn route_of(
    method_path: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Option<Route>, ApiError> {
    if let Some(id) = header_str(headers, &["novita-sandbox-id", "e2b-sandbox-id"]) {
        let port = header_str(headers, &["novita-sandbox-port", "e2b-sandbox-port"]);
        let port: u16 = match port.map(|p| p.trim().parse::<u16>()) {
            Some(Ok(p)) if p > 0 => p,
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "invalid Novita-Sandbox-Port header {:?}",
                    port.unwrap_or("")
                )))
            }
            None => {
                return Err(ApiError::bad_request(
                    "Novita-Sandbox-Id needs a Novita-Sandbox-Port header",
                ))
            }
        };
        if port == ENVD_PORT as u16 && is_lifecycle_path(method_path) {
            // The SDK's `connect` sends these headers to the lifecycle API.
            return Ok(None);
        }
        return Ok(Some(Route {
            sandbox_id: id.trim().to_string(),
            port,
        }));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    Ok(host.and_then(route_from_host))
}

/// Reads one `\n`-terminated line byte by byte (so nothing after it is
/// consumed), at most [`MAX_LINE`] bytes.
async fn read_line(s: &mut UnixStream) -> Result<String, Error> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                if line.is_empty() {
                    "closed without an answer".to_string()
                } else {
                    format!("closed after {:?}", String::from_utf8_lossy(&line))
                },
            )));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        line.push(b[0]);
        if line.len() > MAX_LINE {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "handshake line too long",
            )));
        }
    }
}

async fn handshake(socket: &Path, port: u16) -> Result<UnixStream, Error> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|e| Error::Connect {
            path: socket.display().to_string(),
            source: e,
        })?;
    let vport = if u32::from(port) == ENVD_PORT {
        ENVD_PORT
    } else {
        FORWARD_PORT
    };
    s.write_all(format!("CONNECT {vport}\n").as_bytes()).await?;
    let ok = read_line(&mut s).await.map_err(|e| match e {
        Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => Error::Refused {
            port,
            why: format!("nothing listens on vsock port {vport} (is the agent running?)"),
        },
        other => other,
    })?;
    if !ok.starts_with("OK") {
        return Err(Error::Refused {
            port,
            why: format!("unexpected vsock handshake answer {ok:?}"),
        });
    }
    if vport == FORWARD_PORT {
        s.write_all(format!("{port}\n").as_bytes()).await?;
        let ans = read_line(&mut s).await?;
        if ans != "OK" {
            let why = ans.strip_prefix("ERR").map(str::trim).unwrap_or(&ans);
            return Err(Error::Refused {
                port,
                why: why.to_string(),
            });
        }
    }
    Ok(s)
}

/// Connects to `port` inside the sandbox through its agent socket, bounded
/// by `timeout`.
pub async fn connect(socket: &Path, port: u16, timeout: Duration) -> Result<UnixStream, Error> {
    tokio::time::timeout(timeout, handshake(socket, port))
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

/// `GET /health` on `port` inside the sandbox (the agent's envd port, or a
/// service such as the code interpreter); `Ok` on a 2xx answer.
pub async fn probe_health(socket: &Path, port: u16, timeout: Duration) -> Result<(), Error> {
    agent_request(socket, port, "GET", "/health", None, timeout).await
}

/// `POST /init {"envVars": .., "accessToken": ..}` on the agent's envd
/// port: variables every later process of the sandbox gets (the create
/// call's `envVars`) and, for a secured sandbox, its envd access token
/// (the agent then checks it and signed file URLs itself).
pub async fn init_agent(
    socket: &Path,
    env_vars: &std::collections::BTreeMap<String, String>,
    access_token: Option<&str>,
    timeout: Duration,
) -> Result<(), Error> {
    let mut body = serde_json::json!({ "envVars": env_vars });
    if let Some(t) = access_token {
        body["accessToken"] = serde_json::Value::String(t.to_string());
    }
    let body = body.to_string();
    agent_request(
        socket,
        ENVD_PORT as u16,
        "POST",
        "/init",
        Some(body.as_bytes()),
        timeout,
    )
    .await
}

/// For a sandbox made from a shared snapshot (create from a snapshot id,
/// clone), before user code runs: fresh `entropy` for the guest's RNG (the
/// agent mixes it in with `RNDADDENTROPY` and reseeds the CRNG, so clones
/// of one snapshot draw different random numbers), this sandbox's env vars
/// and its own envd token. `old_token` is the token the snapshot's agent
/// was initialized with (its `/init` needs it).
pub async fn refresh_agent(
    socket: &Path,
    env_vars: &std::collections::BTreeMap<String, String>,
    access_token: Option<&str>,
    old_token: Option<&str>,
    entropy: &[u8],
    timeout: Duration,
) -> Result<(), Error> {
    let hex: String = entropy.iter().map(|b| format!("{b:02x}")).collect();
    let mut body = serde_json::json!({ "envVars": env_vars, "entropy": hex });
    if let Some(t) = access_token {
        body["accessToken"] = serde_json::Value::String(t.to_string());
    }
    let body = body.to_string();
    let headers: Vec<(&str, &str)> = old_token
        .map(|t| vec![("X-Access-Token", t)])
        .unwrap_or_default();
    agent_request_with(
        socket,
        ENVD_PORT as u16,
        "POST",
        "/init",
        Some(body.as_bytes()),
        &headers,
        timeout,
    )
    .await
}

/// One small HTTP/1.1 request to `port` in the sandbox; `Ok` on a 2xx
/// answer (only the status line is read).
async fn agent_request(
    socket: &Path,
    port: u16,
    method: &str,
    path: &str,
    json_body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), Error> {
    agent_request_with(socket, port, method, path, json_body, &[], timeout).await
}

/// [`agent_request`] with extra request headers.
async fn agent_request_with(
    socket: &Path,
    port: u16,
    method: &str,
    path: &str,
    json_body: Option<&[u8]>,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(socket, port, timeout).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n")
            .into_bytes();
    for (k, v) in headers {
        request.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if let Some(b) = json_body {
        request.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .as_bytes(),
        );
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(json_body.unwrap_or_default());
    let answer = tokio::time::timeout(left, async {
        s.write_all(&request).await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(head)
    })
    .await
    .map_err(|_| Error::Timeout(timeout))??;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or("").to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') && status_line.starts_with("HTTP/1.") {
        Ok(())
    } else if status_line.is_empty() {
        Err(Error::Unhealthy(format!("no answer to {method} {path}")))
    } else {
        Err(Error::Unhealthy(format!(
            "{status_line:?} to {method} {path}"
        )))
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every
/// field it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`,
/// `Upgrade`, plus `Proxy-Authenticate`/`-Authorization` and `Trailer`); `te`
/// is kept only as `trailers` (the one value an HTTP/1.1 hop may pass on).
/// The other fields keep their order: the map is rebuilt, not edited in
/// place (`HeaderMap::remove` moves the last field into the hole).
/// Fields named in `also` (lower case) are dropped as well.
fn strip_hop_by_hop(h: &mut HeaderMap, also: &[&str]) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        })
    });
    let old = std::mem::take(h);
    let mut te_done = false;
    let mut last: Option<HeaderName> = None;
    for (name, value) in old {
        let name = match name {
            Some(n) => {
                last = Some(n.clone());
                n
            }
            None => match &last {
                Some(n) => n.clone(),
                None => continue,
            },
        };
        if HOP_BY_HOP.contains(&name.as_str())
            || named.contains(&name)
            || also.contains(&name.as_str())
        {
            continue;
        }
        if name == header::TE {
            if te_trailers && !te_done {
                h.append(header::TE, HeaderValue::from_static("trailers"));
                te_done = true;
            }
            continue;
        }
        h.append(name, value);
    }
}

/// Whether `h` asks to switch protocols (`Connection: upgrade` with an
/// `Upgrade` field, e.g. a WebSocket handshake): the `Upgrade` value.
fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    asks.then(|| h.get(header::UPGRADE).cloned()).flatten()
}

/// The `Via` field this proxy adds to what it forwards (RFC 9110 §7.6.3).
const VIA: &str = "1.1 stasis";
/// Most times a request may have passed through stasis before it is taken
/// for a loop (a sandbox calling another through stasis is two).
pub(super) const MAX_STASIS_HOPS: usize = 4;
/// Routing fields of this proxy: they name the sandbox for this hop only,
/// and must not make the next hop (possibly this server again) route too.
const ROUTING_HEADERS: [&str; 4] = [
    "novita-sandbox-id",
    "novita-sandbox-port",
    "e2b-sandbox-id",
    "e2b-sandbox-port",
];

/// How many `Via` entries a request carries from this proxy.
pub(super) fn stasis_hops(h: &HeaderMap) -> usize {
    h.get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|e| e.trim() == VIA)
        .count()
}

/// A response body from the agent that fails (aborting the client's
/// connection) when the sandbox's gate closes.
struct GatedBody {
    inner: hyper::body::Incoming,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(
                "the sandbox was paused or killed; connection closed".into(),
            )));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Where the manager says a sandbox's traffic goes.
pub struct Target {
    pub socket: std::path::PathBuf,
    pub gate: Arc<Gate>,
}

fn unauthorized(msg: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response()
}

/// A `GET`/`POST /files` request carrying a `signature` query parameter
/// (a signed file URL): its query and operation.
fn signed_files_request(req: &Request) -> Option<(HashMap<String, String>, files::Op)> {
    if req.uri().path() != "/files" {
        return None;
    }
    let op = match *req.method() {
        Method::GET | Method::HEAD => files::Op::Read,
        Method::POST => files::Op::Write,
        _ => return None,
    };
    let q = axum::extract::Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .ok()?
        .0;
    q.contains_key("signature").then_some((q, op))
}

fn bad_gateway(msg: impl Into<String>) -> Response {
    ApiError::new(StatusCode::BAD_GATEWAY, msg).into_response()
}

/// Forwards `req` to `port` of the sandbox behind `target`.
pub async fn forward(target: &Target, route: &Route, req: Request) -> Result<Response, String> {
    let closed = target.gate.closed();
    let stream = tokio::select! {
        s = connect(&target.socket, route.port, HANDSHAKE_TIMEOUT) => s.map_err(|e| e.to_string())?,
        _ = closed => return Err(format!("sandbox {} was paused or killed", route.sandbox_id)),
    };
    let what = format!("sandbox {}", route.sandbox_id);
    relay(stream, req, &ROUTING_HEADERS, &target.gate, &what).await
}

/// One HTTP/1.1 exchange of `req` over `stream` (to a sandbox's agent, or
/// to another host of the pool): hop-by-hop fields and those in `strip`
/// dropped, `Via` added, header case and order kept, an upgrade (e.g. a
/// WebSocket) piped both ways, everything cut when `gate` closes. `what`
/// names the other end in errors and logs.
pub async fn relay<S>(
    stream: S,
    mut req: Request,
    strip: &[&str],
    gate: &Arc<Gate>,
    what: &str,
) -> Result<Response, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // Header names keep their case both ways: the server side records it
    // (`serve_http`), this side writes it and records the answer's.
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {what} failed: {e}"))?;
    let closed = gate.closed();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.with_upgrades() => {}
            _ = closed => {}
        }
    });

    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = pq
        .parse()
        .map_err(|e| format!("invalid request target: {e}"))?;
    *req.version_mut() = Version::HTTP_11;
    let host = req.headers().get(header::HOST).cloned();
    let upgrade = upgrade_of(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    // This hop's routing fields go too (rebuilding keeps the others' order).
    strip_hop_by_hop(req.headers_mut(), strip);
    if host.is_none() {
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    if let Some(u) = &upgrade {
        // The one hop-by-hop exchange a proxy passes on: the switch itself.
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        req.headers_mut().insert(header::UPGRADE, u.clone());
    }
    req.headers_mut()
        .append(header::VIA, HeaderValue::from_static(VIA));
    let closed = gate.closed();
    let mut resp = tokio::select! {
        r = sender.send_request(req) => r.map_err(|e| format!("{what} closed the connection: {e}"))?,
        _ = closed => return Err(format!("{what} was paused or killed")),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(format!(
                "{what} switched protocols though the client did not ask"
            ));
        };
        let server_upgrade = hyper::upgrade::on(&mut resp);
        let answer = upgrade_of(resp.headers());
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, &[]);
        if let Some(u) = answer {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u);
        }
        parts
            .headers
            .append(header::VIA, HeaderValue::from_static(VIA));
        let closed = gate.closed();
        let id = what.to_string();
        tokio::spawn(async move {
            let pipe = async {
                let (client, server) =
                    tokio::try_join!(client_upgrade, server_upgrade).map_err(|e| e.to_string())?;
                let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                tokio::io::copy_bidirectional(&mut client, &mut server)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            tokio::select! {
                r = pipe => if let Err(e) = r {
                    tracing::debug!(to = %id, "upgraded connection ended: {e}");
                },
                _ = closed => tracing::debug!(to = %id, "upgraded connection closed: the sandbox was paused or killed"),
            }
        });
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, &[]);
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static(VIA));
    let body = GatedBody {
        inner: incoming,
        closed: Box::pin(gate.closed()),
    };
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Most per-request log lines (proxied, refused, failed) one sandbox's
/// traffic may cause per second; a guest (or a client) that makes its
/// traffic fail on purpose cannot flood the server's log. The lines left
/// out are counted in the next one (`suppressed`).
pub const LOG_LINES_PER_SEC: u32 = 20;

/// Per-key, per-second budget of log lines.
#[derive(Default)]
pub struct LogLimiter {
    seen: std::sync::Mutex<HashMap<String, (u64, u32, u64)>>,
}

impl LogLimiter {
    /// Whether a line about `key` may be logged at second `now_s`:
    /// `Some(n)` with `n` lines left out since the last one logged, `None`
    /// to leave this one out.
    pub fn allow(&self, key: &str, now_s: u64, per_sec: u32) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 && !seen.contains_key(key) {
            seen.retain(|_, (s, _, left_out)| *s + 60 > now_s && *left_out > 0);
        }
        let e = seen.entry(key.to_string()).or_insert((now_s, 0, 0));
        if e.0 != now_s {
            e.0 = now_s;
            e.1 = 0;
        }
        if e.1 >= per_sec {
            e.2 += 1;
            return None;
        }
        e.1 += 1;
        Some(std::mem::take(&mut e.2))
    }
}

/// The proxy's [`LogLimiter`], per sandbox.
fn log_gate(sandbox: &str) -> Option<u64> {
    static LIMITER: std::sync::OnceLock<LogLimiter> = std::sync::OnceLock::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LIMITER
        .get_or_init(LogLimiter::default)
        .allow(sandbox, now, LOG_LINES_PER_SEC)
}

/// Per-connection limits of [`serve_http_limited`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// A connection that has not sent a complete request head this long
    /// after it was accepted (or after its previous response) is closed
    /// (slowloris). `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// Most connections open at once from one client IP address; beyond it a
    /// new connection is answered 429 and closed. 0: no limit.
    pub max_conns_per_ip: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            max_conns_per_ip: DEFAULT_MAX_CONNS_PER_IP,
        }
    }
}

/// Default [`ConnLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ConnLimits::max_conns_per_ip`].
pub const DEFAULT_MAX_CONNS_PER_IP: usize = 1024;

/// Open connections per client IP; a [`ConnTicket`] holds one.
#[derive(Default)]
struct PerIp {
    open: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
}

struct ConnTicket {
    table: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ConnTicket> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnTicket {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The answer to a connection over the per-IP limit (written raw: the
/// request is not read).
fn too_many_connections(max: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "code": 429,
        "message": format!("too many connections from this address (the limit is {max})"),
    })
    .to_string();
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// [`serve_http_limited`] with the default [`ConnLimits`].
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    serve_http_limited(listener, app, shutdown, tls, ConnLimits::default()).await
}

/// Serves `app` on `listener` over HTTP/1.1 until `shutdown` completes,
/// then lets open connections finish (as `axum::serve` with graceful
/// shutdown). Unlike `axum::serve` it records header-name case
/// (`preserve_header_case`), so the proxy forwards names as the client
/// wrote them, and it serves protocol upgrades (WebSocket). `limits` bound
/// how long a client may take to send a request head and how many
/// connections one client address may hold.
pub async fn serve_http_limited(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
) -> std::io::Result<()> {
    let per_ip = Arc::new(PerIp::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(sp) => sp,
            Err(e) => {
                // Out of descriptors or a connection reset before accept:
                // back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(ticket) = per_ip.take(peer.ip(), limits.max_conns_per_ip) else {
            tracing::warn!(client = %peer.ip(), limit = limits.max_conns_per_ip, "connection refused: too many from this address");
            let answer = (tls.is_none()).then(|| too_many_connections(limits.max_conns_per_ip));
            conns.spawn(async move {
                if let Some(a) = answer {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), stream.write_all(&a)).await;
                }
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop_rx.clone();
        let tls = tls.clone();
        let head_timeout = limits.header_read_timeout;
        conns.spawn(async move {
            let _ticket = ticket;
            match tls {
                None => serve_connection_limited(stream, svc, stop, head_timeout).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(t)) => serve_connection_limited(t, svc, stop, head_timeout).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    stop_tx.send_replace(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Longest time a client may take for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/1.1 on one accepted connection (plain or TLS), header case kept,
/// upgrades allowed, until it closes or the server stops; a request head
/// must arrive within `head_timeout`.
async fn serve_connection_limited<IO>(
    io: IO,
    svc: hyper_util::service::TowerToHyperService<axum::Router>,
    mut stop: watch::Receiver<bool>,
    head_timeout: Option<Duration>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut b = hyper::server::conn::http1::Builder::new();
    b.preserve_header_case(true);
    b.timer(hyper_util::rt::TokioTimer::new());
    b.header_read_timeout(head_timeout);
    let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// Middleware in front of the lifecycle API: in-sandbox traffic is
/// forwarded, everything else goes on to the API.
pub async fn layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let signed = signed_files_request(&req);
    let route = match route_of_in(req.uri().path(), req.headers(), req.uri(), st.mgr.domain()) {
        Ok(Some(r)) => r,
        Ok(None) => {
            // No routing headers: a secured sandbox's envd token alone names
            // it (the SDK's static `Sandbox.connect` sends only the token),
            // and so does the signature of a signed file URL.
            let by_token = match &token {
                Some(t) if !is_lifecycle_path(req.uri().path()) => st.mgr.sandbox_by_envd_token(t),
                _ => None,
            };
            let by_signature = || {
                let (q, op) = signed.as_ref()?;
                st.mgr.envd_tokens().into_iter().find_map(|(id, t)| {
                    files::verify_signature(q, *op, &t, 0, false)
                        .is_ok()
                        .then_some(id)
                })
            };
            match by_token.or_else(by_signature) {
                Some(sandbox_id) => Route {
                    sandbox_id,
                    port: ENVD_PORT as u16,
                },
                None if signed.is_some() => {
                    // A signed URL that no sandbox's token made.
                    return unauthorized("invalid signature");
                }
                None => return next.run(req).await,
            }
        }
        Err(e) => return e.into_response(),
    };
    // A request that has already been through stasis this many times is
    // going round in a loop (e.g. a `{port}-{id}.{domain}` Host that leads
    // back to this server): stop it here instead of at the last descriptor.
    let hops = stasis_hops(req.headers());
    if hops >= MAX_STASIS_HOPS {
        return ApiError::new(
            StatusCode::LOOP_DETECTED,
            format!("request loop: it has already passed through stasis {hops} times"),
        )
        .into_response();
    }
    // A secured sandbox's envd port takes a signed file URL instead of the
    // token: a valid, unexpired signature made with its token passes (the
    // agent checks it again); a bad one is answered with envd's message.
    let mut token = token;
    if u32::from(route.port) == ENVD_PORT && req.uri().path() == "/files" {
        let real = st
            .mgr
            .envd_tokens()
            .into_iter()
            .find_map(|(id, t)| (id == route.sandbox_id).then_some(t));
        if let Some(real) = real {
            let header_ok = token.as_deref().is_some_and(|t| files::ct_eq(t, &real));
            if !header_ok && token.is_none() {
                let checked = match &signed {
                    Some((q, op)) => {
                        files::verify_signature(q, *op, &real, files::unix_now(), true)
                    }
                    None => Err(files::Error::Unauthorized(
                        "missing signature query parameter".into(),
                    )),
                };
                match checked {
                    Ok(()) => token = Some(real),
                    Err(e) => return e.into_response(),
                }
            }
        }
    }
    // A sandbox created with `allowPublicTraffic: false` takes traffic to
    // its user ports only with its traffic access token; `maskRequestHost`
    // replaces the Host the sandbox sees.
    let mut req = req;
    match st
        .mgr
        .traffic_check(&route.sandbox_id, route.port, req.headers())
    {
        Ok(Some(host)) => match HeaderValue::from_str(&host) {
            Ok(v) => {
                req.headers_mut().insert(header::HOST, v);
            }
            Err(_) => return bad_gateway(format!("masked host {host:?} is not a valid Host")),
        },
        Ok(None) => {}
        Err(e) => return e.into_response(),
    }
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // A paused sandbox created with autoResume wakes up for its traffic.
    // On its own task: a client that hangs up does not cut a resume short.
    let (mgr, id, port, tok) = (
        st.mgr.clone(),
        route.sandbox_id.clone(),
        route.port,
        token.clone(),
    );
    let resumed = tokio::spawn(async move { mgr.auto_resume(&id, port, tok.as_deref()).await })
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("auto-resume task failed: {e}"))));
    if let Err(e) = resumed {
        return e.into_response();
    }
    let target = match st
        .mgr
        .proxy_target(&route.sandbox_id, route.port, token.as_deref())
    {
        Ok(t) => t,
        Err(e) => {
            if let Some(suppressed) = log_gate(&route.sandbox_id) {
                tracing::info!(sandbox = %route.sandbox_id, port = route.port, %method, path, status = e.status.as_u16(), suppressed, "proxy refused: {}", e.message);
            }
            return e.into_response();
        }
    };
    match forward(&target, &route, req).await {
        Ok(resp) => {
            st.mgr.agent_reachable(&route.sandbox_id, route.port, None);
            if let Some(suppressed) = log_gate(&route.sandbox_id) {
                tracing::info!(
                    sandbox = %route.sandbox_id,
                    port = route.port,
                    %method,
                    path,
                    status = resp.status().as_u16(),
                    ms = started.elapsed().as_millis() as u64,
                    suppressed,
                    "proxied"
                );
            }
            resp
        }
        Err(msg) => {
            st.mgr
                .agent_reachable(&route.sandbox_id, route.port, Some(&msg));
            if let Some(suppressed) = log_gate(&route.sandbox_id) {
                tracing::warn!(sandbox = %route.sandbox_id, port = route.port, %method, path, suppressed, "proxy failed: {msg}");
            }
            bad_gateway(format!("sandbox {}: {msg}", route.sandbox_id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn log_lines_are_limited_per_sandbox_and_second() {
        let l = LogLimiter::default();
        for _ in 0..3 {
            assert_eq!(l.allow("a", 100, 3), Some(0));
        }
        assert_eq!(l.allow("a", 100, 3), None);
        assert_eq!(l.allow("a", 100, 3), None);
        // Another sandbox has its own budget.
        assert_eq!(l.allow("b", 100, 3), Some(0));
        // The next second: allowed again, with the count left out.
        assert_eq!(l.allow("a", 101, 3), Some(2));
        assert_eq!(l.allow("a", 101, 3), Some(0));
    }

    #[test]
    fn host_routing_is_confined_to_the_domain() {
        let u: Uri = "/".parse().unwrap();
        let h = |host: &'static str| hm(&[("host", host)]);
        let r = route_of_in("/", &h("80-abc.sandbox.test"), &u, Some("sandbox.test")).unwrap();
        assert_eq!(r.map(|r| r.port), Some(80));
        let r = route_of_in(
            "/",
            &h("80-abc.SANDBOX.test.:8443"),
            &u,
            Some("sandbox.test."),
        );
        assert_eq!(r.unwrap().map(|r| r.port), Some(80));
        for host in ["80-abc.other.test", "80-abc.a.sandbox.test", "80-abc.test"] {
            let e = route_of_in("/", &h(host), &u, Some("sandbox.test")).unwrap_err();
            assert_eq!(e.status, StatusCode::MISDIRECTED_REQUEST, "{host}");
        }
        // Not routing-shaped: the API's; headers route whatever the Host.
        assert_eq!(
            route_of_in("/", &h("api.other.test"), &u, Some("sandbox.test")).unwrap(),
            None
        );
        let hd = hm(&[
            ("host", "x.other.test"),
            ("novita-sandbox-id", "abc"),
            ("novita-sandbox-port", "8080"),
        ]);
        assert!(route_of_in("/", &hd, &u, Some("sandbox.test"))
            .unwrap()
            .is_some());
        // Without a domain, any domain routes.
        assert!(route_of_in("/", &h("80-abc.other.test"), &u, None)
            .unwrap()
            .is_some());
    }

    #[test]
    fn routes_by_headers_and_host() {
        let u: Uri = "/files".parse().unwrap();
        let r = route_of(
            "/files",
            &hm(&[
                ("novita-sandbox-id", "abc"),
                ("novita-sandbox-port", "49983"),
            ]),
            &u,
        )
        .unwrap();
        assert_eq!(
            r,
            Some(Route {
                sandbox_id: "abc".into(),
                port: 49983
            })
        );
        // The SDK's connect call carries the headers on a lifecycle route.
        let h = hm(&[
            ("novita-sandbox-id", "abc"),
            ("novita-sandbox-port", "49983"),
        ]);
        assert_eq!(route_of("/sandboxes/abc/connect", &h, &u).unwrap(), None);
        // ... but any path goes to a user port.
        let h = hm(&[
            ("novita-sandbox-id", "abc"),
            ("novita-sandbox-port", "8080"),
        ]);
        assert_eq!(
            route_of("/sandboxes", &h, &u).unwrap().map(|r| r.port),
            Some(8080)
        );
        assert!(route_of("/", &hm(&[("novita-sandbox-id", "abc")]), &u).is_err());
        let h = hm(&[("novita-sandbox-id", "abc"), ("novita-sandbox-port", "x")]);
        assert!(route_of("/", &h, &u).is_err());

        let h = hm(&[("host", "8080-abc123.sandbox.example.com")]);
        assert_eq!(
            route_of("/", &h, &u).unwrap(),
            Some(Route {
                sandbox_id: "abc123".into(),
                port: 8080
            })
        );
        let h = hm(&[("host", "49983-abc.localhost:3000")]);
        assert_eq!(route_of("/", &h, &u).unwrap().map(|r| r.port), Some(49983));
        for host in [
            "127.0.0.1:3000",
            "localhost:3000",
            "api.example.com",
            "8080-abc",
            "x8080-abc.example.com",
            "99999-abc.example.com",
            "0-abc.example.com",
            "80-a/b.example.com",
        ] {
            let h = HeaderMap::from_iter([(header::HOST, HeaderValue::from_str(host).unwrap())]);
            assert_eq!(route_of("/", &h, &u).unwrap(), None, "{host}");
        }
    }

    #[test]
    fn stasis_hops_are_counted_from_via() {
        let mut h = HeaderMap::new();
        assert_eq!(stasis_hops(&h), 0);
        h.append(
            header::VIA,
            HeaderValue::from_static("1.0 fred, 1.1 stasis"),
        );
        h.append(
            header::VIA,
            HeaderValue::from_static("1.1 stasis , 1.1 other"),
        );
        assert_eq!(stasis_hops(&h), 2);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = hm(&[
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("content-type", "application/json"),
            ("x-access-token", "t"),
        ]);
        strip_hop_by_hop(&mut h, &[]);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "te", "x-access-token"]);
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn stripping_keeps_the_order_of_the_rest() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("a-first", "1"),
            ("upgrade", "h2c"),
            ("b-second", "2"),
            ("connection", "upgrade, x-gone"),
            ("x-gone", "g"),
            ("c-third", "3"),
            ("b-second", "2b"),
            ("te", "deflate"),
            ("d-fourth", "4"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h, &[]);
        let got: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let want = [
            ("a-first", "1"),
            ("b-second", "2"),
            ("b-second", "2b"),
            ("c-third", "3"),
            ("d-fourth", "4"),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
        let mut up = HeaderMap::new();
        up.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        up.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_of(&up).unwrap(), "websocket");
        up.insert("connection", HeaderValue::from_static("keep-alive"));
        assert_eq!(upgrade_of(&up), None);
    }

    #[tokio::test]
    async fn gate_closes_waiters() {
        let g = Gate::new();
        let w = g.closed();
        assert!(!g.is_closed());
        g.close();
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap();
        // Closed before waiting: completes at once.
        tokio::time::timeout(Duration::from_secs(5), g.closed())
            .await
            .unwrap();
    }
}
