//! In a pool of hosts: calls and traffic for a sandbox that another host
//! holds are sent there (one HTTP hop), so any host accepts any call.
//!
//! The middleware runs before everything else. It finds the sandbox a
//! request names — the in-sandbox traffic routing of [`super::proxy`]
//! (`Novita-Sandbox-Id` headers, `{port}-{id}.{domain}` hosts) or a
//! lifecycle path `/sandboxes/{id}…`, `/v2/sandboxes/{id}…` — and asks the
//! manager where it is served ([`Manager::pool_route`], which may also
//! adopt a paused sandbox of a host that is gone). A request for a
//! sandbox this host holds, or for none, goes on unchanged.
//!
//! The hop is the proxy's own relay ([`super::proxy::relay`]): header names
//! keep their case and order, hop-by-hop fields are dropped, `Via` is added
//! (its count still stops loops), upgrades (WebSockets) are piped. The
//! hop adds [`FORWARDED_HEADER`] naming this host: the receiving host then
//! never forwards again (one hop only; a disagreement about the owner is
//! answered 409 and the client retries). Lifecycle calls are checked for
//! the API key here first, so an unauthenticated call never causes a
//! placement or an adoption; the owner checks it again.
//!
//! Not forwarded: a request that names its sandbox only by its envd access
//! token (the SDK's static `connect` without `NOVITA_SANDBOX_URL` routing
//! headers) — that lookup is per host; such clients address the owner.
//!
//! [`Manager::pool_route`]: super::manager::Manager::pool_route

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::manager::pool_ext::Decision;
use super::proxy;
use super::routes::AppState;

/// Set on a request one host of the pool forwards to another (its value:
/// the sending host's id).
pub const FORWARDED_HEADER: &str = "x-stasis-forwarded";
/// Longest wait for another host of the pool to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of a hop to another host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host did not accept the connection.
    #[error("connecting to host {host} at {address}: {why}")]
    Connect {
        host: String,
        address: String,
        why: String,
    },
    /// The exchange failed.
    #[error("forwarding to host {host} at {address}: {why}")]
    Relay {
        host: String,
        address: String,
        why: String,
    },
}

/// The sandbox a lifecycle path names (`/sandboxes/{id}[/…]`,
/// `/v2/sandboxes/{id}/…`); not the multi-sandbox routes.
fn sandbox_of_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/sandboxes/")
        .or_else(|| path.strip_prefix("/v2/sandboxes/"))?;
    let id = rest.split('/').next()?;
    (!id.is_empty() && id != "metrics").then_some(id)
}

/// The middleware (see the module docs).
pub async fn layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !st.mgr.in_pool() {
        return next.run(req).await;
    }
    let traffic = proxy::route_of_in(req.uri().path(), req.headers(), req.uri(), st.mgr.domain());
    let id = match &traffic {
        Ok(Some(r)) => r.sandbox_id.clone(),
        // The proxy answers a bad routing request.
        Err(_) => return next.run(req).await,
        Ok(None) => match sandbox_of_path(req.uri().path()) {
            Some(id) if proxy::is_lifecycle_path(req.uri().path()) => {
                if let Some(refused) = super::routes::api_key_refusal(&st, &req) {
                    return refused;
                }
                id.to_string()
            }
            _ => return next.run(req).await,
        },
    };
    if proxy::stasis_hops(req.headers()) >= proxy::MAX_STASIS_HOPS {
        return next.run(req).await;
    }
    let forwarded = req.headers().contains_key(FORWARDED_HEADER);
    match st.mgr.pool_route(&id, forwarded).await {
        Ok(Decision::Local) => next.run(req).await,
        Ok(Decision::Forward { host_id, address }) => {
            let me = st.mgr.host_id().to_string();
            match hop(&me, &host_id, &address, req).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(sandbox = %id, "{e}");
                    ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()).into_response()
                }
            }
        }
        Err(e) => e.into_response(),
    }
}

/// Sends `req` to the host `host` at `address` (see the module docs).
async fn hop(me: &str, host: &str, address: &str, mut req: Request) -> Result<Response, Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|why| Error::Connect {
            host: host.into(),
            address: address.into(),
            why,
        })?;
    let _ = stream.set_nodelay(true);
    if let Ok(v) = HeaderValue::from_str(me) {
        req.headers_mut().insert(FORWARDED_HEADER, v);
    }
    tracing::debug!(to = %host, %address, path = %req.uri().path(), "forwarding to the sandbox's host");
    let what = format!("host {host}");
    // A hop between hosts is cut by neither side's pause: one gate that
    // never closes (its sender must outlive every body relayed through it).
    static OPEN: std::sync::OnceLock<std::sync::Arc<proxy::Gate>> = std::sync::OnceLock::new();
    let gate = OPEN.get_or_init(proxy::Gate::new);
    proxy::relay(stream, req, &[], gate, &what)
        .await
        .map_err(|why| Error::Relay {
            host: host.into(),
            address: address.into(),
            why,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_paths_name_their_sandbox() {
        assert_eq!(sandbox_of_path("/sandboxes/abc"), Some("abc"));
        assert_eq!(sandbox_of_path("/sandboxes/abc/pause"), Some("abc"));
        assert_eq!(sandbox_of_path("/v2/sandboxes/abc/logs"), Some("abc"));
        assert_eq!(sandbox_of_path("/sandboxes/metrics"), None);
        assert_eq!(sandbox_of_path("/sandboxes"), None);
        assert_eq!(sandbox_of_path("/sandboxes/"), None);
        assert_eq!(sandbox_of_path("/snapshots"), None);
    }
}
