//! The sandbox server: the lifecycle HTTP API that the novita-sandbox / E2B
//! SDKs speak (`stasis serve`).
//!
//! - [`routes`]: axum routes, auth, error mapping, request logging.
//! - [`manager`]: the per-sandbox state machine, timers, restart recovery.
//! - [`store`]: metadata in SQLite (`<data-dir>/stasis.db`) or PostgreSQL
//!   ([`store_pg`], `--database postgres://…`).
//! - [`models`]: JSON shapes; [`error`]: the JSON error; [`openapi`]: the
//!   OpenAPI document.
//! - [`proxy`]: forwards in-sandbox traffic (`Novita-Sandbox-Id`/`-Port`
//!   headers or `{port}-{id}.{domain}` hosts) to the sandbox's agent.
//! - [`forward`]: in a pool of hosts, sends calls and traffic for a
//!   sandbox another host holds to that host.
//!
//! Each running sandbox lives in its own worker process ([`crate::worker`]);
//! nothing here touches KVM. [`bench`] drives this API in-process and
//! measures its latency (`stasis bench --api`).

pub mod bench;
pub mod error;
pub mod forward;
pub mod manager;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod proxy;
pub mod routes;
pub mod store;
pub mod store_pg;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::worker::protocol::BackendKind;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("refusing to listen on {0} without an API key: pass --api-key (or listen on a loopback address)")]
    InsecureListen(SocketAddr),
    #[error("invalid option: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("metadata store: {0}")]
    Store(#[from] store::Error),
}

/// Everything `stasis serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on; port 0 picks a free port (the chosen address is
    /// printed on stdout as `stasis: listening on http://ADDR`, or sent to
    /// `on_listen`).
    pub listen: SocketAddr,
    /// Holds `stasis.db`, `sandboxes/<id>/`, `run/`, `templates/`.
    pub data_dir: PathBuf,
    /// When set, every call but `/health` and `/openapi.json` needs
    /// `X-API-KEY: <key>`. Required to listen beyond loopback.
    pub api_key: Option<String>,
    /// VM implementation the workers use.
    pub backend: BackendKind,
    /// How long a sandbox is kept after its creation (paused ones are
    /// deleted after that).
    pub retention: Duration,
    /// Timeout when a request gives none.
    pub default_timeout: Duration,
    /// Largest timeout a request may ask for.
    pub max_timeout: Duration,
    /// Most sandboxes running at once (429 beyond).
    pub max_running: usize,
    /// Most requests handled at once (others wait).
    pub max_inflight: usize,
    /// Binary to run as `<exe> worker --socket PATH`; default: this one.
    pub worker_exe: Option<PathBuf>,
    /// For servers embedded in a process (e.g. `stasis bench --api`): when
    /// set, the bound address is sent here once the server listens, instead
    /// of being printed on stdout.
    pub on_listen: Option<std::sync::mpsc::Sender<SocketAddr>>,
    /// When set, `base` and the SDK's default template names boot this Linux
    /// guest with the agent instead of the built-in test guest.
    pub linux: Option<manager::LinuxTemplate>,
    /// Longest wait for a new sandbox's agent to answer `GET /health`.
    pub agent_timeout: Duration,
    /// A second address serving the same routes, for SDKs in debug mode
    /// (`NOVITA_DEBUG=true` sends envd requests to `localhost:49983`).
    pub sandbox_listen: Option<SocketAddr>,
    /// On a graceful shutdown, running sandboxes are paused (and so survive
    /// the restart) within this long; the rest are stopped. Zero: stop them
    /// all at once, as after a crash.
    pub shutdown_pause: Duration,
    /// Sandbox domain: returned as `domain` by create/connect, so the SDK
    /// addresses sandbox ports at `{port}-{id}.{domain}`.
    pub domain: Option<String>,
    /// Serve the same routes over TLS here (with a certificate for the
    /// domain and `*.domain`); needs `domain`.
    pub tls_listen: Option<SocketAddr>,
    /// Where the TLS certificate comes from.
    pub tls_source: Option<tls::CertSource>,
    /// Fake backend: the Python that runs code-interpreter servers.
    pub interpreter_python: String,
    /// Run VM workers unconfined (no jail: debugging only). By default
    /// every VM worker is jailed (`crate::jail`), and a host that cannot
    /// jail (not root, no cgroups) is a startup error.
    pub no_jail: bool,
    /// First uid/gid of jailed workers (each gets `base + slot`).
    pub jail_uid_base: u32,
    /// Guest memory backing of sandboxes (templates may name their own).
    pub memory_backing: crate::vmm::memory::MemoryBacking,
    /// Header-read timeout and per-client-IP connection limit of every
    /// listener.
    pub conn_limits: proxy::ConnLimits,
    /// Running sandboxes' memory (their templates' `memoryMB`) may use at
    /// most this share of the host's RAM; a create or resume beyond it is
    /// answered 429.
    pub max_memory_share: f64,
    /// Most paused sandboxes kept at once (a pause beyond is answered 429
    /// and the sandbox keeps running). 0: no limit.
    pub max_paused: usize,
    /// Most bytes all paused sandboxes' snapshots may take on disk together:
    /// once reached, a pause is answered 429 and the sandbox keeps running.
    /// 0: no limit.
    pub max_snapshot_bytes: u64,
    /// Sandbox networking for Linux sandboxes on the real VMM; None: no
    /// network device (`--no-network`; the default for embedded servers).
    pub network: Option<crate::net::NetConfig>,
    /// `--snapshot-store s3://…`: upload paused sandboxes' snapshots there.
    pub snapshot_store: Option<crate::snapshot::remote::RemoteConfig>,
    /// `--durable-pause`: a pause answers once its snapshot is in the bucket.
    pub durable_pause: bool,
    /// Create sandboxes of a template by resuming its template snapshot
    /// (built after the template's first create); `--no-warm-templates`
    /// turns it off.
    pub warm_templates: bool,
    /// Metadata database (`--database`): `postgres://…` (shared by a pool)
    /// or `sqlite:PATH`; None: `<data-dir>/stasis.db`.
    pub database: Option<String>,
    /// This host's id in a shared database (`--host-id`; default: the
    /// hostname).
    pub host_id: Option<String>,
    /// Member of a pool of hosts (`--pool-discovery` other than none).
    pub pool: Option<crate::pool::PoolArgs>,
    /// Chunk cache for downloads from the bucket: directory (default
    /// `<data-dir>/chunk-cache`) and most bytes.
    pub chunk_cache_dir: Option<PathBuf>,
    /// Most bytes of the chunk cache.
    pub chunk_cache_bytes: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            data_dir: PathBuf::from("stasis-data"),
            api_key: None,
            backend: BackendKind::Vm,
            retention: Duration::from_secs(30 * 24 * 3600),
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            max_running: 256,
            max_inflight: 1024,
            worker_exe: None,
            on_listen: None,
            linux: None,
            agent_timeout: Duration::from_secs(180),
            sandbox_listen: None,
            shutdown_pause: Duration::from_secs(60),
            no_jail: false,
            jail_uid_base: crate::jail::DEFAULT_UID_BASE,
            domain: None,
            tls_listen: None,
            tls_source: None,
            interpreter_python: "python3".into(),
            memory_backing: crate::vmm::memory::MemoryBacking::Auto,
            conn_limits: proxy::ConnLimits::default(),
            max_memory_share: DEFAULT_MAX_MEMORY_SHARE,
            max_paused: 0,
            max_snapshot_bytes: 0,
            network: None,
            snapshot_store: None,
            durable_pause: false,
            warm_templates: true,
            database: None,
            host_id: None,
            pool: None,
            chunk_cache_dir: None,
            chunk_cache_bytes: 8 << 30,
        }
    }
}

/// `stasis serve` arguments, ready to `#[command(flatten)]` into the CLI.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Snapshot store in object storage (`--snapshot-store s3://bucket`,
    /// `--s3-endpoint`, `--durable-pause`; keys from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY).
    #[command(flatten)]
    pub s3: crate::snapshot::remote::S3Args,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Data directory (database, snapshots, templates).
    #[arg(long, default_value = "stasis-data")]
    pub data_dir: PathBuf,
    /// Metadata database: `postgres://USER@HOST/DB` (shared by a pool of
    /// hosts; also `postgresql://`, libpq URL parameters such as
    /// `?host=/run/postgresql` work) or `sqlite:PATH` (default: the data
    /// dir's `stasis.db`).
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// This host's id in a shared database (default: the hostname). Hosts
    /// sharing one database need distinct ids; keep it across restarts to
    /// find this host's paused sandboxes again.
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Require this X-API-KEY on every call (default: $STASIS_API_KEY).
    /// Visible in `ps`: prefer --api-key-file.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (surrounding whitespace trimmed); a
    /// file readable by group or others is warned about.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// VM backend: vm (KVM) or fake (a counting thread, for tests)
    /// (default: $STASIS_BACKEND, else vm).
    #[arg(long)]
    pub backend: Option<BackendKind>,
    /// Keep sandboxes this many seconds after creation.
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    pub retention_secs: u64,
    /// Largest timeout a client may set, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub max_timeout_secs: u64,
    /// Most sandboxes running at once.
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Run VM workers without the jail (namespaces, pivot_root, cgroup,
    /// unprivileged uid, seccomp): for debugging only.
    #[arg(long)]
    pub no_jail: bool,
    /// Boot every sandbox cold: no template snapshots are built or used
    /// (by default a template's first create is followed by building its
    /// template snapshot, and later creates resume from it).
    #[arg(long)]
    pub no_warm_templates: bool,
    /// First uid/gid of jailed workers; each running sandbox gets
    /// `base + slot` (65536 slots).
    #[arg(long, default_value_t = crate::jail::DEFAULT_UID_BASE)]
    pub jail_uid_base: u32,
    /// Linux kernel (vmlinux or bzImage) for the built-in templates: with
    /// --rootfs, `base` and `code-interpreter-v1` become Linux guests that
    /// run the stasis agent.
    #[arg(long, requires = "rootfs")]
    pub kernel: Option<PathBuf>,
    /// Root filesystem image (ext4 with the agent) for the built-in
    /// templates; each sandbox gets a copy-on-write disk over it.
    #[arg(long, requires = "kernel")]
    pub rootfs: Option<PathBuf>,
    /// Kernel command line of the Linux template.
    #[arg(long, default_value = manager::LINUX_CMDLINE)]
    pub cmdline: String,
    /// Memory of the Linux template, in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mb: u64,
    /// vCPUs of the Linux template.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Seconds a new sandbox's agent may take to answer before the create
    /// call fails (guests boot in seconds natively, up to a minute or more
    /// under nested emulation).
    #[arg(long, default_value_t = 180)]
    pub agent_timeout: u64,
    /// Also serve on this address (e.g. 127.0.0.1:49983, where SDKs in
    /// debug mode send in-sandbox requests).
    #[arg(long)]
    pub sandbox_listen: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, pause running sandboxes (they are listed as paused
    /// after the restart) for at most this many seconds, then stop the rest;
    /// 0 stops them all at once (they are lost, as after a crash).
    #[arg(long, default_value_t = 60)]
    pub shutdown_pause_secs: u64,
    /// Code-interpreter image for `code-interpreter-v1` (rootfs/build-image.sh
    /// --code-interpreter); default: --rootfs.
    #[arg(long, requires = "rootfs")]
    pub interpreter_rootfs: Option<PathBuf>,
    /// Sandbox domain D: sandboxes' ports are `{port}-{id}.D` (a wildcard DNS
    /// record `*.D` must point at this server); returned as `domain`.
    #[arg(long)]
    pub domain: Option<String>,
    /// Serve over TLS on this address too (SDKs use https for sandbox
    /// ports), with a certificate for D and *.D; needs --domain.
    #[arg(long, requires = "domain")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for D and *.D (default: issued by stasis's own
    /// CA, <data-dir>/tls/ca.pem, which clients must trust).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Fake backend: the Python (with jupyter-client and ipykernel) that runs
    /// the code-interpreter server of `"interpreter": true` templates.
    #[arg(long, default_value = "python3")]
    pub interpreter_python: String,
    /// Guest memory backing of sandboxes: auto (hugetlb if the pool has
    /// room, else THP, else 4k), hugetlb, thp or 4k; a template's
    /// "memoryBacking" overrides it.
    #[arg(long, default_value = "auto")]
    pub memory_backing: crate::vmm::memory::MemoryBacking,
    /// Close a connection that has not sent a complete request head within
    /// this many seconds (slowloris guard; 0: never).
    #[arg(long, default_value_t = proxy::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub header_read_timeout_secs: u64,
    /// Most connections open at once from one client IP address (beyond:
    /// 429 and closed; 0: no limit).
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_CONNS_PER_IP)]
    pub max_conns_per_ip: usize,
    /// Share of the host's RAM that running sandboxes' memory may take
    /// (a create or resume beyond it is answered 429).
    #[arg(long, default_value_t = DEFAULT_MAX_MEMORY_SHARE)]
    pub max_memory_share: f64,
    /// Most paused sandboxes kept at once (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_paused: usize,
    /// Most bytes of snapshots on disk, all paused sandboxes together
    /// (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_snapshot_bytes: u64,
    /// Private IPv4 range for sandbox addresses, carved into /29s (two /30
    /// links each: guest↔tap, namespace↔host). Must not overlap another
    /// server's or the host's networks.
    #[arg(long, default_value = crate::net::NetConfig::DEFAULT_CIDR)]
    pub sandbox_cidr: String,
    /// Resolver given to guests (kernel `ip=`); default: the host's first
    /// non-loopback nameserver in /etc/resolv.conf.
    #[arg(long)]
    pub sandbox_dns: Option<std::net::Ipv4Addr>,
    /// Run Linux sandboxes without a network device (no namespaces, taps or
    /// nftables rules; the network controls are still validated and the
    /// proxy's still enforced). Without it, `serve` with the real VMM
    /// fails at start when `ip`, `nft` or network namespaces are missing.
    #[arg(long)]
    pub no_network: bool,
    /// Put the uplink side (host veth ends, NAT and the `inet stasis` table)
    /// in this named network namespace (/run/netns/NAME) instead of the
    /// host's own: for tests, or to give sandboxes their own uplink.
    #[arg(long)]
    pub sandbox_uplink_netns: Option<String>,
    /// Pool of hosts (`--pool-*`, `--nomad-*`, `--k8s-*`): see `crate::pool`.
    #[command(flatten)]
    pub pool: crate::pool::PoolArgs,
}

/// Default `--max-memory-share`.
pub const DEFAULT_MAX_MEMORY_SHARE: f64 = 0.8;
/// Shortest API key accepted on a listener beyond loopback (shorter keys
/// only warn on loopback).
pub const MIN_API_KEY_LEN: usize = 16;

/// Reads an API key file: its content, trimmed; empty is an error. Warns
/// if group or others may read it.
fn read_key_file(p: &Path) -> Result<String, Error> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(p)
        .map_err(|e| Error::Io(format!("reading the API key file {}", p.display()), e))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(Error::Config(format!(
            "the API key file {} is empty",
            p.display()
        )));
    }
    if let Ok(m) = std::fs::metadata(p) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %p.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "the API key file is readable by group or others; chmod 600 it"
            );
        }
    }
    Ok(key.to_owned())
}

impl ServeArgs {
    /// Turns the arguments (and `STASIS_API_KEY` / `STASIS_BACKEND`) into
    /// options.
    pub fn into_options(self) -> Result<ServeOptions, Error> {
        let from_file = match &self.api_key_file {
            Some(p) => Some(read_key_file(p)?),
            None => None,
        };
        let api_key = self
            .api_key
            .or(from_file)
            .or_else(|| std::env::var("STASIS_API_KEY").ok())
            .filter(|k| !k.is_empty());
        let backend = match self.backend {
            Some(b) => b,
            None => match std::env::var("STASIS_BACKEND") {
                Ok(s) if !s.is_empty() => s.parse().map_err(Error::Config)?,
                _ => BackendKind::Vm,
            },
        };
        if self.vcpus == 0 || self.memory_mb == 0 || self.agent_timeout == 0 {
            return Err(Error::Config(
                "--vcpus, --memory-mb and --agent-timeout must be positive".into(),
            ));
        }
        let linux = match (self.kernel, self.rootfs) {
            (Some(kernel), Some(rootfs)) => {
                for (what, p) in [("kernel", &kernel), ("rootfs", &rootfs)] {
                    if !p.is_file() {
                        return Err(Error::Config(format!(
                            "--{what} {}: not a readable file",
                            p.display()
                        )));
                    }
                }
                let abs = |p: PathBuf| {
                    std::fs::canonicalize(&p)
                        .map_err(|e| Error::Io(format!("resolve {}", p.display()), e))
                };
                let interpreter_rootfs = match self.interpreter_rootfs {
                    Some(p) if !p.is_file() => {
                        return Err(Error::Config(format!(
                            "--interpreter-rootfs {}: not a readable file",
                            p.display()
                        )))
                    }
                    Some(p) => Some(abs(p)?),
                    None => None,
                };
                Some(manager::LinuxTemplate {
                    kernel: abs(kernel)?,
                    rootfs: abs(rootfs)?,
                    interpreter_rootfs,
                    cmdline: self.cmdline,
                    memory_mb: self.memory_mb,
                    vcpus: self.vcpus,
                })
            }
            _ => None,
        };
        if let Some(d) = &self.domain {
            tls::validate_domain(d).map_err(|e| Error::Config(e.to_string()))?;
        }
        // Pool flags: a wrong one is a clear error at start.
        self.pool
            .check()
            .map_err(|e| Error::Config(e.to_string()))?;
        // One id names this host in the database and in the pool.
        let host_id = match (self.host_id.clone(), self.pool.pool_host_id.clone()) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::Config(format!(
                    "--host-id {a:?} and --pool-host-id {b:?} differ: give one (they name the same thing)"
                )))
            }
            (a, b) => a.or(b),
        };
        let network = if self.no_network || backend != BackendKind::Vm {
            None
        } else {
            let cidr: crate::net::Cidr = self
                .sandbox_cidr
                .parse()
                .map_err(|e: crate::net::Error| Error::Config(e.to_string()))?;
            Some(crate::net::NetConfig {
                cidr,
                uplink_netns: self.sandbox_uplink_netns.clone(),
                dns: self
                    .sandbox_dns
                    .or_else(crate::net::NetConfig::host_resolver),
            })
        };
        let tls_source = self
            .tls_listen
            .map(|_| match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => tls::CertSource::Files { cert, key },
                _ => tls::CertSource::OwnCa(self.data_dir.join("tls")),
            });
        Ok(ServeOptions {
            domain: self.domain,
            tls_listen: self.tls_listen,
            tls_source,
            interpreter_python: self.interpreter_python,
            memory_backing: self.memory_backing,
            listen: self.listen,
            data_dir: self.data_dir,
            api_key,
            backend,
            retention: Duration::from_secs(self.retention_secs),
            max_timeout: Duration::from_secs(self.max_timeout_secs),
            max_running: self.max_running,
            linux,
            agent_timeout: Duration::from_secs(self.agent_timeout),
            sandbox_listen: self.sandbox_listen,
            shutdown_pause: Duration::from_secs(self.shutdown_pause_secs),
            conn_limits: proxy::ConnLimits {
                header_read_timeout: (self.header_read_timeout_secs > 0)
                    .then(|| Duration::from_secs(self.header_read_timeout_secs)),
                max_conns_per_ip: self.max_conns_per_ip,
            },
            max_memory_share: self.max_memory_share,
            max_paused: self.max_paused,
            max_snapshot_bytes: self.max_snapshot_bytes,
            network,
            no_jail: self.no_jail,
            jail_uid_base: self.jail_uid_base,
            snapshot_store: self.s3.config(),
            durable_pause: self.s3.durable_pause,
            warm_templates: !self.no_warm_templates,
            database: self.database,
            host_id,
            pool: (self.pool.pool_discovery != crate::pool::DiscoveryKind::None)
                .then_some(self.pool),
            chunk_cache_dir: self.s3.chunk_cache_dir,
            chunk_cache_bytes: self.s3.chunk_cache_bytes,
            ..ServeOptions::default()
        })
    }
}

/// An API key shorter than [`MIN_API_KEY_LEN`] bytes is refused when any
/// listener is reachable beyond loopback (there the key is all that stands
/// between the network and the API); on loopback it is warned about.
fn check_api_key_strength(opts: &ServeOptions) -> Result<(), Error> {
    let Some(key) = &opts.api_key else {
        return Ok(());
    };
    if key.len() >= MIN_API_KEY_LEN {
        return Ok(());
    }
    let exposed = std::iter::once(opts.listen)
        .chain(opts.sandbox_listen)
        .chain(opts.tls_listen)
        .find(|a| !a.ip().is_loopback());
    match exposed {
        Some(addr) => Err(Error::Config(format!(
            "the API key is {} bytes long; listening on {addr} needs one of at least {MIN_API_KEY_LEN} bytes (e.g. `head -c 24 /dev/urandom | base64 > key; --api-key-file key`)",
            key.len()
        ))),
        None => {
            tracing::warn!(
                len = key.len(),
                min = MIN_API_KEY_LEN,
                "the API key is short; it would be refused on a non-loopback address"
            );
            Ok(())
        }
    }
}

/// Raises the open-file soft limit to the hard limit (each connection and
/// each worker needs descriptors).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read/write the rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Binds with a deep accept backlog (the kernel caps it at somaxconn), so a
/// burst of connections is queued rather than dropped.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(16_384)
}

/// Runs the server until `shutdown` completes. Must run in a multi-threaded
/// tokio runtime. On shutdown running sandboxes are paused (within
/// `opts.shutdown_pause`) and every worker is stopped.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    for addr in std::iter::once(opts.listen).chain(opts.sandbox_listen) {
        if opts.api_key.is_none() && !addr.ip().is_loopback() {
            return Err(Error::InsecureListen(addr));
        }
    }
    check_api_key_strength(&opts)?;
    if !(opts.max_memory_share > 0.0 && opts.max_memory_share <= 1.0) {
        return Err(Error::Config(format!(
            "--max-memory-share must be in (0, 1] (got {})",
            opts.max_memory_share
        )));
    }
    if opts.max_running == 0 || opts.max_inflight == 0 {
        return Err(Error::Config(
            "max_running and max_inflight must be positive".into(),
        ));
    }
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4000);
    if opts.default_timeout > opts.max_timeout {
        return Err(Error::Config(
            "the default timeout exceeds the maximum timeout".into(),
        ));
    }
    raise_nofile_limit();
    let worker_exe = match opts.worker_exe.clone() {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| Error::Io("locating the stasis binary".into(), e))?,
    };
    let jail = if opts.no_jail || opts.backend != BackendKind::Vm {
        None
    } else {
        Some(
            crate::jail::Jailer::detect(
                &opts.data_dir.join("jail"),
                opts.jail_uid_base,
                crate::jail::DEFAULT_UID_COUNT,
            )
            .map_err(|e| Error::Config(crate::error_chain(&e)))?,
        )
    };
    let snapshot_upload = match &opts.snapshot_store {
        Some(c) => {
            let remote = crate::snapshot::remote::RemoteStore::open(c)
                .map_err(|e| Error::Config(crate::error_chain(&e)))?;
            // A bucket that does not answer, or refuses the credentials, is
            // a startup error: better than pauses that never reach it.
            remote.check().await.map_err(|e| {
                Error::Config(format!(
                    "the snapshot store is not usable: {}",
                    crate::error_chain(&e)
                ))
            })?;
            tracing::info!(
                store = remote.describe(),
                durable_pause = opts.durable_pause,
                "snapshot store"
            );
            Some(crate::snapshot::remote::Uploader::start(remote))
        }
        None => {
            if opts.durable_pause {
                return Err(Error::Config(
                    "--durable-pause needs --snapshot-store".into(),
                ));
            }
            None
        }
    };
    let cfg = manager::Config {
        snapshot_upload,
        durable_pause: opts.durable_pause,
        jail,
        data_dir: opts.data_dir.clone(),
        backend: opts.backend,
        retention_ms: i64::try_from(opts.retention.as_millis()).unwrap_or(i64::MAX / 4),
        default_timeout_s: secs(opts.default_timeout),
        max_timeout_s: secs(opts.max_timeout),
        max_running: opts.max_running,
        max_concurrent_spawns: std::thread::available_parallelism().map_or(4, |n| n.get() * 4),
        worker_exe,
        linux: opts.linux.clone(),
        agent_timeout: opts.agent_timeout,
        domain: opts.domain.clone(),
        interpreter_python: opts.interpreter_python.clone(),
        memory_backing: opts.memory_backing,
        limits: manager::Limits {
            memory_budget_mb: manager::memory_budget_mb(opts.max_memory_share),
            max_paused: opts.max_paused,
            max_snapshot_bytes: opts.max_snapshot_bytes,
        },
        network: match &opts.network {
            Some(c) => Some(Arc::new(
                crate::net::Network::new(c.clone())
                    .map_err(|e| Error::Config(crate::error_chain(&e)))?,
            )),
            None => None,
        },
        warm_templates: opts.warm_templates,
        database: opts
            .database
            .as_deref()
            .map(store::DatabaseSpec::parse)
            .transpose()?,
        host_id: opts.host_id.clone(),
        pool: opts.pool.clone(),
        chunk_cache: opts.snapshot_store.as_ref().map(|_| {
            (
                opts.chunk_cache_dir
                    .clone()
                    .unwrap_or_else(|| opts.data_dir.join("chunk-cache")),
                opts.chunk_cache_bytes,
            )
        }),
    };
    tracing::info!(
        memory_backing = %opts.memory_backing,
        "{}",
        crate::vmm::backing::describe_host()
    );
    let mgr = manager::Manager::start(cfg).await?;
    let listener =
        listen(opts.listen).map_err(|e| Error::Io(format!("listening on {}", opts.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Io("reading the bound address".into(), e))?;
    let sandbox_listener = match opts.sandbox_listen {
        Some(a) => Some(listen(a).map_err(|e| Error::Io(format!("listening on {a}"), e))?),
        None => None,
    };
    // Other hosts of a pool reach this one at --pool-advertise (default:
    // the bound address).
    let advertise = opts
        .pool
        .as_ref()
        .and_then(|p| p.pool_advertise.clone())
        .unwrap_or_else(|| addr.to_string());
    mgr.start_heartbeat(advertise);
    let metrics = Arc::new(metrics::Registry::default());
    metrics::spawn_sampler(mgr.clone(), metrics.clone());
    let app = routes::router(routes::AppState {
        mgr: mgr.clone(),
        metrics,
        api_key: opts.api_key.as_deref().map(Arc::from),
        inflight: Arc::new(tokio::sync::Semaphore::new(opts.max_inflight)),
    });
    if let Some(tx) = &opts.on_listen {
        let _ = tx.send(addr);
    } else {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "stasis: listening on http://{addr}");
        let _ = out.flush();
    }
    tracing::info!(%addr, backend = %opts.backend, data_dir = %opts.data_dir.display(), "serving");
    if opts.backend == BackendKind::Vm && opts.linux.is_none() {
        tracing::info!("{IMAGES_HINT}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(l) = sandbox_listener {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "also serving (in-sandbox traffic of debug-mode SDKs)");
        }
        let extra = proxy::serve_http_limited(
            l,
            app.clone(),
            stopped(stop_rx.clone()),
            None,
            opts.conn_limits,
        );
        tokio::spawn(async move {
            if let Err(e) = extra.await {
                tracing::error!("second listener failed: {e}");
            }
        });
    }
    if let (Some(a), Some(src), Some(domain)) = (opts.tls_listen, &opts.tls_source, &opts.domain) {
        let tls = tls::load(domain, src).map_err(|e| Error::Config(e.to_string()))?;
        let l = listen(a).map_err(|e| Error::Io(format!("listening on {a}"), e))?;
        let bound = l
            .local_addr()
            .map_err(|e| Error::Io("reading the bound address".into(), e))?;
        let ca = tls
            .ca_file
            .as_ref()
            .map(|p| format!(" (clients trust {})", p.display()))
            .unwrap_or_default();
        if opts.on_listen.is_none() {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "stasis: listening on https://{bound} for *.{domain}{ca}"
            );
            let _ = out.flush();
        }
        tracing::info!(addr = %bound, %domain, "serving TLS{ca}");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
        let (app, stop) = (app.clone(), stop_rx.clone());
        let conn_limits = opts.conn_limits;
        tokio::spawn(async move {
            if let Err(e) =
                proxy::serve_http_limited(l, app, stopped(stop), Some(acceptor), conn_limits).await
            {
                tracing::error!("TLS listener failed: {e}");
            }
        });
    }
    let served = proxy::serve_http_limited(listener, app, stopped(stop_rx), None, opts.conn_limits)
        .await
        .map_err(|e| Error::Io("serving".into(), e));
    tracing::info!(
        pause_within_s = opts.shutdown_pause.as_secs(),
        "shutting down: pausing running sandboxes, then stopping workers"
    );
    mgr.shutdown(opts.shutdown_pause).await;
    served
}

/// Fault injection for tests: `STASIS_FAULT=name[@N][,name[@N]...]` in the
/// server's environment makes the named fault point fail once, the N-th
/// time it is reached (default: the first). Read at the first check; never
/// set it in production. Points: `pause` (the worker's pause fails, the VM
/// keeps running), `db-after-pause` (saving the paused record fails),
/// `db-after-resume` (saving the running record fails after the guest
/// ran), `slow-create` (create waits 2 s after making the sandbox's
/// directory, so a test can disconnect meanwhile). `tests/faults.rs` proves
/// what each leaves behind.
pub fn fault(name: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static ARMED: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let map: HashMap<String, u32> = std::env::var("STASIS_FAULT")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1).max(1)),
                None => (s.to_string(), 1),
            })
            .collect();
        if !map.is_empty() {
            tracing::warn!(faults = ?map, "fault injection armed (STASIS_FAULT)");
        }
        Mutex::new(map)
    });
    let mut armed = armed.lock().unwrap_or_else(|e| e.into_inner());
    let Some(left) = armed.get_mut(name) else {
        return false;
    };
    *left -= 1;
    if *left > 0 {
        return false;
    }
    armed.remove(name);
    tracing::warn!(fault = name, "injected fault");
    true
}

/// Said at start when the built-in templates run the test guest: how to get
/// Linux sandboxes (`base`, `code-interpreter-v1`) instead.
pub const IMAGES_HINT: &str =
    "templates base and code-interpreter-v1 run the built-in test guest; \
for Linux sandboxes build a kernel and images (`stasis images build`, or kernel/build.sh; \
rootfs/build-agent.sh; rootfs/build-image.sh [--code-interpreter] AGENT) and pass --kernel K \
--rootfs BASE.ext4 --interpreter-rootfs CI.ext4 (the last line `stasis images build` prints)";

/// `stasis serve`: runs the server on its own runtime until SIGINT/SIGTERM.
pub fn serve_blocking(opts: ServeOptions) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("stasis-api")
        .build()
        .map_err(|e| Error::Io("starting the tokio runtime".into(), e))?;
    // What the server and its workers create (database, snapshots, disk
    // overlays, console logs, sockets) is the owner's alone. Host agents of
    // the fake backend reset it before exec (their files are the user's).
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    rt.block_on(serve(opts, async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }))
}
