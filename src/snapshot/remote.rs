//! Snapshots in S3-compatible object storage: content-addressed chunks, a
//! manifest committed last, a bounded per-host chunk cache.
//!
//! Layout in the bucket (under an optional key prefix):
//!
//! - `chunks/<sha256>`: a [`CHUNK_SIZE`] (2 MiB) piece of a snapshot file
//!   (the last piece of a file may be shorter), named by the SHA-256 of its
//!   bytes. All-zero chunks are not stored at all (the manifest says
//!   "zero"); a chunk the bucket already holds is not uploaded again, so
//!   sandboxes of one template and successive pauses of one sandbox share
//!   every chunk they have in common.
//! - `snapshots/<id>/manifest`: a [`RemoteManifest`] listing every file of
//!   the snapshot directory (state, memory, disk overlay and its map, the
//!   local manifest if any) with its length and the hash of each chunk.
//!   Container (little-endian): magic `b"STASISRM"`, version `u32`, body
//!   length `u64`, JSON body, CRC-64/XZ over everything before it.
//!
//! Commit rule: the manifest is written last, once every chunk it names is
//! in the bucket, with a conditional put (`If-None-Match: *`): a snapshot id
//! is committed once, and of two hosts committing the same id exactly one
//! wins ([`Error::AlreadyCommitted`] for the other). A reader that finds a
//! manifest finds every chunk it names (unless something deleted or damaged
//! them: then the download fails naming the chunk).
//!
//! Every chunk read back is checked against its name (SHA-256) and its
//! expected length; a missing or corrupt chunk is an error that names the
//! chunk, the file and the offset. Manifests are size-capped and checked
//! (names, ids, chunk counts) before use: a crafted manifest is a clear
//! error, never a panic or a path outside the destination.
//!
//! Objects are at most 2 MiB, so every upload is a single PUT (multipart is
//! for objects above 5 MiB); requests are retried with backoff by
//! `object_store`, bounded so an unreachable bucket fails in seconds, not
//! minutes.
//!
//! [`ChunkCache`]: a bounded LRU cache of verified chunks on the host's
//! disk (`--chunk-cache-dir`, `--chunk-cache-bytes`); a chunk missing from
//! it is fetched once however many readers want it at the same time
//! (single flight). [`Uploader`]: the server's background uploads of paused
//! sandboxes' snapshots, retried until the bucket takes them, with their
//! progress and backlog for `GET /sandboxes/{id}`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Size of a chunk (the last chunk of a file may be shorter).
pub const CHUNK_SIZE: u64 = super::manifest::CHUNK_SIZE;
/// Magic bytes of a remote manifest.
pub const REMOTE_MAGIC: [u8; 8] = *b"STASISRM";
/// The remote manifest version this build reads and writes.
pub const REMOTE_VERSION: u32 = 1;
/// Largest remote manifest read (a 1 TiB snapshot lists 512 Ki chunks).
pub const MAX_REMOTE_MANIFEST: u64 = 64 << 20;
/// Largest file a manifest may describe.
pub const MAX_FILE_LEN: u64 = 1 << 40;
/// Parallel requests of one upload or download.
pub const PARALLEL: usize = 8;

/// Errors of the remote snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store's configuration is unusable.
    #[error("snapshot store: {0}")]
    Config(String),
    /// A request to the bucket failed (after retries).
    #[error("snapshot store {what}: {source}")]
    Store {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot is not in the bucket.
    #[error("snapshot {0} is not in the snapshot store")]
    NotFound(String),
    /// Another commit of this snapshot id came first.
    #[error("snapshot {0} is already committed in the snapshot store (another commit won)")]
    AlreadyCommitted(String),
    /// A remote manifest is damaged or crafted.
    #[error("remote manifest of snapshot {id}: {why}")]
    BadManifest {
        /// The snapshot.
        id: String,
        /// What is wrong.
        why: String,
    },
    /// A chunk a manifest names is missing from the bucket.
    #[error("chunk {hash} (file {file}, offset {offset:#x}) is missing from the snapshot store")]
    ChunkMissing {
        /// The chunk's name.
        hash: String,
        /// The file it belongs to.
        file: String,
        /// Its offset in the file.
        offset: u64,
    },
    /// A chunk's bytes do not match its name or length.
    #[error("chunk {hash} (file {file}, offset {offset:#x}) is corrupt: {why}")]
    ChunkCorrupt {
        /// The chunk's name.
        hash: String,
        /// The file it belongs to.
        file: String,
        /// Its offset in the file.
        offset: u64,
        /// What differs.
        why: String,
    },
    /// Fetching a chunk failed (shared by every waiter of that chunk).
    #[error("chunk {hash} (file {file}, offset {offset:#x}): {why}")]
    ChunkFetch {
        /// The chunk's name.
        hash: String,
        /// The file it belongs to.
        file: String,
        /// Its offset in the file.
        offset: u64,
        /// Why.
        why: String,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn store_err(what: impl Into<String>) -> impl FnOnce(object_store::Error) -> Error {
    let what = what.into();
    move |source| Error::Store { what, source }
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n != "."
        && n != ".."
        && !n.contains('/')
        && !n.contains('\0')
}

// ---- the manifest -------------------------------------------------------

/// One file of a remote snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFile {
    /// Its name in the snapshot directory (a plain name).
    pub name: String,
    /// Its length.
    pub len: u64,
    /// Per [`CHUNK_SIZE`] piece: the SHA-256 naming the chunk, or `None`
    /// for an all-zero piece (not stored; a hole when downloaded).
    pub chunks: Vec<Option<String>>,
}

/// The manifest of a snapshot in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteManifest {
    /// The snapshot's id in the bucket.
    pub id: String,
    /// Always [`CHUNK_SIZE`] in version 1.
    pub chunk_size: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// Every file of the snapshot directory.
    pub files: Vec<RemoteFile>,
    /// Free-form key/values (the sandbox, its pause generation).
    pub labels: BTreeMap<String, String>,
}

impl RemoteManifest {
    /// Encodes the manifest into its container.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a manifest always serialises");
        super::manifest::seal(&REMOTE_MAGIC, REMOTE_VERSION, &body)
    }

    /// Decodes and checks the manifest of snapshot `id` (which it must name).
    pub fn decode(bytes: &[u8], id: &str) -> Result<RemoteManifest> {
        let bad = |why: String| Error::BadManifest {
            id: id.to_owned(),
            why,
        };
        let body = super::manifest::unseal(bytes, &REMOTE_MAGIC, REMOTE_VERSION, "remote manifest")
            .map_err(bad)?;
        let m: RemoteManifest =
            serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))?;
        m.check(id).map_err(bad)?;
        Ok(m)
    }

    fn check(&self, id: &str) -> std::result::Result<(), String> {
        if self.id != id {
            return Err(format!("names snapshot {:?}", self.id));
        }
        if self.chunk_size != CHUNK_SIZE {
            return Err(format!(
                "chunk size {} (this build uses {CHUNK_SIZE})",
                self.chunk_size
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            if !valid_name(&f.name) || !seen.insert(f.name.as_str()) {
                return Err(format!("invalid or repeated file name {:?}", f.name));
            }
            if f.len > MAX_FILE_LEN {
                return Err(format!(
                    "file {} is {} bytes, over the limit",
                    f.name, f.len
                ));
            }
            let want = f.len.div_ceil(CHUNK_SIZE);
            if f.chunks.len() as u64 != want {
                return Err(format!(
                    "file {}: {} chunks listed, {want} expected for {} bytes",
                    f.name,
                    f.chunks.len(),
                    f.len
                ));
            }
            if let Some(h) = f.chunks.iter().flatten().find(|h| !valid_hash(h)) {
                return Err(format!("file {}: invalid chunk name {h:?}", f.name));
            }
        }
        Ok(())
    }

    /// Distinct stored chunks and the bytes they hold.
    pub fn stored_chunks(&self) -> BTreeMap<&str, u64> {
        let mut m = BTreeMap::new();
        for f in &self.files {
            for (i, h) in f.chunks.iter().enumerate() {
                if let Some(h) = h {
                    let len = (f.len - i as u64 * CHUNK_SIZE).min(CHUNK_SIZE);
                    m.insert(h.as_str(), len);
                }
            }
        }
        m
    }
}

/// Splits the files of `dir` into chunks: hashes every non-zero piece
/// (blocking; reads every byte once).
pub fn chunk_dir(dir: &Path, id: &str, labels: BTreeMap<String, String>) -> Result<RemoteManifest> {
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let e = e.map_err(io("reading", dir))?;
        let ft = e.file_type().map_err(io("reading", &e.path()))?;
        if ft.is_file() {
            if let Some(n) = e.file_name().to_str() {
                names.push(n.to_owned());
            }
        }
    }
    names.sort();
    let mut files = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for name in names {
        let path = dir.join(&name);
        let f = File::open(&path).map_err(io("opening", &path))?;
        let len = f.metadata().map_err(io("reading", &path))?.len();
        let mut chunks = Vec::with_capacity(len.div_ceil(CHUNK_SIZE) as usize);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK_SIZE) as usize;
            f.read_exact_at(&mut buf[..n], off)
                .map_err(io("reading", &path))?;
            let piece = &buf[..n];
            chunks.push((!is_zero(piece)).then(|| sha256_hex(piece)));
            off += n as u64;
        }
        files.push(RemoteFile { name, len, chunks });
    }
    Ok(RemoteManifest {
        id: id.to_owned(),
        chunk_size: CHUNK_SIZE,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        files,
        labels,
    })
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed blocks vectorises; stop at the first non-zero block.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

// ---- the store ----------------------------------------------------------

/// Where the bucket is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct RemoteConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// `http(s)://host:port` of an S3-compatible server (default: AWS, or
    /// `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Region (default: `AWS_REGION`/`AWS_DEFAULT_REGION`, else us-east-1).
    pub region: Option<String>,
    /// Access key id (default: `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// Secret key (default: `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// Retries of one request (default 3).
    pub max_retries: Option<usize>,
    /// Longest a request is retried for (default 10 s).
    pub retry_timeout: Option<Duration>,
}

/// Command-line options of the snapshot store (`stasis serve`, `stasis
/// snapshot push|pull`). Keys come from `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (never flags: `ps` would show them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct S3Args {
    /// Snapshot store in S3-compatible object storage: `s3://bucket` or
    /// `s3://bucket/prefix`.
    #[arg(long, value_name = "S3_URL")]
    pub snapshot_store: Option<String>,
    /// Endpoint of an S3-compatible server (e.g. http://127.0.0.1:9000);
    /// default: AWS_ENDPOINT_URL, else AWS. `http://` is allowed.
    #[arg(long, requires = "snapshot_store")]
    pub s3_endpoint: Option<String>,
    /// Region (default: AWS_REGION, else us-east-1).
    #[arg(long, requires = "snapshot_store")]
    pub s3_region: Option<String>,
    /// A pause answers only once its snapshot is in the bucket.
    #[arg(long, requires = "snapshot_store")]
    pub durable_pause: bool,
    /// Per-host chunk cache directory: downloads from the bucket go
    /// through it (`stasis snapshot pull`, and `serve` resuming a pool's
    /// sandbox paused on another host; serve's default:
    /// `<data-dir>/chunk-cache`).
    #[arg(long, requires = "snapshot_store")]
    pub chunk_cache_dir: Option<PathBuf>,
    /// Most bytes the chunk cache holds (least recently used go first).
    #[arg(long, default_value_t = 8 << 30)]
    pub chunk_cache_bytes: u64,
}

impl S3Args {
    /// The store's configuration, if `--snapshot-store` was given.
    pub fn config(&self) -> Option<RemoteConfig> {
        self.snapshot_store.as_ref().map(|url| RemoteConfig {
            url: url.clone(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            ..Default::default()
        })
    }
}

/// Counters of one upload.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadProgress {
    /// Distinct stored (non-zero) chunks of the snapshot.
    pub chunks_total: AtomicU64,
    /// Of those, handled so far (uploaded or found in the bucket).
    pub chunks_done: AtomicU64,
    /// Uploaded by this upload.
    pub chunks_uploaded: AtomicU64,
    /// Already in the bucket (deduplicated).
    pub chunks_present: AtomicU64,
    /// All-zero pieces (never stored).
    pub chunks_zero: AtomicU64,
    /// Bytes uploaded by this upload.
    pub bytes_uploaded: AtomicU64,
    /// Bytes of the stored chunks, uploaded or not.
    pub bytes_total: AtomicU64,
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadStats {
    /// Distinct non-zero chunks.
    pub chunks_total: u64,
    /// Uploaded.
    pub chunks_uploaded: u64,
    /// Already in the bucket.
    pub chunks_present: u64,
    /// All-zero pieces.
    pub chunks_zero: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of the distinct stored chunks.
    pub bytes_total: u64,
}

impl UploadProgress {
    /// A copy of the counters.
    pub fn stats(&self) -> UploadStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UploadStats {
            chunks_total: g(&self.chunks_total),
            chunks_uploaded: g(&self.chunks_uploaded),
            chunks_present: g(&self.chunks_present),
            chunks_zero: g(&self.chunks_zero),
            bytes_uploaded: g(&self.bytes_uploaded),
            bytes_total: g(&self.bytes_total),
        }
    }
}

/// What a download did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DownloadStats {
    /// Distinct stored chunks of the snapshot.
    pub chunks: u64,
    /// Of those, read from the bucket.
    pub fetched: u64,
    /// Of those, found in the chunk cache.
    pub cached: u64,
    /// Bytes written into the destination's files.
    pub bytes: u64,
}

/// An S3-compatible bucket holding snapshots.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    desc: String,
}

impl RemoteStore {
    /// Builds the client (no request yet; see [`Self::check`]).
    pub fn open(cfg: &RemoteConfig) -> Result<RemoteStore> {
        // reqwest's rustls takes the process-wide provider (ring, as the
        // rest of stasis); installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rest = cfg.url.strip_prefix("s3://").ok_or_else(|| {
            Error::Config(format!(
                "--snapshot-store {:?}: expected s3://bucket[/prefix]",
                cfg.url
            ))
        })?;
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(Error::Config(format!("{:?}: no bucket", cfg.url)));
        }
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        let allow_http = cfg
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .is_some_and(|e| e.starts_with("http://"));
        if let Some(e) = &cfg.endpoint {
            b = b
                .with_endpoint(e.clone())
                .with_virtual_hosted_style_request(false);
        }
        if let Some(r) = cfg.region.clone().or_else(|| {
            std::env::var("AWS_REGION")
                .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                .ok()
        }) {
            b = b.with_region(r);
        }
        if let Some(k) = &cfg.access_key_id {
            b = b.with_access_key_id(k.clone());
        }
        if let Some(k) = &cfg.secret_access_key {
            b = b.with_secret_access_key(k.clone());
        }
        let retry = object_store::RetryConfig {
            max_retries: cfg.max_retries.unwrap_or(3),
            retry_timeout: cfg.retry_timeout.unwrap_or(Duration::from_secs(10)),
            ..Default::default()
        };
        // (Client options replace the builder's: allow_http goes here.)
        let client = object_store::ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(60));
        let s3 = b
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(RemoteStore {
            store: Arc::new(s3),
            desc: format!(
                "s3://{bucket}/{prefix} at {}",
                cfg.endpoint.as_deref().unwrap_or("the default endpoint")
            ),
            prefix,
        })
    }

    /// A store over any `object_store` implementation (tests).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str) -> RemoteStore {
        RemoteStore {
            desc: format!("{store}"),
            store,
            prefix: prefix.to_owned(),
        }
    }

    /// Where the bucket is, for messages.
    pub fn describe(&self) -> &str {
        &self.desc
    }

    fn chunk_path(&self, hash: &str) -> ObjPath {
        ObjPath::from(format!("{}chunks/{hash}", self.prefix))
    }

    fn manifest_path(&self, id: &str) -> ObjPath {
        ObjPath::from(format!("{}snapshots/{id}/manifest", self.prefix))
    }

    /// Checks that the bucket answers and the credentials are accepted
    /// (lists the snapshots prefix).
    pub async fn check(&self) -> Result<()> {
        let p = ObjPath::from(format!("{}snapshots", self.prefix));
        self.store
            .list_with_delimiter(Some(&p))
            .await
            .map(|_| ())
            .map_err(store_err(format!("{}: listing snapshots", self.desc)))
    }

    /// Whether chunk `hash` is in the bucket.
    pub async fn has_chunk(&self, hash: &str) -> Result<bool> {
        match self.store.head(&self.chunk_path(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(format!("HEAD chunk {hash}"))(e)),
        }
    }

    /// Stores chunk `hash` (conditional: a chunk already there is left
    /// alone). Returns whether it was written.
    pub async fn put_chunk(&self, hash: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.chunk_path(hash), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(store_err(format!("PUT chunk {hash}"))(e)),
        }
    }

    /// Reads chunk `hash` (of `file` at `offset`, for messages), checks its
    /// length and SHA-256.
    pub async fn get_chunk(&self, hash: &str, file: &str, offset: u64, len: u64) -> Result<Bytes> {
        let data = match self.store.get(&self.chunk_path(hash)).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let data = match data {
            Ok(d) => d,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::ChunkMissing {
                    hash: hash.into(),
                    file: file.into(),
                    offset,
                })
            }
            Err(e) => {
                return Err(Error::ChunkFetch {
                    hash: hash.into(),
                    file: file.into(),
                    offset,
                    why: e.to_string(),
                })
            }
        };
        verify_chunk(hash, &data, len).map_err(|why| Error::ChunkCorrupt {
            hash: hash.into(),
            file: file.into(),
            offset,
            why,
        })?;
        Ok(data)
    }

    /// Overwrites a chunk unconditionally (tests: to damage one).
    pub async fn put_chunk_raw(&self, hash: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.chunk_path(hash), PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(store_err(format!("PUT chunk {hash}")))
    }

    /// Deletes a chunk (tests: to lose one).
    pub async fn delete_chunk(&self, hash: &str) -> Result<()> {
        self.store
            .delete(&self.chunk_path(hash))
            .await
            .map_err(store_err(format!("DELETE chunk {hash}")))
    }

    /// Commits `m`: a conditional put of its manifest, which must not exist
    /// yet ([`Error::AlreadyCommitted`] if it does).
    pub async fn commit(&self, m: &RemoteManifest) -> Result<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(
                &self.manifest_path(&m.id),
                PutPayload::from(m.encode()),
                opts,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                Err(Error::AlreadyCommitted(m.id.clone()))
            }
            Err(e) => Err(store_err(format!("committing snapshot {}", m.id))(e)),
        }
    }

    /// Reads and checks snapshot `id`'s manifest.
    pub async fn manifest(&self, id: &str) -> Result<RemoteManifest> {
        if !super::manifest::valid_id(id) {
            return Err(Error::Config(format!("invalid snapshot id {id:?}")));
        }
        let path = self.manifest_path(id);
        let r = match self.store.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::NotFound(id.into())),
            Err(e) => return Err(store_err(format!("reading the manifest of {id}"))(e)),
        };
        if r.meta.size > MAX_REMOTE_MANIFEST {
            return Err(Error::BadManifest {
                id: id.into(),
                why: format!(
                    "{} bytes, over the {MAX_REMOTE_MANIFEST}-byte limit",
                    r.meta.size
                ),
            });
        }
        let bytes = r
            .bytes()
            .await
            .map_err(store_err(format!("reading the manifest of {id}")))?;
        RemoteManifest::decode(&bytes, id)
    }

    /// Uploads the snapshot directory `dir` as snapshot `id`: its chunks
    /// that the bucket lacks, then the manifest (the commit point).
    pub async fn upload_dir(
        &self,
        dir: &Path,
        id: &str,
        labels: BTreeMap<String, String>,
        progress: &UploadProgress,
    ) -> Result<UploadStats> {
        if !super::manifest::valid_id(id) {
            return Err(Error::Config(format!("invalid snapshot id {id:?}")));
        }
        let (d, i) = (dir.to_owned(), id.to_owned());
        let m = tokio::task::spawn_blocking(move || chunk_dir(&d, &i, labels))
            .await
            .map_err(|e| Error::Config(format!("chunking task: {e}")))??;
        self.upload_chunks(dir, &m, progress).await?;
        self.commit(&m).await?;
        Ok(progress.stats())
    }

    /// Uploads the chunks of `m` (read from `dir`) that the bucket lacks.
    pub async fn upload_chunks(
        &self,
        dir: &Path,
        m: &RemoteManifest,
        progress: &UploadProgress,
    ) -> Result<()> {
        // One source per distinct chunk: (file, offset, len).
        let mut todo: BTreeMap<String, (PathBuf, u64, u64)> = BTreeMap::new();
        let mut zero = 0;
        for f in &m.files {
            for (i, h) in f.chunks.iter().enumerate() {
                let off = i as u64 * CHUNK_SIZE;
                match h {
                    Some(h) => {
                        todo.entry(h.clone()).or_insert((
                            dir.join(&f.name),
                            off,
                            (f.len - off).min(CHUNK_SIZE),
                        ));
                    }
                    None => zero += 1,
                }
            }
        }
        progress.chunks_zero.store(zero, Ordering::Relaxed);
        progress
            .chunks_total
            .store(todo.len() as u64, Ordering::Relaxed);
        progress
            .bytes_total
            .store(todo.values().map(|(_, _, l)| l).sum(), Ordering::Relaxed);
        stream::iter(todo.into_iter().map(Ok))
            .try_for_each_concurrent(PARALLEL, |(hash, (path, off, len))| async move {
                if !self.has_chunk(&hash).await? {
                    let p = path.clone();
                    let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                        let f = File::open(&p).map_err(io("opening", &p))?;
                        let mut buf = vec![0u8; len as usize];
                        f.read_exact_at(&mut buf, off).map_err(io("reading", &p))?;
                        Ok(buf)
                    })
                    .await
                    .map_err(|e| Error::Config(format!("reading task: {e}")))??;
                    if sha256_hex(&data) != hash {
                        return Err(Error::Config(format!(
                            "{} changed while it was uploaded (chunk at {off:#x})",
                            path.display()
                        )));
                    }
                    if self.put_chunk(&hash, Bytes::from(data)).await? {
                        progress.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
                        progress.bytes_uploaded.fetch_add(len, Ordering::Relaxed);
                    } else {
                        progress.chunks_present.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    progress.chunks_present.fetch_add(1, Ordering::Relaxed);
                }
                progress.chunks_done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .await
    }

    /// Downloads snapshot `id` into the new directory `dest` (made next to
    /// it and renamed into place once complete), its chunks through
    /// `cache` (if any), `PARALLEL` at a time. All-zero pieces stay holes.
    pub async fn download(
        &self,
        id: &str,
        dest: &Path,
        cache: Option<&ChunkCache>,
    ) -> Result<DownloadStats> {
        let m = self.manifest(id).await?;
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Config(format!("invalid destination {}", dest.display())))?;
        if dest.exists() {
            return Err(Error::Config(format!("{} already exists", dest.display())));
        }
        let tmp = parent
            .map(|p| p.join(format!(".{name}.download")))
            .unwrap_or_else(|| PathBuf::from(format!(".{name}.download")));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
        let res = self.download_into(&m, &tmp, cache).await;
        match res {
            Ok(stats) => {
                std::fs::rename(&tmp, dest).map_err(io("renaming into place", dest))?;
                Ok(stats)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    async fn download_into(
        &self,
        m: &RemoteManifest,
        dir: &Path,
        cache: Option<&ChunkCache>,
    ) -> Result<DownloadStats> {
        let mut pieces = Vec::new();
        for f in &m.files {
            let path = dir.join(&f.name);
            let file = File::create(&path).map_err(io("creating", &path))?;
            file.set_len(f.len).map_err(io("sizing", &path))?;
            let file = Arc::new(file);
            for (i, h) in f.chunks.iter().enumerate() {
                if let Some(h) = h {
                    let off = i as u64 * CHUNK_SIZE;
                    pieces.push((
                        h.clone(),
                        f.name.clone(),
                        file.clone(),
                        off,
                        (f.len - off).min(CHUNK_SIZE),
                    ));
                }
            }
        }
        let stats = Mutex::new(DownloadStats {
            chunks: m.stored_chunks().len() as u64,
            ..Default::default()
        });
        stream::iter(pieces.into_iter().map(Ok))
            .try_for_each_concurrent(PARALLEL, |(hash, name, file, off, len)| {
                let stats = &stats;
                async move {
                    let (data, hit) = match cache {
                        Some(c) => c.get_or_fetch(self, &hash, &name, off, len).await?,
                        None => (self.get_chunk(&hash, &name, off, len).await?, false),
                    };
                    let path = dir.join(&name);
                    tokio::task::spawn_blocking(move || {
                        file.write_all_at(&data, off).map_err(io("writing", &path))
                    })
                    .await
                    .map_err(|e| Error::Config(format!("writing task: {e}")))??;
                    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                    if hit {
                        s.cached += 1;
                    } else {
                        s.fetched += 1;
                    }
                    s.bytes += len;
                    Ok(())
                }
            })
            .await?;
        for f in &m.files {
            let path = dir.join(&f.name);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io("fsyncing", &path))?;
        }
        let s = *stats.lock().unwrap_or_else(|p| p.into_inner());
        // Distinct counts: a chunk used twice was fetched once.
        Ok(s)
    }
}

fn verify_chunk(hash: &str, data: &[u8], len: u64) -> std::result::Result<(), String> {
    if data.len() as u64 != len {
        return Err(format!("{} bytes, expected {len}", data.len()));
    }
    let got = sha256_hex(data);
    if got != hash {
        return Err(format!("checksum mismatch: SHA-256 of its bytes is {got}"));
    }
    Ok(())
}

// ---- the chunk cache ----------------------------------------------------

type Flight = Arc<tokio::sync::OnceCell<std::result::Result<Bytes, String>>>;

/// A bounded LRU cache of verified chunks in one directory (`<hash>` files;
/// the least recently used go first once the total passes the bound), with
/// single-flight fetches: concurrent readers of a chunk that is not cached
/// share one GET.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    inflight: Mutex<HashMap<String, Flight>>,
    evict: Mutex<()>,
    /// GETs made (for tests and numbers).
    pub gets: AtomicU64,
}

impl ChunkCache {
    /// The cache in `dir` (created), holding at most `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<ChunkCache> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let mut used = 0;
        for e in std::fs::read_dir(dir)
            .map_err(io("reading", dir))?
            .flatten()
        {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with('.') {
                let _ = std::fs::remove_file(e.path()); // a torn insert
            } else if let Ok(md) = e.metadata() {
                used += md.len();
            }
        }
        let c = ChunkCache {
            dir: dir.to_owned(),
            max_bytes,
            used: AtomicU64::new(used),
            inflight: Mutex::new(HashMap::new()),
            evict: Mutex::new(()),
            gets: AtomicU64::new(0),
        };
        c.evict_over_bound();
        Ok(c)
    }

    /// Bytes cached.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The cached chunk `hash`, verified (a damaged entry is dropped);
    /// marks it recently used.
    pub fn get(&self, hash: &str, len: u64) -> Option<Bytes> {
        if !valid_hash(hash) {
            return None;
        }
        let path = self.dir.join(hash);
        let data = std::fs::read(&path).ok()?;
        if verify_chunk(hash, &data, len).is_err() {
            if std::fs::remove_file(&path).is_ok() {
                self.used.fetch_sub(data.len() as u64, Ordering::Relaxed);
            }
            return None;
        }
        if let Ok(f) = File::open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(Bytes::from(data))
    }

    /// Inserts a verified chunk, then evicts past the bound.
    pub fn insert(&self, hash: &str, data: &[u8]) {
        if !valid_hash(hash) || data.len() as u64 > self.max_bytes {
            return;
        }
        let path = self.dir.join(hash);
        if path.exists() {
            return;
        }
        let tmp = self.dir.join(format!(".{hash}.{}", std::process::id()));
        if std::fs::write(&tmp, data).is_ok() && std::fs::rename(&tmp, &path).is_ok() {
            self.used.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.evict_over_bound();
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn evict_over_bound(&self) {
        if self.used.load(Ordering::Relaxed) <= self.max_bytes {
            return;
        }
        let _g = self.evict.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<(std::time::SystemTime, PathBuf, u64)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                Some((md.modified().ok()?, e.path(), md.len()))
            })
            .collect();
        entries.sort();
        let mut used: u64 = entries.iter().map(|e| e.2).sum();
        for (_, p, len) in entries {
            if used <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&p).is_ok() {
                used -= len;
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }

    /// Chunk `hash` from the cache, else from `store` (one GET however many
    /// callers wait for it), then cached. Returns the bytes and whether
    /// they came from the cache.
    pub async fn get_or_fetch(
        &self,
        store: &RemoteStore,
        hash: &str,
        file: &str,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, bool)> {
        if let Some(d) = self.get(hash, len) {
            return Ok((d, true));
        }
        let cell = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(hash.to_owned()).or_default().clone()
        };
        let res = cell
            .get_or_init(|| async {
                self.gets.fetch_add(1, Ordering::Relaxed);
                match store.get_chunk(hash, file, offset, len).await {
                    Ok(d) => {
                        self.insert(hash, &d);
                        Ok(d)
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
            .clone();
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash);
        match res {
            Ok(d) => Ok((d, false)),
            Err(why) => {
                // The first waiter's error, named by the chunk for everyone.
                if why.contains("is missing") {
                    Err(Error::ChunkMissing {
                        hash: hash.into(),
                        file: file.into(),
                        offset,
                    })
                } else {
                    Err(Error::ChunkFetch {
                        hash: hash.into(),
                        file: file.into(),
                        offset,
                        why,
                    })
                }
            }
        }
    }
}

// ---- background uploads of the server -----------------------------------

/// Where one sandbox's snapshot upload stands (`GET /sandboxes/{id}`,
/// `stasis.snapshotUpload`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UploadStatusOut {
    /// `pending`, `uploading`, `uploaded` or `failed` (retried).
    pub state: &'static str,
    /// The snapshot's id in the bucket.
    pub snapshot_id: String,
    /// Counters so far.
    pub stats: UploadStats,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error while not uploaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Snapshots of this host waiting for (or in) upload.
    pub backlog: usize,
}

struct Job {
    snapshot_id: String,
    dir: PathBuf,
    labels: BTreeMap<String, String>,
    progress: Arc<UploadProgress>,
    state: &'static str,
    attempts: u32,
    error: Option<String>,
    next_try: Instant,
    done: tokio::sync::watch::Sender<bool>,
}

/// The server's uploads: one job per sandbox (a newer pause replaces the
/// older job), run in the background and retried with backoff until the
/// bucket takes them.
pub struct Uploader {
    store: RemoteStore,
    jobs: Mutex<HashMap<String, Job>>,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("store", &self.store.desc)
            .finish()
    }
}

/// A job taken for an attempt: sandbox, snapshot id, directory, labels,
/// its fresh counters.
type DueJob = (
    String,
    String,
    PathBuf,
    BTreeMap<String, String>,
    Arc<UploadProgress>,
);

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);

impl Uploader {
    /// Starts the upload loop on the current tokio runtime.
    pub fn start(store: RemoteStore) -> Arc<Uploader> {
        let u = Arc::new(Uploader {
            store,
            jobs: Mutex::new(HashMap::new()),
            wake: Arc::new(tokio::sync::Notify::new()),
        });
        let weak = Arc::downgrade(&u);
        let wake = u.wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(u) = weak.upgrade() else { break };
                let next = u.run_due().await;
                drop(u);
                let notified = wake.notified();
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(next) => {}
                }
            }
        });
        u
    }

    /// The bucket.
    pub fn store(&self) -> &RemoteStore {
        &self.store
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the upload of `sandbox`'s snapshot `dir` as `snapshot_id`
    /// (replacing an older one of that sandbox).
    pub fn submit(
        &self,
        sandbox: &str,
        snapshot_id: String,
        dir: PathBuf,
        labels: BTreeMap<String, String>,
    ) {
        let (done, _) = tokio::sync::watch::channel(false);
        self.jobs().insert(
            sandbox.to_owned(),
            Job {
                snapshot_id,
                dir,
                labels,
                progress: Arc::default(),
                state: "pending",
                attempts: 0,
                error: None,
                next_try: Instant::now(),
                done,
            },
        );
        self.wake.notify_one();
    }

    /// Forgets `sandbox`'s upload (the sandbox is gone).
    pub fn forget(&self, sandbox: &str) {
        if let Some(j) = self.jobs().remove(sandbox) {
            j.done.send_replace(true);
        }
    }

    /// Snapshots not uploaded yet.
    pub fn backlog(&self) -> usize {
        self.jobs()
            .values()
            .filter(|j| j.state != "uploaded")
            .count()
    }

    /// `sandbox`'s upload, if any.
    pub fn status(&self, sandbox: &str) -> Option<UploadStatusOut> {
        let jobs = self.jobs();
        let backlog = jobs.values().filter(|j| j.state != "uploaded").count();
        jobs.get(sandbox).map(|j| UploadStatusOut {
            state: j.state,
            snapshot_id: j.snapshot_id.clone(),
            stats: j.progress.stats(),
            attempts: j.attempts,
            error: j.error.clone(),
            backlog,
        })
    }

    /// Waits until `sandbox`'s current upload is done (uploaded, replaced
    /// or forgotten), at most `limit`; true if it was uploaded.
    pub async fn wait(&self, sandbox: &str, limit: Duration) -> bool {
        let rx = self.jobs().get(sandbox).map(|j| j.done.subscribe());
        let Some(mut rx) = rx else { return false };
        let _ = tokio::time::timeout(limit, rx.wait_for(|d| *d)).await;
        self.jobs()
            .get(sandbox)
            .is_some_and(|j| j.state == "uploaded")
    }

    /// Waits until nothing is left to upload, at most `limit`; returns the
    /// backlog left.
    pub async fn wait_all(&self, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            let left = self.backlog();
            if left == 0 || Instant::now() >= end {
                return left;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs every due job once; returns how long until the next is due.
    async fn run_due(self: &Arc<Self>) -> Duration {
        let now = Instant::now();
        let due: Vec<DueJob> = {
            let mut jobs = self.jobs();
            jobs.iter_mut()
                .filter(|(_, j)| {
                    j.state != "uploaded" && j.state != "uploading" && j.next_try <= now
                })
                .map(|(s, j)| {
                    j.state = "uploading";
                    j.attempts += 1;
                    j.progress = Arc::default();
                    (
                        s.clone(),
                        j.snapshot_id.clone(),
                        j.dir.clone(),
                        j.labels.clone(),
                        j.progress.clone(),
                    )
                })
                .collect()
        };
        let mut tasks = Vec::new();
        for (sandbox, snap, dir, labels, progress) in due {
            let u = self.clone();
            tasks.push(tokio::spawn(async move {
                let res = if !dir.is_dir() {
                    Err(Error::Config(format!("{} is gone", dir.display())))
                } else {
                    match u.store.upload_dir(&dir, &snap, labels, &progress).await {
                        // A retry after a commit whose answer was lost: the
                        // same snapshot is there.
                        Err(Error::AlreadyCommitted(_)) => match u.store.manifest(&snap).await {
                            Ok(_) => Ok(()),
                            Err(e) => Err(e),
                        },
                        r => r.map(|_| ()),
                    }
                };
                let mut jobs = u.jobs();
                let Some(j) = jobs.get_mut(&sandbox) else {
                    return;
                };
                if j.snapshot_id != snap {
                    return; // replaced meanwhile
                }
                match res {
                    Ok(()) => {
                        let st = j.progress.stats();
                        tracing::info!(
                            sandbox,
                            snapshot = snap,
                            uploaded = st.chunks_uploaded,
                            present = st.chunks_present,
                            zero = st.chunks_zero,
                            "snapshot uploaded"
                        );
                        j.state = "uploaded";
                        j.error = None;
                        j.done.send_replace(true);
                    }
                    Err(e) if !dir.is_dir() => {
                        tracing::info!(
                            sandbox,
                            snapshot = snap,
                            "upload dropped: the snapshot is gone ({e})"
                        );
                        let j = jobs.remove(&sandbox);
                        if let Some(j) = j {
                            j.done.send_replace(true);
                        }
                    }
                    Err(e) => {
                        let msg = crate::error_chain(&e);
                        tracing::warn!(
                            sandbox,
                            snapshot = snap,
                            attempt = j.attempts,
                            "snapshot upload failed (retried): {msg}"
                        );
                        let back = RETRY_MIN
                            .saturating_mul(1 << j.attempts.min(6))
                            .min(RETRY_MAX);
                        j.state = "failed";
                        j.error = Some(msg);
                        j.next_try = Instant::now() + back;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let jobs = self.jobs();
        let now = Instant::now();
        jobs.values()
            .filter(|j| j.state == "failed" || j.state == "pending")
            .map(|j| j.next_try.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RemoteManifest {
        RemoteManifest {
            id: "s-1".into(),
            chunk_size: CHUNK_SIZE,
            created_unix: 1,
            files: vec![RemoteFile {
                name: "memory.bin".into(),
                len: CHUNK_SIZE + 5,
                chunks: vec![Some(sha256_hex(b"x")), None],
            }],
            labels: Default::default(),
        }
    }

    #[test]
    fn manifest_roundtrip_and_every_corruption_is_an_error() {
        let m = sample();
        let b = m.encode();
        assert_eq!(RemoteManifest::decode(&b, "s-1").unwrap(), m);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x20;
            assert!(RemoteManifest::decode(&c, "s-1").is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            assert!(RemoteManifest::decode(&b[..n], "s-1").is_err(), "cut {n}");
        }
        assert!(RemoteManifest::decode(&b, "other").is_err());
    }

    #[test]
    fn crafted_manifests_are_refused() {
        type Case = (fn(&mut RemoteManifest), &'static str);
        let cases: Vec<Case> = vec![
            (|m| m.files[0].name = "../x".into(), "invalid or repeated"),
            (|m| m.files.push(m.files[0].clone()), "invalid or repeated"),
            (|m| drop(m.files[0].chunks.pop()), "chunks listed"),
            (
                |m| m.files[0].chunks[0] = Some("../../etc".into()),
                "invalid chunk name",
            ),
            (|m| m.chunk_size = 4096, "chunk size"),
            (|m| m.files[0].len = u64::MAX, "over the limit"),
        ];
        for (f, want) in cases {
            let mut m = sample();
            f(&mut m);
            let e = RemoteManifest::decode(&m.encode(), "s-1")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn chunking_skips_zero_pieces_and_names_the_rest_by_content() {
        let d = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; (CHUNK_SIZE * 3 + 100) as usize];
        data[5] = 1; // chunk 0: data; 1: zero; 2: same bytes as chunk 0
        data[(CHUNK_SIZE * 2 + 5) as usize] = 1;
        data[(CHUNK_SIZE * 3 + 7) as usize] = 9; // short tail
        std::fs::write(d.path().join("memory.bin"), &data).unwrap();
        std::fs::write(d.path().join("state.bin"), b"state").unwrap();
        let m = chunk_dir(d.path(), "s", Default::default()).unwrap();
        assert_eq!(m.files.len(), 2);
        let mem = &m.files[0];
        assert_eq!(mem.name, "memory.bin");
        assert_eq!(mem.chunks.len(), 4);
        assert!(mem.chunks[1].is_none());
        assert_eq!(mem.chunks[0], mem.chunks[2]);
        assert_ne!(mem.chunks[0], mem.chunks[3]);
        assert_eq!(m.stored_chunks().len(), 3);
        assert_eq!(
            mem.chunks[0].as_deref(),
            Some(sha256_hex(&data[..CHUNK_SIZE as usize]).as_str())
        );
    }

    #[test]
    fn cache_verifies_and_evicts_least_recently_used() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(d.path(), 2500).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 1000]).collect();
        let h: Vec<String> = chunks.iter().map(|c| sha256_hex(c)).collect();
        c.insert(&h[0], &chunks[0]);
        // Ensure distinct mtimes without sleeping: set them explicitly.
        let t0 = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        File::open(d.path().join(&h[0]))
            .unwrap()
            .set_modified(t0)
            .unwrap();
        c.insert(&h[1], &chunks[1]);
        let t1 = t0 + Duration::from_secs(10);
        File::open(d.path().join(&h[1]))
            .unwrap()
            .set_modified(t1)
            .unwrap();
        assert!(c.get(&h[0], 1000).is_some()); // now the most recent
        c.insert(&h[2], &chunks[2]); // over 2500: evicts h[1]
        assert!(c.get(&h[1], 1000).is_none());
        assert!(c.get(&h[0], 1000).is_some());
        assert!(c.get(&h[2], 1000).is_some());
        assert!(c.used_bytes() <= 2500);
        // A damaged entry is dropped, not returned.
        std::fs::write(d.path().join(&h[2]), vec![0u8; 1000]).unwrap();
        assert!(c.get(&h[2], 1000).is_none());
        assert!(!d.path().join(&h[2]).exists());
    }
}
