//! HTTP routes, extractors and middleware (auth, bounded concurrency,
//! request logging). Every error, axum's own rejections included, answers
//! `{"code", "message"}`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::manager::{ListQuery, Manager};
use super::models::{self, ConnectBody, NewSandbox, ResumeBody, TimeoutBody};

/// Largest page `GET /v2/sandboxes` serves.
pub const MAX_LIMIT: usize = 100;

#[derive(Clone)]
pub struct AppState {
    pub mgr: Arc<Manager>,
    pub api_key: Option<Arc<str>>,
    pub inflight: Arc<Semaphore>,
}

/// Builds the API router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", get(list_v2))
        .route("/sandboxes/{id}", get(get_one).delete(kill))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), limit_and_log))
        // Outermost: in-sandbox traffic never reaches the API's auth or its
        // concurrency limit (streams may stay open for long).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            super::proxy::layer,
        ))
        .with_state(state)
}

async fn limit_and_log(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let _permit = st.inflight.acquire().await;
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let open =
            req.method() == Method::GET && matches!(req.uri().path(), "/health" | "/openapi.json");
        let given = req.headers().get("x-api-key").map(HeaderValue::as_bytes);
        if !open && !given.is_some_and(|g| same(g, key.as_bytes())) {
            let msg = if given.is_some() {
                "invalid API key"
            } else {
                "missing X-API-KEY header"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// A JSON body: empty means `{}`; otherwise `Content-Type` must be JSON
/// (415) and the body must parse (400).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| {
                let essence = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                essence == "application/json" || essence.ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return serde_json::from_slice(b"{}")
                .map(JsonBody)
                .map_err(|e| ApiError::bad_request(format!("a JSON body is required: {e}")));
        }
        if json_ct != Some(true) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type: application/json",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn id_of(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(super::openapi::document())
}

async fn create(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let out = st.mgr.create(body).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn get_one(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = id_of(p)?;
    Ok(Json(st.mgr.get(&id).await?).into_response())
}

async fn kill(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    st.mgr.kill(&id_of(p)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    st.mgr.pause(&id_of(p)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> Result<Response, ApiError> {
    let (resumed, out) = st.mgr.connect(&id_of(p)?, body).await?;
    let code = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(out)).into_response())
}

async fn resume(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ResumeBody>,
) -> Result<Response, ApiError> {
    let out = st.mgr.resume(&id_of(p)?, body).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn set_timeout(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> Result<StatusCode, ApiError> {
    st.mgr.set_timeout(&id_of(p)?, body.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Parses the list filters shared by both list routes.
fn parse_list_query(raw: Option<&str>, v2: bool) -> Result<ListQuery, ApiError> {
    let pairs = models::parse_query(raw.unwrap_or("")).map_err(ApiError::bad_request)?;
    let mut q = ListQuery {
        running: !v2,
        paused: false,
        metadata: Vec::new(),
        limit: if v2 { MAX_LIMIT } else { usize::MAX },
        before_seq: None,
    };
    let mut any_state = false;
    for (k, v) in pairs {
        match k.as_str() {
            "state" if v2 => {
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    any_state = true;
                    match s {
                        "running" => q.running = true,
                        "paused" => q.paused = true,
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "invalid state {other:?} (expected running or paused)"
                            )))
                        }
                    }
                }
            }
            "metadata" => {
                // `k=v&k2=v2`, each key and value URL-encoded once more (as
                // the SDK sends it).
                for (mk, mv) in models::parse_query(&v).map_err(ApiError::bad_request)? {
                    let mk = models::percent_decode(&mk, false).map_err(ApiError::bad_request)?;
                    let mv = models::percent_decode(&mv, false).map_err(ApiError::bad_request)?;
                    q.metadata.push((mk, mv));
                }
            }
            "limit" if v2 => {
                q.limit = match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "limit must be an integer from 1 to {MAX_LIMIT} (got {v:?})"
                        )))
                    }
                }
            }
            "nextToken" if v2 && !v.is_empty() => {
                q.before_seq = match v.parse::<i64>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => return Err(ApiError::bad_request(format!("invalid nextToken {v:?}"))),
                }
            }
            _ => {}
        }
    }
    if v2 && !any_state {
        q.running = true;
        q.paused = true;
    }
    Ok(q)
}

async fn list_v2(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse_list_query(raw.as_deref(), true)?;
    let (items, next) = st.mgr.list(&q);
    let mut resp = Json(items).into_response();
    if let Some(token) = next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert("x-next-token", token);
    }
    Ok(resp)
}

async fn list_v1(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse_list_query(raw.as_deref(), false)?;
    let (items, _) = st.mgr.list(&q);
    Ok(Json(items).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_parsing() {
        let q = parse_list_query(None, true).unwrap();
        assert!(q.running && q.paused && q.limit == MAX_LIMIT);
        let q = parse_list_query(Some("state=paused&limit=5&nextToken=9"), true).unwrap();
        assert!(!q.running && q.paused && q.limit == 5 && q.before_seq == Some(9));
        let q = parse_list_query(Some("state=running&state=paused"), true).unwrap();
        assert!(q.running && q.paused);
        let q = parse_list_query(Some("state=running%2Cpaused"), true).unwrap();
        assert!(q.running && q.paused);
        // What the SDK sends for metadata={"a b": "c&d", "k": "v"}.
        let q = parse_list_query(Some("metadata=a%252520b%3Dc%252526d%26k%3Dv"), true).unwrap();
        assert_eq!(
            q.metadata,
            vec![("a b".into(), "c&d".into()), ("k".into(), "v".into())]
        );
        for bad in [
            "state=gone",
            "limit=0",
            "limit=101",
            "limit=x",
            "nextToken=abc",
            "nextToken=-1",
        ] {
            assert!(parse_list_query(Some(bad), true).is_err(), "{bad}");
        }
        let q = parse_list_query(Some("state=paused"), false).unwrap();
        assert!(q.running && !q.paused);
    }
}
