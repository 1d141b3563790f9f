//! The PostgreSQL backend of [`super::store::Store`] (`stasis serve
//! --database postgres://…`): metadata shared by a pool of hosts.
//!
//! One connection per host, owned by a dedicated thread (`stasis-pg`):
//! callers hand it a closure and wait for the answer, so the `postgres`
//! crate's own runtime never runs inside tokio's (the manager calls the
//! store both from the blocking pool and, at startup, from async code).
//! A connection that broke is dropped and made again on the next call;
//! while PostgreSQL cannot be reached every call fails with
//! [`Error::Unavailable`], which the API answers with 503.
//!
//! Schema (versioned: `stasis_schema` holds the applied version; the
//! migrations run in one transaction under an advisory lock, so hosts
//! starting together do not race):
//! - `sandboxes`: the SQLite table's columns plus `generation` (bumped by
//!   every write) and `owner` (the host that runs it, or where it paused).
//!   A write ([`PgStore::put`]) only lands on a row this host owns (or a
//!   new one); a state change by another host is a conditional update on
//!   `(state, generation)` ([`PgStore::transition`]), so of two hosts
//!   racing to resume one paused sandbox exactly one wins.
//! - `sandbox_network`: network settings, deleted with the sandbox (same
//!   transaction).
//! - `hosts`: `(id, address, fingerprint, load, last_heartbeat)`, the
//!   heartbeat task's upserts; [`PgStore::live_hosts`] lists those heard
//!   from within a TTL (PostgreSQL's clock, so host clocks may differ).
//! - `snapshots`: reusable snapshots' manifests by id (what a lost
//!   database is rebuilt from, see `stasis db rebuild`).
//! - `quarantine`: rows that could not be decoded at startup.

use std::collections::BTreeMap;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use postgres::{Client, NoTls};

use super::store::{Claim, Error, HostInfo, LiveHost, Quarantined, Row, RowState};

/// The schema, one migration per version (index + 1). Only ever append.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        template_id TEXT NOT NULL,
        alias TEXT,
        state TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        started_ms BIGINT NOT NULL,
        end_ms BIGINT NOT NULL,
        on_timeout_pause BOOLEAN NOT NULL,
        auto_resume BOOLEAN NOT NULL,
        metadata TEXT NOT NULL,
        cpu_count BIGINT NOT NULL,
        memory_mb BIGINT NOT NULL,
        disk_mb BIGINT NOT NULL,
        allow_internet BOOLEAN NOT NULL,
        snapshot_gen BIGINT NOT NULL,
        guest_round BIGINT,
        worker_pid BIGINT,
        agent BOOLEAN NOT NULL,
        envd_token TEXT,
        generation BIGINT NOT NULL DEFAULT 1,
        owner TEXT
    );
    CREATE INDEX sandboxes_owner ON sandboxes (owner);
    CREATE TABLE sandbox_network (id TEXT PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        load BIGINT NOT NULL,
        last_heartbeat TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        host TEXT,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE quarantine (id TEXT, reason TEXT NOT NULL, at_ms BIGINT NOT NULL, raw TEXT NOT NULL);",
    // v2: what placement needs from a heartbeat besides the running count.
    "ALTER TABLE hosts ADD COLUMN draining BOOLEAN NOT NULL DEFAULT false;
    ALTER TABLE hosts ADD COLUMN memory_free BIGINT NOT NULL DEFAULT 0;",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
/// Any number; identifies stasis's migration lock among advisory locks.
const MIGRATION_LOCK: i64 = 0x5354_4153_4953;
/// Connecting gives up after this long when the URL names no
/// `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest [`PgStore::ping`] waits for an answer.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// The connection thread's state.
struct Conn {
    config: postgres::Config,
    client: Option<Client>,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, Error> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            // The crate's connect_timeout bounds the socket connect only,
            // not the startup exchange: a frozen server would hold this
            // thread forever. So the attempt runs on its own thread and is
            // abandoned (it ends when the server answers or goes) after
            // the timeout.
            let (tx, rx) = mpsc::sync_channel(1);
            let config = self.config.clone();
            std::thread::Builder::new()
                .name("stasis-pg-connect".into())
                .spawn(move || {
                    let _ = tx.send(config.connect(NoTls));
                })
                .map_err(|e| Error::Unavailable(format!("connecting: {e}")))?;
            let limit = self
                .config
                .get_connect_timeout()
                .copied()
                .unwrap_or(CONNECT_TIMEOUT);
            let c = match rx.recv_timeout(limit) {
                Ok(r) => r.map_err(|e| Error::Unavailable(chain(&e)))?,
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "no answer from the server within {limit:?}"
                    )))
                }
            };
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| Error::Unavailable("no connection".into()))
    }

    /// Classifies a failed call; a connection-level failure drops the
    /// connection (the next call connects again).
    fn fail(&mut self, e: postgres::Error) -> Error {
        let db_level = e.as_db_error().is_some_and(|d| {
            let code = d.code().code();
            // 08: connection exceptions; 57P0x: the server is shutting
            // down or starting.
            !(code.starts_with("08") || code.starts_with("57P"))
        });
        if db_level && !e.is_closed() && !self.client.as_ref().is_some_and(|c| c.is_closed()) {
            Error::Postgres(chain(&e))
        } else {
            self.client = None;
            Error::Unavailable(chain(&e))
        }
    }

    /// Runs `f` with a live client, classifying its error.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, Error> {
        let c = self.client()?;
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.fail(e)),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let m = x.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = x.source();
    }
    s
}

/// A PostgreSQL-backed store for one host.
pub struct PgStore {
    tx: Mutex<mpsc::Sender<Job>>,
    host: String,
    /// The URL without its password, for messages.
    shown: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore({}, host {})", self.shown, self.host)
    }
}

/// `url` with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find('@') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{tail}"),
        None => url.to_string(),
    }
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL or a libpq key=value string)
    /// as host `host`, and creates or migrates the schema. Fails with
    /// [`Error::Unavailable`] when the server cannot be reached.
    pub fn connect(url: &str, host: &str) -> Result<Self, Error> {
        let shown = redact(url);
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| Error::Config(format!("bad database URL {shown}: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("stasis");
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("stasis-pg".into())
            .spawn(move || {
                let mut conn = Conn {
                    config,
                    client: None,
                };
                // Ends when the last sender (the store) is dropped.
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| Error::Unavailable(format!("starting the database thread: {e}")))?;
        let s = PgStore {
            tx: Mutex::new(tx),
            host: host.to_string(),
            shown: shown.clone(),
        };
        s.run(|c| c.with(migrate)?).map_err(|e| match e {
            Error::Unavailable(m) => Error::Unavailable(format!("{shown}: {m}")),
            other => other,
        })?;
        Ok(s)
    }

    /// This host's id (the `owner` it writes).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runs `f` on the connection thread and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let _ = rtx.send(f(c));
        });
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| Error::Unavailable("the database thread is gone".into()))?;
        rrx.recv()
            .map_err(|_| Error::Unavailable("the database thread is gone".into()))?
    }

    /// Whether the database answers now, within [`PING_TIMEOUT`] (a
    /// server that accepts nothing, e.g. frozen, is unavailable too).
    pub fn ping(&self) -> Result<(), Error> {
        self.run(|c| c.with(|cl| cl.is_valid(PING_TIMEOUT)))
    }

    /// Inserts a row or updates it — only if this host owns it (or nobody
    /// does); bumps its generation. A row another host owns is
    /// [`Error::Conflict`].
    pub fn put(&self, r: &Row) -> Result<(), Error> {
        let metadata = serde_json::to_string(&r.metadata).map_err(|e| Error::Corrupt {
            id: r.id.clone(),
            what: e.to_string(),
        })?;
        let r = r.clone();
        let host = self.host.clone();
        let n = self.run(move |c| {
            c.with(|cl| {
                cl.execute(
                    "INSERT INTO sandboxes (id, seq, template_id, alias, state, created_ms,
                        started_ms, end_ms, on_timeout_pause, auto_resume, metadata, cpu_count,
                        memory_mb, disk_mb, allow_internet, snapshot_gen, guest_round, worker_pid,
                        agent, envd_token, generation, owner)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                        $16, $17, $18, $19, $20, 1, $21)
                     ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq,
                        template_id = EXCLUDED.template_id, alias = EXCLUDED.alias,
                        state = EXCLUDED.state, created_ms = EXCLUDED.created_ms,
                        started_ms = EXCLUDED.started_ms, end_ms = EXCLUDED.end_ms,
                        on_timeout_pause = EXCLUDED.on_timeout_pause,
                        auto_resume = EXCLUDED.auto_resume, metadata = EXCLUDED.metadata,
                        cpu_count = EXCLUDED.cpu_count, memory_mb = EXCLUDED.memory_mb,
                        disk_mb = EXCLUDED.disk_mb, allow_internet = EXCLUDED.allow_internet,
                        snapshot_gen = EXCLUDED.snapshot_gen, guest_round = EXCLUDED.guest_round,
                        worker_pid = EXCLUDED.worker_pid, agent = EXCLUDED.agent,
                        envd_token = EXCLUDED.envd_token,
                        generation = sandboxes.generation + 1, owner = EXCLUDED.owner
                     WHERE sandboxes.owner IS NULL OR sandboxes.owner = EXCLUDED.owner",
                    &[
                        &r.id,
                        &r.seq,
                        &r.template_id,
                        &r.alias,
                        &r.state.as_str(),
                        &r.created_ms,
                        &r.started_ms,
                        &r.end_ms,
                        &r.on_timeout_pause,
                        &r.auto_resume,
                        &metadata,
                        &i64::from(r.cpu_count),
                        &(r.memory_mb as i64),
                        &(r.disk_mb as i64),
                        &r.allow_internet,
                        &(r.snapshot_gen as i64),
                        &r.guest_round.map(|g| g as i64),
                        &r.worker_pid.map(i64::from),
                        &r.agent,
                        &r.envd_token,
                        &host,
                    ],
                )
            })
            .map(|n| (n, r.id))
        })?;
        match n {
            (0, id) => Err(Error::Conflict {
                id,
                what: "another host owns it now".into(),
            }),
            _ => Ok(()),
        }
    }

    /// Deletes a row (and its network settings) if this host owns it (or
    /// nobody does); absent is fine.
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        let id = id.to_string();
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                let mut tx = cl.transaction()?;
                let n = tx.execute(
                    "DELETE FROM sandboxes WHERE id = $1 AND (owner IS NULL OR owner = $2)",
                    &[&id, &host],
                )?;
                let exists = n == 0
                    && tx
                        .query_opt("SELECT 1 FROM sandboxes WHERE id = $1", &[&id])?
                        .is_some();
                if !exists {
                    tx.execute("DELETE FROM sandbox_network WHERE id = $1", &[&id])?;
                }
                tx.commit()?;
                Ok(exists)
            })
            .and_then(|other_owns| {
                if other_owns {
                    Err(Error::Conflict {
                        id,
                        what: "another host owns it now".into(),
                    })
                } else {
                    Ok(())
                }
            })
        })
    }

    /// The highest `seq` of this host's rows (0 when none).
    pub fn max_seq(&self) -> Result<i64, Error> {
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                cl.query_one(
                    "SELECT COALESCE(MAX(seq), 0) FROM sandboxes WHERE owner = $1",
                    &[&host],
                )
                .map(|r| r.get::<_, i64>(0))
            })
        })
    }

    /// One row by id, whoever owns it.
    pub fn get(&self, id: &str) -> Result<Option<Row>, Error> {
        let id = id.to_string();
        self.run(move |c| {
            let rows = c.with(|cl| {
                cl.query(
                    &format!("SELECT {COLUMNS} FROM sandboxes WHERE id = $1"),
                    &[&id],
                )
            })?;
            match rows.first() {
                Some(r) => decode(r)
                    .map(Some)
                    .map_err(|what| Error::Corrupt { id, what }),
                None => Ok(None),
            }
        })
    }

    /// This host's rows in `seq` order; rows that do not decode are moved
    /// to `quarantine` (one transaction) and reported.
    pub fn load_all_quarantining(&self) -> Result<(Vec<Row>, Vec<Quarantined>), Error> {
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                let mut tx = cl.transaction()?;
                let rows = tx.query(
                    &format!(
                        "SELECT {COLUMNS}, row_to_json(sandboxes)::text FROM sandboxes
                         WHERE owner = $1 ORDER BY seq"
                    ),
                    &[&host],
                )?;
                let mut good = Vec::new();
                let mut bad = Vec::new();
                let now = super::manager::now_ms();
                for r in &rows {
                    match decode(r) {
                        Ok(row) => good.push(row),
                        Err(why) => {
                            let id: String = r.get(0);
                            let raw: String = r.get(COLUMN_COUNT);
                            tx.execute(
                                "INSERT INTO quarantine (id, reason, at_ms, raw) VALUES ($1, $2, $3, $4)",
                                &[&id, &why, &now, &raw],
                            )?;
                            tx.execute("DELETE FROM sandboxes WHERE id = $1", &[&id])?;
                            bad.push(Quarantined { id, why });
                        }
                    }
                }
                tx.commit()?;
                Ok((good, bad))
            })
        })
    }

    /// This host's rows in `seq` order (an undecodable row is an error).
    pub fn load_all(&self) -> Result<Vec<Row>, Error> {
        let host = self.host.clone();
        self.run(move |c| {
            let rows = c.with(|cl| {
                cl.query(
                    &format!("SELECT {COLUMNS} FROM sandboxes WHERE owner = $1 ORDER BY seq"),
                    &[&host],
                )
            })?;
            rows.iter()
                .map(|r| decode(r).map_err(|what| Error::Corrupt { id: r.get(0), what }))
                .collect()
        })
    }

    /// The conditional state change: `state = to, generation + 1, owner =
    /// this host` only where the row is still in `from` at `generation`.
    /// True: this call made the change; false: someone else changed the
    /// row first (or it is gone).
    pub fn transition(
        &self,
        id: &str,
        from: RowState,
        generation: u64,
        to: RowState,
    ) -> Result<bool, Error> {
        let id = id.to_string();
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                cl.execute(
                    "UPDATE sandboxes SET state = $2, generation = generation + 1, owner = $5
                     WHERE id = $1 AND state = $3 AND generation = $4",
                    &[
                        &id,
                        &to.as_str(),
                        &from.as_str(),
                        &(generation as i64),
                        &host,
                    ],
                )
            })
            .map(|n| n == 1)
        })
    }

    /// Reads the row and makes the conditional change `from` → `to` for
    /// this host (see [`Claim`]).
    pub fn claim(&self, id: &str, from: RowState, to: RowState) -> Result<Claim, Error> {
        let Some(row) = self.get(id)? else {
            return Ok(Claim::Missing);
        };
        if row.state == to && row.owner.as_deref() == Some(self.host.as_str()) {
            return Ok(Claim::Won);
        }
        if row.state == from && self.transition(id, from, row.generation, to)? {
            return Ok(Claim::Won);
        }
        let now = self.get(id)?;
        Ok(Claim::Lost {
            state: now.as_ref().map(|r| r.state),
            owner: now.and_then(|r| r.owner),
        })
    }

    /// Stores a sandbox's network settings.
    pub fn put_network(&self, id: &str, json: String) -> Result<(), Error> {
        let id = id.to_string();
        self.run(move |c| {
            c.with(|cl| {
                cl.execute(
                    "INSERT INTO sandbox_network (id, spec) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec",
                    &[&id, &json],
                )
                .map(|_| ())
            })
        })
    }

    /// Network settings of this host's sandboxes.
    pub fn load_networks(&self) -> Result<Vec<(String, String)>, Error> {
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                cl.query(
                    "SELECT n.id, n.spec FROM sandbox_network n JOIN sandboxes s ON s.id = n.id
                     WHERE s.owner = $1",
                    &[&host],
                )
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })
    }

    /// Records that this host is alive now (PostgreSQL's clock).
    pub fn heartbeat(&self, h: &HostInfo) -> Result<(), Error> {
        let h = h.clone();
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                cl.execute(
                    "INSERT INTO hosts (id, address, fingerprint, load, last_heartbeat, draining, memory_free)
                     VALUES ($1, $2, $3, $4, now(), $5, $6)
                     ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address,
                        fingerprint = EXCLUDED.fingerprint, load = EXCLUDED.load,
                        last_heartbeat = now(), draining = EXCLUDED.draining,
                        memory_free = EXCLUDED.memory_free",
                    &[
                        &host,
                        &h.address,
                        &h.fingerprint,
                        &(h.load as i64),
                        &h.draining,
                        &i64::try_from(h.memory_free).unwrap_or(i64::MAX),
                    ],
                )
                .map(|_| ())
            })
        })
    }

    /// Hosts heard from within `ttl`, by id.
    pub fn live_hosts(&self, ttl: Duration) -> Result<Vec<LiveHost>, Error> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.run(move |c| {
            c.with(|cl| {
                cl.query(
                    "SELECT id, address, fingerprint, load,
                        (EXTRACT(EPOCH FROM (now() - last_heartbeat)) * 1000)::BIGINT,
                        draining, memory_free
                     FROM hosts
                     WHERE last_heartbeat > now() - make_interval(secs => $1::BIGINT / 1000.0)
                     ORDER BY id",
                    &[&ms],
                )
                .map(|rows| {
                    rows.iter()
                        .map(|r| LiveHost {
                            id: r.get(0),
                            info: HostInfo {
                                address: r.get(1),
                                fingerprint: r.get(2),
                                load: r.get::<_, i64>(3).max(0) as u64,
                                draining: r.get(5),
                                memory_free: r.get::<_, i64>(6).max(0) as u64,
                            },
                            age_ms: r.get::<_, i64>(4).max(0) as u64,
                        })
                        .collect()
                })
            })
        })
    }

    /// Forgets this host's heartbeat row (a clean exit after the drain:
    /// the others stop counting it as live at once instead of after the
    /// TTL).
    pub fn delete_host(&self) -> Result<(), Error> {
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                cl.execute("DELETE FROM hosts WHERE id = $1", &[&host])
                    .map(|_| ())
            })
        })
    }

    /// Rows owned by other hosts (or by none), in `seq` order; rows that do
    /// not decode are skipped with a log line (their owner quarantines
    /// them).
    pub fn others(&self) -> Result<Vec<Row>, Error> {
        let host = self.host.clone();
        self.run(move |c| {
            let rows = c.with(|cl| {
                cl.query(
                    &format!(
                        "SELECT {COLUMNS} FROM sandboxes WHERE owner IS DISTINCT FROM $1 ORDER BY seq"
                    ),
                    &[&host],
                )
            })?;
            Ok(rows
                .iter()
                .filter_map(|r| match decode(r) {
                    Ok(row) => Some(row),
                    Err(why) => {
                        tracing::warn!("skipping another host's undecodable row: {why}");
                        None
                    }
                })
                .collect())
        })
    }

    /// One sandbox's network settings (JSON), whoever owns it.
    pub fn get_network(&self, id: &str) -> Result<Option<String>, Error> {
        let id = id.to_string();
        self.run(move |c| {
            c.with(|cl| {
                cl.query("SELECT spec FROM sandbox_network WHERE id = $1", &[&id])
                    .map(|rows| rows.first().map(|r| r.get(0)))
            })
        })
    }

    /// Records a reusable snapshot's manifest (replacing one of that id).
    pub fn put_snapshot(&self, id: &str, manifest: String, created_ms: i64) -> Result<(), Error> {
        let id = id.to_string();
        let host = self.host.clone();
        self.run(move |c| {
            c.with(|cl| {
                cl.execute(
                    "INSERT INTO snapshots (id, manifest, host, created_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE SET manifest = EXCLUDED.manifest,
                        host = EXCLUDED.host, created_ms = EXCLUDED.created_ms",
                    &[&id, &manifest, &host, &created_ms],
                )
                .map(|_| ())
            })
        })
    }

    /// Forgets a reusable snapshot; absent is fine.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), Error> {
        let id = id.to_string();
        self.run(move |c| {
            c.with(|cl| {
                cl.execute("DELETE FROM snapshots WHERE id = $1", &[&id])
                    .map(|_| ())
            })
        })
    }

    /// Reusable snapshots recorded: (id, manifest JSON, host).
    pub fn snapshots(&self) -> Result<Vec<(String, String, Option<String>)>, Error> {
        self.run(move |c| {
            c.with(|cl| {
                cl.query("SELECT id, manifest, host FROM snapshots ORDER BY id", &[])
                    .map(|rows| {
                        rows.iter()
                            .map(|r| (r.get(0), r.get(1), r.get(2)))
                            .collect()
                    })
            })
        })
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<i32, Error> {
        self.run(|c| {
            c.with(|cl| {
                cl.query_one("SELECT MAX(version) FROM stasis_schema", &[])
                    .map(|r| r.get::<_, Option<i32>>(0).unwrap_or(0))
            })
        })
    }
}

/// Creates the schema or brings it up to [`SCHEMA_VERSION`].
fn migrate(cl: &mut Client) -> Result<Result<(), Error>, postgres::Error> {
    let mut tx = cl.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS stasis_schema (version INTEGER NOT NULL)")?;
    let have: i32 = tx
        .query_one("SELECT MAX(version) FROM stasis_schema", &[])?
        .get::<_, Option<i32>>(0)
        .unwrap_or(0);
    if have > SCHEMA_VERSION {
        return Ok(Err(Error::Config(format!(
            "the database's schema is version {have}, newer than this binary's {SCHEMA_VERSION}: upgrade stasis"
        ))));
    }
    for (i, ddl) in MIGRATIONS.iter().enumerate().skip(have.max(0) as usize) {
        tx.batch_execute(ddl)?;
        tx.execute(
            "INSERT INTO stasis_schema (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )?;
    }
    tx.commit()?;
    Ok(Ok(()))
}

const COLUMNS: &str = "id, seq, template_id, alias, state, created_ms, started_ms, end_ms,
    on_timeout_pause, auto_resume, metadata, cpu_count, memory_mb, disk_mb, allow_internet,
    snapshot_gen, guest_round, worker_pid, agent, envd_token, generation, owner";
const COLUMN_COUNT: usize = 22;

/// Decodes and range-checks one row of [`COLUMNS`].
fn decode(r: &postgres::Row) -> Result<Row, String> {
    fn col<'a, T: postgres::types::FromSql<'a>>(
        r: &'a postgres::Row,
        i: usize,
    ) -> Result<T, String> {
        r.try_get(i)
            .map_err(|e| format!("column {}: {e}", r.columns()[i].name()))
    }
    let id: String = col(r, 0)?;
    if id.is_empty() || id.len() > 128 {
        return Err(format!("id {id:?} has a bad length"));
    }
    let state = match col::<String>(r, 4)?.as_str() {
        "running" => RowState::Running,
        "paused" => RowState::Paused,
        other => return Err(format!("unknown state {other:?}")),
    };
    let metadata: BTreeMap<String, String> =
        serde_json::from_str(&col::<String>(r, 10)?).map_err(|e| format!("metadata: {e}"))?;
    let cpu: i64 = col(r, 11)?;
    let cpu_count = u32::try_from(cpu)
        .ok()
        .filter(|c| (1..=255).contains(c))
        .ok_or_else(|| format!("cpu_count {cpu} is not in 1..=255"))?;
    let mem: i64 = col(r, 12)?;
    if !(1..=(1 << 20)).contains(&mem) {
        return Err(format!("memory_mb {mem} is not in 1..={}", 1 << 20));
    }
    let nonneg = |i: usize| -> Result<u64, String> {
        let v: i64 = col(r, i)?;
        u64::try_from(v).map_err(|_| format!("{} {v} is negative", r.columns()[i].name()))
    };
    Ok(Row {
        id,
        seq: col(r, 1)?,
        template_id: col(r, 2)?,
        alias: col(r, 3)?,
        state,
        created_ms: col(r, 5)?,
        started_ms: col(r, 6)?,
        end_ms: col(r, 7)?,
        on_timeout_pause: col(r, 8)?,
        auto_resume: col(r, 9)?,
        metadata,
        cpu_count,
        memory_mb: mem as u64,
        disk_mb: nonneg(13)?,
        allow_internet: col(r, 14)?,
        snapshot_gen: nonneg(15)?,
        guest_round: col::<Option<i64>>(r, 16)?.and_then(|g| u64::try_from(g).ok()),
        worker_pid: col::<Option<i64>>(r, 17)?.and_then(|p| u32::try_from(p).ok()),
        agent: col(r, 18)?,
        envd_token: col(r, 19)?,
        generation: nonneg(20)?,
        owner: col(r, 21)?,
    })
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=/tmp user=u"), "host=/tmp user=u");
    }
}
