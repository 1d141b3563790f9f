//! The envd HTTP file API: `GET /files?path=&username=` downloads a file
//! (streamed), `POST /files` uploads one or more files, as
//! `multipart/form-data` (each part's filename is its path, or the `path`
//! parameter for a single file) or as `application/octet-stream` (the
//! body is the file at `path`). Missing parent directories are created.
//! Errors are JSON `{"code": <http status>, "message"}`: 400 bad request,
//! 404 missing file, 507 out of disk space, 500 otherwise.

use crate::envd::users::{self, User};
use crate::envd::Agent;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    let (_, path) = user_and_path(&agent, &q, &headers)?;
    let path = path.ok_or_else(|| Error::BadRequest("the path parameter is required".into()))?;
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
    let stream = futures_util::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', "_"))
        .unwrap_or_default();
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, meta.len().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Writes `chunks` to `path` (creating parents, truncating), owned by
/// `user`. A failed write removes the partial file.
async fn write_file<S, E>(path: &Path, user: &User, mut chunks: S) -> Result<(), Error>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
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
            let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the upload: {e}")))?;
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
    let (user, path) = user_and_path(&agent, &q, &headers)?;
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("?");
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(Error::Unsupported(format!(
                "Content-Encoding '{enc}' is not supported for uploads; send the file uncompressed"
            )));
        }
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mut written = Vec::new();
    if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct)
            .map_err(|e| Error::BadRequest(format!("bad multipart Content-Type: {e}")))?;
        let mut mp = multer::Multipart::new(body.into_data_stream(), boundary);
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(Error::BadRequest(format!("bad multipart body: {e}"))),
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
        write_file(&target, &user, body.into_data_stream()).await?;
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
