//! Sandbox metadata: SQLite (`<data-dir>/stasis.db`, WAL; the single-host
//! default) or PostgreSQL (`stasis serve --database postgres://…`, shared
//! by a pool of hosts; [`super::store_pg`]). [`Store`] is one type over
//! both ([`Backend`]); the manager calls the same methods either way.
//!
//! One row per sandbox that exists (running or paused). The in-memory state
//! in [`super::manager`] is authoritative while the server runs; this table
//! is what survives a restart. Calls are synchronous: the manager runs them
//! on tokio's blocking pool.
//!
//! Every row has a `generation`, bumped by every write, and an `owner` (the
//! host id that wrote it). A state change that must happen once — a paused
//! sandbox being resumed — is a conditional update
//! ([`Store::transition`]: `… WHERE id AND state = old AND generation =
//! gen`), so a snapshot is never resumed twice and two hosts never run one
//! sandbox. `hosts` holds heartbeats ([`Store::heartbeat`],
//! [`Store::live_hosts`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row for sandbox {id}: {what}")]
    Corrupt { id: String, what: String },
    #[error("store task failed: {0}")]
    Join(String),
    /// PostgreSQL answered with an error (a constraint, a type, ...).
    #[error("postgres: {0}")]
    Postgres(String),
    /// The database cannot be reached (refused, closed, shutting down):
    /// the API answers 503 and nothing was written.
    #[error("the metadata database is unavailable: {0}")]
    Unavailable(String),
    /// The row changed under this host (another host owns it now).
    #[error("sandbox {id} changed in the shared database: {what}")]
    Conflict { id: String, what: String },
    /// A bad `--database` value or schema.
    #[error("{0}")]
    Config(String),
}

/// Persisted lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    Running,
    Paused,
}

impl RowState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RowState::Running => "running",
            RowState::Paused => "paused",
        }
    }
}

/// One sandbox as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    /// Creation order, for stable listing.
    pub seq: i64,
    pub template_id: String,
    pub alias: Option<String>,
    pub state: RowState,
    pub created_ms: i64,
    pub started_ms: i64,
    /// Running: when its timeout fires.
    pub end_ms: i64,
    pub on_timeout_pause: bool,
    pub auto_resume: bool,
    pub metadata: BTreeMap<String, String>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub allow_internet: bool,
    /// Generation of the current snapshot dir (`snapshot-<gen>`), 0 = none.
    pub snapshot_gen: u64,
    pub guest_round: Option<u64>,
    pub worker_pid: Option<u32>,
    /// The guest runs the stasis agent (reached through its vsock socket).
    pub agent: bool,
    /// The envd access token (`X-Access-Token`) of a secured agent sandbox.
    pub envd_token: Option<String>,
    /// Bumped by every write (read back by [`Store::get`]; ignored by
    /// [`Store::put`], which bumps it).
    pub generation: u64,
    /// The host that wrote it last (read back; [`Store::put`] writes the
    /// store's own host id).
    pub owner: Option<String>,
}

/// Where metadata lives (`--database`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseSpec {
    /// `sqlite:PATH` (default: `<data-dir>/stasis.db`).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…` (a libpq URL).
    Postgres(String),
}

impl DatabaseSpec {
    /// Parses a `--database` value.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseSpec::Postgres(s.to_string()))
        } else if let Some(p) = s.strip_prefix("sqlite:") {
            if p.is_empty() {
                return Err(Error::Config("--database sqlite: needs a path".into()));
            }
            Ok(DatabaseSpec::Sqlite(PathBuf::from(p)))
        } else {
            Err(Error::Config(format!(
                "--database {:?}: expected postgres://USER@HOST/DB or sqlite:PATH",
                super::store_pg::redact(s)
            )))
        }
    }
}

/// What a host says about itself in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Where its API answers (`IP:PORT`).
    pub address: String,
    /// Its CPU/KVM fingerprint (a snapshot resumes only on a match).
    pub fingerprint: String,
    /// Sandboxes running there.
    pub load: u64,
    /// It is draining (shutting down): it takes no sandboxes.
    pub draining: bool,
    /// Bytes of guest memory it may still give to sandboxes.
    pub memory_free: u64,
}

/// A host heard from recently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHost {
    pub id: String,
    pub info: HostInfo,
    /// Since its last heartbeat, by the database's clock.
    pub age_ms: u64,
}

/// The outcome of [`Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This host made the change (or already held the row in the target
    /// state).
    Won,
    /// Someone else changed the row first: what it is now.
    Lost {
        state: Option<RowState>,
        owner: Option<String>,
    },
    /// No such row.
    Missing,
}

/// The metadata store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// This host's id (`owner` of the rows it writes).
    host: Arc<str>,
}

/// The two implementations.
#[derive(Clone)]
pub enum Backend {
    Sqlite(Arc<Mutex<Connection>>),
    Postgres(Arc<super::store_pg::PgStore>),
}

impl Store {
    /// Opens the store `spec` names for host `host` (SQLite: creating the
    /// file; PostgreSQL: connecting and migrating the schema — an
    /// unreachable server is [`Error::Unavailable`]).
    pub fn open_spec(spec: &DatabaseSpec, host: &str) -> Result<Self, Error> {
        match spec {
            DatabaseSpec::Sqlite(p) => {
                let mut s = Self::open(p)?;
                s.host = Arc::from(host);
                Ok(s)
            }
            DatabaseSpec::Postgres(url) => Ok(Store {
                backend: Backend::Postgres(Arc::new(super::store_pg::PgStore::connect(url, host)?)),
                host: Arc::from(host),
            }),
        }
    }

    /// Whether several hosts share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// This host's id.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The backend (for tests and `stasis db`).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Whether the database answers now ([`Error::Unavailable`] if not).
    pub fn ping(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.ping(),
        }
    }

    /// One row by id (any owner).
    pub fn get(&self, id: &str) -> Result<Option<Row>, Error> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(self.sqlite_rows(Some(id))?.pop()),
            Backend::Postgres(p) => p.get(id),
        }
    }

    /// The conditional state change: sets `state = to`, bumps the
    /// generation and makes this host the owner, only where the row is in
    /// `from` at `generation`. True: this call changed it.
    pub fn transition(
        &self,
        id: &str,
        from: RowState,
        generation: u64,
        to: RowState,
    ) -> Result<bool, Error> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(self.conn().execute(
                "UPDATE sandboxes SET state = ?2, generation = generation + 1, owner = ?5
                 WHERE id = ?1 AND state = ?3 AND generation = ?4",
                params![
                    id,
                    to.as_str(),
                    from.as_str(),
                    generation as i64,
                    &*self.host
                ],
            )? == 1),
            Backend::Postgres(p) => p.transition(id, from, generation, to),
        }
    }

    /// Reads the row and makes the conditional change `from` → `to` for
    /// this host: [`Claim::Won`] also when this host already holds it in
    /// `to`.
    pub fn claim(&self, id: &str, from: RowState, to: RowState) -> Result<Claim, Error> {
        if let Backend::Postgres(p) = &self.backend {
            return p.claim(id, from, to);
        }
        let Some(row) = self.get(id)? else {
            return Ok(Claim::Missing);
        };
        if row.state == to && row.owner.as_deref().is_none_or(|o| o == &*self.host) {
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

    /// Records that this host is alive (with its address, fingerprint and
    /// load).
    pub fn heartbeat(&self, h: &HostInfo) -> Result<(), Error> {
        match &self.backend {
            Backend::Sqlite(_) => {
                self.conn().execute(
                    "INSERT OR REPLACE INTO hosts (id, address, fingerprint, load, last_heartbeat_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![&*self.host, h.address, h.fingerprint, h.load as i64, now_ms()],
                )?;
                Ok(())
            }
            Backend::Postgres(p) => p.heartbeat(h),
        }
    }

    /// Hosts whose last heartbeat is younger than `ttl`, by id.
    pub fn live_hosts(&self, ttl: std::time::Duration) -> Result<Vec<LiveHost>, Error> {
        match &self.backend {
            Backend::Sqlite(_) => {
                let now = now_ms();
                let conn = self.conn();
                let mut stmt = conn.prepare(
                    "SELECT id, address, fingerprint, load, last_heartbeat_ms FROM hosts ORDER BY id",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok(LiveHost {
                        id: r.get(0)?,
                        info: HostInfo {
                            address: r.get(1)?,
                            fingerprint: r.get(2)?,
                            load: r.get::<_, i64>(3)?.max(0) as u64,
                            draining: false,
                            memory_free: 0,
                        },
                        age_ms: now.saturating_sub(r.get::<_, i64>(4)?).max(0) as u64,
                    })
                })?;
                let mut out = Vec::new();
                for h in rows {
                    let h = h?;
                    if u128::from(h.age_ms) < ttl.as_millis() {
                        out.push(h);
                    }
                }
                Ok(out)
            }
            Backend::Postgres(p) => p.live_hosts(ttl),
        }
    }

    /// Forgets this host's heartbeat (shared database only).
    pub fn delete_host(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.delete_host(),
        }
    }

    /// Sandboxes other hosts own (shared database only; none on SQLite).
    pub fn others(&self) -> Result<Vec<Row>, Error> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.others(),
        }
    }

    /// One sandbox's network settings, whoever owns it.
    pub fn get_network(&self, id: &str) -> Result<Option<crate::net::spec::NetSpec>, Error> {
        let raw = match &self.backend {
            Backend::Postgres(p) => p.get_network(id)?,
            Backend::Sqlite(_) => {
                let conn = self.conn();
                let mut stmt = conn.prepare("SELECT spec FROM sandbox_network WHERE id = ?1")?;
                let mut rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
                rows.next().transpose()?
            }
        };
        raw.map(|json| {
            serde_json::from_str(&json).map_err(|e| Error::Corrupt {
                id: id.to_string(),
                what: format!("network settings: {e}"),
            })
        })
        .transpose()
    }

    /// Records a reusable snapshot's manifest (shared database only; on
    /// SQLite the snapshot store's directory is the only record).
    pub fn put_snapshot(&self, m: &crate::snapshot::manifest::Manifest) -> Result<(), Error> {
        let Backend::Postgres(p) = &self.backend else {
            return Ok(());
        };
        let json = serde_json::to_string(m).map_err(|e| Error::Corrupt {
            id: m.id.clone(),
            what: e.to_string(),
        })?;
        let created_ms = i64::try_from(m.created_unix.saturating_mul(1000)).unwrap_or(i64::MAX);
        p.put_snapshot(&m.id, json, created_ms)
    }

    /// Forgets a reusable snapshot (shared database only).
    pub fn delete_snapshot(&self, id: &str) -> Result<(), Error> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.delete_snapshot(id),
        }
    }

    /// Reusable snapshots recorded in a shared database (their manifests).
    pub fn snapshots(&self) -> Result<Vec<crate::snapshot::manifest::Manifest>, Error> {
        let Backend::Postgres(p) = &self.backend else {
            return Ok(vec![]);
        };
        p.snapshots()?
            .into_iter()
            .map(|(id, json, _host)| {
                serde_json::from_str(&json).map_err(|e| Error::Corrupt {
                    id,
                    what: format!("snapshot manifest: {e}"),
                })
            })
            .collect()
    }

    /// `stasis db rebuild`: records every valid user snapshot of the local
    /// snapshot store (`<data-dir>/snapshots`, manifests checked as a
    /// resume checks them; damaged ones are skipped and named) in a shared
    /// database — what a lost database gets back from the snapshots' own
    /// manifests. Warm template snapshots are the host's own cache, never
    /// recorded (a later create rebuilds them). Idempotent. Returns the ids
    /// recorded.
    pub fn rebuild_snapshots(&self, snapshots_dir: &Path) -> Result<Vec<String>, Error> {
        if !self.is_shared() {
            return Err(Error::Config(
                "stasis db rebuild fills a PostgreSQL database (--database postgres://…)".into(),
            ));
        }
        let store = crate::snapshot::store::SnapshotStore::open(snapshots_dir)
            .map_err(|e| Error::Config(crate::error_chain(&e)))?;
        let mut done = Vec::new();
        for m in store.list() {
            if m.kind == crate::snapshot::manifest::SnapshotKind::Template {
                continue;
            }
            self.put_snapshot(&m)?;
            done.push(m.id);
        }
        Ok(done)
    }

    /// Opens (creating if needed) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + NORMAL: a committed transaction survives the process being
        // killed (the WAL is in the page cache); only an OS crash may lose
        // the last ones.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sandboxes (
                id TEXT PRIMARY KEY,
                seq INTEGER NOT NULL UNIQUE,
                template_id TEXT NOT NULL,
                alias TEXT,
                state TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                started_ms INTEGER NOT NULL,
                end_ms INTEGER NOT NULL,
                on_timeout_pause INTEGER NOT NULL,
                auto_resume INTEGER NOT NULL,
                metadata TEXT NOT NULL,
                cpu_count INTEGER NOT NULL,
                memory_mb INTEGER NOT NULL,
                disk_mb INTEGER NOT NULL,
                allow_internet INTEGER NOT NULL,
                snapshot_gen INTEGER NOT NULL,
                guest_round INTEGER,
                worker_pid INTEGER,
                agent INTEGER NOT NULL DEFAULT 0,
                envd_token TEXT
            );",
        )?;
        // Databases from before agent templates lack these columns.
        for (column, ddl) in [
            (
                "agent",
                "ALTER TABLE sandboxes ADD COLUMN agent INTEGER NOT NULL DEFAULT 0;",
            ),
            (
                "envd_token",
                "ALTER TABLE sandboxes ADD COLUMN envd_token TEXT;",
            ),
            (
                "generation",
                "ALTER TABLE sandboxes ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;",
            ),
            ("owner", "ALTER TABLE sandboxes ADD COLUMN owner TEXT;"),
        ] {
            let has: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('sandboxes') WHERE name = ?1")?
                .exists([column])?;
            if !has {
                conn.execute_batch(ddl)?;
            }
        }
        // Network settings (src/net/spec.rs), one JSON document per
        // sandbox, deleted with the sandbox's row.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sandbox_network (
                id TEXT PRIMARY KEY,
                spec TEXT NOT NULL
            );
            CREATE TRIGGER IF NOT EXISTS sandbox_network_gone AFTER DELETE ON sandboxes
            BEGIN DELETE FROM sandbox_network WHERE id = old.id; END;
            CREATE TABLE IF NOT EXISTS hosts (
                id TEXT PRIMARY KEY,
                address TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                load INTEGER NOT NULL,
                last_heartbeat_ms INTEGER NOT NULL
            );",
        )?;
        Ok(Store {
            backend: Backend::Sqlite(Arc::new(Mutex::new(conn))),
            host: Arc::from(default_host_id().as_str()),
        })
    }

    /// Stores a sandbox's network settings.
    pub fn put_network(&self, id: &str, spec: &crate::net::spec::NetSpec) -> Result<(), Error> {
        let json = serde_json::to_string(spec).map_err(|e| Error::Corrupt {
            id: id.to_string(),
            what: e.to_string(),
        })?;
        if let Backend::Postgres(p) = &self.backend {
            return p.put_network(id, json);
        }
        self.conn().execute(
            "INSERT OR REPLACE INTO sandbox_network (id, spec) VALUES (?1, ?2)",
            params![id, json],
        )?;
        Ok(())
    }

    /// Every stored network setting (sandbox id, settings).
    pub fn load_networks(&self) -> Result<Vec<(String, crate::net::spec::NetSpec)>, Error> {
        let raw: Vec<(String, String)> = match &self.backend {
            Backend::Postgres(p) => p.load_networks()?,
            Backend::Sqlite(_) => {
                let conn = self.conn();
                let mut stmt = conn.prepare("SELECT id, spec FROM sandbox_network")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                rows.collect::<Result<_, _>>()?
            }
        };
        let mut out = Vec::new();
        for (id, json) in raw {
            let spec = serde_json::from_str(&json).map_err(|e| Error::Corrupt {
                id: id.clone(),
                what: format!("network settings: {e}"),
            })?;
            out.push((id, spec));
        }
        Ok(out)
    }

    /// The SQLite connection. Only called on the SQLite backend (every
    /// public method dispatches PostgreSQL first).
    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        match &self.backend {
            Backend::Sqlite(c) => c.lock().unwrap_or_else(|e| e.into_inner()),
            Backend::Postgres(_) => unreachable!("conn() on the PostgreSQL backend"),
        }
    }

    /// Inserts or replaces a row.
    pub fn put(&self, r: &Row) -> Result<(), Error> {
        if let Backend::Postgres(p) = &self.backend {
            return p.put(r);
        }
        let metadata = serde_json::to_string(&r.metadata).map_err(|e| Error::Corrupt {
            id: r.id.clone(),
            what: e.to_string(),
        })?;
        self.conn().execute(
            "INSERT OR REPLACE INTO sandboxes (id, seq, template_id, alias, state, created_ms,
                started_ms, end_ms, on_timeout_pause, auto_resume, metadata, cpu_count, memory_mb,
                disk_mb, allow_internet, snapshot_gen, guest_round, worker_pid, agent, envd_token,
                generation, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                ?19, ?20,
                COALESCE((SELECT generation FROM sandboxes WHERE id = ?1), 0) + 1, ?21)",
            params![
                r.id,
                r.seq,
                r.template_id,
                r.alias,
                r.state.as_str(),
                r.created_ms,
                r.started_ms,
                r.end_ms,
                r.on_timeout_pause,
                r.auto_resume,
                metadata,
                r.cpu_count,
                r.memory_mb as i64,
                r.disk_mb as i64,
                r.allow_internet,
                r.snapshot_gen as i64,
                r.guest_round.map(|g| g as i64),
                r.worker_pid,
                r.agent,
                r.envd_token,
                &*self.host,
            ],
        )?;
        Ok(())
    }

    /// Deletes a row; absent is fine.
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        if let Backend::Postgres(p) = &self.backend {
            return p.delete(id);
        }
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// The highest `seq` ever stored (0 when empty).
    pub fn max_seq(&self) -> Result<i64, Error> {
        if let Backend::Postgres(p) = &self.backend {
            return p.max_seq();
        }
        let v: Option<i64> = self
            .conn()
            .query_row("SELECT MAX(seq) FROM sandboxes", [], |r| r.get(0))
            .optional()?
            .flatten();
        Ok(v.unwrap_or(0))
    }

    /// Every valid row, in `seq` order; a row that cannot be decoded or
    /// holds values out of range (a negative or absurd `memory_mb`, an
    /// unknown state, bad metadata JSON, a wrong column type, ...) is
    /// quarantined: moved, with the reason and its raw values, to the
    /// `quarantine` table, and reported here, so one bad row never stops
    /// the server from starting.
    pub fn load_all_quarantining(&self) -> Result<(Vec<Row>, Vec<Quarantined>), Error> {
        if let Backend::Postgres(p) = &self.backend {
            return p.load_all_quarantining();
        }
        let mut conn = self.conn();
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS quarantine (
                id TEXT,
                reason TEXT NOT NULL,
                at_ms INTEGER NOT NULL,
                raw TEXT NOT NULL
            );",
        )?;
        let mut bad: Vec<(i64, Quarantined, String)> = Vec::new();
        {
            let mut stmt = conn.prepare("SELECT rowid, * FROM sandboxes")?;
            let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let rowid: i64 = r.get(0)?;
                if let Err(why) = check_row(r) {
                    let mut raw = serde_json::Map::new();
                    for (i, n) in names.iter().enumerate().skip(1) {
                        let v = match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                            rusqlite::types::ValueRef::Integer(n) => n.into(),
                            rusqlite::types::ValueRef::Real(f) => f.into(),
                            rusqlite::types::ValueRef::Text(t) => {
                                String::from_utf8_lossy(t).into_owned().into()
                            }
                            rusqlite::types::ValueRef::Blob(b) => {
                                format!("<{} bytes of blob>", b.len()).into()
                            }
                        };
                        raw.insert(n.clone(), v);
                    }
                    let id = match r.get_ref(1)? {
                        rusqlite::types::ValueRef::Text(t) => {
                            String::from_utf8_lossy(t).into_owned()
                        }
                        other => format!("{other:?}"),
                    };
                    bad.push((
                        rowid,
                        Quarantined { id, why },
                        serde_json::Value::Object(raw).to_string(),
                    ));
                }
            }
        }
        if !bad.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let tx = conn.transaction()?;
            for (rowid, q, raw) in &bad {
                tx.execute(
                    "INSERT INTO quarantine (id, reason, at_ms, raw) VALUES (?1, ?2, ?3, ?4)",
                    params![q.id, q.why, now, raw],
                )?;
                tx.execute("DELETE FROM sandboxes WHERE rowid = ?1", params![rowid])?;
            }
            tx.commit()?;
        }
        drop(conn);
        let rows = self.load_all()?;
        Ok((rows, bad.into_iter().map(|(_, q, _)| q).collect()))
    }

    /// Every row, in `seq` order.
    pub fn load_all(&self) -> Result<Vec<Row>, Error> {
        if let Backend::Postgres(p) = &self.backend {
            return p.load_all();
        }
        self.sqlite_rows(None)
    }

    /// SQLite: every row in `seq` order, or the one with `id`.
    fn sqlite_rows(&self, id: Option<&str>) -> Result<Vec<Row>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, seq, template_id, alias, state, created_ms, started_ms, end_ms,
                on_timeout_pause, auto_resume, metadata, cpu_count, memory_mb, disk_mb,
                allow_internet, snapshot_gen, guest_round, worker_pid, agent, envd_token,
                generation, owner
             FROM sandboxes {} ORDER BY seq",
            if id.is_some() { "WHERE id = ?1" } else { "" }
        ))?;
        let args: Vec<&dyn rusqlite::ToSql> = match &id {
            Some(id) => vec![id],
            None => vec![],
        };
        let raw = stmt.query_map(args.as_slice(), |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                [
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ],
                [
                    r.get::<_, bool>(8)?,
                    r.get::<_, bool>(9)?,
                    r.get::<_, bool>(14)?,
                ],
                r.get::<_, String>(10)?,
                [
                    r.get::<_, i64>(11)?,
                    r.get::<_, i64>(12)?,
                    r.get::<_, i64>(13)?,
                    r.get::<_, i64>(15)?,
                ],
                r.get::<_, Option<i64>>(16)?,
                r.get::<_, Option<i64>>(17)?,
                (r.get::<_, bool>(18)?, r.get::<_, Option<String>>(19)?),
                (r.get::<_, i64>(20)?, r.get::<_, Option<String>>(21)?),
            ))
        })?;
        let mut out = Vec::new();
        for item in raw {
            let (
                id,
                seq,
                template_id,
                alias,
                state,
                t,
                flags,
                metadata,
                nums,
                round,
                pid,
                agent_token,
                gen_owner,
            ) = item?;
            let (agent, envd_token) = agent_token;
            let corrupt = |what: String| Error::Corrupt {
                id: id.clone(),
                what,
            };
            let state = match state.as_str() {
                "running" => RowState::Running,
                "paused" => RowState::Paused,
                other => return Err(corrupt(format!("unknown state {other:?}"))),
            };
            let metadata: BTreeMap<String, String> =
                serde_json::from_str(&metadata).map_err(|e| corrupt(e.to_string()))?;
            out.push(Row {
                id: id.clone(),
                seq,
                template_id,
                alias,
                state,
                created_ms: t[0],
                started_ms: t[1],
                end_ms: t[2],
                on_timeout_pause: flags[0],
                auto_resume: flags[1],
                allow_internet: flags[2],
                metadata,
                cpu_count: u32::try_from(nums[0]).map_err(|e| corrupt(e.to_string()))?,
                memory_mb: u64::try_from(nums[1]).map_err(|e| corrupt(e.to_string()))?,
                disk_mb: u64::try_from(nums[2]).map_err(|e| corrupt(e.to_string()))?,
                snapshot_gen: u64::try_from(nums[3]).map_err(|e| corrupt(e.to_string()))?,
                guest_round: round.and_then(|r| u64::try_from(r).ok()),
                worker_pid: pid.and_then(|p| u32::try_from(p).ok()),
                agent,
                envd_token,
                generation: u64::try_from(gen_owner.0).unwrap_or(0),
                owner: gen_owner.1,
            });
        }
        Ok(out)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// This host's default id: the hostname (`/proc/sys/kernel/hostname`),
/// else `localhost`. `stasis serve --host-id` overrides it; hosts sharing
/// one database need distinct ids.
pub fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A stored row that was moved to the `quarantine` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its `id` column as stored (may be anything).
    pub id: String,
    /// Why it was refused.
    pub why: String,
}

/// Largest `memory_mb` a stored row may hold (1 TiB, as templates).
const MAX_ROW_MEMORY_MB: i64 = 1 << 20;
/// Largest `cpu_count` a stored row may hold.
const MAX_ROW_VCPUS: i64 = 255;

/// Whether a `SELECT rowid, *` row decodes into a valid [`Row`].
fn check_row(r: &rusqlite::Row<'_>) -> Result<(), String> {
    fn col<T: rusqlite::types::FromSql>(r: &rusqlite::Row<'_>, name: &str) -> Result<T, String> {
        r.get::<_, T>(name)
            .map_err(|e| format!("column {name}: {e}"))
    }
    let id: String = col(r, "id")?;
    if id.is_empty() || id.len() > 128 {
        return Err(format!("id {id:?} has a bad length"));
    }
    col::<i64>(r, "seq")?;
    col::<String>(r, "template_id")?;
    col::<Option<String>>(r, "alias")?;
    let state: String = col(r, "state")?;
    if state != "running" && state != "paused" {
        return Err(format!("unknown state {state:?}"));
    }
    for c in ["created_ms", "started_ms", "end_ms"] {
        col::<i64>(r, c)?;
    }
    for c in ["on_timeout_pause", "auto_resume", "allow_internet", "agent"] {
        col::<bool>(r, c)?;
    }
    let metadata: String = col(r, "metadata")?;
    serde_json::from_str::<BTreeMap<String, String>>(&metadata)
        .map_err(|e| format!("metadata: {e}"))?;
    let cpus: i64 = col(r, "cpu_count")?;
    if !(1..=MAX_ROW_VCPUS).contains(&cpus) {
        return Err(format!("cpu_count {cpus} is not in 1..={MAX_ROW_VCPUS}"));
    }
    let mem: i64 = col(r, "memory_mb")?;
    if !(1..=MAX_ROW_MEMORY_MB).contains(&mem) {
        return Err(format!("memory_mb {mem} is not in 1..={MAX_ROW_MEMORY_MB}"));
    }
    for c in ["disk_mb", "snapshot_gen"] {
        let v: i64 = col(r, c)?;
        if v < 0 {
            return Err(format!("{c} {v} is negative"));
        }
    }
    col::<Option<i64>>(r, "guest_round")?;
    col::<Option<i64>>(r, "worker_pid")?;
    col::<Option<String>>(r, "envd_token")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, seq: i64) -> Row {
        Row {
            id: id.into(),
            seq,
            template_id: "base".into(),
            alias: Some("base".into()),
            state: RowState::Paused,
            created_ms: 1,
            started_ms: 2,
            end_ms: 3,
            on_timeout_pause: true,
            auto_resume: false,
            metadata: [("k".to_string(), "v".to_string())].into(),
            cpu_count: 1,
            memory_mb: 64,
            disk_mb: 0,
            allow_internet: true,
            snapshot_gen: 2,
            guest_round: Some(99),
            worker_pid: None,
            agent: false,
            envd_token: Some("tok".into()),
            generation: 0,
            owner: None,
        }
    }

    #[test]
    fn put_load_delete_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("stasis.db");
        {
            let s = Store::open(&path).unwrap();
            s.put(&row("a", 1)).unwrap();
            s.put(&row("b", 2)).unwrap();
            let mut b = row("b", 2);
            b.state = RowState::Running;
            s.put(&b).unwrap();
            s.delete("a").unwrap();
            s.delete("zzz").unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rows = s.load_all().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, RowState::Running);
        assert_eq!(rows[0].metadata.get("k").map(String::as_str), Some("v"));
        assert_eq!(s.max_seq().unwrap(), 2);
    }

    #[test]
    fn sqlite_conditional_transition_generation_and_heartbeats() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open_spec(&DatabaseSpec::Sqlite(tmp.path().join("s.db")), "h1").unwrap();
        s.put(&row("a", 1)).unwrap();
        let got = s.get("a").unwrap().unwrap();
        assert_eq!((got.generation, got.owner.as_deref()), (1, Some("h1")));
        assert!(!s
            .transition("a", RowState::Paused, 0, RowState::Running)
            .unwrap());
        assert!(!s
            .transition("a", RowState::Running, 1, RowState::Paused)
            .unwrap());
        assert!(s
            .transition("a", RowState::Paused, 1, RowState::Running)
            .unwrap());
        assert!(!s
            .transition("a", RowState::Paused, 1, RowState::Running)
            .unwrap());
        assert_eq!(s.get("a").unwrap().unwrap().generation, 2);
        // Already running here: claiming it again is a no-op win.
        assert_eq!(
            s.claim("a", RowState::Paused, RowState::Running).unwrap(),
            Claim::Won
        );
        assert_eq!(
            s.claim("zz", RowState::Paused, RowState::Running).unwrap(),
            Claim::Missing
        );
        let h = HostInfo {
            address: "127.0.0.1:1".into(),
            fingerprint: "f".into(),
            load: 2,
            draining: false,
            memory_free: 0,
        };
        s.heartbeat(&h).unwrap();
        let live = s.live_hosts(std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].id.as_str(), &live[0].info), ("h1", &h));
        assert!(s.live_hosts(std::time::Duration::ZERO).unwrap().is_empty());
    }

    #[test]
    fn database_specs_parse_and_hide_passwords() {
        assert_eq!(
            DatabaseSpec::parse("sqlite:/x/y.db").unwrap(),
            DatabaseSpec::Sqlite("/x/y.db".into())
        );
        assert!(matches!(
            DatabaseSpec::parse("postgresql://u@h/d").unwrap(),
            DatabaseSpec::Postgres(_)
        ));
        for bad in ["sqlite:", "mysql://u:pw@h/d", ""] {
            let e = DatabaseSpec::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn old_database_gains_the_agent_and_token_columns() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("stasis.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE,
                template_id TEXT NOT NULL, alias TEXT, state TEXT NOT NULL,
                created_ms INTEGER NOT NULL, started_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
                on_timeout_pause INTEGER NOT NULL, auto_resume INTEGER NOT NULL,
                metadata TEXT NOT NULL, cpu_count INTEGER NOT NULL, memory_mb INTEGER NOT NULL,
                disk_mb INTEGER NOT NULL, allow_internet INTEGER NOT NULL,
                snapshot_gen INTEGER NOT NULL, guest_round INTEGER, worker_pid INTEGER);
                INSERT INTO sandboxes VALUES ('old', 1, 'base', NULL, 'paused', 1, 2, 3, 0, 0,
                '{}', 1, 64, 0, 1, 1, NULL, NULL);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rows = s.load_all().unwrap();
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].agent);
        assert_eq!(rows[0].envd_token, None);
        let mut r = row("new", 2);
        r.agent = true;
        s.put(&r).unwrap();
        drop(s);
        let rows = Store::open(&path).unwrap().load_all().unwrap();
        assert!(rows
            .iter()
            .any(|r| r.id == "new" && r.agent && r.envd_token.as_deref() == Some("tok")));
    }
}
