//! The envd HTTP file API: `GET /files?path=&username=` downloads a file
//! (streamed), `POST /files` uploads one or more files, as
//! `multipart/form-data` (each part's filename is its path, or the `path`
//! parameter for a single file) or as `application/octet-stream` (the
//! body is the file at `path`). Missing parent directories are created.
//! Errors are JSON `{"code": <http status>, "message"}`: 400 bad request,
//! 404 missing file, 507 out of disk space, 500 otherwise.
//!
//! As E2B's envd:
//! - **Compression**: an upload (either form) with `Content-Encoding: gzip`
//!   is decompressed as it streams in (a malformed or truncated gzip body is
//!   a 400 and leaves no partial file); other codings than `identity` are a
//!   415. A download whose `Accept-Encoding` prefers `gzip` (RFC 9110
//!   quality values; httpx and browsers send it by default) is sent
//!   gzip-compressed (fast level) without a `Content-Length`.
//! - **Signed URLs**: once the agent has an access token (`POST /init`
//!   `{"accessToken"}`), a `/files` request needs either that token in
//!   `X-Access-Token` or a `signature` made by the SDK's `get_signature`:
//!   `"v1_" + base64(sha256("{path}:{read|write}:{username}:{token}[:{expiration}]"))`
//!   without padding, over the raw `path` and `username` query values (empty
//!   username when absent), with `signature_expiration` (Unix seconds) when
//!   the URL carries one. Failures are 401 with envd's messages: "missing
//!   signature query parameter", "invalid signature", "signature is already
//!   expired", "access token present in header but does not match".

use crate::envd::users::{self, User};
use crate::envd::Agent;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Errors of the file API, each with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// The file doesn't exist.
    #[error("path '{0}' does not exist")]
    NotFound(String),
    /// The disk is full.
    #[error("not enough disk space to write '{0}'")]
    NoSpace(String),
    /// Not allowed.
    #[error("permission denied: {0}")]
    Forbidden(String),
    /// The upload's content encoding isn't supported.
    #[error("{0}")]
    Unsupported(String),
    /// No encoding the client accepts can be produced.
    #[error("{0}")]
    NotAcceptable(String),
    /// A missing, wrong or expired signature or token.
    #[error("{0}")]
    Unauthorized(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn io(path: &Path, e: &std::io::Error) -> Error {
        let p = path.display().to_string();
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(p),
            std::io::ErrorKind::PermissionDenied => Error::Forbidden(format!("'{p}': {e}")),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                Error::NoSpace(p)
            }
            std::io::ErrorKind::IsADirectory => {
                Error::BadRequest(format!("path '{p}' is a directory"))
            }
            std::io::ErrorKind::NotADirectory => {
                Error::BadRequest(format!("a parent of '{p}' is not a directory"))
            }
            _ => Error::Internal(format!("'{p}': {e}")),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({"code": status.as_u16(), "message": self.to_string()});
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// The operation a signature is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Downloads (`GET`).
    Read,
    /// Uploads (`POST`).
    Write,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// The signature novita-sandbox 2.1.1's `get_signature` makes (see the
/// module docs).
pub fn signature(path: &str, op: Op, user: &str, token: &str, expiration: Option<i64>) -> String {
    use base64::Engine;
    use sha2::Digest;
    let raw = match expiration {
        Some(e) => format!("{path}:{}:{user}:{token}:{e}", op.as_str()),
        None => format!("{path}:{}:{user}:{token}", op.as_str()),
    };
    let digest = sha2::Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

pub use crate::ct_eq;

/// Checks a `/files` request's signature query parameters against
/// `token` as envd does: the signature first, then its expiration (against
/// `now`, Unix seconds). `check_expiry: false` checks only that the
/// signature was made with `token` (the proxy uses it to route).
pub fn verify_signature(
    q: &HashMap<String, String>,
    op: Op,
    token: &str,
    now: i64,
    check_expiry: bool,
) -> Result<(), Error> {
    let sig = q
        .get("signature")
        .ok_or_else(|| Error::Unauthorized("missing signature query parameter".into()))?;
    let exp = match q.get("signature_expiration") {
        None => None,
        Some(e) => Some(e.trim().parse::<i64>().map_err(|_| {
            Error::BadRequest(format!(
                "invalid signature_expiration {e:?}: expected Unix seconds"
            ))
        })?),
    };
    let path = q.get("path").map(String::as_str).unwrap_or("");
    let user = q.get("username").map(String::as_str).unwrap_or("");
    if !ct_eq(signature(path, op, user, token, exp), sig) {
        return Err(Error::Unauthorized("invalid signature".into()));
    }
    if check_expiry && exp.is_some_and(|e| e < now) {
        return Err(Error::Unauthorized("signature is already expired".into()));
    }
    Ok(())
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// envd's rule for `/files` on an agent with an access token: the token in
/// `X-Access-Token`, or a valid, unexpired signature.
fn authorize(
    agent: &Agent,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    op: Op,
) -> Result<(), Error> {
    let Some(token) = agent.access_token() else {
        return Ok(());
    };
    let sent = headers
        .get("x-access-token")
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty());
    if let Some(sent) = sent {
        return if ct_eq(sent, &token) {
            Ok(())
        } else {
            Err(Error::Unauthorized(
                "access token present in header but does not match".into(),
            ))
        };
    }
    verify_signature(q, op, &token, unix_now(), true)
}

/// Whether a response to a request with these headers should be gzip:
/// the best-quality acceptable coding among `gzip`, `identity` and `*`.
/// `Err`: identity refused and gzip not accepted.
pub fn wants_gzip(headers: &HeaderMap) -> Result<bool, Error> {
    let Some(v) = headers.get(header::ACCEPT_ENCODING) else {
        return Ok(false);
    };
    let v = v.to_str().unwrap_or("");
    let mut codings: Vec<(String, f32)> = v
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            let mut parts = c.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    let val = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))?;
                    val.trim().parse::<f32>().ok()
                })
                .next_back()
                .unwrap_or(1.0);
            (name, q)
        })
        .collect();
    codings.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let identity_refused = codings.iter().any(|(n, q)| n == "identity" && *q <= 0.0);
    for (name, q) in &codings {
        if *q <= 0.0 {
            continue;
        }
        match name.as_str() {
            "gzip" | "x-gzip" => return Ok(true),
            "identity" => return Ok(false),
            "*" => return Ok(identity_refused),
            _ => {}
        }
    }
    if identity_refused {
        Err(Error::NotAcceptable(format!(
            "no acceptable content encoding in {v:?}; supported: gzip, identity"
        )))
    } else {
        Ok(false)
    }
}

/// The upload's content coding: `Ok(true)` for gzip, `Ok(false)` for none.
fn gzip_upload(headers: &HeaderMap) -> Result<bool, Error> {
    let Some(enc) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let enc = enc.to_str().unwrap_or("?").trim();
    if enc.is_empty() || enc.eq_ignore_ascii_case("identity") {
        Ok(false)
    } else if enc.eq_ignore_ascii_case("gzip") || enc.eq_ignore_ascii_case("x-gzip") {
        Ok(true)
    } else {
        Err(Error::Unsupported(format!(
            "unsupported Content-Encoding '{enc}', supported: gzip, identity"
        )))
    }
}

/// Input fed to the gzip decoder at a time: bounds what one step can
/// inflate to (a compression bomb yields many bounded chunks, never one
/// huge buffer).
const INFLATE_STEP: usize = 4096;

type ByteStream = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send>>;

fn malformed_gzip(e: std::io::Error) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("malformed gzip body: {e}"),
    )
}

/// A request body decompressed as it streams; a malformed, truncated or
/// trailing-garbage gzip body ends the stream with an error.
fn gunzip_stream(body: Body) -> ByteStream {
    struct St {
        up: axum::body::BodyDataStream,
        dec: Option<flate2::write::GzDecoder<Vec<u8>>>,
        pending: bytes::Bytes,
    }
    let st = St {
        up: body.into_data_stream(),
        dec: Some(flate2::write::GzDecoder::new(Vec::new())),
        pending: bytes::Bytes::new(),
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        use std::io::Write;
        loop {
            let dec = st.dec.as_mut()?;
            if !st.pending.is_empty() {
                let step = st.pending.split_to(st.pending.len().min(INFLATE_STEP));
                if let Err(e) = dec.write_all(&step) {
                    st.dec = None;
                    return Some((Err(malformed_gzip(e)), st));
                }
                let out = std::mem::take(dec.get_mut());
                if !out.is_empty() {
                    return Some((Ok(bytes::Bytes::from(out)), st));
                }
                continue;
            }
            match st.up.next().await {
                Some(Ok(chunk)) => st.pending = chunk,
                Some(Err(e)) => {
                    st.dec = None;
                    return Some((Err(std::io::Error::other(e.to_string())), st));
                }
                None => {
                    let mut dec = st.dec.take()?;
                    let res = dec.try_finish().and_then(|()| {
                        let out = std::mem::take(dec.get_mut());
                        dec.finish().map(|_| out)
                    });
                    return match res {
                        Ok(out) if out.is_empty() => None,
                        Ok(out) => Some((Ok(bytes::Bytes::from(out)), st)),
                        Err(e) => Some((Err(malformed_gzip(e)), st)),
                    };
                }
            }
        }
    }))
}

/// A file's bytes as a stream, gzip-compressed if `gzip`.
fn file_stream(file: tokio::fs::File, gzip: bool) -> ByteStream {
    use std::io::Write;
    let enc = gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    Box::pin(futures_util::stream::unfold(
        Some((file, enc)),
        |state| async move {
            let (mut f, mut enc) = state?;
            loop {
                let mut buf = vec![0u8; 64 * 1024];
                match f.read(&mut buf).await {
                    Ok(0) => {
                        return match enc {
                            None => None,
                            Some(e) => match e.finish() {
                                Ok(out) => Some((Ok(bytes::Bytes::from(out)), None)),
                                Err(e) => Some((Err(e), None)),
                            },
                        }
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        match enc.as_mut() {
                            None => return Some((Ok(bytes::Bytes::from(buf)), Some((f, enc)))),
                            Some(e) => {
                                if let Err(err) = e.write_all(&buf) {
                                    return Some((Err(err), None));
                                }
                                let out = std::mem::take(e.get_mut());
                                if !out.is_empty() {
                                    return Some((Ok(bytes::Bytes::from(out)), Some((f, enc))));
                                }
                            }
                        }
                    }
                    Err(e) => return Some((Err(e), None)),
                }
            }
        },
    ))
}

fn user_and_path(
    agent: &Agent,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(User, Option<PathBuf>), Error> {
    let name = match q.get("username").filter(|u| !u.is_empty()) {
        Some(u) => Some(u.clone()),
        None => agent
            .header_user(headers)
            .map_err(|e| Error::BadRequest(e.message))?,
    };
    let user = agent
        .user(name.as_deref())
        .map_err(|e| Error::BadRequest(e.message))?;
    let path = match q.get("path").filter(|p| !p.is_empty()) {
        Some(p) => {
            Some(users::resolve(p, &user.home).map_err(|e| Error::BadRequest(e.to_string()))?)
        }
        None => None,
    };
    Ok((user, path))
}

/// `GET /files`.
pub async fn download(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    authorize(&agent, &q, &headers, Op::Read)?;
    let (_, path) = user_and_path(&agent, &q, &headers)?;
    let path = path.ok_or_else(|| Error::BadRequest("the path parameter is required".into()))?;
    let gzip = wants_gzip(&headers)?;
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| Error::io(&path, &e))?;
    if meta.is_dir() {
        return Err(Error::BadRequest(format!(
            "path '{}' is a directory",
            path.display()
        )));
    }
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Error::io(&path, &e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', "_"))
        .unwrap_or_default();
    let mut resp = Response::new(Body::from_stream(file_stream(file, gzip)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::VARY,
        header::HeaderValue::from_static("Accept-Encoding"),
    );
    if gzip {
        h.insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static("gzip"),
        );
    } else {
        h.insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from(meta.len()),
        );
    }
    Ok(resp)
}

/// Writes `chunks` to `path` (creating parents, truncating), owned by
/// `user`. A failed write removes the partial file.
async fn write_file<S, E>(path: &Path, user: &User, mut chunks: S) -> Result<(), Error>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error,
{
    if tokio::fs::metadata(path)
        .await
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Err(Error::BadRequest(format!(
            "path '{}' is a directory",
            path.display()
        )));
    }
    if let Some(parent) = path.parent() {
        let (p, u) = (parent.to_path_buf(), user.clone());
        tokio::task::spawn_blocking(move || crate::envd::filesystem::create_dirs(&p, &u))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::io(parent, &e))?;
    }
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::io(path, &e))?;
    users::chown_to(path, user).map_err(|e| Error::io(path, &e))?;
    let res: Result<(), Error> = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                Error::BadRequest(format!("reading the upload: {}", crate::error_chain(&e)))
            })?;
            f.write_all(&chunk).await.map_err(|e| Error::io(path, &e))?;
        }
        f.flush().await.map_err(|e| Error::io(path, &e))?;
        f.sync_all().await.map_err(|e| Error::io(path, &e))
    }
    .await;
    if res.is_err() {
        drop(f);
        // Free the space a partial regular file holds (never remove a
        // device or anything else that was there).
        if tokio::fs::symlink_metadata(path)
            .await
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            let _ = tokio::fs::remove_file(path).await;
        }
    }
    res
}

fn write_info(path: &Path) -> serde_json::Value {
    serde_json::json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
        "path": path.to_string_lossy(),
    })
}

/// `POST /files`.
pub async fn upload(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    authorize(&agent, &q, &headers, Op::Write)?;
    let (user, path) = user_and_path(&agent, &q, &headers)?;
    let body: ByteStream = if gzip_upload(&headers)? {
        gunzip_stream(body)
    } else {
        Box::pin(
            body.into_data_stream()
                .map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))),
        )
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mut written = Vec::new();
    if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct)
            .map_err(|e| Error::BadRequest(format!("bad multipart Content-Type: {e}")))?;
        let mut mp = multer::Multipart::new(body, boundary);
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::BadRequest(format!(
                        "bad multipart body: {}",
                        crate::error_chain(&e)
                    )))
                }
            };
            let target = match (&path, field.file_name()) {
                (Some(p), _) if written.is_empty() => p.clone(),
                (Some(_), _) => {
                    return Err(Error::BadRequest(
                        "the path parameter names one file; send several files without it".into(),
                    ))
                }
                (None, Some(name)) if !name.is_empty() => users::resolve(name, &user.home)
                    .map_err(|e| Error::BadRequest(e.to_string()))?,
                (None, _) => {
                    return Err(Error::BadRequest(
                        "a multipart file part needs a filename (its path) or the path parameter"
                            .into(),
                    ))
                }
            };
            write_file(&target, &user, field).await?;
            written.push(write_info(&target));
        }
    } else {
        let target = path.ok_or_else(|| {
            Error::BadRequest("the path parameter is required for an octet-stream upload".into())
        })?;
        write_file(&target, &user, body).await?;
        written.push(write_info(&target));
    }
    if written.is_empty() {
        return Err(Error::BadRequest("the upload contains no file".into()));
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Array(written).to_string(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn signatures_match_the_python_sdk() {
        // Vectors from novita-sandbox 2.1.1's `get_signature`.
        assert_eq!(
            signature("/home/user/a.txt", Op::Read, "", "tok", None),
            "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY"
        );
        assert_eq!(
            signature("dir/b", Op::Write, "user", "tok", Some(1_700_000_000)),
            "v1_/Sy2b/1IYW7thI5N5KtiEXbqCO4LTKxkgJdIFA4G+nY"
        );
        let sig = signature("dir/b", Op::Write, "user", "tok", Some(1_700_000_000));
        let good = q(&[
            ("path", "dir/b"),
            ("username", "user"),
            ("signature", &sig),
            ("signature_expiration", "1700000000"),
        ]);
        verify_signature(&good, Op::Write, "tok", 1_699_999_999, true).unwrap();
        let msg = |r: Result<(), Error>| r.unwrap_err().to_string();
        assert_eq!(
            msg(verify_signature(
                &good,
                Op::Write,
                "tok",
                1_700_000_001,
                true
            )),
            "signature is already expired"
        );
        // Expiry is checked only after the signature itself.
        verify_signature(&good, Op::Write, "tok", 1_700_000_001, false).unwrap();
        assert_eq!(
            msg(verify_signature(&good, Op::Read, "tok", 0, true)),
            "invalid signature"
        );
        assert_eq!(
            msg(verify_signature(&good, Op::Write, "other", 0, true)),
            "invalid signature"
        );
        let mut later = good.clone();
        later.insert("signature_expiration".into(), "1800000000".into());
        assert_eq!(
            msg(verify_signature(&later, Op::Write, "tok", 0, true)),
            "invalid signature"
        );
        assert_eq!(
            msg(verify_signature(
                &q(&[("path", "x")]),
                Op::Read,
                "tok",
                0,
                true
            )),
            "missing signature query parameter"
        );
        let mut junk = good.clone();
        junk.insert("signature_expiration".into(), "soon".into());
        assert!(matches!(
            verify_signature(&junk, Op::Write, "tok", 0, true),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn accept_encoding_negotiation() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, header::HeaderValue::from_static(v));
            m
        };
        assert!(!wants_gzip(&HeaderMap::new()).unwrap());
        assert!(wants_gzip(&h("gzip, deflate")).unwrap());
        assert!(wants_gzip(&h("br;q=1.0, gzip;q=0.8, *;q=0.1")).unwrap());
        assert!(!wants_gzip(&h("identity")).unwrap());
        assert!(!wants_gzip(&h("gzip;q=0")).unwrap());
        assert!(!wants_gzip(&h("identity;q=1, gzip;q=0.5")).unwrap());
        assert!(wants_gzip(&h("*")).is_ok_and(|g| !g));
        assert!(wants_gzip(&h("*, identity;q=0")).unwrap());
        assert_eq!(
            wants_gzip(&h("br, identity;q=0")).unwrap_err().status(),
            StatusCode::NOT_ACCEPTABLE
        );
    }

    async fn send(
        app: &axum::Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, String) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn the_agent_checks_its_token_and_signed_urls() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f.txt"), b"data").unwrap();
        let agent = Agent::new(crate::envd::Config {
            host_mode: true,
            root: Some(d.path().to_path_buf()),
            default_user: None,
        });
        let app = crate::envd::router(agent);
        // No token yet: open, as envd.
        let (st, body) = send(&app, "GET", "/files?path=f.txt", &[], vec![]).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "data"));
        let init = br#"{"accessToken": "secret-token"}"#.to_vec();
        let (st, _) = send(&app, "POST", "/init", &[], init.clone()).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        // Re-init needs the token.
        let (st, _) = send(&app, "POST", "/init", &[], init.clone()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _) = send(
            &app,
            "POST",
            "/init",
            &[("x-access-token", "secret-token")],
            init,
        )
        .await;
        assert_eq!(st, StatusCode::NO_CONTENT);

        let expect = |st: StatusCode, body: &str, msg: &str| {
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v, serde_json::json!({"code": 401, "message": msg}));
        };
        let (st, body) = send(&app, "GET", "/files?path=f.txt", &[], vec![]).await;
        expect(st, &body, "missing signature query parameter");
        let (st, body) = send(
            &app,
            "GET",
            "/files?path=f.txt",
            &[("x-access-token", "nope")],
            vec![],
        )
        .await;
        expect(
            st,
            &body,
            "access token present in header but does not match",
        );
        let (st, body) = send(
            &app,
            "GET",
            "/files?path=f.txt",
            &[("x-access-token", "secret-token")],
            vec![],
        )
        .await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "data"));

        let enc = |s: &str| s.replace('+', "%2B").replace('/', "%2F");
        let sig = signature("f.txt", Op::Read, "", "secret-token", None);
        let uri = format!("/files?path=f.txt&signature={}", enc(&sig));
        let (st, body) = send(&app, "GET", &uri, &[], vec![]).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "data"));
        let tampered = format!(
            "/files?path=f.txt&signature={}",
            enc(&sig.replace('v', "w"))
        );
        let (st, body) = send(&app, "GET", &tampered, &[], vec![]).await;
        expect(st, &body, "invalid signature");
        let past = unix_now() - 10;
        let sig = signature("f.txt", Op::Read, "", "secret-token", Some(past));
        let uri = format!(
            "/files?path=f.txt&signature={}&signature_expiration={past}",
            enc(&sig)
        );
        let (st, body) = send(&app, "GET", &uri, &[], vec![]).await;
        expect(st, &body, "signature is already expired");
        // A signed upload, then the written file.
        let sig = signature("up.txt", Op::Write, "", "secret-token", None);
        let uri = format!("/files?path=up.txt&signature={}", enc(&sig));
        let ct = [("content-type", "application/octet-stream")];
        let (st, body) = send(&app, "POST", &uri, &ct, b"up".to_vec()).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(std::fs::read(d.path().join("up.txt")).unwrap(), b"up");
        // Other routes need the token itself.
        let (st, _) = send(&app, "GET", "/envs", &[], vec![]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _) = send(
            &app,
            "GET",
            "/envs",
            &[("x-access-token", "secret-token")],
            vec![],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let (st, _) = send(&app, "GET", "/health", &[], vec![]).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }

    #[test]
    fn statuses() {
        let nospace = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(
            Error::io(Path::new("/x"), &nospace).status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = Error::io(Path::new("/x"), &nf);
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.to_string(), "path '/x' does not exist");
    }
}
