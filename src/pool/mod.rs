//! A pool of stasis hosts: design, and the parts that are pure enough to
//! build and test before the shared stores exist.
//!
//! # Design
//!
//! Every host runs the same `stasis serve`, started by an existing
//! scheduler — a Nomad `system` job or a Kubernetes DaemonSet (`deploy/`),
//! one per KVM machine — never by a cluster manager of our own. The hosts
//! share two things:
//!
//! - **an S3-compatible bucket** for snapshots: after a pause the layer's
//!   content-addressed chunks are uploaded (only those the bucket lacks),
//!   the manifest last with a conditional put as the commit point. A
//!   snapshot whose manifest is committed can resume on any host with a
//!   matching CPU/KVM fingerprint, fetching its chunks lazily by range.
//! - **a PostgreSQL database** for metadata: sandboxes (state, owner host,
//!   generation), snapshots, templates, and `hosts` rows with heartbeats
//!   (address, fingerprint, load, draining). Every state change is a
//!   conditional update on (state, generation): one resume of a snapshot
//!   wins, two hosts never run one sandbox.
//!
//! **Any host accepts any call.** The sandbox's row names its owner;
//! [`placement::route`] decides: serve here (this host owns it, or nobody
//! does because it is paused with its data in the bucket), forward to the
//! live owner (API calls and the sandbox's traffic alike, one hop only: a
//! forwarded call that still does not land on the owner answers 409), or
//! report it lost (it was running on a host that is gone — E2B does the
//! same: memory that lived only on a dead machine is gone).
//!
//! **Placement** ([`placement::place_resume`], [`placement::place_create`]):
//! a resume prefers the host where the sandbox paused if it is live and
//! still holds the data (no download at all); else the least loaded of a
//! few randomly sampled live hosts whose fingerprint matches the
//! snapshot's; else it is refused with the reason. A create takes the
//! least loaded of a sample.
//!
//! **Discovery** ([`discovery::Discovery`]): who is in the pool — a static
//! list, PostgreSQL heartbeats, Nomad services or Kubernetes
//! EndpointSlices. The scheduler's view (Nomad, Kubernetes) says which
//! hosts exist; heartbeats add fingerprint, load and draining
//! ([`discovery::merge`]).
//!
//! **Host death**: a host whose heartbeat is older than the TTL is not
//! live. Its running sandboxes are reported lost; its paused sandboxes
//! whose upload was committed are placed elsewhere on their next resume;
//! those whose upload had not finished are refused with that reason until
//! the host returns.
//!
//! **Drain**: SIGTERM (Nomad's `kill_timeout`, Kubernetes'
//! `terminationGracePeriodSeconds`, both longer than
//! `--shutdown-pause-secs`) marks the host draining (placement skips it),
//! pauses every running sandbox and waits for each upload, then releases
//! ownership: the sandboxes resume elsewhere — a migration.
//!
//! # What is here
//!
//! [`discovery`] (all four sources; PostgreSQL through the
//! [`discovery::HeartbeatStore`] trait that the metadata store implements),
//! [`placement`] (the rules above as pure functions) and the `serve` flags
//! ([`PoolArgs`]), validated at start. `serve` wires them in:
//! `crate::api::forward` (the HTTP hop to the owner) and the manager's pool
//! extension (`src/api/manager_pool.rs`: routing decisions, adoption of a
//! dead host's paused sandboxes, resume from the bucket, the drain).

pub mod discovery;
pub mod placement;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use discovery::{Discovery, HeartbeatStore, KubeSource, NomadSource};

/// Errors of the pool settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag is missing or inconsistent.
    #[error("pool settings: {0}")]
    Config(String),
    /// Building a discovery source failed.
    #[error(transparent)]
    Discovery(#[from] discovery::Error),
}

/// `--pool-discovery`: where the pool's hosts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DiscoveryKind {
    /// Not in a pool (one host; the default).
    #[default]
    None,
    /// `--pool-hosts`.
    Static,
    /// PostgreSQL heartbeats (needs the PostgreSQL metadata store).
    Postgres,
    /// Nomad services (`--nomad-addr`, `--nomad-service`).
    Nomad,
    /// Kubernetes EndpointSlices (in-cluster service account).
    Kubernetes,
}

/// The pool's `stasis serve` flags (flattened into `ServeArgs`).
#[derive(Debug, Clone, clap::Args)]
pub struct PoolArgs {
    /// Where the pool's hosts come from: none (a single host), static
    /// (--pool-hosts), postgres (heartbeats), nomad or kubernetes.
    #[arg(long, value_enum, default_value_t = DiscoveryKind::None)]
    pub pool_discovery: DiscoveryKind,
    /// Static pool: the hosts' API addresses, `a:3000,b:3000`.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub pool_hosts: Option<String>,
    /// This host's id in the pool (default: the machine's host name).
    #[arg(long)]
    pub pool_host_id: Option<String>,
    /// The address other hosts reach this host's API at (default: --listen).
    #[arg(long, value_name = "HOST:PORT")]
    pub pool_advertise: Option<String>,
    /// Hosts whose heartbeat is older than this many seconds are not live.
    #[arg(long, default_value_t = 15)]
    pub pool_heartbeat_ttl_secs: u64,
    /// Live hosts sampled per placement (the least loaded of them wins).
    #[arg(long, default_value_t = placement::DEFAULT_SAMPLE)]
    pub pool_sample: usize,
    /// Nomad's HTTP API (default: $NOMAD_ADDR, else http://127.0.0.1:4646).
    #[arg(long)]
    pub nomad_addr: Option<String>,
    /// The Nomad service the hosts register (the job's `service` name).
    #[arg(long, default_value = "stasis")]
    pub nomad_service: String,
    /// Nomad namespace (default: $NOMAD_NAMESPACE, else Nomad's default).
    #[arg(long)]
    pub nomad_namespace: Option<String>,
    /// File holding a Nomad ACL token (default: $NOMAD_TOKEN, if set).
    #[arg(long, value_name = "PATH")]
    pub nomad_token_file: Option<PathBuf>,
    /// CA certificate (PEM) of an https Nomad address (default: $NOMAD_CACERT).
    #[arg(long, value_name = "PATH")]
    pub nomad_ca_cert: Option<PathBuf>,
    /// The Kubernetes Service whose EndpointSlices list the hosts.
    #[arg(long, default_value = "stasis")]
    pub k8s_service: String,
    /// Its namespace (default: the pod's, from the service account).
    #[arg(long)]
    pub k8s_namespace: Option<String>,
    /// The Service's port name that carries the API.
    #[arg(long, default_value = "http")]
    pub k8s_port_name: String,
}

impl PoolArgs {
    /// Checks the flags at start: builds the selected source and drops it
    /// (the PostgreSQL source is built by the metadata store, which checks
    /// that `--database` is PostgreSQL).
    pub fn check(&self) -> Result<(), Error> {
        if self.pool_discovery == DiscoveryKind::Postgres {
            if self.pool_sample == 0 || self.pool_heartbeat_ttl_secs == 0 {
                return Err(Error::Config(
                    "--pool-sample and --pool-heartbeat-ttl-secs must be at least 1".into(),
                ));
            }
            return Ok(());
        }
        self.discovery(None).map(drop)
    }

    /// The discovery source these flags select (`None`: not in a pool).
    /// `heartbeats`: the metadata store, when it is PostgreSQL. Reads the
    /// token and namespace files it names (a clear error if missing); no
    /// network call.
    pub fn discovery(
        &self,
        heartbeats: Option<Arc<dyn HeartbeatStore>>,
    ) -> Result<Option<Discovery>, Error> {
        let cfg = |m: &str| Error::Config(m.into());
        if self.pool_sample == 0 {
            return Err(cfg("--pool-sample must be at least 1"));
        }
        if self.pool_heartbeat_ttl_secs == 0 {
            return Err(cfg("--pool-heartbeat-ttl-secs must be at least 1"));
        }
        if self.pool_hosts.is_some() && self.pool_discovery != DiscoveryKind::Static {
            return Err(cfg("--pool-hosts needs --pool-discovery static"));
        }
        Ok(Some(match self.pool_discovery {
            DiscoveryKind::None => return Ok(None),
            DiscoveryKind::Static => {
                let list = self
                    .pool_hosts
                    .as_deref()
                    .ok_or_else(|| cfg("--pool-discovery static needs --pool-hosts a:port,b:port"))?;
                Discovery::Static(discovery::parse_static(list)?)
            }
            DiscoveryKind::Postgres => Discovery::Heartbeats {
                store: heartbeats.ok_or_else(|| {
                    cfg("--pool-discovery postgres needs the PostgreSQL metadata store (--database postgres://...)")
                })?,
                ttl: Duration::from_secs(self.pool_heartbeat_ttl_secs),
            },
            DiscoveryKind::Nomad => {
                let addr = self
                    .nomad_addr
                    .clone()
                    .or_else(|| std::env::var("NOMAD_ADDR").ok())
                    .unwrap_or_else(|| "http://127.0.0.1:4646".into());
                let uri: hyper::Uri = addr.parse().map_err(|e| {
                    Error::Config(format!("--nomad-addr {addr:?} is not a URL: {e}"))
                })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(Error::Config(format!(
                        "--nomad-addr {addr:?} must be http://host:port or https://host:port"
                    )));
                }
                let token = match &self.nomad_token_file {
                    Some(p) => Some(
                        std::fs::read_to_string(p)
                            .map_err(|err| discovery::Error::Read {
                                source_name: "nomad",
                                path: p.clone(),
                                err,
                            })?
                            .trim()
                            .to_owned(),
                    ),
                    None => std::env::var("NOMAD_TOKEN").ok().filter(|t| !t.is_empty()),
                };
                let ca_cert = self
                    .nomad_ca_cert
                    .clone()
                    .or_else(|| std::env::var_os("NOMAD_CACERT").map(PathBuf::from));
                if uri.scheme_str() == Some("https") && ca_cert.is_none() {
                    return Err(cfg("an https --nomad-addr needs --nomad-ca-cert"));
                }
                Discovery::Nomad(NomadSource {
                    addr: uri,
                    service: self.nomad_service.clone(),
                    namespace: self
                        .nomad_namespace
                        .clone()
                        .or_else(|| std::env::var("NOMAD_NAMESPACE").ok()),
                    token,
                    ca_cert,
                })
            }
            DiscoveryKind::Kubernetes => Discovery::Kubernetes(KubeSource::in_cluster(
                std::path::Path::new(discovery::SERVICE_ACCOUNT_DIR),
                self.k8s_namespace.clone(),
                self.k8s_service.clone(),
                Some(self.k8s_port_name.clone()),
            )?),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        pool: PoolArgs,
    }

    fn args(a: &[&str]) -> PoolArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(a.iter().copied()))
            .unwrap()
            .pool
    }

    #[test]
    fn flags_select_a_source_or_say_what_is_missing() {
        assert!(args(&[]).discovery(None).unwrap().is_none());
        let d = args(&["--pool-discovery", "static", "--pool-hosts", "a:1,b:2"])
            .discovery(None)
            .unwrap()
            .unwrap();
        assert_eq!(d.name(), "static");
        let d = args(&[
            "--pool-discovery",
            "nomad",
            "--nomad-addr",
            "http://10.0.0.1:4646",
            "--nomad-namespace",
            "prod",
        ])
        .discovery(None)
        .unwrap()
        .unwrap();
        match d {
            Discovery::Nomad(n) => {
                assert_eq!(n.addr.to_string(), "http://10.0.0.1:4646/");
                assert_eq!(n.service, "stasis");
                assert_eq!(n.namespace.as_deref(), Some("prod"));
            }
            other => panic!("{other:?}"),
        }
        for (a, want) in [
            (&["--pool-discovery", "static"][..], "needs --pool-hosts"),
            (
                &["--pool-hosts", "a:1"][..],
                "needs --pool-discovery static",
            ),
            (
                &["--pool-discovery", "postgres"][..],
                "--database postgres://",
            ),
            (
                &["--pool-discovery", "nomad", "--nomad-addr", "ftp://x:1"][..],
                "must be http://",
            ),
            (
                &["--pool-discovery", "nomad", "--nomad-addr", "https://x:1"][..],
                "--nomad-ca-cert",
            ),
            (
                &[
                    "--pool-discovery",
                    "nomad",
                    "--nomad-token-file",
                    "/nonexistent/tok",
                ][..],
                "/nonexistent/tok",
            ),
            (
                &[
                    "--pool-discovery",
                    "static",
                    "--pool-hosts",
                    "a:1",
                    "--pool-sample",
                    "0",
                ][..],
                "--pool-sample",
            ),
            (
                &["--pool-discovery", "static", "--pool-hosts", "a"][..],
                "no port",
            ),
        ] {
            let e = args(a).discovery(None).unwrap_err().to_string();
            assert!(e.contains(want), "{a:?}: {e}");
        }
        struct Empty;
        impl HeartbeatStore for Empty {
            fn live_hosts(&self, _: Duration) -> Result<Vec<discovery::HostRecord>, String> {
                Ok(vec![])
            }
        }
        let d = args(&[
            "--pool-discovery",
            "postgres",
            "--pool-heartbeat-ttl-secs",
            "7",
        ])
        .discovery(Some(Arc::new(Empty)))
        .unwrap()
        .unwrap();
        assert_eq!(d.name(), "postgres");
        assert!(format!("{d:?}").contains("7s"));
    }
}
