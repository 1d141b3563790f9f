//! Host discovery: which stasis hosts make up the pool right now.
//!
//! One small interface, [`Discovery::live_hosts`], over four sources:
//!
//! - **static** (`--pool-hosts a:3000,b:3000`): a fixed list; every listed
//!   host counts as live (a dead one is found when a forwarded call fails).
//! - **PostgreSQL heartbeats** (`--pool-discovery postgres`): each host
//!   writes its [`HostRecord`] (address, CPU/KVM fingerprint, load) every few
//!   seconds; live hosts are those seen within a TTL. The store is the
//!   metadata store's business; this module only defines the trait it
//!   implements, [`HeartbeatStore`], and filters by the TTL again
//!   ([`within_ttl`]) so a store that returns stale rows cannot make a dead
//!   host look alive.
//! - **Nomad services** (`--pool-discovery nomad`): `GET
//!   /v1/service/<name>` of the Nomad HTTP API (Nomad's native service
//!   discovery; the job in `deploy/nomad` registers the service), with
//!   `X-Nomad-Token` and paging through `X-Nomad-NextToken`.
//! - **Kubernetes endpoints** (`--pool-discovery kubernetes`): the
//!   EndpointSlices of the Service in `deploy/kubernetes` (`GET
//!   /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=kubernetes.io/service-name=<name>`)
//!   with the pod's service-account token (read again on every call: the
//!   kubelet rotates it) over TLS verified against the service-account CA.
//!   Only ready endpoints count: a terminating (draining) pod is not ready.
//!
//! Nomad and Kubernetes know addresses, not fingerprints or load: their
//! records carry `fingerprint: None` and zero load; placement
//! ([`super::placement`]) never resumes a snapshot on a host whose
//! fingerprint it cannot check. [`merge`] completes address-only records
//! with heartbeat records of the same address.
//!
//! Every answer from Nomad, Kubernetes or the heartbeat store is untrusted:
//! bodies are bounded ([`MAX_BODY`]), fields checked (a port of 0 or above
//! 65535, an empty address, a malformed fingerprint are clear errors), and
//! a call has an overall deadline ([`HTTP_TIMEOUT`]).
//!
//! The HTTP client is the crate's hyper stack (one HTTP/1.1 connection per
//! call; rustls with the ring provider for https).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::Body as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::snapshot::manifest::HostFingerprint;

/// Largest response body read from Nomad or Kubernetes.
pub const MAX_BODY: usize = 8 << 20;
/// Deadline of one discovery call (connect, request, whole body).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most pages followed through `X-Nomad-NextToken`.
pub const MAX_PAGES: usize = 64;
/// Where a pod finds its service account (token, ca.crt, namespace).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Errors of host discovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host address (from a flag or an answer) is not `host:port`.
    #[error("{source_name}: host address {addr:?} is not host:port ({why})")]
    BadAddress {
        /// Which source produced it.
        source_name: &'static str,
        /// The address as given.
        addr: String,
        /// What is wrong.
        why: String,
    },
    /// A URL (Nomad address, Kubernetes API) is unusable.
    #[error("{source_name}: URL {url:?} is not usable: {why}")]
    BadUrl {
        /// Which source.
        source_name: &'static str,
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// Reading a local file (token, CA, namespace) failed.
    #[error("{source_name}: reading {path}: {err}")]
    Read {
        /// Which source.
        source_name: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("{source_name}: CA file {path}: {why}")]
    Ca {
        /// Which source.
        source_name: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The request failed (connect, TLS, HTTP, deadline).
    #[error("{source_name}: GET {url}: {why}")]
    Http {
        /// Which source.
        source_name: &'static str,
        /// The URL.
        url: String,
        /// What failed.
        why: String,
    },
    /// The server answered with a non-2xx status.
    #[error("{source_name}: GET {url} answered {status}: {body}")]
    Status {
        /// Which source.
        source_name: &'static str,
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// The answer does not have the documented shape.
    #[error("{source_name}: GET {url}: unexpected answer: {why}")]
    Parse {
        /// Which source.
        source_name: &'static str,
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The heartbeat store failed.
    #[error("postgres heartbeats: {0}")]
    Store(String),
    /// A heartbeat row is unusable.
    #[error("postgres heartbeats: host {id:?}: {why}")]
    BadRecord {
        /// The host's id.
        id: String,
        /// What is wrong.
        why: String,
    },
}

/// A host's load, as its heartbeat reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Sandboxes running on it.
    pub running: u32,
    /// Bytes of guest memory of its running sandboxes.
    pub memory_used: u64,
    /// Bytes it may still give to sandboxes (its `--max-memory-share` of
    /// RAM less what running sandboxes hold).
    pub memory_free: u64,
}

/// One stasis host of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Stable id (`--pool-host-id`; Nomad node id, Kubernetes node name, or
    /// the address when a source knows nothing better).
    pub id: String,
    /// `host:port` of its API, as other hosts reach it.
    pub address: String,
    /// CPU/KVM fingerprint; `None` when the source does not know it.
    pub fingerprint: Option<HostFingerprint>,
    /// Load at the last heartbeat (zero when unknown).
    pub load: HostLoad,
    /// Last heartbeat; `None` when the source has no heartbeats.
    pub last_heartbeat: Option<SystemTime>,
    /// The host is draining (SIGTERM received): it takes no new sandboxes.
    pub draining: bool,
}

impl HostRecord {
    /// A record that knows only an address (static, Nomad, Kubernetes).
    pub fn address_only(id: impl Into<String>, address: impl Into<String>) -> HostRecord {
        HostRecord {
            id: id.into(),
            address: address.into(),
            fingerprint: None,
            load: HostLoad::default(),
            last_heartbeat: None,
            draining: false,
        }
    }
}

/// What the PostgreSQL metadata store implements for discovery: the hosts
/// whose last heartbeat is within `ttl`. Blocking (the store's client is
/// synchronous); [`Discovery::live_hosts`] calls it on tokio's blocking
/// pool.
pub trait HeartbeatStore: Send + Sync + 'static {
    /// Hosts seen within `ttl` of now (the store's clock).
    fn live_hosts(&self, ttl: Duration) -> Result<Vec<HostRecord>, String>;
}

/// Nomad service discovery settings.
#[derive(Debug, Clone)]
pub struct NomadSource {
    /// The Nomad agent's HTTP API (`http://127.0.0.1:4646`).
    pub addr: Uri,
    /// The service name the job registers.
    pub service: String,
    /// Nomad namespace (`None`: Nomad's default).
    pub namespace: Option<String>,
    /// ACL token (`X-Nomad-Token`).
    pub token: Option<String>,
    /// CA certificate (PEM) for an https Nomad address.
    pub ca_cert: Option<PathBuf>,
}

/// Kubernetes EndpointSlice discovery settings.
#[derive(Debug, Clone)]
pub struct KubeSource {
    /// The API server (`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`).
    pub api: Uri,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// Name of the port in the slice (`None`: the slice's only port).
    pub port_name: Option<String>,
    /// Bearer token file (re-read on every call).
    pub token_file: PathBuf,
    /// CA certificate (PEM) of the API server.
    pub ca_cert: PathBuf,
}

impl KubeSource {
    /// In-cluster settings: the API server from `KUBERNETES_SERVICE_HOST`/
    /// `_PORT`, the token, CA and (unless given) namespace from the pod's
    /// service account directory `sa_dir`.
    pub fn in_cluster(
        sa_dir: &Path,
        namespace: Option<String>,
        service: String,
        port_name: Option<String>,
    ) -> Result<KubeSource, Error> {
        KubeSource::from_service_account(
            std::env::var("KUBERNETES_SERVICE_HOST").ok(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok(),
            sa_dir,
            namespace,
            service,
            port_name,
        )
    }

    /// [`KubeSource::in_cluster`] with the API server's host and port given.
    pub fn from_service_account(
        host: Option<String>,
        port: Option<String>,
        sa_dir: &Path,
        namespace: Option<String>,
        service: String,
        port_name: Option<String>,
    ) -> Result<KubeSource, Error> {
        let host = host
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::BadUrl {
                source_name: "kubernetes",
                url: String::new(),
                why: "KUBERNETES_SERVICE_HOST is not set (not running in a pod?)".into(),
            })?;
        let port = port.unwrap_or_else(|| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let url = format!("https://{host}:{port}");
        let api = url.parse().map_err(|e| Error::BadUrl {
            source_name: "kubernetes",
            url: url.clone(),
            why: format!("{e}"),
        })?;
        let namespace = match namespace {
            Some(n) => n,
            None => {
                let p = sa_dir.join("namespace");
                std::fs::read_to_string(&p)
                    .map_err(|err| Error::Read {
                        source_name: "kubernetes",
                        path: p,
                        err,
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(KubeSource {
            api,
            namespace,
            service,
            port_name,
            token_file: sa_dir.join("token"),
            ca_cert: sa_dir.join("ca.crt"),
        })
    }
}

/// A source of live hosts.
#[derive(Clone)]
pub enum Discovery {
    /// A fixed list (`--pool-hosts`).
    Static(Vec<HostRecord>),
    /// PostgreSQL heartbeats within a TTL.
    Heartbeats {
        /// The metadata store.
        store: Arc<dyn HeartbeatStore>,
        /// How recent a heartbeat must be.
        ttl: Duration,
    },
    /// Nomad services.
    Nomad(NomadSource),
    /// Kubernetes EndpointSlices.
    Kubernetes(KubeSource),
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Discovery::Static(h) => f.debug_tuple("Static").field(h).finish(),
            Discovery::Heartbeats { ttl, .. } => {
                f.debug_struct("Heartbeats").field("ttl", ttl).finish()
            }
            Discovery::Nomad(n) => f.debug_tuple("Nomad").field(n).finish(),
            Discovery::Kubernetes(k) => f.debug_tuple("Kubernetes").field(k).finish(),
        }
    }
}

impl Discovery {
    /// The source's name, as `--pool-discovery` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Discovery::Static(_) => "static",
            Discovery::Heartbeats { .. } => "postgres",
            Discovery::Nomad(_) => "nomad",
            Discovery::Kubernetes(_) => "kubernetes",
        }
    }

    /// The hosts of the pool that are live now, sorted by id, one per
    /// address.
    pub async fn live_hosts(&self) -> Result<Vec<HostRecord>, Error> {
        let mut hosts = match self {
            Discovery::Static(h) => h.clone(),
            Discovery::Heartbeats { store, ttl } => {
                let (store, ttl) = (store.clone(), *ttl);
                let rows = tokio::task::spawn_blocking(move || store.live_hosts(ttl))
                    .await
                    .map_err(|e| Error::Store(format!("the store call panicked: {e}")))?
                    .map_err(Error::Store)?;
                let rows = within_ttl(rows, SystemTime::now(), ttl);
                for r in &rows {
                    check_address("postgres", &r.address).map_err(|e| Error::BadRecord {
                        id: r.id.clone(),
                        why: e.to_string(),
                    })?;
                }
                rows
            }
            Discovery::Nomad(n) => nomad_hosts(n).await?,
            Discovery::Kubernetes(k) => kube_hosts(k).await?,
        };
        hosts.sort_by(|a, b| a.id.cmp(&b.id).then(a.address.cmp(&b.address)));
        let mut seen = std::collections::HashSet::new();
        hosts.retain(|h| seen.insert(h.address.clone()));
        Ok(hosts)
    }
}

/// The records whose heartbeat is within `ttl` before `now` (a record
/// without a heartbeat, or one from the future by more than `ttl` — a
/// skewed clock — is not live).
pub fn within_ttl(rows: Vec<HostRecord>, now: SystemTime, ttl: Duration) -> Vec<HostRecord> {
    rows.into_iter()
        .filter(|r| match r.last_heartbeat {
            Some(t) => match now.duration_since(t) {
                Ok(age) => age <= ttl,
                Err(ahead) => ahead.duration() <= ttl,
            },
            None => false,
        })
        .collect()
}

/// Completes address-only records (`found`) with the heartbeat record of
/// the same address: the heartbeat knows fingerprint, load and draining;
/// the scheduler's source decides who is in the pool.
pub fn merge(found: Vec<HostRecord>, heartbeats: &[HostRecord]) -> Vec<HostRecord> {
    let by_addr: BTreeMap<&str, &HostRecord> =
        heartbeats.iter().map(|h| (h.address.as_str(), h)).collect();
    found
        .into_iter()
        .map(|f| match by_addr.get(f.address.as_str()) {
            Some(h) => (*h).clone(),
            None => f,
        })
        .collect()
}

/// Parses `--pool-hosts a:port,b:port` (each entry `host:port` or
/// `[v6]:port`; duplicates and empty entries are errors).
pub fn parse_static(list: &str) -> Result<Vec<HostRecord>, Error> {
    let mut out: Vec<HostRecord> = Vec::new();
    for raw in list.split(',') {
        let a = raw.trim();
        check_address("static", a)?;
        if out.iter().any(|h| h.address == a) {
            return Err(Error::BadAddress {
                source_name: "static",
                addr: a.into(),
                why: "listed twice".into(),
            });
        }
        out.push(HostRecord::address_only(a, a));
    }
    Ok(out)
}

/// Checks that `a` is `host:port` with a non-empty host without spaces or
/// path characters and a port in 1..=65535.
fn check_address(source_name: &'static str, a: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::BadAddress {
        source_name,
        addr: a.into(),
        why: why.into(),
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if host.starts_with('[') != host.ends_with(']') {
        return Err(bad("unbalanced brackets"));
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err(bad("an IPv6 address needs brackets: [addr]:port"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@'))
    {
        return Err(bad("the host has a character no host name has"));
    }
    match port.parse::<u16>() {
        Ok(0) => Err(bad("port 0")),
        Ok(_) => Ok(()),
        Err(_) => Err(bad("the port is not a number in 1..=65535")),
    }
}

fn host_port(ip: &str, port: i64) -> Result<String, String> {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port} is not in 1..=65535"))?;
    if ip.is_empty() {
        return Err("empty address".into());
    }
    Ok(if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

/// Percent-encodes a path segment or query value (RFC 3986 unreserved kept).
fn pct(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// One registration of `GET /v1/service/<name>` (Nomad's documented
/// fields; others are ignored).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NomadRegistration {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "NodeID", default)]
    node_id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: i64,
}

async fn nomad_hosts(n: &NomadSource) -> Result<Vec<HostRecord>, Error> {
    const SRC: &str = "nomad";
    let tls = match n.addr.scheme_str() {
        Some("https") => Some(tls_config(SRC, n.ca_cert.as_deref())?),
        _ => None,
    };
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut q = Vec::new();
        if let Some(ns) = &n.namespace {
            q.push(format!("namespace={}", pct(ns)));
        }
        if let Some(t) = &next {
            q.push(format!("next_token={}", pct(t)));
        }
        let mut path = format!("/v1/service/{}", pct(&n.service));
        if !q.is_empty() {
            path = format!("{path}?{}", q.join("&"));
        }
        let mut headers = HeaderMap::new();
        if let Some(t) = &n.token {
            let v = HeaderValue::from_str(t).map_err(|_| Error::BadUrl {
                source_name: SRC,
                url: n.addr.to_string(),
                why: "the ACL token is not a valid header value".into(),
            })?;
            headers.insert(HeaderName::from_static("x-nomad-token"), v);
        }
        let (url, resp_headers, body) = get(SRC, &n.addr, &path, headers, tls.clone()).await?;
        let regs: Vec<NomadRegistration> =
            serde_json::from_slice(&body).map_err(|e| Error::Parse {
                source_name: SRC,
                url: url.clone(),
                why: format!("not a list of service registrations: {e}"),
            })?;
        for r in regs {
            let address = host_port(&r.address, r.port).map_err(|why| Error::Parse {
                source_name: SRC,
                url: url.clone(),
                why: format!("registration {:?}: {why}", r.id),
            })?;
            let id = if r.node_id.is_empty() {
                address.clone()
            } else {
                r.node_id
            };
            out.push(HostRecord::address_only(id, address));
        }
        next = resp_headers
            .get("x-nomad-nexttoken")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        if next.is_none() {
            return Ok(out);
        }
    }
    Err(Error::Parse {
        source_name: SRC,
        url: n.addr.to_string(),
        why: format!("more than {MAX_PAGES} pages"),
    })
}

/// `discovery.k8s.io/v1` EndpointSliceList, the fields used.
#[derive(Deserialize)]
struct SliceList {
    items: Vec<Slice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Slice {
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<SlicePort>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<Conditions>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize)]
struct Conditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct SlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i64>,
}

async fn kube_hosts(k: &KubeSource) -> Result<Vec<HostRecord>, Error> {
    const SRC: &str = "kubernetes";
    let token = std::fs::read_to_string(&k.token_file).map_err(|err| Error::Read {
        source_name: SRC,
        path: k.token_file.clone(),
        err,
    })?;
    let tls = match k.api.scheme_str() {
        Some("https") => Some(tls_config(SRC, Some(&k.ca_cert))?),
        _ => None,
    };
    let mut headers = HeaderMap::new();
    let auth =
        HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| Error::Read {
            source_name: SRC,
            path: k.token_file.clone(),
            err: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token is not a valid header value",
            ),
        })?;
    headers.insert(hyper::header::AUTHORIZATION, auth);
    let path = format!(
        "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices?labelSelector={}",
        pct(&k.namespace),
        pct(&format!("kubernetes.io/service-name={}", k.service))
    );
    let (url, _, body) = get(SRC, &k.api, &path, headers, tls).await?;
    let list: SliceList = serde_json::from_slice(&body).map_err(|e| Error::Parse {
        source_name: SRC,
        url: url.clone(),
        why: format!("not an EndpointSliceList: {e}"),
    })?;
    let mut out = Vec::new();
    for s in list.items {
        if s.address_type == "FQDN" {
            continue;
        }
        let ports = s.ports.unwrap_or_default();
        let port = match &k.port_name {
            Some(want) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(want.as_str()))
                .and_then(|p| p.port),
            None if ports.len() == 1 => ports[0].port,
            None => None,
        };
        let Some(port) = port else {
            // A slice without the port (e.g. while the Service changes):
            // its endpoints cannot be reached on it.
            continue;
        };
        for e in s.endpoints.unwrap_or_default() {
            // `ready` unset means ready (the API's documented default for
            // consumers); a terminating pod is not ready.
            if e.conditions.and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let Some(ip) = e.addresses.first() else {
                continue;
            };
            let address = host_port(ip, port).map_err(|why| Error::Parse {
                source_name: SRC,
                url: url.clone(),
                why: format!("endpoint {ip:?}: {why}"),
            })?;
            let id = e
                .node_name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| address.clone());
            out.push(HostRecord::address_only(id, address));
        }
    }
    Ok(out)
}

/// A rustls client config trusting `ca` (PEM), or nothing if `ca` is
/// `None` (an https Nomad without `--nomad-ca-cert` is refused).
fn tls_config(source_name: &'static str, ca: Option<&Path>) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ca = ca.ok_or_else(|| Error::BadUrl {
        source_name,
        url: String::new(),
        why: "https needs a CA certificate file".into(),
    })?;
    let pem = std::fs::read(ca).map_err(|err| Error::Read {
        source_name,
        path: ca.to_owned(),
        err,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| Error::Ca {
            source_name,
            path: ca.to_owned(),
            why: format!("not PEM: {e}"),
        })?;
        roots.add(c).map_err(|e| Error::Ca {
            source_name,
            path: ca.to_owned(),
            why: format!("not a usable certificate: {e}"),
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Ca {
            source_name,
            path: ca.to_owned(),
            why: "no certificate in it".into(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Ca {
            source_name,
            path: ca.to_owned(),
            why: format!("TLS setup: {e}"),
        })
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// `GET base+path` with `headers`; returns the URL, the answer's headers
/// and its body (2xx only, at most [`MAX_BODY`], within [`HTTP_TIMEOUT`]).
async fn get(
    source_name: &'static str,
    base: &Uri,
    path: &str,
    headers: HeaderMap,
    tls: Option<rustls::ClientConfig>,
) -> Result<(String, HeaderMap, Bytes), Error> {
    let url = format!(
        "{}://{}{}",
        base.scheme_str().unwrap_or("http"),
        base.authority().map(|a| a.as_str()).unwrap_or(""),
        path
    );
    let u = url.clone();
    match tokio::time::timeout(
        HTTP_TIMEOUT,
        get_inner(source_name, base, path, headers, tls, &u),
    )
    .await
    {
        Ok(r) => r.map(|(h, b)| (url, h, b)),
        Err(_) => Err(Error::Http {
            source_name,
            url,
            why: format!("no complete answer within {HTTP_TIMEOUT:?}"),
        }),
    }
}

async fn get_inner(
    source_name: &'static str,
    base: &Uri,
    path: &str,
    headers: HeaderMap,
    tls: Option<rustls::ClientConfig>,
    url: &str,
) -> Result<(HeaderMap, Bytes), Error> {
    let http = |why: String| Error::Http {
        source_name,
        url: url.to_owned(),
        why,
    };
    let bad_url = |why: &str| Error::BadUrl {
        source_name,
        url: base.to_string(),
        why: why.into(),
    };
    let https = match base.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad_url("the scheme must be http or https")),
    };
    let host = base.host().ok_or_else(|| bad_url("no host"))?;
    let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| http(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let authority = base
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(axum::body::Body::empty())
        .map_err(|e| http(format!("building the request: {e}")))?;
    req.headers_mut().extend(headers);
    if https {
        let cfg = tls.ok_or_else(|| bad_url("https without TLS settings"))?;
        let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
            .map_err(|e| bad_url(&format!("not a TLS server name: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| http(format!("TLS: {e}")))?;
        exchange(stream, req, &http).await
    } else {
        exchange(tcp, req, &http).await
    }
}

async fn exchange<S>(
    stream: S,
    req: Request<axum::body::Body>,
    http: &(dyn Fn(String) -> Error + Sync),
) -> Result<(HeaderMap, Bytes), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(format!("HTTP handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http(format!("{e}")))?;
    let (parts, mut body) = resp.into_parts();
    let mut buf = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| http(format!("reading the body: {e}")))?;
        if let Ok(d) = frame.into_data() {
            if buf.len() + d.len() > MAX_BODY {
                conn.abort();
                return Err(http(format!("the body is over {MAX_BODY} bytes")));
            }
            buf.extend_from_slice(&d);
        }
    }
    conn.abort();
    if !parts.status.is_success() {
        let text = String::from_utf8_lossy(&buf[..buf.len().min(300)]).into_owned();
        return Err(match http(String::new()) {
            Error::Http {
                source_name, url, ..
            } => Error::Status {
                source_name,
                url,
                status: parts.status,
                body: text,
            },
            e => e,
        });
    }
    Ok((parts.headers, Bytes::from(buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback HTTP(S) server answering each connection with the next
    /// canned response; it records each request head.
    struct Replay {
        addr: std::net::SocketAddr,
        heads: Arc<Mutex<Vec<String>>>,
    }

    /// A canned answer: status, extra headers, body.
    type Canned = (u16, Vec<(&'static str, String)>, String);

    async fn replay(responses: Vec<Canned>, tls: Option<Arc<rustls::ServerConfig>>) -> Replay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h2 = heads.clone();
        tokio::spawn(async move {
            for (status, hdrs, body) in responses {
                let Ok((s, _)) = l.accept().await else { return };
                let h = h2.clone();
                let tls = tls.clone();
                let serve = async move |mut s: Box<dyn Stream>| {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    h.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let mut out = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in &hdrs {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    out.push_str(&body);
                    let _ = s.write_all(out.as_bytes()).await;
                    let _ = s.shutdown().await;
                };
                match tls {
                    Some(cfg) => {
                        let Ok(t) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                            continue;
                        };
                        serve(Box::new(t)).await
                    }
                    None => serve(Box::new(s)).await,
                }
            }
        });
        Replay { addr, heads }
    }

    trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn static_list_parses_and_rejects_bad_entries() {
        let h = parse_static("10.0.0.1:3000, host-b:3001,[::1]:3002").unwrap();
        let a: Vec<_> = h.iter().map(|h| h.address.as_str()).collect();
        assert_eq!(a, ["10.0.0.1:3000", "host-b:3001", "[::1]:3002"]);
        assert!(h.iter().all(|h| h.fingerprint.is_none() && !h.draining));
        for (bad, why) in [
            ("", "no port"),
            ("a:3000,,b:3000", "no port"),
            ("a", "no port"),
            (":3000", "empty host"),
            ("a:0", "port 0"),
            ("a:70000", "1..=65535"),
            ("a:x", "1..=65535"),
            ("::1:3000", "brackets"),
            ("[::1:3000", "unbalanced"),
            ("a/b:3000", "character"),
            ("a:3000,a:3000", "twice"),
        ] {
            let e = parse_static(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    fn fp(vendor: &str) -> HostFingerprint {
        HostFingerprint {
            cpu_vendor: vendor.into(),
            cpu_signature: 0x806f8,
            cpu_features: 42,
            kvm_api_version: 12,
        }
    }

    fn beat(id: &str, addr: &str, age_s: u64, now: SystemTime) -> HostRecord {
        HostRecord {
            id: id.into(),
            address: addr.into(),
            fingerprint: Some(fp("GenuineIntel")),
            load: HostLoad {
                running: 3,
                memory_used: 1 << 30,
                memory_free: 4 << 30,
            },
            last_heartbeat: Some(now - Duration::from_secs(age_s)),
            draining: false,
        }
    }

    struct FakeStore(Vec<HostRecord>);
    impl HeartbeatStore for FakeStore {
        fn live_hosts(&self, _ttl: Duration) -> Result<Vec<HostRecord>, String> {
            Ok(self.0.clone())
        }
    }

    struct DownStore;
    impl HeartbeatStore for DownStore {
        fn live_hosts(&self, _ttl: Duration) -> Result<Vec<HostRecord>, String> {
            Err("connection refused".into())
        }
    }

    #[test]
    fn heartbeats_keep_only_hosts_within_the_ttl() {
        let now = SystemTime::now();
        let ttl = Duration::from_secs(15);
        let mut future = beat("skewed", "d:1", 0, now);
        future.last_heartbeat = Some(now + Duration::from_secs(60));
        let mut none = beat("never", "e:1", 0, now);
        none.last_heartbeat = None;
        let rows = vec![
            beat("b", "b:1", 14, now),
            beat("a", "a:1", 0, now),
            beat("stale", "c:1", 16, now),
            future,
            none,
        ];
        // The store returns stale rows: discovery drops them anyway.
        let d = Discovery::Heartbeats {
            store: Arc::new(FakeStore(rows)),
            ttl,
        };
        let live = rt().block_on(d.live_hosts()).unwrap();
        let ids: Vec<_> = live.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(live[0].load.running, 3);

        let e = rt()
            .block_on(
                Discovery::Heartbeats {
                    store: Arc::new(DownStore),
                    ttl,
                }
                .live_hosts(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("connection refused"), "{e}");
        let bad = beat("x", "no-port", 0, now);
        let e = rt()
            .block_on(
                Discovery::Heartbeats {
                    store: Arc::new(FakeStore(vec![bad])),
                    ttl,
                }
                .live_hosts(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"x\"") && e.contains("no port"), "{e}");
    }

    #[test]
    fn merge_completes_address_only_records() {
        let now = SystemTime::now();
        let found = parse_static("a:1,b:1").unwrap();
        let m = merge(found, &[beat("host-a", "a:1", 1, now)]);
        assert_eq!(m[0].id, "host-a");
        assert!(m[0].fingerprint.is_some());
        assert_eq!(m[1].id, "b:1");
        assert!(m[1].fingerprint.is_none());
    }

    /// The documented shape of `GET /v1/service/<name>` (Nomad HTTP API,
    /// "Read Service"), two pages.
    const NOMAD_PAGE_1: &str = r#"[
      {"Address":"10.0.0.11","AllocID":"5f0730ca-b055-52ac-f56e-358f3f7412f6","CreateIndex":33,
       "Datacenter":"dc1","ID":"_nomad-task-5f0730ca-b055-52ac-f56e-358f3f7412f6-stasis-stasis-http",
       "JobID":"stasis","ModifyIndex":33,"Namespace":"default","NodeID":"7406e90b-de16-d118-80fe-60d0f2730cb3",
       "Port":3000,"ServiceName":"stasis","Tags":["api"]}
    ]"#;
    const NOMAD_PAGE_2: &str = r#"[
      {"Address":"10.0.0.12","AllocID":"a831f7f2-4c01-39dc-c742-f2b8ca178a49","CreateIndex":35,
       "Datacenter":"dc1","ID":"_nomad-task-a831f7f2-stasis","JobID":"stasis","ModifyIndex":35,
       "Namespace":"default","NodeID":"","Port":3000,"ServiceName":"stasis","Tags":[]}
    ]"#;

    #[test]
    fn nomad_service_registrations_with_paging_and_token() {
        rt().block_on(async {
            let srv = replay(
                vec![
                    (
                        200,
                        vec![("X-Nomad-NextToken", "tok 2".into())],
                        NOMAD_PAGE_1.into(),
                    ),
                    (200, vec![], NOMAD_PAGE_2.into()),
                ],
                None,
            )
            .await;
            let d = Discovery::Nomad(NomadSource {
                addr: format!("http://{}", srv.addr).parse().unwrap(),
                service: "stasis".into(),
                namespace: Some("prod".into()),
                token: Some("secret-acl".into()),
                ca_cert: None,
            });
            let hosts = d.live_hosts().await.unwrap();
            let got: Vec<_> = hosts
                .iter()
                .map(|h| (h.id.as_str(), h.address.as_str()))
                .collect();
            assert_eq!(
                got,
                [
                    ("10.0.0.12:3000", "10.0.0.12:3000"),
                    ("7406e90b-de16-d118-80fe-60d0f2730cb3", "10.0.0.11:3000"),
                ]
            );
            let heads = srv.heads.lock().unwrap().clone();
            assert!(
                heads[0].starts_with("GET /v1/service/stasis?namespace=prod HTTP/1.1"),
                "{}",
                heads[0]
            );
            assert!(heads[0]
                .to_ascii_lowercase()
                .contains("x-nomad-token: secret-acl"));
            assert!(
                heads[1].starts_with("GET /v1/service/stasis?namespace=prod&next_token=tok%202 "),
                "{}",
                heads[1]
            );
        });
    }

    #[test]
    fn nomad_errors_are_clear() {
        rt().block_on(async {
            let src = |addr: std::net::SocketAddr| {
                Discovery::Nomad(NomadSource {
                    addr: format!("http://{addr}").parse().unwrap(),
                    service: "stasis".into(),
                    namespace: None,
                    token: None,
                    ca_cert: None,
                })
            };
            let cases = [
                (403, "Permission denied", "403"),
                (
                    200,
                    "{\"not\": \"a list\"}",
                    "not a list of service registrations",
                ),
                (
                    200,
                    r#"[{"Address":"10.0.0.1","Port":0,"ID":"x"}]"#,
                    "port 0 is not in 1..=65535",
                ),
                (
                    200,
                    r#"[{"Address":"","Port":3000,"ID":"y"}]"#,
                    "empty address",
                ),
            ];
            for (status, body, want) in cases {
                let srv = replay(vec![(status, vec![], body.into())], None).await;
                let e = src(srv.addr).live_hosts().await.unwrap_err().to_string();
                assert!(e.contains(want) && e.contains("nomad"), "{body}: {e}");
            }
            // Nothing listening.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            let e = src(addr).live_hosts().await.unwrap_err().to_string();
            assert!(e.contains("connect"), "{e}");
        });
    }

    /// The documented shape of an EndpointSliceList (discovery.k8s.io/v1):
    /// two slices of one Service, one endpoint terminating (not ready), one
    /// with `ready` unset, one duplicate across slices.
    const SLICES: &str = r#"{
      "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
      "metadata": {"resourceVersion": "12345"},
      "items": [
        {"metadata": {"name": "stasis-abc12", "namespace": "sandboxes",
                      "labels": {"kubernetes.io/service-name": "stasis"}},
         "addressType": "IPv4",
         "endpoints": [
           {"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "kvm-node-1", "targetRef": {"kind": "Pod", "name": "stasis-x1", "namespace": "sandboxes"}},
           {"addresses": ["10.244.2.7"], "conditions": {"ready": false, "serving": true, "terminating": true},
            "nodeName": "kvm-node-2"},
           {"addresses": ["10.244.3.9"], "conditions": {}, "nodeName": "kvm-node-3"}
         ],
         "ports": [{"name": "http", "port": 3000, "protocol": "TCP"}, {"name": "sandbox", "port": 49983, "protocol": "TCP"}]},
        {"metadata": {"name": "stasis-def34"}, "addressType": "IPv4",
         "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "nodeName": "kvm-node-1"}],
         "ports": [{"name": "http", "port": 3000, "protocol": "TCP"}]},
        {"metadata": {"name": "stasis-empty"}, "addressType": "IPv4", "endpoints": null, "ports": null}
      ]
    }"#;

    /// A CA and a server certificate for 127.0.0.1 signed by it.
    fn test_pki(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        (ca_path, Arc::new(cfg))
    }

    #[test]
    fn kubernetes_endpoint_slices_over_tls_with_the_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server_tls) = test_pki(dir.path());
        let token = dir.path().join("token");
        std::fs::write(&token, "eyJhbGciOi.sa-token\n").unwrap();
        rt().block_on(async {
            let srv = replay(vec![(200, vec![], SLICES.into())], Some(server_tls.clone())).await;
            let k = KubeSource {
                api: format!("https://{}", srv.addr).parse().unwrap(),
                namespace: "sandboxes".into(),
                service: "stasis".into(),
                port_name: Some("http".into()),
                token_file: token.clone(),
                ca_cert: ca.clone(),
            };
            let hosts = Discovery::Kubernetes(k.clone()).live_hosts().await.unwrap();
            let got: Vec<_> = hosts
                .iter()
                .map(|h| (h.id.as_str(), h.address.as_str()))
                .collect();
            assert_eq!(
                got,
                [
                    ("kvm-node-1", "10.244.1.5:3000"),
                    ("kvm-node-3", "10.244.3.9:3000")
                ]
            );
            let head = srv.heads.lock().unwrap()[0].clone();
            assert!(
                head.starts_with(
                    "GET /apis/discovery.k8s.io/v1/namespaces/sandboxes/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dstasis HTTP/1.1"
                ),
                "{head}"
            );
            assert!(
                head.to_ascii_lowercase().contains("authorization: bearer eyjhbgcioi.sa-token\r\n"),
                "{head}"
            );

            // A server whose certificate the CA did not sign is refused.
            let other = tempfile::tempdir().unwrap();
            let (_, other_tls) = test_pki(other.path());
            let srv = replay(vec![(200, vec![], SLICES.into())], Some(other_tls)).await;
            let mut k2 = k.clone();
            k2.api = format!("https://{}", srv.addr).parse().unwrap();
            let e = Discovery::Kubernetes(k2).live_hosts().await.unwrap_err().to_string();
            assert!(e.contains("TLS"), "{e}");

            // No port named "http" in the slices, without a port name and
            // several ports: no hosts, not a guess.
            let srv = replay(vec![(200, vec![], SLICES.into())], Some(server_tls.clone())).await;
            let mut k3 = k.clone();
            k3.api = format!("https://{}", srv.addr).parse().unwrap();
            k3.port_name = Some("metrics".into());
            assert!(Discovery::Kubernetes(k3).live_hosts().await.unwrap().is_empty());

            // Missing token, bad CA, RBAC refusal: clear errors.
            let mut k4 = k.clone();
            k4.token_file = dir.path().join("missing-token");
            let e = Discovery::Kubernetes(k4).live_hosts().await.unwrap_err().to_string();
            assert!(e.contains("missing-token"), "{e}");
            let junk = dir.path().join("junk.crt");
            std::fs::write(&junk, "not a certificate").unwrap();
            let mut k5 = k.clone();
            k5.ca_cert = junk;
            let e = Discovery::Kubernetes(k5).live_hosts().await.unwrap_err().to_string();
            assert!(e.contains("junk.crt") && e.contains("no certificate"), "{e}");
            let forbidden = r#"{"kind":"Status","status":"Failure","reason":"Forbidden","code":403}"#;
            let srv = replay(vec![(403, vec![], forbidden.into())], Some(server_tls)).await;
            let mut k6 = k.clone();
            k6.api = format!("https://{}", srv.addr).parse().unwrap();
            let e = Discovery::Kubernetes(k6).live_hosts().await.unwrap_err().to_string();
            assert!(e.contains("403") && e.contains("Forbidden"), "{e}");
        });
    }

    #[test]
    fn in_cluster_settings_come_from_the_service_account() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("namespace"), "sandboxes\n").unwrap();
        let sa = |host: Option<&str>, ns: Option<&str>| {
            KubeSource::from_service_account(
                host.map(str::to_owned),
                Some("6443".into()),
                dir.path(),
                ns.map(str::to_owned),
                "stasis".into(),
                None,
            )
        };
        let k = sa(Some("10.96.0.1"), None).unwrap();
        assert_eq!(k.api.to_string(), "https://10.96.0.1:6443/");
        assert_eq!(k.namespace, "sandboxes");
        assert_eq!(k.token_file, dir.path().join("token"));
        assert_eq!(k.ca_cert, dir.path().join("ca.crt"));
        let k = sa(Some("fd00::1"), Some("x")).unwrap();
        assert_eq!(k.namespace, "x");
        assert_eq!(k.api.host(), Some("[fd00::1]"));
        let e = sa(None, None).unwrap_err().to_string();
        assert!(e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
    }
}
