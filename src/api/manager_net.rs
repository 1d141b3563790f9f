//! The manager's side of sandbox networking (a child module of
//! `manager`, so it sees the manager's private state).
//!
//! - create: the request's controls become a [`NetSpec`] (400 naming a bad
//!   entry); a Linux sandbox on the real VMM with networking enabled gets a
//!   slot, its namespace, tap and rules ([`crate::net::Network::setup`]), a
//!   virtio-net device over that tap and the kernel's `ip=`;
//! - pause: the namespace goes, the slot (and so the guest's address)
//!   stays; resume sets it up again with the current rules before the
//!   worker restores the VM;
//! - `PUT /sandboxes/{id}/network`: stored, applied at once when running,
//!   on resume when paused;
//! - remove: namespace, rules and slot go; the stored settings go with the
//!   sandbox's row (a trigger);
//! - start: stored settings are loaded, slots of paused sandboxes reserved,
//!   and whatever a killed server left on the host is swept.
//!
//! Without networking (`--no-network`, the fake backend, the test guest)
//! the settings are still validated, stored, shown and enforced by the
//! proxy (`allowPublicTraffic`, `maskRequestHost`); there is just no
//! device to apply egress rules to.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};

use super::{Manager, Template};
use crate::api::error::ApiError;
use crate::api::models::{NetworkOut, NewSandbox};
use crate::net::spec::{NetSpec, TRAFFIC_TOKEN_HEADER};
use crate::net::{GuestLink, SandboxNet};
use crate::worker::protocol::BackendKind;

/// The manager's network state.
#[derive(Default)]
pub(super) struct NetState {
    /// Settings of every sandbox that exists.
    specs: std::sync::Mutex<std::collections::HashMap<String, NetSpec>>,
    /// Namespaces that exist now (running sandboxes with a device).
    live: std::sync::Mutex<std::collections::HashMap<String, SandboxNet>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn net_err(e: crate::net::Error) -> ApiError {
    match e {
        crate::net::Error::BadEntry(_) | crate::net::Error::Unresolved { .. } => {
            ApiError::bad_request(e.to_string())
        }
        other => ApiError::internal(format!("sandbox network: {}", crate::error_chain(&other))),
    }
}

impl Manager {
    fn net(&self) -> &NetState {
        &self.net_state
    }

    /// At start: loads stored settings, reserves the slots of paused
    /// sandboxes, sweeps leftovers of a killed server.
    pub(super) fn net_recover(&self) -> Result<(), crate::api::Error> {
        let specs = self
            .store
            .load_networks()
            .map_err(|e| crate::api::Error::Config(format!("loading network settings: {e}")))?;
        let map = self.map();
        let mut s = lock(&self.net().specs);
        for (id, spec) in specs {
            if !map.contains_key(&id) {
                continue;
            }
            if let (Some(n), Some(slot)) = (&self.cfg.network, spec.slot) {
                if !n.reserve(slot) {
                    tracing::warn!(sandbox = %id, slot, "network slot taken twice or out of range");
                }
            }
            s.insert(id, spec);
        }
        drop(s);
        drop(map);
        if let Some(n) = &self.cfg.network {
            let removed = n
                .sweep()
                .map_err(|e| crate::api::Error::Config(crate::error_chain(&e)))?;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed network namespaces and links a previous server left"
                );
            }
        }
        Ok(())
    }

    /// Adoption of a paused sandbox from a host of the pool that is gone
    /// ([`super::pool_ext`]): its network settings as recorded. The guest
    /// keeps its address, so its slot must be free here; if it is not, the
    /// resume fails with the network error (logged now).
    pub(super) fn net_adopt(&self, id: &str, spec: NetSpec) {
        if let (Some(n), Some(slot)) = (&self.cfg.network, spec.slot) {
            if !n.reserve(slot) {
                tracing::warn!(sandbox = %id, slot, "adopted sandbox's network slot is taken on this host");
            }
        }
        lock(&self.net().specs).insert(id.to_string(), spec);
    }

    /// Create: validates the request's controls and, for a Linux guest on
    /// the real VMM, sets up its network and adds the device to the boot
    /// configuration. On error nothing is left behind.
    pub(super) async fn net_prepare_create(
        &self,
        req: &NewSandbox,
        template: &mut Template,
        id: &str,
    ) -> Result<NetSpec, ApiError> {
        let n = req.network.as_ref();
        let mut spec = NetSpec::from_request(
            req.allow_internet_access,
            n.and_then(|n| n.allow_out.clone()),
            n.and_then(|n| n.deny_out.clone()),
            req.allow_public_traffic
                .or(n.and_then(|n| n.allow_public_traffic)),
            n.and_then(|n| n.mask_request_host.clone()),
        )
        .map_err(net_err)?;
        let Some(network) = self.cfg.network.clone() else {
            return Ok(spec);
        };
        if !template.agent || self.cfg.backend != BackendKind::Vm {
            return Ok(spec);
        }
        let slot = network.allocate().map_err(net_err)?;
        let rules = spec.egress();
        let nw = network.clone();
        let made = tokio::task::spawn_blocking(move || nw.setup(slot, &GuestLink::Tap, &rules))
            .await
            .map_err(|e| ApiError::internal(format!("network setup: {e}")))?;
        let sb = match made {
            Ok(sb) => sb,
            Err(e) => {
                network.release(slot.index);
                return Err(net_err(e));
            }
        };
        template.boot.net = Some(crate::vmm::NetAttach {
            netns: sb.netns.clone(),
            mac: slot.guest_mac(),
        });
        template.boot.cmdline = format!(
            "{} {}",
            template.boot.cmdline,
            slot.kernel_ip_arg(network.config().dns)
        );
        spec.slot = Some(slot.index);
        lock(&self.net().live).insert(id.to_string(), sb);
        tracing::info!(sandbox = %id, guest = %slot.guest(), "sandbox network set up");
        Ok(spec)
    }

    /// Create succeeded: the settings are stored with the sandbox.
    pub(super) async fn net_commit(&self, id: &str, spec: NetSpec) -> Result<(), ApiError> {
        let store = self.store.clone();
        let (id2, spec2) = (id.to_string(), spec.clone());
        tokio::task::spawn_blocking(move || store.put_network(&id2, &spec2))
            .await
            .map_err(|e| ApiError::internal(format!("store: {e}")))?
            .map_err(|e| ApiError::internal(format!("store: {e}")))?;
        lock(&self.net().specs).insert(id.to_string(), spec);
        Ok(())
    }

    /// The network namespace of a sandbox whose network is set up now: a
    /// jailed worker joins it (and opens the tap there before it drops its
    /// privileges).
    pub(super) fn net_live_path(&self, id: &str) -> Option<std::path::PathBuf> {
        lock(&self.net().live).get(id).map(|s| s.netns.clone())
    }

    /// Removes a sandbox's namespace and rules; with `keep_slot` false also
    /// its address slot and settings (the sandbox is gone).
    pub(super) async fn net_release(&self, id: &str, keep_slot: bool, slot_hint: Option<u32>) {
        let live = lock(&self.net().live).remove(id);
        let spec = if keep_slot {
            None
        } else {
            lock(&self.net().specs).remove(id)
        };
        let Some(network) = self.cfg.network.clone() else {
            return;
        };
        if let Some(sb) = live {
            let nw = network.clone();
            let _ = tokio::task::spawn_blocking(move || nw.teardown(&sb)).await;
        }
        if !keep_slot {
            if let Some(slot) = spec.and_then(|s| s.slot).or(slot_hint) {
                network.release(slot);
            }
        }
    }

    /// Resume: re-creates the namespace (same slot, current rules) for the
    /// worker to open the tap in. None: the sandbox has no network device.
    pub(super) async fn net_for_resume(
        &self,
        id: &str,
    ) -> Result<Option<crate::vmm::NetAttach>, ApiError> {
        let spec = lock(&self.net().specs).get(id).cloned();
        let (Some(network), Some(spec)) = (self.cfg.network.clone(), spec) else {
            return Ok(None);
        };
        let Some(index) = spec.slot else {
            return Ok(None);
        };
        let slot = network.slot(index).map_err(net_err)?;
        let old = lock(&self.net().live).remove(id);
        if let Some(old) = old {
            let nw = network.clone();
            let _ = tokio::task::spawn_blocking(move || nw.teardown(&old)).await;
        }
        let rules = spec.egress();
        let nw = network.clone();
        let sb = tokio::task::spawn_blocking(move || {
            // A namespace left by a failed earlier attempt goes first.
            nw.teardown(&SandboxNet {
                slot,
                netns: crate::net::netns_path(&slot.netns_name()),
            });
            nw.setup(slot, &GuestLink::Tap, &rules)
        })
        .await
        .map_err(|e| ApiError::internal(format!("network setup: {e}")))?
        .map_err(net_err)?;
        let attach = crate::vmm::NetAttach {
            netns: sb.netns.clone(),
            mac: slot.guest_mac(),
        };
        lock(&self.net().live).insert(id.to_string(), sb);
        Ok(Some(attach))
    }

    /// Server shutdown, after every worker stopped: the namespaces that
    /// are left go (paused sandboxes keep their slots in the store).
    pub(super) async fn net_shutdown(&self) {
        let live: Vec<SandboxNet> = lock(&self.net().live).drain().map(|(_, v)| v).collect();
        let Some(network) = self.cfg.network.clone() else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || {
            for sb in &live {
                network.teardown(sb);
            }
        })
        .await;
    }

    /// `PUT /sandboxes/{id}/network`.
    pub async fn set_network(
        self: &Arc<Self>,
        id: &str,
        allow_out: Option<Vec<String>>,
        deny_out: Option<Vec<String>>,
    ) -> Result<(), ApiError> {
        let e = self.entry(id)?;
        let _op = e.op.lock().await;
        if e.rec().gone {
            return Err(self.not_found(id));
        }
        let mut spec = lock(&self.net().specs).get(id).cloned().unwrap_or_default();
        spec.update(allow_out, deny_out).map_err(net_err)?;
        // Resolve host names now, so a bad one is a 400 before anything
        // changes, for a paused sandbox too.
        crate::net::resolve_entries(&spec.allow_out).map_err(net_err)?;
        crate::net::resolve_entries(&spec.deny_out).map_err(net_err)?;
        let live = lock(&self.net().live).get(id).map(|s| s.slot);
        if let (Some(network), Some(slot)) = (self.cfg.network.clone(), live) {
            let rules = spec.egress();
            tokio::task::spawn_blocking(move || network.apply_rules(slot, &rules))
                .await
                .map_err(|e| ApiError::internal(format!("network rules: {e}")))?
                .map_err(net_err)?;
        }
        self.net_commit(id, spec).await?;
        tracing::info!(sandbox = %id, running = live.is_some(), "network rules updated");
        Ok(())
    }

    /// The proxy's check for a user port: `Err` (403) without the traffic
    /// token when public traffic is off; `Ok(Some(host))` when the Host is
    /// masked.
    pub fn traffic_check(
        &self,
        id: &str,
        port: u16,
        headers: &HeaderMap,
    ) -> Result<Option<String>, ApiError> {
        let specs = lock(&self.net().specs);
        let Some(spec) = specs.get(id) else {
            return Ok(None);
        };
        if u32::from(port) == crate::vsock::ENVD_PORT {
            return Ok(None);
        }
        let token = headers
            .get(TRAFFIC_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        if !spec.traffic_allowed(token) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "sandbox {id} does not allow public traffic: port {port} needs its traffic access token in {TRAFFIC_TOKEN_HEADER}"
                ),
            ));
        }
        Ok(spec.masked_host(port))
    }

    /// The traffic access token of a sandbox (create's answer).
    pub(super) fn net_token(&self, id: &str) -> Option<String> {
        lock(&self.net().specs)
            .get(id)
            .and_then(|s| s.traffic_token.clone())
    }

    /// `network` of `GET /sandboxes/{id}`.
    pub(super) fn net_out(&self, id: &str) -> NetworkOut {
        let spec = lock(&self.net().specs).get(id).cloned().unwrap_or_default();
        let slot = match (&self.cfg.network, spec.slot) {
            (Some(n), Some(i)) => n.slot(i).ok(),
            _ => None,
        };
        NetworkOut {
            allow_out: spec.allow_out,
            deny_out: spec.deny_out,
            allow_public_traffic: spec.allow_public_traffic,
            mask_request_host: spec.mask_request_host,
            address: slot.map(|s| format!("{}/30", s.guest())),
            gateway: slot.map(|s| s.gateway().to_string()),
        }
    }
}
