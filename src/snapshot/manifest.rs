//! The manifest of a reusable snapshot: `manifest.bin` in
//! `<data>/snapshots/<id>/`, naming everything a resume needs and nothing
//! it must trust blindly.
//!
//! Container (little-endian): magic `b"STASISMF"`, version `u32`
//! ([`MANIFEST_VERSION`]), body length `u64`, a JSON body (a [`Manifest`]),
//! CRC-64/XZ over everything before it. JSON keeps the manifest readable
//! and lets later versions add fields; the container's checksum, a size
//! cap ([`MAX_MANIFEST_LEN`]) and strict field checks make a damaged or
//! crafted manifest a clear error, never a panic.
//!
//! Layout today: per-layer files (`memory.bin`, `state.bin`,
//! `disk.overlay` + its map in the snapshot's directory), each named with
//! its length in [`Manifest::files`]. The format is ready for
//! content-addressed chunks: [`Manifest::chunk_size`] is 0 ("per-layer
//! files") and [`Layer::chunks`] empty; a chunked store would set
//! `chunk_size` to 2 MiB and list, per layer, the CRC-64 of each 2 MiB
//! chunk (the chunk's name in the store), so that a layer can be fetched by
//! range from object storage. A reader of this version refuses a manifest
//! with a non-zero `chunk_size` (clear error) rather than guess.
//!
//! Memory layers: a layer is a complete sparse memory image (`parent` is
//! `None`) or holds only the pages that differ from its parent. Version 1
//! writes full layers only ([`Layer::parent`] stays `None`); the field and
//! the snapshot's `parent` pointer are in the format so that an
//! incremental pause can write child layers without a version change.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the manifest inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.bin";
/// Magic bytes of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"STASISMF";
/// The manifest version this build reads and writes.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest read (checked before reading).
pub const MAX_MANIFEST_LEN: u64 = 1 << 20;
/// The chunk size a chunked store will use (not used by version 1).
pub const CHUNK_SIZE: u64 = 2 << 20;
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 8;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid manifest.
    #[error("snapshot manifest {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// What a snapshot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Taken through the API from a sandbox (`POST /sandboxes/{id}/snapshots`).
    User,
    /// A warm template: booted, agent answering, saved for later creates.
    Template,
}

/// The host a snapshot was taken on, as far as a resume cares: vCPU state
/// saved on one CPU model may not load (or may misbehave) on another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// CPUID vendor string ("GenuineIntel", "AuthenticAMD").
    pub cpu_vendor: String,
    /// CPUID leaf 1 EAX: family, model, stepping.
    pub cpu_signature: u32,
    /// CRC-64 of CPUID leaves 1 (ECX, EDX) and 7.0 (EBX, ECX, EDX): the
    /// feature flags a guest may have seen.
    pub cpu_features: u64,
    /// `KVM_GET_API_VERSION`.
    pub kvm_api_version: i32,
}

impl HostFingerprint {
    /// This host's fingerprint.
    pub fn current() -> HostFingerprint {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid_count;
            #[allow(unused_unsafe)]
            // SAFETY: CPUID is available on every x86_64 CPU; leaves 0, 1
            // and 7 are architectural (an unsupported leaf reads as zeros).
            let (l0, l1, l7) = unsafe {
                (
                    __cpuid_count(0, 0),
                    __cpuid_count(1, 0),
                    __cpuid_count(7, 0),
                )
            };
            let mut vendor = Vec::with_capacity(12);
            for r in [l0.ebx, l0.edx, l0.ecx] {
                vendor.extend_from_slice(&r.to_le_bytes());
            }
            let mut feat = Vec::new();
            // Leaf 1 EBX holds the APIC id and CLFLUSH size: not features.
            for r in [l1.ecx, l1.edx, l7.ebx, l7.ecx, l7.edx] {
                feat.extend_from_slice(&r.to_le_bytes());
            }
            HostFingerprint {
                cpu_vendor: String::from_utf8_lossy(&vendor).into_owned(),
                cpu_signature: l1.eax,
                cpu_features: CRC64.checksum(&feat),
                kvm_api_version: kvm_ioctls::Kvm::new()
                    .map(|k| k.get_api_version())
                    .unwrap_or(-1),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        HostFingerprint {
            cpu_vendor: std::env::consts::ARCH.into(),
            cpu_signature: 0,
            cpu_features: 0,
            kvm_api_version: -1,
        }
    }

    /// `None` if a snapshot taken on `self` may be resumed on `host`, else
    /// what differs.
    pub fn mismatch(&self, host: &HostFingerprint) -> Option<String> {
        let mut d = Vec::new();
        if self.cpu_vendor != host.cpu_vendor {
            d.push(format!(
                "CPU vendor {} vs {}",
                self.cpu_vendor, host.cpu_vendor
            ));
        }
        if self.cpu_signature != host.cpu_signature {
            d.push(format!(
                "CPU signature {:#x} vs {:#x}",
                self.cpu_signature, host.cpu_signature
            ));
        }
        if self.cpu_features != host.cpu_features {
            d.push("CPU feature flags differ".into());
        }
        if self.kvm_api_version != host.kvm_api_version {
            d.push(format!(
                "KVM API {} vs {}",
                self.kvm_api_version, host.kvm_api_version
            ));
        }
        (!d.is_empty()).then(|| d.join(", "))
    }
}

/// One file of a snapshot, with the length it must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Its name in the snapshot's directory (a plain name, no `/`).
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// Bytes it has allocated on disk (sparse files: less than `len`).
    pub allocated: u64,
}

/// A memory layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The memory image (sparse; see [`super::memfile`]).
    pub file: String,
    /// `None`: a full image. `Some(id)`: only the pages that differ from
    /// snapshot `id`'s memory (not written by version 1).
    pub parent: Option<String>,
    /// Bytes of page data stored in this layer.
    pub bytes_stored: u64,
    /// Content-addressed chunks (CRC-64 of each [`CHUNK_SIZE`] chunk);
    /// empty while [`Manifest::chunk_size`] is 0.
    pub chunks: Vec<u64>,
}

/// The manifest body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot's id (its directory's name).
    pub id: String,
    /// What it is for.
    pub kind: SnapshotKind,
    /// The snapshot it was taken on top of (its memory layers' parent).
    pub parent: Option<String>,
    /// The sandbox it was taken from, if any.
    pub source_sandbox: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// The VM state file (`state.bin`).
    pub state: FileRef,
    /// Memory layers, nearest first (version 1: exactly one).
    pub layers: Vec<Layer>,
    /// Every file of the snapshot with its length (state, memory, disk
    /// layer and map, the fake backend's files).
    pub files: Vec<FileRef>,
    /// The disk layer (`disk.overlay`), if the VM has a disk.
    pub disk_layer: Option<String>,
    /// The host it needs.
    pub fingerprint: HostFingerprint,
    /// 0: per-layer files (version 1). Else the chunk size.
    pub chunk_size: u64,
    /// Free-form key/values (template inputs' hash, the API's metadata).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Wraps `body` in the container stasis uses for its small JSON documents
/// (this manifest; the object store's, `super::remote`): `magic`,
/// `version` (u32), the body's length (u64), the body, and CRC-64/XZ over
/// everything before it, all little-endian.
pub(crate) fn seal(magic: &[u8; 8], version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a [`seal`]ed container (length, `magic`, `version`, the header's
/// body length, checksum) and returns its body, or why it is refused
/// (`what` names the document in the reason).
pub(crate) fn unseal<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    version: u32,
    what: &str,
) -> Result<&'a [u8], String> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(format!("truncated: {} bytes", bytes.len()));
    }
    if bytes[..8] != *magic {
        return Err(format!("bad magic {:02x?} at offset 0", &bytes[..8]));
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found != version {
        return Err(format!(
            "unsupported {what} version {found} (this build reads {version})"
        ));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let expected = len.saturating_add((HEADER_LEN + CRC_LEN) as u64);
    if expected != bytes.len() as u64 {
        return Err(format!(
            "length: header says {expected} bytes, file has {}",
            bytes.len()
        ));
    }
    let crc_off = bytes.len() - CRC_LEN;
    let stored = u64::from_le_bytes(bytes[crc_off..].try_into().expect("8 bytes"));
    let computed = CRC64.checksum(&bytes[..crc_off]);
    if stored != computed {
        return Err(format!(
                "checksum mismatch: stored CRC-64 {stored:#018x} at offset {crc_off}, computed {computed:#018x}"
            ));
    }
    Ok(&bytes[HEADER_LEN..crc_off])
}

impl Manifest {
    /// Encodes the manifest into its container.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a manifest always serialises");
        seal(&MANIFEST_MAGIC, MANIFEST_VERSION, &body)
    }

    /// Decodes and checks a manifest read from `path` (for messages).
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, Error> {
        let bad = |why: String| Error::Invalid {
            path: path.to_owned(),
            why,
        };
        let body = unseal(bytes, &MANIFEST_MAGIC, MANIFEST_VERSION, "manifest").map_err(bad)?;
        let m: Manifest = serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))?;
        m.check().map_err(bad)?;
        Ok(m)
    }

    /// Field checks beyond the types: names are plain file names, ids
    /// are ids, version 1's layout.
    fn check(&self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!("invalid snapshot id {:?}", self.id));
        }
        if let Some(p) = &self.parent {
            if !valid_id(p) {
                return Err(format!("invalid parent id {p:?}"));
            }
        }
        if self.chunk_size != 0 {
            return Err(format!(
                "chunked layout (chunk size {}) is not supported by this build",
                self.chunk_size
            ));
        }
        if self.layers.len() != 1 || self.layers[0].parent.is_some() {
            return Err(format!(
                "{} memory layers; this build resumes one full layer",
                self.layers.len()
            ));
        }
        let names = self
            .files
            .iter()
            .map(|f| f.name.as_str())
            .chain([self.state.name.as_str()])
            .chain(self.layers.iter().map(|l| l.file.as_str()))
            .chain(self.disk_layer.as_deref());
        for n in names {
            if !valid_name(n) {
                return Err(format!("invalid file name {n:?}"));
            }
        }
        for l in &self.layers {
            if !self.files.iter().any(|f| f.name == l.file) {
                return Err(format!("layer {} is not among the files", l.file));
            }
        }
        Ok(())
    }

    /// Writes the manifest to `dir/manifest.bin` and fsyncs it.
    pub fn write_to(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(MANIFEST_FILE);
        let io = |op| {
            let path = path.clone();
            move |source| Error::Io { op, path, source }
        };
        let mut f = std::fs::File::create(&path).map_err(io("creating"))?;
        f.write_all(&self.encode()).map_err(io("writing"))?;
        f.sync_all().map_err(io("fsyncing"))?;
        Ok(())
    }

    /// Reads `dir/manifest.bin` (size-capped before reading).
    pub fn read_from(dir: &Path) -> Result<Manifest, Error> {
        let path = dir.join(MANIFEST_FILE);
        let io = |op| {
            let path = path.clone();
            move |source| Error::Io { op, path, source }
        };
        let len = std::fs::metadata(&path).map_err(io("reading"))?.len();
        if len > MAX_MANIFEST_LEN {
            return Err(Error::Invalid {
                path,
                why: format!("{len} bytes, more than the {MAX_MANIFEST_LEN}-byte limit"),
            });
        }
        let bytes = std::fs::read(&path).map_err(io("reading"))?;
        Manifest::decode(&bytes, &path)
    }
}

/// A snapshot id: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n != "."
        && n != ".."
        && !n.contains('/')
        && !n.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            id: "snap-1".into(),
            kind: SnapshotKind::User,
            parent: None,
            source_sandbox: Some("sbx".into()),
            created_unix: 1,
            state: FileRef {
                name: "state.bin".into(),
                len: 10,
                allocated: 4096,
            },
            layers: vec![Layer {
                file: "memory.bin".into(),
                parent: None,
                bytes_stored: 4096,
                chunks: vec![],
            }],
            files: vec![FileRef {
                name: "memory.bin".into(),
                len: 8192,
                allocated: 4096,
            }],
            disk_layer: None,
            fingerprint: HostFingerprint::current(),
            chunk_size: 0,
            labels: Default::default(),
        }
    }

    #[test]
    fn roundtrip_and_every_corruption_is_an_error() {
        let m = sample();
        let bytes = m.encode();
        let p = Path::new("m");
        assert_eq!(Manifest::decode(&bytes, p).unwrap(), m);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Manifest::decode(&b, p).is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n], p).is_err(), "truncation {n}");
        }
        let e = Manifest::decode(b"STASISSN\x01\0\0\0", p).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn crafted_fields_are_refused() {
        type Case = (fn(&mut Manifest), &'static str);
        let cases: Vec<Case> = vec![
            (|m| m.id = "../x".into(), "invalid snapshot id"),
            (
                |m| m.files[0].name = "../../etc/passwd".into(),
                "invalid file name",
            ),
            (|m| m.chunk_size = CHUNK_SIZE, "chunked layout"),
            (|m| m.layers.clear(), "memory layers"),
            (
                |m| m.layers[0].file = "other.bin".into(),
                "not among the files",
            ),
        ];
        for (f, want) in cases {
            let mut m = sample();
            f(&mut m);
            let e = Manifest::decode(&m.encode(), Path::new("m"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn fingerprint_is_stable_and_mismatch_names_the_difference() {
        let a = HostFingerprint::current();
        assert_eq!(a, HostFingerprint::current());
        assert!(a.mismatch(&a).is_none());
        let mut b = a.clone();
        b.cpu_signature ^= 1;
        b.kvm_api_version += 1;
        let d = a.mismatch(&b).unwrap();
        assert!(d.contains("CPU signature") && d.contains("KVM API"), "{d}");
    }
}
