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
    /// Metrics and console logs of the sandboxes (`super::metrics`).
    pub metrics: Arc<super::metrics::Registry>,
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
        .route("/sandboxes/{id}/network", axum::routing::put(set_network))
        .route("/sandboxes/metrics", get(metrics_many))
        .route("/sandboxes/{id}/metrics", get(metrics_one))
        .route("/sandboxes/{id}/logs", get(logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(logs_v2))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/snapshots", get(list_snapshots))
        .route("/sandboxes/{id}/clone", post(clone_sandbox))
        .route(
            "/templates/{template_id}",
            axum::routing::delete(delete_snapshot),
        )
        .merge(unsupported_routes())
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
        // Before everything: in a pool, calls for a sandbox another host
        // holds go there.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            super::forward::layer,
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

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(refused) = api_key_refusal(&st, &req) {
        return refused;
    }
    next.run(req).await
}

/// The 401 for an API request without the server's API key (None: the key
/// is right, not needed, or the route is open).
pub(super) fn api_key_refusal(st: &AppState, req: &Request) -> Option<Response> {
    let key = st.api_key.as_ref()?;
    let open =
        req.method() == Method::GET && matches!(req.uri().path(), "/health" | "/openapi.json");
    let given = req.headers().get("x-api-key").map(HeaderValue::as_bytes);
    if open || given.is_some_and(|g| crate::ct_eq(g, key.as_bytes())) {
        return None;
    }
    let msg = if given.is_some() {
        "invalid API key"
    } else {
        "missing X-API-KEY header"
    };
    Some(ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response())
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

fn known(st: &AppState, id: &str) -> Result<(), ApiError> {
    if st.mgr.sandbox_facts().iter().any(|f| f.id == id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} not found"),
        ))
    }
}

/// Query parameters as a map (last value wins); numbers parsed on demand.
fn query_map(q: Option<String>) -> std::collections::HashMap<String, String> {
    q.as_deref()
        .map(|q| {
            axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(
                &format!("/?{q}").parse().unwrap_or_default(),
            )
            .map(|m| m.0)
            .unwrap_or_default()
        })
        .unwrap_or_default()
}

fn int_param(
    q: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<i64>, ApiError> {
    match q.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!("invalid {name} {v:?}: expected an integer"))
        }),
    }
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (Unix seconds).
async fn metrics_one(
    State(st): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    known(&st, &id)?;
    let q = query_map(q);
    let (start, end) = (int_param(&q, "start")?, int_param(&q, "end")?);
    if let (Some(a), Some(b)) = (start, end) {
        if a > b {
            return Err(ApiError::bad_request("start is after end"));
        }
    }
    Ok(Json(st.metrics.samples(&id, start, end)).into_response())
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: each known sandbox's latest
/// sample (`{"sandboxes": {id: metric}}`); unknown ids are left out.
async fn metrics_many(State(st): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let q = query_map(q);
    let facts = st.mgr.sandbox_facts();
    let ids: Vec<String> = match q.get("sandbox_ids").filter(|v| !v.is_empty()) {
        Some(v) => v.split(',').map(|s| s.trim().to_string()).collect(),
        None => facts.iter().map(|f| f.id.clone()).collect(),
    };
    let mut out = serde_json::Map::new();
    for id in ids {
        if facts.iter().any(|f| f.id == id) {
            if let Some(m) = st.metrics.latest(&id) {
                out.insert(id, serde_json::to_value(m).unwrap_or_default());
            }
        }
    }
    Json(serde_json::json!({ "sandboxes": out })).into_response()
}

const LOG_PAGE: usize = 1000;

fn log_limit(q: &std::collections::HashMap<String, String>) -> Result<usize, ApiError> {
    match int_param(q, "limit")? {
        None => Ok(LOG_PAGE),
        Some(n) if n >= 0 => Ok((n as usize).min(10 * LOG_PAGE)),
        Some(_) => Err(ApiError::bad_request("limit must not be negative")),
    }
}

fn entry(l: &super::metrics::LogLine) -> serde_json::Value {
    serde_json::json!({
        "timestamp": super::models::rfc3339(l.ms),
        "level": "info",
        "message": l.line,
        "fields": { "source": "console" },
    })
}

/// `GET /sandboxes/{id}/logs?start=&limit=` (`start` in Unix ms).
async fn logs_v1(
    State(st): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    known(&st, &id)?;
    let q = query_map(q);
    let lines = st
        .metrics
        .logs(&id, int_param(&q, "start")?, log_limit(&q)?, true, None);
    Ok(Json(serde_json::json!({
        "logs": lines.iter().map(|l| serde_json::json!({
            "timestamp": super::models::rfc3339(l.ms),
            "line": l.line,
        })).collect::<Vec<_>>(),
        "logEntries": lines.iter().map(entry).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`.
async fn logs_v2(
    State(st): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    known(&st, &id)?;
    let q = query_map(q);
    let forward = match q.get("direction").map(String::as_str) {
        None | Some("") | Some("forward") => true,
        Some("backward") => false,
        Some(d) => {
            return Err(ApiError::bad_request(format!(
                "invalid direction {d:?}: forward or backward"
            )))
        }
    };
    // Console lines are all "info": asking for warn/error finds none.
    let level_ok = match q.get("level").map(String::as_str) {
        None | Some("") | Some("debug") | Some("info") => true,
        Some("warn") | Some("error") => false,
        Some(l) => {
            return Err(ApiError::bad_request(format!(
                "invalid level {l:?}: debug, info, warn or error"
            )))
        }
    };
    let lines = if level_ok {
        st.metrics.logs(
            &id,
            int_param(&q, "cursor")?,
            log_limit(&q)?,
            forward,
            q.get("search")
                .map(String::as_str)
                .filter(|s| !s.is_empty()),
        )
    } else {
        Vec::new()
    };
    Ok(
        Json(serde_json::json!({ "logs": lines.iter().map(entry).collect::<Vec<_>>() }))
            .into_response(),
    )
}

async fn openapi() -> Json<serde_json::Value> {
    let mut doc = super::openapi::document();
    add_metrics_and_logs_to(&mut doc);
    add_unsupported_to(&mut doc);
    add_snapshots_to(&mut doc);
    Json(doc)
}

/// Routes the novita-sandbox 2.1.1 SDK can call that stasis does not
/// implement: (method, path, what). Each answers 501
/// `{"code": 501, "message": "not supported by stasis: <what>"}` (not a 404,
/// which the SDK would report as "sandbox not found") and is listed in
/// `/openapi.json` with that answer. `tests/sdk_fidelity/test_routes.py`
/// checks that every route of the SDK is served or listed here.
pub const UNSUPPORTED: &[(&str, &str, &str)] = &[
    (
        "POST",
        "/sandboxes/{id}/commit",
        "committing a sandbox to a template",
    ),
    (
        "POST",
        "/sandboxes/{id}/refreshes",
        "refreshes (use POST /sandboxes/{id}/timeout)",
    ),
    ("POST", "/sandboxes/{id}/reset", "resetting sandboxes"),
    ("POST", "/sandboxes/{id}/hotplug-memory", "memory hotplug"),
    ("POST", "/sandboxes/{id}/volume-mounts", "volume mounts"),
    ("DELETE", "/sandboxes/{id}/volume-mounts", "volume mounts"),
    ("GET", "/sandboxes/events", "sandbox events"),
    ("GET", "/sandboxes/quota", "quotas"),
    (
        "GET",
        "/templates",
        "template management (templates are files in <data-dir>/templates)",
    ),
    ("POST", "/templates", "template builds"),
    ("GET", "/templates/aliases/{alias}", "template aliases"),
    ("POST", "/templates/tags", "template tags"),
    ("DELETE", "/templates/tags", "template tags"),
    ("GET", "/templates/{template_id}", "template management"),
    ("POST", "/templates/{template_id}", "template builds"),
    ("PATCH", "/templates/{template_id}", "template management"),
    ("GET", "/templates/{template_id}/tags", "template tags"),
    (
        "GET",
        "/templates/{template_id}/files/{hash}",
        "template builds",
    ),
    (
        "POST",
        "/templates/{template_id}/builds/{build_id}",
        "template builds",
    ),
    (
        "GET",
        "/templates/{template_id}/builds/{build_id}/logs",
        "template builds",
    ),
    (
        "GET",
        "/templates/{template_id}/builds/{build_id}/status",
        "template builds",
    ),
    ("GET", "/v2/templates", "template management"),
    ("POST", "/v2/templates", "template builds"),
    (
        "PATCH",
        "/v2/templates/{template_id}",
        "template management",
    ),
    (
        "POST",
        "/v2/templates/{template_id}/builds/{build_id}",
        "template builds",
    ),
    ("POST", "/v3/templates", "template builds"),
    ("GET", "/v1/templates/agents", "agent templates"),
    (
        "GET",
        "/v1/templates/agents/{template_id}",
        "agent templates",
    ),
    ("GET", "/volumes", "volumes"),
    ("POST", "/volumes", "volumes"),
    ("GET", "/volumes/{volume_id}", "volumes"),
    ("DELETE", "/volumes/{volume_id}", "volumes"),
];

fn not_supported(what: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!("not supported by stasis: {what}"),
    )
}

fn unsupported_routes() -> Router<AppState> {
    use axum::routing::MethodFilter;
    let mut r = Router::new();
    let mut by_path: std::collections::BTreeMap<&str, axum::routing::MethodRouter<AppState>> =
        Default::default();
    for &(method, path, what) in UNSUPPORTED {
        let filter = match method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            "PATCH" => MethodFilter::PATCH,
            _ => MethodFilter::DELETE,
        };
        // The body is read (and dropped) so that the connection stays
        // usable for the client's next request.
        let handler = move |_body: Bytes| async move { not_supported(what) };
        let mr = by_path.remove(path).unwrap_or_default();
        by_path.insert(path, mr.on(filter, handler));
    }
    for (path, mr) in by_path {
        r = r.route(path, mr);
    }
    r
}

/// Lists the metrics and logs routes (`super::metrics`) in the document.
fn add_metrics_and_logs_to(doc: &mut serde_json::Value) {
    use serde_json::json;
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let id =
        json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } });
    let int = |n: &str, d: &str| json!({ "name": n, "in": "query", "description": d, "schema": { "type": "integer" } });
    let err = json!({ "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let metric = json!({ "type": "object", "properties": {
        "cpuCount": { "type": "integer" }, "cpuUsedPct": { "type": "number" },
        "memTotal": { "type": "integer" }, "memUsed": { "type": "integer" },
        "diskTotal": { "type": "integer" }, "diskUsed": { "type": "integer" },
        "timestamp": { "type": "string", "format": "date-time" }, "timestampUnix": { "type": "integer" } } });
    let entry = json!({ "type": "object", "properties": {
        "timestamp": { "type": "string", "format": "date-time" }, "level": { "type": "string" },
        "message": { "type": "string" }, "fields": { "type": "object" } } });
    paths.insert("/sandboxes/{id}/metrics".into(), json!({ "get": {
        "summary": "Metrics samples of a sandbox (oldest first)",
        "parameters": [id, int("start", "Unix seconds, inclusive"), int("end", "Unix seconds, inclusive")],
        "responses": { "200": { "description": "Samples", "content": { "application/json": { "schema": { "type": "array", "items": metric } } } },
            "400": err, "401": err, "404": err } } }));
    paths.insert("/sandboxes/metrics".into(), json!({ "get": {
        "summary": "Latest metrics sample of each sandbox",
        "parameters": [{ "name": "sandbox_ids", "in": "query", "description": "comma-separated", "schema": { "type": "string" } }],
        "responses": { "200": { "description": "{\"sandboxes\": {id: metric}}", "content": { "application/json": { "schema": { "type": "object",
            "properties": { "sandboxes": { "type": "object", "additionalProperties": metric } } } } } }, "401": err } } }));
    paths.insert("/sandboxes/{id}/logs".into(), json!({ "get": {
        "summary": "Console lines of a sandbox",
        "parameters": [id, int("start", "Unix ms, inclusive"), int("limit", "default 1000")],
        "responses": { "200": { "description": "Lines", "content": { "application/json": { "schema": { "type": "object", "properties": {
            "logs": { "type": "array", "items": { "type": "object", "properties": { "timestamp": { "type": "string" }, "line": { "type": "string" } } } },
            "logEntries": { "type": "array", "items": entry } } } } } }, "400": err, "401": err, "404": err } } }));
    paths.insert("/v2/sandboxes/{id}/logs".into(), json!({ "get": {
        "summary": "Console lines of a sandbox (v2)",
        "parameters": [id, int("cursor", "Unix ms"), int("limit", "default 1000"),
            { "name": "direction", "in": "query", "schema": { "type": "string", "enum": ["forward", "backward"] } },
            { "name": "level", "in": "query", "schema": { "type": "string", "enum": ["debug", "info", "warn", "error"] } },
            { "name": "search", "in": "query", "schema": { "type": "string" } }],
        "responses": { "200": { "description": "Entries", "content": { "application/json": { "schema": { "type": "object", "properties": {
            "logs": { "type": "array", "items": entry } } } } } }, "400": err, "401": err, "404": err } } }));
}

/// OpenAPI path parameters for each `{name}` segment of `path`.
fn path_params(path: &str) -> serde_json::Value {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            serde_json::json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } })
        })
        .collect()
}

/// Lists [`UNSUPPORTED`] in the OpenAPI document, each answering 501.
fn add_unsupported_to(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for &(method, path, what) in UNSUPPORTED {
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(obj) = entry.as_object_mut() {
            obj.insert(
                method.to_ascii_lowercase(),
                serde_json::json!({
                    "summary": format!("Not supported by stasis: {what}"),
                    "x-stasis-unsupported": true,
                    // Its path parameters, so the document is valid OpenAPI
                    // (schemathesis refused it without them).
                    "parameters": path_params(path),
                    "responses": { "501": { "description": format!("not supported by stasis: {what}"),
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } } }
                }),
            );
        }
    }
}

/// Runs a lifecycle operation on its own task and awaits it: a client that
/// disconnects (dropping the handler's future) does not cancel it halfway,
/// between its steps (a created sandbox's files without its record, a
/// paused worker without the paused state). The operation finishes and its
/// result is kept in the server's state; only the answer is lost.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(op)
        .await
        .map_err(|e| ApiError::internal(format!("the operation's task failed: {e}")))?
}

async fn create(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let mgr = st.mgr.clone();
    let out = detached(async move { mgr.create(body).await }).await?;
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
    let (mgr, id) = (st.mgr.clone(), id_of(p)?);
    detached(async move { mgr.kill(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let (mgr, id) = (st.mgr.clone(), id_of(p)?);
    // No body (the SDK's generated client) or no `sync`: synchronous.
    let body: models::PauseBody = if body.iter().all(|b| b.is_ascii_whitespace()) {
        models::PauseBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid pause body: {e}")))?
    };
    let sync = body.sync.unwrap_or(true);
    detached(async move { mgr.pause_with(&id, sync).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> Result<Response, ApiError> {
    let (mgr, id) = (st.mgr.clone(), id_of(p)?);
    let (resumed, out) = detached(async move { mgr.connect(&id, body).await }).await?;
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
    let (mgr, id) = (st.mgr.clone(), id_of(p)?);
    let out = detached(async move { mgr.resume(&id, body).await }).await?;
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

/// `PUT /sandboxes/{id}/network`: replaces the egress lists given (a
/// running sandbox's rules change at once; a paused one's on resume).
async fn set_network(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<models::NetworkUpdate>,
) -> Result<StatusCode, ApiError> {
    st.mgr
        .set_network(&id_of(p)?, body.allow_out, body.deny_out)
        .await?;
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
    let (items, next) = st.mgr.list_with(&q, st.mgr.pool_rows().await);
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
    let (items, _) = st.mgr.list_with(&q, st.mgr.pool_rows().await);
    Ok(Json(items).into_response())
}

/// `POST /sandboxes/{id}/snapshots` (the body's optional `name` is
/// accepted and not used: the snapshot's id is its name).
async fn create_snapshot(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let out = st.mgr.create_snapshot(&id_of(p)?).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `GET /snapshots?sandboxID=&limit=&nextToken=` (the SDK's paginator
/// reads `x-next-token`).
async fn list_snapshots(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = models::parse_query(raw.as_deref().unwrap_or("")).map_err(ApiError::bad_request)?;
    let (mut sandbox, mut limit, mut next) = (None, MAX_LIMIT, None);
    for (k, v) in pairs {
        match k.as_str() {
            "sandboxID" => sandbox = Some(v),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be 1..={MAX_LIMIT}"))
                    })?
            }
            "nextToken" => next = Some(v),
            _ => {}
        }
    }
    let (items, token) = st
        .mgr
        .list_snapshots(sandbox.as_deref(), limit, next.as_deref())?;
    let mut resp = Json(items).into_response();
    if let Some(t) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert("x-next-token", t);
    }
    Ok(resp)
}

/// `DELETE /templates/{id}`: the SDK's `delete_snapshot` (templates
/// themselves are files in `<data-dir>/templates`, not deleted here).
async fn delete_snapshot(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    st.mgr.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/clone` (`count`, `strict`, `timeout`).
async fn clone_sandbox(
    State(st): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<super::manager::CloneBody>,
) -> Result<Response, ApiError> {
    let out = st.mgr.clone_sandbox(&id_of(p)?, body).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// The snapshot and clone routes in `/openapi.json` (merged into path
/// objects that other routes already have).
fn add_snapshots_to(doc: &mut serde_json::Value) {
    use serde_json::json;
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let id = |n: &str| json!({ "name": n, "in": "path", "required": true, "schema": { "type": "string" } });
    let err = json!({ "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let info = json!({ "type": "object", "properties": {
        "snapshotID": { "type": "string" }, "names": { "type": "array", "items": { "type": "string" } } } });
    let mut put = |path: &str, method: &str, op: serde_json::Value| {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        if let Some(o) = entry.as_object_mut() {
            o.insert(method.into(), op);
        }
    };
    put(
        "/sandboxes/{id}/snapshots",
        "post",
        json!({
        "summary": "Snapshot a sandbox into a reusable snapshot (a running one pauses briefly and keeps running)",
        "parameters": [id("id")],
        "requestBody": { "required": false, "content": { "application/json": { "schema": { "type": "object", "properties": { "name": { "type": "string" } } } } } },
        "responses": { "201": { "description": "The snapshot", "content": { "application/json": { "schema": info.clone() } } },
            "401": err, "404": err, "409": err, "500": err } }),
    );
    put(
        "/snapshots",
        "get",
        json!({
        "summary": "List snapshots, oldest first, paginated",
        "parameters": [
            { "name": "sandboxID", "in": "query", "schema": { "type": "string" } },
            { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100 } },
            { "name": "nextToken", "in": "query", "schema": { "type": "string" } } ],
        "responses": { "200": { "description": "A page; the next page's token is in the x-next-token header",
            "content": { "application/json": { "schema": { "type": "array", "items": info } } } },
            "400": err, "401": err } }),
    );
    put(
        "/templates/{template_id}",
        "delete",
        json!({
        "summary": "Delete a snapshot (the SDK's delete_snapshot); 409 while another snapshot names it as parent",
        "parameters": [id("template_id")],
        "responses": { "204": { "description": "Deleted" }, "401": err, "404": err, "409": err } }),
    );
    put(
        "/sandboxes/{id}/clone",
        "post",
        json!({
        "summary": "Clone a sandbox: snapshot it and create count sandboxes from the snapshot",
        "parameters": [id("id")],
        "requestBody": { "required": false, "content": { "application/json": { "schema": { "type": "object", "properties": {
            "count": { "type": "integer", "minimum": 1, "maximum": 16 }, "strict": { "type": "boolean" },
            "timeout": { "type": "integer" }, "nodeID": { "type": "string" } } } } } },
        "responses": { "201": { "description": "{sandboxes: [{sandboxID, envdVersion, envdAccessToken, trafficAccessToken}], snapshotTemplateId}" },
            "400": err, "401": err, "404": err, "409": err, "429": err, "500": err } }),
    );
    put(
        "/sandboxes/{id}/network",
        "put",
        json!({
        "summary": "Replace a sandbox's egress lists (running: applied at once; paused: applied on resume)",
        "parameters": [id("id")],
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "properties": {
            "allowOut": { "type": "array", "items": { "type": "string" } },
            "denyOut": { "type": "array", "items": { "type": "string" } } } } } } },
        "responses": { "204": { "description": "Applied (or stored for the resume)" },
            "400": err, "401": err, "404": err, "409": err, "500": err } }),
    );
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
