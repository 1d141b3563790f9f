//! The manager's side of shared metadata (`--database postgres://…`, see
//! [`super::super::store`]): store errors as HTTP answers (database down:
//! 503, nothing changed; row owned by another host: 409), the readiness
//! check before a lifecycle change, the resume claim, and the heartbeat.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use super::super::error::ApiError;
use super::super::store::{self, Claim, HostInfo, RowState};
use super::{Entry, Manager};

/// Between two heartbeats of a host sharing a database.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// A store error as the API's answer.
pub fn store_error(e: store::Error) -> ApiError {
    match e {
        store::Error::Unavailable(m) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the metadata database is unavailable ({m}); nothing was changed, retry later"),
        ),
        store::Error::Conflict { id, what } => {
            ApiError::conflict(format!("sandbox {id} changed on another host: {what}"))
        }
        other => ApiError::internal(format!("store: {other}")),
    }
}

impl Manager {
    /// Runs a store call on the blocking pool.
    pub(super) async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&store::Store) -> Result<T, store::Error> + Send + 'static,
    ) -> Result<T, ApiError> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| ApiError::internal(format!("store task: {e}")))?
            .map_err(store_error)
    }

    /// Before a lifecycle change: 503 while a shared database is down, so
    /// nothing starts that could not be recorded.
    pub(super) async fn db_ready(&self) -> Result<(), ApiError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        self.with_store(|s| s.ping()).await
    }

    /// Before a paused sandbox's guest may run: the conditional update
    /// paused → running that makes this host its runner. 503 if the
    /// database is down, 409 if another host changed the row first.
    pub(super) async fn claim_for_resume(&self, id: &str) -> Result<(), ApiError> {
        let id2 = id.to_string();
        match self
            .with_store(move |s| s.claim(&id2, RowState::Paused, RowState::Running))
            .await?
        {
            // No row (a database rebuilt without it): the resume records one.
            Claim::Won | Claim::Missing => Ok(()),
            Claim::Lost { state, owner } => {
                tracing::warn!(sandbox = %id, ?state, ?owner, "resume refused: another host changed the sandbox first");
                Err(ApiError::conflict(format!(
                    "sandbox {id} was resumed elsewhere first (now {} on host {}); this host does not run it",
                    state.map_or("gone", |s| s.as_str()),
                    owner.as_deref().unwrap_or("unknown"),
                )))
            }
        }
    }

    /// After a failed resume whose claim succeeded (the guest never ran):
    /// records the sandbox as paused again; if that fails too, the timer
    /// task retries (the entry is marked unsaved).
    pub(super) async fn release_claim(&self, e: &Entry) {
        let row = e.rec().row.clone();
        if let Err(err) = self.with_store(move |s| s.put(&row)).await {
            tracing::warn!(sandbox = %e.id, "recording the failed resume failed: {}", err.message);
            e.rec().unsaved = true;
        }
    }

    /// With a shared database: records a new reusable snapshot (best
    /// effort: the snapshot store's directory stays the authority, and
    /// `stasis db rebuild` records what was missed).
    pub(super) async fn record_snapshot(&self, m: &crate::snapshot::manifest::Manifest) {
        if !self.store.is_shared() {
            return;
        }
        let m2 = m.clone();
        if let Err(e) = self.with_store(move |s| s.put_snapshot(&m2)).await {
            tracing::warn!(snapshot = %m.id, "recording the snapshot in the database failed: {}", e.message);
        }
    }

    /// With a shared database: forgets a deleted reusable snapshot.
    pub(super) async fn forget_snapshot(&self, id: &str) {
        if !self.store.is_shared() {
            return;
        }
        let id2 = id.to_string();
        if let Err(e) = self.with_store(move |s| s.delete_snapshot(&id2)).await {
            tracing::warn!(snapshot = %id, "removing the snapshot from the database failed: {}", e.message);
        }
    }

    /// This host's id in the database.
    pub fn host_id(&self) -> &str {
        self.store.host()
    }

    /// With a shared database: records this host (its API `address`,
    /// fingerprint, running sandboxes, free memory, draining) every
    /// [`HEARTBEAT_EVERY`] until the manager is dropped. A failed heartbeat
    /// is logged and retried.
    pub fn start_heartbeat(self: &Arc<Self>, address: String) {
        if !self.store.is_shared() {
            return;
        }
        let _ = self.advertised.set(address);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let Some(mgr) = weak.upgrade() else { return };
                match mgr.beat_once().await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("heartbeats reach the database again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!("heartbeat failed: {}", e.message);
                    }
                    Err(_) => {}
                }
                drop(mgr);
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        });
    }

    /// One heartbeat now (no-op before [`Manager::start_heartbeat`]).
    pub(super) async fn beat_once(&self) -> Result<(), ApiError> {
        let Some(address) = self.advertised.get().cloned() else {
            return Ok(());
        };
        let load = self
            .map()
            .values()
            .filter(|e| e.rec().row.state == RowState::Running)
            .count() as u64;
        let (draining, memory_free) = self.pool_heartbeat_fields();
        let info = HostInfo {
            address,
            fingerprint: super::pool_ext::fingerprint_json().to_string(),
            load,
            draining,
            memory_free,
        };
        self.with_store(move |s| s.heartbeat(&info)).await
    }
}
