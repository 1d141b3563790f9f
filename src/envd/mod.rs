//! The in-guest agent `stasis-envd`: the "envd" API that the SDK's
//! in-sandbox calls speak (commands, files, filesystem), served over HTTP/1.1
//! on vsock in a guest, or on a Unix socket / TCP on a host for tests.
//!
//! This module owns the agent's state ([`Agent`]: processes, watchers,
//! users), its HTTP routes ([`router`]) and the dispatch of the Connect RPC
//! services `process.Process` and `filesystem.Filesystem`. Submodules: the
//! Connect protocol (`connect`), processes (`process`), filesystem RPCs and
//! watches (`filesystem`), the file up/download API (`files`), users and
//! paths (`users`), non-blocking fds (`fdio`) and listeners (`listen`).
//!
//! [`VERSION`] is the envd version the agent claims: 0.5.7, the newest the
//! SDK (novita-sandbox 2.1.1) distinguishes. It enables recursive watches
//! (0.1.4), `stdin=False` for commands (0.3.0), no default user sent by the
//! SDK (0.4.0: the agent picks it) and octet-stream uploads (0.5.7), all
//! of which the agent implements.

pub mod connect;
mod fdio;
pub mod files;
pub mod filesystem;
pub mod interpreter;
pub mod listen;
pub mod process;
pub mod users;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use connect::{Code, Kind, Msg, RpcError};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use users::User;

/// The envd version the agent reports (see the module docs).
pub const VERSION: &str = "0.5.7";

/// The generated protobuf messages of the two services.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `process.proto`.
    pub mod process {
        include!(concat!(env!("OUT_DIR"), "/process.rs"));
        include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
    }
    /// `filesystem.proto`.
    pub mod filesystem {
        include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
        include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
    }
}

use proto::filesystem as fsp;
use proto::process as pp;

/// How the agent runs.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// On a host (tests): processes run as the agent's own user whatever
    /// user a request names, with `root` as home and default cwd.
    pub host_mode: bool,
    /// Host mode only: the home directory / default cwd of every request.
    pub root: Option<PathBuf>,
    /// The user for requests that name none; unset: `user` if it exists,
    /// else `root`.
    pub default_user: Option<String>,
}

/// The agent's state, shared by all connections.
pub struct Agent {
    cfg: Config,
    procs: Arc<process::Manager>,
    watchers: filesystem::Watchers,
    envs: RwLock<HashMap<String, String>>,
    /// envd's access token, set by `POST /init` (secured sandboxes).
    token: RwLock<Option<String>>,
}

impl Agent {
    /// A new agent.
    pub fn new(cfg: Config) -> Arc<Agent> {
        Arc::new(Agent {
            cfg,
            procs: Arc::default(),
            watchers: filesystem::Watchers::default(),
            envs: RwLock::default(),
            token: RwLock::default(),
        })
    }

    /// The access token `/init` set, if any.
    pub fn access_token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The user named by the request's Authorization header, if any.
    pub fn header_user(&self, headers: &HeaderMap) -> Result<Option<String>, RpcError> {
        match headers.get(header::AUTHORIZATION) {
            None => Ok(None),
            Some(v) => users::user_from_basic_auth(v.to_str().unwrap_or(""))
                .map_err(|e| RpcError::new(Code::InvalidArgument, e.to_string())),
        }
    }

    /// The user a request runs as.
    pub fn user(&self, name: Option<&str>) -> Result<User, RpcError> {
        if self.cfg.host_mode {
            let mut u = users::current();
            if let Some(root) = &self.cfg.root {
                u.home = root.clone();
            }
            return Ok(u);
        }
        let name = match name.or(self.cfg.default_user.as_deref()) {
            Some(n) => n.to_string(),
            None if users::lookup("user").is_some() => "user".into(),
            None => "root".into(),
        };
        users::lookup(&name).ok_or_else(|| {
            RpcError::new(
                Code::InvalidArgument,
                users::Error::NoSuchUser(name).to_string(),
            )
        })
    }

    fn request_user(&self, headers: &HeaderMap) -> Result<User, RpcError> {
        let name = self.header_user(headers)?;
        self.user(name.as_deref())
    }

    fn path(&self, user: &User, p: &str) -> Result<PathBuf, RpcError> {
        users::resolve(p, &user.home)
            .map_err(|e| RpcError::new(Code::InvalidArgument, e.to_string()))
    }

    fn global_envs(&self) -> HashMap<String, String> {
        self.envs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The agent's HTTP routes.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route("/files", get(files::download).post(files::upload))
        .route("/init", post(init))
        .route("/envs", get(envs))
        .route("/{service}/{method}", post(rpc))
        .layer(axum::middleware::from_fn_with_state(agent.clone(), auth))
        .with_state(agent)
}

/// envd's access rule once `/init` gave the agent a token: every request
/// carries it in `X-Access-Token` (401 otherwise), except `GET /health`,
/// `/files` (which also take a signed URL, checked there) and `POST /init`
/// (which checks it itself).
async fn auth(
    State(agent): State<Arc<Agent>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = agent.access_token() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health" || path == "/files" || path == "/init" {
        return next.run(req).await;
    }
    let sent = req
        .headers()
        .get("x-access-token")
        .and_then(|v| v.to_str().ok());
    if sent.is_some_and(|s| files::ct_eq(s, &token)) {
        return next.run(req).await;
    }
    files::Error::Unauthorized(
        "unauthorized access, please provide a valid access token or method signing if supported"
            .into(),
    )
    .into_response()
}

/// `POST /init`: `{"envVars": {..}, "accessToken": ".."}` sets variables
/// for every process started afterwards and the access token (what the
/// orchestrator sends envd at boot). Once a token is set, `/init` itself
/// needs it in `X-Access-Token`.
async fn init(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(token) = agent.access_token() {
        let sent = headers.get("x-access-token").and_then(|v| v.to_str().ok());
        if !sent.is_some_and(|s| files::ct_eq(s, &token)) {
            return files::Error::Unauthorized(
                "the agent is initialized: /init needs its access token in X-Access-Token".into(),
            )
            .into_response();
        }
    }
    if body.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    #[derive(serde::Deserialize)]
    struct Init {
        #[serde(rename = "envVars", default)]
        env_vars: HashMap<String, String>,
        #[serde(rename = "accessToken", default)]
        access_token: Option<String>,
        /// Hex: fresh entropy for a sandbox resumed from a shared snapshot.
        #[serde(default)]
        entropy: Option<String>,
    }
    match serde_json::from_slice::<Init>(&body) {
        Ok(i) => {
            if let Some(hex) = &i.entropy {
                let bytes = match decode_hex(hex) {
                    Some(b) if !b.is_empty() && b.len() <= MAX_ENTROPY => b,
                    _ => {
                        return files::Error::BadRequest(format!(
                            "entropy must be 1..={MAX_ENTROPY} bytes of hex"
                        ))
                        .into_response()
                    }
                };
                match add_entropy_and_reseed(&bytes) {
                    Ok(how) => tracing::info!(
                        "stasis-envd: fresh entropy: {} bytes mixed into the kernel RNG ({how})",
                        bytes.len()
                    ),
                    Err(e) => {
                        return files::Error::BadRequest(format!("adding entropy failed: {e}"))
                            .into_response()
                    }
                }
            }
            agent
                .envs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .extend(i.env_vars);
            if let Some(t) = i.access_token.filter(|t| !t.is_empty()) {
                *agent.token.write().unwrap_or_else(|p| p.into_inner()) = Some(t);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => files::Error::BadRequest(format!("invalid /init body: {e}")).into_response(),
    }
}

/// `GET /envs`: the variables set by `/init`.
async fn envs(State(agent): State<Arc<Agent>>) -> Response {
    axum::Json(agent.global_envs()).into_response()
}

/// Decodes a unary request, runs `f`, encodes its result.
async fn unary<Req: Msg, Resp: Msg>(
    kind: Kind,
    body: &[u8],
    f: impl AsyncFnOnce(Req) -> Result<Resp, RpcError>,
) -> Response {
    if kind.stream {
        let e = RpcError::new(
            Code::InvalidArgument,
            "this method is unary: send application/json or application/proto",
        );
        return connect::stream_error(kind.codec, e);
    }
    match kind.codec.decode::<Req>(body) {
        Ok(req) => connect::unary_response(kind.codec, f(req).await),
        Err(e) => connect::error_response(&e),
    }
}

/// Decodes a server-streaming request.
fn stream_request<Req: Msg>(kind: Kind, body: &[u8]) -> Result<Req, RpcError> {
    if !kind.stream {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "this method streams: send application/connect+json or application/connect+proto",
        ));
    }
    kind.codec.decode(connect::single_envelope(body)?)
}

/// The reply to a streaming request that failed before streaming.
fn stream_failed(kind: Kind, e: RpcError) -> Response {
    if kind.stream {
        connect::stream_error(kind.codec, e)
    } else {
        connect::error_response(&e)
    }
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn keepalive_timer(headers: &HeaderMap) -> Option<tokio::time::Interval> {
    connect::keepalive(headers).map(|d| tokio::time::interval_at(Instant::now() + d, d))
}

fn deadline_error(what: &str, d: Option<Duration>) -> RpcError {
    RpcError::new(
        Code::DeadlineExceeded,
        format!(
            "{what}: the request's timeout of {:?} passed",
            d.unwrap_or_default()
        ),
    )
}

/// Streams a process subscription as `R`s (StartResponse or
/// ConnectResponse), with keepalives; at the deadline, `kill` (Start's
/// process) is killed and the stream fails with deadline_exceeded.
fn process_stream<R: Msg>(
    kind: Kind,
    headers: &HeaderMap,
    mut sub: mpsc::Receiver<pp::process_event::Event>,
    kill: Option<Arc<process::Proc>>,
    wrap: fn(pp::ProcessEvent) -> R,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<R, RpcError>>(16);
    let mut ka = keepalive_timer(headers);
    let timeout = connect::timeout(headers);
    let deadline = timeout.map(|d| Instant::now() + d);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = sub.recv() => {
                    let Some(ev) = ev else { break };
                    let end = matches!(ev, pp::process_event::Event::End(_));
                    if tx.send(Ok(wrap(pp::ProcessEvent { event: Some(ev) }))).await.is_err() || end {
                        break;
                    }
                }
                _ = tick(&mut ka) => {
                    let ev = pp::process_event::Event::Keepalive(pp::process_event::KeepAlive {});
                    if tx.send(Ok(wrap(pp::ProcessEvent { event: Some(ev) }))).await.is_err() {
                        break;
                    }
                }
                _ = until(deadline) => {
                    let what = match &kill {
                        Some(p) => {
                            let _ = p.signal(libc::SIGKILL);
                            format!("process {} was killed", p.pid())
                        }
                        None => "stream closed".to_string(),
                    };
                    let _ = tx.send(Err(deadline_error(&what, timeout))).await;
                    break;
                }
                _ = tx.closed() => break,
            }
        }
    });
    connect::stream_response(kind.codec, rx)
}

/// `POST /<service>/<method>`: the Connect RPCs.
async fn rpc(
    State(agent): State<Arc<Agent>>,
    UrlPath((service, method)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(kind) = Kind::from_content_type(ct) else {
        let e = RpcError::new(
            Code::InvalidArgument,
            format!("unsupported content-type '{ct}' for a Connect RPC"),
        );
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            connect::error_response(&e),
        )
            .into_response();
    };
    let enc_header = if kind.stream {
        "connect-content-encoding"
    } else {
        "content-encoding"
    };
    if let Some(enc) = headers.get(enc_header).and_then(|v| v.to_str().ok()) {
        if !enc.eq_ignore_ascii_case("identity") {
            let e = RpcError::new(
                Code::Unimplemented,
                format!("{enc_header} '{enc}' is not supported; send identity"),
            );
            return stream_failed(kind, e);
        }
    }
    if (service.as_str(), method.as_str()) == ("process.Process", "StreamInput") {
        return stream_input(agent, kind, req.into_body()).await;
    }
    let body = match axum::body::to_bytes(req.into_body(), connect::MAX_MESSAGE).await {
        Ok(b) => b,
        Err(e) => {
            let e = RpcError::new(Code::ResourceExhausted, format!("reading the request: {e}"));
            return stream_failed(kind, e);
        }
    };
    let a = &agent;
    let h = &headers;
    match (service.as_str(), method.as_str()) {
        ("process.Process", "List") => {
            unary(kind, &body, async |_: pp::ListRequest| {
                Ok(pp::ListResponse {
                    processes: a.procs.list(),
                })
            })
            .await
        }
        ("process.Process", "Start") => {
            let r = stream_request::<pp::StartRequest>(kind, &body).and_then(|req| {
                let user = a.request_user(h)?;
                let how = process::Spawn {
                    user: &user,
                    envs: a.global_envs(),
                };
                a.procs.start(req, how)
            });
            match r {
                Ok((proc, sub)) => process_stream(kind, h, sub, Some(proc), |e| {
                    pp::StartResponse { event: Some(e) }
                }),
                Err(e) => stream_failed(kind, e),
            }
        }
        ("process.Process", "Connect") => {
            let r = stream_request::<pp::ConnectRequest>(kind, &body)
                .and_then(|req| a.procs.find(req.process.as_ref()));
            match r {
                Ok(proc) => process_stream(kind, h, proc.subscribe(), None, |e| {
                    pp::ConnectResponse { event: Some(e) }
                }),
                Err(e) => stream_failed(kind, e),
            }
        }
        ("process.Process", "Update") => {
            unary(kind, &body, async |req: pp::UpdateRequest| {
                let size = req.pty.and_then(|p| p.size).ok_or_else(|| {
                    RpcError::new(
                        Code::InvalidArgument,
                        "only pty size updates are supported; pty.size is missing",
                    )
                })?;
                a.procs.resize(req.process.as_ref(), size.rows, size.cols)?;
                Ok(pp::UpdateResponse {})
            })
            .await
        }
        ("process.Process", "SendInput") => {
            unary(kind, &body, async |req: pp::SendInputRequest| {
                a.procs.send_input(req.process.as_ref(), req.input).await?;
                Ok(pp::SendInputResponse {})
            })
            .await
        }
        ("process.Process", "SendSignal") => {
            unary(kind, &body, async |req: pp::SendSignalRequest| {
                let sig = match pp::Signal::try_from(req.signal) {
                    Ok(pp::Signal::Sigterm) => libc::SIGTERM,
                    Ok(pp::Signal::Sigkill) => libc::SIGKILL,
                    _ => {
                        return Err(RpcError::new(
                            Code::InvalidArgument,
                            format!("unsupported signal {}", req.signal),
                        ))
                    }
                };
                let proc = a.procs.find(req.process.as_ref())?;
                proc.signal(sig).map_err(|e| {
                    RpcError::new(
                        Code::Internal,
                        format!("signalling process {}: {e}", proc.pid()),
                    )
                })?;
                Ok(pp::SendSignalResponse {})
            })
            .await
        }
        ("process.Process", "CloseStdin") => {
            unary(kind, &body, async |req: pp::CloseStdinRequest| {
                a.procs.close_stdin(req.process.as_ref()).await?;
                Ok(pp::CloseStdinResponse {})
            })
            .await
        }
        ("filesystem.Filesystem", "Stat") => {
            unary(kind, &body, async |req: fsp::StatRequest| {
                let user = a.request_user(h)?;
                let entry = filesystem::entry_info(&a.path(&user, &req.path)?)?;
                Ok(fsp::StatResponse { entry: Some(entry) })
            })
            .await
        }
        ("filesystem.Filesystem", "MakeDir") => {
            unary(kind, &body, async |req: fsp::MakeDirRequest| {
                let user = a.request_user(h)?;
                let entry = filesystem::make_dir(&a.path(&user, &req.path)?, &user)?;
                Ok(fsp::MakeDirResponse { entry: Some(entry) })
            })
            .await
        }
        ("filesystem.Filesystem", "Move") => {
            unary(kind, &body, async |req: fsp::MoveRequest| {
                let user = a.request_user(h)?;
                let (src, dst) = (
                    a.path(&user, &req.source)?,
                    a.path(&user, &req.destination)?,
                );
                let entry = filesystem::move_entry(&src, &dst, &user)?;
                Ok(fsp::MoveResponse { entry: Some(entry) })
            })
            .await
        }
        ("filesystem.Filesystem", "ListDir") => {
            unary(kind, &body, async |req: fsp::ListDirRequest| {
                let user = a.request_user(h)?;
                let dir = a.path(&user, &req.path)?;
                let entries =
                    tokio::task::spawn_blocking(move || filesystem::list_dir(&dir, req.depth))
                        .await
                        .map_err(|e| RpcError::new(Code::Internal, e.to_string()))??;
                Ok(fsp::ListDirResponse { entries })
            })
            .await
        }
        ("filesystem.Filesystem", "Remove") => {
            unary(kind, &body, async |req: fsp::RemoveRequest| {
                let user = a.request_user(h)?;
                let path = a.path(&user, &req.path)?;
                tokio::task::spawn_blocking(move || filesystem::remove(&path))
                    .await
                    .map_err(|e| RpcError::new(Code::Internal, e.to_string()))??;
                Ok(fsp::RemoveResponse {})
            })
            .await
        }
        ("filesystem.Filesystem", "WatchDir") => {
            let r = stream_request::<fsp::WatchDirRequest>(kind, &body).and_then(|req| {
                let user = a.request_user(h)?;
                filesystem::Watch::new(&a.path(&user, &req.path)?, req.recursive)
            });
            match r {
                Ok(w) => watch_stream(kind, h, w),
                Err(e) => stream_failed(kind, e),
            }
        }
        ("filesystem.Filesystem", "CreateWatcher") => {
            unary(kind, &body, async |req: fsp::CreateWatcherRequest| {
                let user = a.request_user(h)?;
                let id = a
                    .watchers
                    .create(&a.path(&user, &req.path)?, req.recursive)?;
                Ok(fsp::CreateWatcherResponse { watcher_id: id })
            })
            .await
        }
        ("filesystem.Filesystem", "GetWatcherEvents") => {
            unary(kind, &body, async |req: fsp::GetWatcherEventsRequest| {
                Ok(fsp::GetWatcherEventsResponse {
                    events: a.watchers.take(&req.watcher_id)?,
                })
            })
            .await
        }
        ("filesystem.Filesystem", "RemoveWatcher") => {
            unary(kind, &body, async |req: fsp::RemoveWatcherRequest| {
                a.watchers.remove(&req.watcher_id)?;
                Ok(fsp::RemoveWatcherResponse {})
            })
            .await
        }
        (s, m) => {
            let e = RpcError::new(Code::Unimplemented, format!("unknown method /{s}/{m}"));
            stream_failed(kind, e)
        }
    }
}

/// WatchDir: a start event, then filesystem events as they happen.
fn watch_stream(kind: Kind, headers: &HeaderMap, mut w: filesystem::Watch) -> Response {
    let (tx, rx) = mpsc::channel::<Result<fsp::WatchDirResponse, RpcError>>(16);
    let mut ka = keepalive_timer(headers);
    let timeout = connect::timeout(headers);
    let deadline = timeout.map(|d| Instant::now() + d);
    tokio::spawn(async move {
        use fsp::watch_dir_response::{Event, KeepAlive, StartEvent};
        let msg = |e| Ok(fsp::WatchDirResponse { event: Some(e) });
        if tx.send(msg(Event::Start(StartEvent {}))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                batch = w.next() => match batch {
                    Ok(events) => {
                        for ev in events {
                            if tx.send(msg(Event::Filesystem(ev))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(RpcError::new(Code::Internal, format!("reading inotify: {e}")))).await;
                        return;
                    }
                },
                _ = tick(&mut ka) => {
                    if tx.send(msg(Event::Keepalive(KeepAlive {}))).await.is_err() {
                        return;
                    }
                }
                _ = until(deadline) => {
                    let _ = tx.send(Err(deadline_error("watch closed", timeout))).await;
                    return;
                }
                _ = tx.closed() => return,
            }
        }
    });
    connect::stream_response(kind.codec, rx)
}

/// StreamInput (client streaming): a start message selecting the process,
/// then data messages whose input is written to it, as they arrive.
async fn stream_input(agent: Arc<Agent>, kind: Kind, body: Body) -> Response {
    use pp::stream_input_request::Event;
    if !kind.stream {
        return connect::error_response(&RpcError::new(
            Code::InvalidArgument,
            "StreamInput streams: send application/connect+json or application/connect+proto",
        ));
    }
    let res: Result<(), RpcError> = async {
        let mut body = body.into_data_stream();
        let mut buf = bytes::BytesMut::new();
        let mut proc_sel: Option<pp::ProcessSelector> = None;
        loop {
            while let Some((flags, data, used)) = connect::parse_envelope(&buf)? {
                if flags & connect::COMPRESSED != 0 {
                    return Err(RpcError::new(
                        Code::Unimplemented,
                        "compressed messages are not supported",
                    ));
                }
                let msg: pp::StreamInputRequest = kind.codec.decode(data)?;
                let _ = buf.split_to(used);
                match msg.event {
                    Some(Event::Start(s)) => {
                        agent.procs.find(s.process.as_ref())?;
                        proc_sel = s.process;
                    }
                    Some(Event::Data(d)) => {
                        let Some(sel) = proc_sel.as_ref() else {
                            return Err(RpcError::new(
                                Code::FailedPrecondition,
                                "data before the start message",
                            ));
                        };
                        agent.procs.send_input(Some(sel), d.input).await?;
                    }
                    Some(Event::Keepalive(_)) | None => {}
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(RpcError::new(
                        Code::Canceled,
                        format!("reading the request: {e}"),
                    ))
                }
                None if buf.is_empty() => return Ok(()),
                None => {
                    return Err(RpcError::new(
                        Code::InvalidArgument,
                        "the request ends inside a message",
                    ))
                }
            }
        }
    }
    .await;
    let (tx, rx) = mpsc::channel(2);
    let _ = tx.try_send(res.map(|()| pp::StreamInputResponse {}));
    drop(tx);
    connect::stream_response(kind.codec, rx)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, Instant};

    /// Polls `cond` until it holds, failing after a generous deadline.
    pub async fn poll(mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < end, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Most entropy one `/init` may carry.
const MAX_ENTROPY: usize = 512;

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Mixes `bytes` into the kernel's entropy pool and reseeds its CRNG, so
/// that `/dev/urandom` (and every process seeded from it after this, such
/// as a new Python interpreter's `random`) differs between sandboxes
/// resumed from one snapshot: `RNDADDENTROPY` (credited; needs
/// CAP_SYS_ADMIN, which the agent has as the guest's init-started root),
/// then `RNDRESEEDCRNG`. Without the capability the bytes are written to
/// `/dev/urandom` (mixed in, not credited) and the reseed is left to the
/// kernel. Returns what was done.
pub fn add_entropy_and_reseed(bytes: &[u8]) -> std::io::Result<&'static str> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    // _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` is a valid rand_pool_info of buf_size bytes of data,
    // alive for the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        f.write_all(bytes)?;
        return Ok("written to /dev/urandom, not credited");
    }
    // SAFETY: an argument-less ioctl on our own descriptor.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
    Ok(if rc == 0 {
        "RNDADDENTROPY + RNDRESEEDCRNG"
    } else {
        "RNDADDENTROPY; reseed refused"
    })
}

#[cfg(test)]
mod entropy_tests {
    use super::*;

    #[test]
    fn entropy_is_mixed_in_and_bad_hex_is_refused() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 0xff, 0x10]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        let bytes: Vec<u8> = (0..64).map(|i| i as u8 ^ 0x5a).collect();
        let how = add_entropy_and_reseed(&bytes).expect("adding entropy");
        assert!(!how.is_empty());
    }
}
