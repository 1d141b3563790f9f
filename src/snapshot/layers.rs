//! Layered memory: a snapshot whose memory file holds only the pages the
//! guest wrote since it was resumed from another snapshot (its **parent**),
//! and the resume that serves each page from the nearest layer holding it.
//!
//! A child snapshot directory is an ordinary snapshot (`state.bin`,
//! `memory.bin`, the disk overlay) plus `layers.bin`: the
//! [`format`](super::format) container (magic, version, length, CRC-64)
//! around a [`ChainFile`] (its own version, [`CHAIN_VERSION`]), the parent
//! layers **nearest first**, each with its directory's name and the CRC-64
//! of its `state.bin` (the parent's identity:
//! a parent replaced, rewritten or damaged since the child was written is a
//! clear error naming it, never a resume from other pages). The chain is
//! flattened: a child lists its parent and all of the parent's parents, so
//! a resume reads one `layers.bin`.
//!
//! **Parents are siblings**: `layers.bin` is read from disk, so it is
//! untrusted; it names each parent by a plain directory name (such as
//! `snapshot-3`), resolved against the child's own parent directory. A
//! name with a `/`, `.` or `..`, or empty, is refused
//! ([`ParentRef::resolve`]): a chain can never make a resume read a file
//! outside the directory that holds the child. A whole chain therefore
//! lives in one directory (the API keeps a sandbox's generations side by
//! side in its sandbox directory) and moves with it.
//!
//! In the child's own memory metadata, `present` are the pages this layer
//! stores; every other page comes from the nearest parent that has it, or
//! is zero if none has. A page the guest wrote that is all zero is stored
//! (as data) when a parent has it, so it overrides the parent's page.
//!
//! A resume builds one **page → layer table** ([`LayerChain::new`], one
//! byte per page, 256 KiB for 1 GiB) before the guest runs; the eager
//! reader ([`read_eager`]) and the lazy loader
//! ([`super::uffd::LazyLoader::start_chain`]) read each run of pages from
//! the layer the table names and verify it against that layer's checksums.
//!
//! **Depth**: a chain holds at most [`MAX_CHAIN_DEPTH`] parents. A pause
//! whose child would need more writes a full layer instead (no parent), so
//! a resume never opens more than `MAX_CHAIN_DEPTH + 1` memory files and
//! nothing is ever compacted under a running resume.
//!
//! **Parents are immutable**: a layer is never written after its commit.
//! Whoever owns the directories must keep a parent while a child names it
//! (the manager keeps a sandbox's chain, see README "Snapshot format").

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::bitmap::PageBitmap;
use super::memfile::{self, MemRegion, MemoryMeta, ReadOpts, SumIndex, PAGE_SIZE};
use super::{format, SnapshotDir, STATE_FILE};

/// Name of the chain file inside a child snapshot directory.
pub const LAYERS_FILE: &str = "layers.bin";
/// Version of the [`ChainFile`] body. 2: parents are sibling directory
/// names (version 1 recorded absolute paths, no longer accepted).
pub const CHAIN_VERSION: u32 = 2;
/// Most parent layers a snapshot may have; a pause that would exceed it
/// writes a full layer.
pub const MAX_CHAIN_DEPTH: usize = 4;
/// Owner-table value of a page no layer stores (reads as zero).
const NONE: u8 = u8::MAX;
const CRC64: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// Errors opening a chain of layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `layers.bin` is damaged or does not decode.
    #[error("{path}: bad layer chain file")]
    ChainFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: format::Error,
    },
    /// A parent layer is missing, damaged or not the one the child was
    /// written on.
    #[error("memory layer {dir} (parent {depth} of {child}): {reason}")]
    Layer {
        /// The parent's directory.
        dir: PathBuf,
        /// 1: the nearest parent.
        depth: usize,
        /// The snapshot being resumed.
        child: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The chain is longer than [`MAX_CHAIN_DEPTH`] or its layers disagree.
    #[error("layer chain of {child}: {reason}")]
    Chain {
        /// The snapshot being resumed.
        child: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing `layers.bin` failed.
    #[error("writing the layer chain file")]
    Write(#[from] format::Error),
}

/// A parent layer as a child records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent snapshot directory's name: a sibling of the child's
    /// directory (see [`ParentRef::resolve`]).
    pub name: String,
    /// CRC-64/XZ of the parent's `state.bin`: its identity.
    pub state_crc: u64,
    /// Bytes of page data the parent's own layer stores.
    pub bytes_stored: u64,
}

impl ParentRef {
    /// The parent's directory for the child snapshot in `child`: the
    /// sibling named [`ParentRef::name`]. Refuses a name that is not one
    /// plain path component (empty, `.`, `..`, with a `/` or a NUL).
    pub fn resolve(&self, child: &Path) -> Result<PathBuf, String> {
        let n = self.name.as_str();
        if n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0') {
            return Err(format!(
                "parent layer name {n:?} is not a plain directory name (a chain names its parents as siblings)"
            ));
        }
        let up = child
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Ok(up.join(n))
    }

    /// The record of the layer in directory `dir` as a parent of a child
    /// written beside it: its name, identity and own bytes.
    pub fn of(dir: &Path, bytes_stored: u64) -> std::io::Result<ParentRef> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{}: not a snapshot directory name", dir.display()),
                )
            })?
            .to_owned();
        Ok(ParentRef {
            name,
            state_crc: state_crc(dir)?,
            bytes_stored,
        })
    }
}

/// The body of `layers.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainFile {
    /// [`CHAIN_VERSION`].
    pub version: u32,
    /// Parent layers, nearest first.
    pub parents: Vec<ParentRef>,
}

impl Default for ChainFile {
    fn default() -> Self {
        ChainFile {
            version: CHAIN_VERSION,
            parents: Vec::new(),
        }
    }
}

impl ChainFile {
    /// Reads `dir/layers.bin`; `Ok(None)` if there is none (a full layer).
    pub fn read(dir: &Path) -> Result<Option<ChainFile>, Error> {
        let path = dir.join(LAYERS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let c: ChainFile = format::read_and_decode(&path).map_err(|source| Error::ChainFile {
            path: path.clone(),
            source,
        })?;
        if c.version != CHAIN_VERSION {
            return Err(Error::Chain {
                child: dir.to_owned(),
                reason: format!(
                    "layers.bin version {}, this build reads version {CHAIN_VERSION}",
                    c.version
                ),
            });
        }
        if c.parents.len() > MAX_CHAIN_DEPTH {
            return Err(Error::Chain {
                child: dir.to_owned(),
                reason: format!(
                    "{} parent layers, more than the limit of {MAX_CHAIN_DEPTH}",
                    c.parents.len()
                ),
            });
        }
        Ok(Some(c))
    }

    /// The parents' directories for the child in `dir`, nearest first.
    pub fn parent_dirs(&self, dir: &Path) -> Result<Vec<PathBuf>, Error> {
        self.parents
            .iter()
            .map(|p| {
                p.resolve(dir).map_err(|reason| Error::Chain {
                    child: dir.to_owned(),
                    reason,
                })
            })
            .collect()
    }

    /// Writes `dir/layers.bin`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        format::write_file(&dir.join(LAYERS_FILE), &format::encode(self)?)?;
        Ok(())
    }
}

/// CRC-64/XZ of `dir/state.bin` (a layer's identity).
pub fn state_crc(dir: &Path) -> std::io::Result<u64> {
    Ok(CRC64.checksum(&std::fs::read(dir.join(STATE_FILE))?))
}

/// One memory layer opened for reading.
#[derive(Debug)]
pub struct MemLayer {
    /// Its snapshot directory.
    pub dir: PathBuf,
    /// Its memory file.
    pub file: File,
    /// Its memory metadata.
    pub meta: MemoryMeta,
    index: SumIndex,
}

impl MemLayer {
    /// A layer from an open memory file and its metadata (checked against
    /// each other: length).
    pub fn new(dir: PathBuf, file: File, meta: MemoryMeta) -> memfile::Result<MemLayer> {
        meta.validate()?;
        meta.check_file(&file)?;
        let index = SumIndex::new(&meta.present);
        Ok(MemLayer {
            dir,
            file,
            meta,
            index,
        })
    }
}

/// The layers a resume reads, nearest first, and the page → layer table.
#[derive(Debug)]
pub struct LayerChain {
    layers: Vec<MemLayer>,
    owner: Vec<u8>,
    present: PageBitmap,
}

impl LayerChain {
    /// Builds the page → layer table over `layers` (nearest first; all with
    /// the same layout).
    pub fn new(layers: Vec<MemLayer>) -> memfile::Result<LayerChain> {
        let first = layers
            .first()
            .ok_or_else(|| memfile::Error::Layout("a layer chain needs a layer".into()))?;
        if layers.len() > MAX_CHAIN_DEPTH + 1 {
            return Err(memfile::Error::Layout(format!(
                "{} layers, more than {}",
                layers.len(),
                MAX_CHAIN_DEPTH + 1
            )));
        }
        let pages = first.meta.total_pages();
        for l in &layers[1..] {
            if l.meta.regions != first.meta.regions {
                return Err(memfile::Error::Layout(format!(
                    "layer {} has regions {:x?}, the snapshot {:x?}",
                    l.dir.display(),
                    l.meta.regions,
                    first.meta.regions
                )));
            }
        }
        let mut owner = vec![NONE; pages];
        let mut words = vec![0u64; pages.div_ceil(64)];
        // Farthest first, so nearer layers overwrite.
        for (i, l) in layers.iter().enumerate().rev() {
            for (s, e) in l.meta.present.iter_runs() {
                owner[s..e].fill(i as u8);
            }
            for (w, lw) in words.iter_mut().zip(l.meta.present.words()) {
                *w |= lw;
            }
        }
        let present = PageBitmap::from_words(pages, words).expect("word count matches");
        Ok(LayerChain {
            layers,
            owner,
            present,
        })
    }

    /// A chain of one full layer.
    pub fn single(dir: PathBuf, file: File, meta: MemoryMeta) -> memfile::Result<LayerChain> {
        LayerChain::new(vec![MemLayer::new(dir, file, meta)?])
    }

    /// The layers, nearest first.
    pub fn layers(&self) -> &[MemLayer] {
        &self.layers
    }

    /// The nearest layer (the snapshot itself).
    pub fn top(&self) -> &MemLayer {
        &self.layers[0]
    }

    /// Pages some layer stores (everything else reads as zero).
    pub fn present(&self) -> &PageBitmap {
        &self.present
    }

    /// Logical size of the memory.
    pub fn total_bytes(&self) -> u64 {
        self.top().meta.total_bytes
    }

    /// The layer serving page `p`, if any.
    pub fn owner(&self, p: usize) -> Option<usize> {
        match self.owner.get(p) {
            Some(&o) if o != NONE => Some(o as usize),
            _ => None,
        }
    }

    /// Checks that `regions` have the snapshot's layout.
    pub fn check_regions(&self, regions: &[MemRegion]) -> memfile::Result<()> {
        self.top().meta.check_regions(regions)
    }

    /// Checks every layer's holes are zero in its file.
    pub fn verify_holes(&self) -> memfile::Result<()> {
        for l in &self.layers {
            memfile::verify_holes(&l.file, &l.meta)?;
        }
        Ok(())
    }

    /// Reads pages `s..s + buf.len() / PAGE_SIZE` into `buf`, each from the
    /// layer the table names (zero where none), verifying every page read
    /// against its layer's checksums.
    pub fn read_verified(
        &self,
        s: usize,
        buf: &mut [u8],
        scratch: &mut Vec<u32>,
    ) -> memfile::Result<()> {
        let n = buf.len() / PAGE_SIZE;
        let mut a = 0;
        while a < n {
            let o = self.owner.get(s + a).copied().unwrap_or(NONE);
            let mut b = a + 1;
            while b < n && self.owner.get(s + b).copied().unwrap_or(NONE) == o {
                b += 1;
            }
            let part = &mut buf[a * PAGE_SIZE..b * PAGE_SIZE];
            if o == NONE {
                part.fill(0);
            } else {
                let l = &self.layers[o as usize];
                memfile::read_exact_at(&l.file, part, ((s + a) as u64) * PAGE_SIZE as u64)?;
                memfile::verify_run(
                    &l.file,
                    &l.meta.present,
                    &l.meta.sums,
                    &l.index,
                    s + a,
                    part,
                    scratch,
                )?;
            }
            a = b;
        }
        Ok(())
    }

    /// Runs `(start, end, layer)` of consecutive pages of one layer inside
    /// one region, at most `max_pages` long, in file order.
    fn runs(&self, regions: &[MemRegion], max_pages: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for r in regions {
            let (rp0, rp1) = (r.first_page(), r.first_page() + r.pages());
            let mut p = rp0;
            while let Some(s) = self.present.next_one(p) {
                if s >= rp1 {
                    break;
                }
                let e = self.present.next_zero(s).min(rp1);
                let mut a = s;
                while a < e {
                    let o = self.owner[a];
                    let mut b = a + 1;
                    while b < e && self.owner[b] == o && b - a < max_pages {
                        b += 1;
                    }
                    out.push((a, b));
                    a = b;
                }
                p = e;
            }
        }
        out
    }
}

/// Restores guest memory eagerly from a chain: every page some layer
/// stores is read from the nearest such layer straight into the mapping
/// and verified; pages no layer stores stay untouched (zero).
pub fn read_eager(
    chain: &LayerChain,
    regions: &[MemRegion],
    opts: &ReadOpts,
) -> memfile::Result<memfile::MemReadReport> {
    let start = Instant::now();
    chain.check_regions(regions)?;
    chain.verify_holes()?;
    let runs = chain.runs(regions, (opts.max_read / PAGE_SIZE).max(1));
    let total: usize = runs.iter().map(|&(s, e)| e - s).sum();
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
    .min(total.div_ceil(256).max(1));
    let per = runs.len().div_ceil(threads).max(1);
    let results: Vec<memfile::Result<u64>> = std::thread::scope(|sc| {
        let hs: Vec<_> = runs
            .chunks(per)
            .map(|g| {
                sc.spawn(move || {
                    let mut scratch = Vec::new();
                    let mut n = 0u64;
                    for &(s, e) in g {
                        let r = memfile::region_of(regions, s).expect("runs come from the regions");
                        let addr = r.addr() + ((s - r.first_page()) * PAGE_SIZE);
                        // SAFETY: pages s..e lie inside region `r`, writable
                        // per the MemRegion contract; nothing else touches
                        // guest memory during an eager restore, and the runs
                        // of different threads are disjoint.
                        let buf = unsafe {
                            std::slice::from_raw_parts_mut(addr as *mut u8, (e - s) * PAGE_SIZE)
                        };
                        chain.read_verified(s, buf, &mut scratch)?;
                        n += buf.len() as u64;
                    }
                    Ok(n)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("memory reader thread panicked"))
            .collect()
    });
    let mut bytes_read = 0;
    for r in results {
        bytes_read += r?;
    }
    Ok(memfile::MemReadReport {
        bytes_read,
        elapsed: start.elapsed(),
        threads,
    })
}

/// Opens the chain of the snapshot in `dir`: its own layer, then each
/// parent named by its `layers.bin`, each checked to be the layer the
/// child was written on. `load_meta` decodes a snapshot's memory metadata
/// from its state.
pub fn open_chain(
    dir: &Path,
    top_file: File,
    top_meta: MemoryMeta,
    load_meta: impl Fn(&SnapshotDir) -> Result<MemoryMeta, String>,
) -> Result<(LayerChain, Option<ChainFile>), Error> {
    let chain_err = |reason: String| Error::Chain {
        child: dir.to_owned(),
        reason,
    };
    let cf = ChainFile::read(dir)?;
    let dirs = match &cf {
        Some(c) => c.parent_dirs(dir)?,
        None => Vec::new(),
    };
    let mut layers = vec![MemLayer::new(dir.to_owned(), top_file, top_meta)
        .map_err(|e| chain_err(crate::error_chain(&e)))?];
    for (i, (p, pdir)) in cf
        .iter()
        .flat_map(|c| c.parents.iter())
        .zip(&dirs)
        .enumerate()
    {
        let bad = |reason: String| Error::Layer {
            dir: pdir.clone(),
            depth: i + 1,
            child: dir.to_owned(),
            reason,
        };
        let snap = SnapshotDir::open(pdir).map_err(|e| bad(crate::error_chain(&e)))?;
        let crc = state_crc(pdir).map_err(|e| bad(format!("reading state.bin: {e}")))?;
        if crc != p.state_crc {
            return Err(bad(format!(
                "state.bin has CRC-64 {crc:#018x}, the child was written on {:#018x} (the layer was replaced or damaged)",
                p.state_crc
            )));
        }
        let meta = load_meta(&snap).map_err(&bad)?;
        let file = snap
            .open_memory()
            .map_err(|e| bad(crate::error_chain(&e)))?;
        layers.push(
            MemLayer::new(pdir.clone(), file, meta).map_err(|e| bad(crate::error_chain(&e)))?,
        );
    }
    let chain = LayerChain::new(layers).map_err(|e| chain_err(crate::error_chain(&e)))?;
    Ok((chain, cf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memfile::{write_memory, AnonMapping, WriteOpts};

    fn layer(dir: &Path, pages: &[(usize, u8)], n: usize) -> MemLayer {
        let m = AnonMapping::new(n * PAGE_SIZE).unwrap();
        for &(p, v) in pages {
            // SAFETY: page p < n of our own mapping.
            unsafe { std::ptr::write_bytes(m.addr().add(p * PAGE_SIZE), v, PAGE_SIZE) };
        }
        let path = dir.join("memory.bin");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let regions = [m.region(0)];
        let rep = write_memory(&f, &regions, &WriteOpts::default()).unwrap();
        let meta = MemoryMeta::new(&regions, rep.present, rep.sums, PageBitmap::new(0)).unwrap();
        MemLayer::new(dir.to_owned(), File::open(&path).unwrap(), meta).unwrap()
    }

    #[test]
    fn nearest_layer_wins_and_corruption_names_the_layer() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..3).map(|i| root.path().join(format!("l{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        let n = 16;
        // l2 (farthest): pages 0..8 = 2; l1: pages 4..6 = 1; l0: page 5 = 9.
        let l2 = layer(&dirs[2], &(0..8).map(|p| (p, 2)).collect::<Vec<_>>(), n);
        let l1 = layer(&dirs[1], &[(4, 1), (5, 1)], n);
        let l0 = layer(&dirs[0], &[(5, 9), (12, 7)], n);
        let chain = LayerChain::new(vec![l0, l1, l2]).unwrap();
        let want = |p: usize| match p {
            5 => 9,
            12 => 7,
            4 => 1,
            0..8 => 2,
            _ => 0,
        };
        let mut buf = vec![0xffu8; n * PAGE_SIZE];
        let mut scratch = Vec::new();
        chain.read_verified(0, &mut buf, &mut scratch).unwrap();
        for p in 0..n {
            assert!(
                buf[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                    .iter()
                    .all(|&b| b == want(p)),
                "page {p}"
            );
        }
        assert_eq!(chain.owner(5), Some(0));
        assert_eq!(chain.owner(4), Some(1));
        assert_eq!(chain.owner(0), Some(2));
        assert_eq!(chain.owner(9), None);
        // Eager read into fresh memory gives the same bytes.
        let m = AnonMapping::new(n * PAGE_SIZE).unwrap();
        read_eager(&chain, &[m.region(0)], &ReadOpts::default()).unwrap();
        // SAFETY: our own mapping.
        let got = unsafe { std::slice::from_raw_parts(m.addr(), n * PAGE_SIZE) };
        assert_eq!(got, &buf[..]);
        // A damaged page of the middle layer is an error naming its file.
        let f = File::options()
            .write(true)
            .open(dirs[1].join("memory.bin"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"X", 4 * PAGE_SIZE as u64 + 9).unwrap();
        let e = chain
            .read_verified(0, &mut buf, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l1/memory.bin") && e.contains("checksum"), "{e}");
    }

    #[test]
    fn incremental_write_stores_written_pages_and_zero_overrides() {
        use crate::snapshot::dirty::WriteTracker;
        let root = tempfile::tempdir().unwrap();
        let (d0, d1) = (root.path().join("l0"), root.path().join("l1"));
        std::fs::create_dir(&d0).unwrap();
        std::fs::create_dir(&d1).unwrap();
        // Big enough for two writer threads (balanced by dirty pages).
        let n = 40_000;
        let m = AnonMapping::new(n * PAGE_SIZE).unwrap();
        let fill = |p: usize, v: u8| {
            // SAFETY: page p < n of our own mapping.
            unsafe { std::ptr::write_bytes(m.addr().add(p * PAGE_SIZE), v, PAGE_SIZE) }
        };
        for p in 0..16 {
            fill(p, 3);
        }
        let regions = [m.region(0)];
        let new_file = |d: &Path| {
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(d.join("memory.bin"))
                .unwrap()
        };
        let f0 = new_file(&d0);
        let r0 = write_memory(&f0, &regions, &WriteOpts::default()).unwrap();
        let meta0 = MemoryMeta::new(&regions, r0.present, r0.sums, PageBitmap::new(0)).unwrap();
        let _t = match WriteTracker::start(&regions) {
            Ok(t) => t,
            Err(e) if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") => {
                eprintln!("SKIPPED (not passed): {}", crate::error_chain(&e));
                return;
            }
            Err(e) => panic!("{}", crate::error_chain(&e)),
        };
        fill(2, 0); // a parent's page zeroed: must be stored
        fill(5, 7); // a parent's page changed
        fill(30, 9); // a new page
        fill(40, 0); // a hole written with zeros: stays a hole
        fill(6, 3); // rewritten with the same bytes: written, so stored
        fill(39_000, 4); // far away: the other writer thread
        let f1 = new_file(&d1);
        let opts = WriteOpts {
            incremental: Some(std::sync::Arc::new(meta0.present.clone())),
            threads: 2,
            ..WriteOpts::default()
        };
        let r1 = write_memory(&f1, &regions, &opts).unwrap();
        let got: Vec<usize> = r1.present.iter_ones().collect();
        assert_eq!(got, vec![2, 5, 6, 30, 39_000]);
        assert_eq!(r1.threads, 2);
        let meta1 = MemoryMeta::new(&regions, r1.present, r1.sums, PageBitmap::new(0)).unwrap();
        let chain = LayerChain::new(vec![
            MemLayer::new(
                d1.clone(),
                File::open(d1.join("memory.bin")).unwrap(),
                meta1,
            )
            .unwrap(),
            MemLayer::new(
                d0.clone(),
                File::open(d0.join("memory.bin")).unwrap(),
                meta0,
            )
            .unwrap(),
        ])
        .unwrap();
        let fresh = AnonMapping::new(n * PAGE_SIZE).unwrap();
        read_eager(&chain, &[fresh.region(0)], &ReadOpts::default()).unwrap();
        // SAFETY: both are our own mappings of n pages.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(m.addr(), n * PAGE_SIZE),
                std::slice::from_raw_parts(fresh.addr(), n * PAGE_SIZE),
            )
        };
        assert!(a == b, "the chain does not read back the memory");
    }

    #[test]
    fn chain_file_roundtrip_and_depth_limit() {
        let root = tempfile::tempdir().unwrap();
        let p = |i: u64| ParentRef {
            name: format!("snapshot-{i}"),
            state_crc: i,
            bytes_stored: 4096,
        };
        let c = ChainFile {
            parents: (0..MAX_CHAIN_DEPTH as u64).map(p).collect(),
            ..ChainFile::default()
        };
        c.write(root.path()).unwrap();
        assert_eq!(ChainFile::read(root.path()).unwrap(), Some(c.clone()));
        let mut deep = c.clone();
        deep.parents.push(p(99));
        std::fs::remove_file(root.path().join(LAYERS_FILE)).unwrap();
        deep.write(root.path()).unwrap();
        let e = ChainFile::read(root.path()).unwrap_err().to_string();
        assert!(e.contains("more than the limit"), "{e}");
        std::fs::write(root.path().join(LAYERS_FILE), b"garbage").unwrap();
        assert!(ChainFile::read(root.path()).is_err());
        // Another version of the body is refused by number.
        std::fs::remove_file(root.path().join(LAYERS_FILE)).unwrap();
        let mut old = c.clone();
        old.version = 1;
        old.write(root.path()).unwrap();
        let e = ChainFile::read(root.path()).unwrap_err().to_string();
        assert!(e.contains("layers.bin version 1"), "{e}");
    }

    #[test]
    fn parents_resolve_as_siblings_only() {
        let child = Path::new("/data/sandboxes/x/snapshot-5");
        let p = |n: &str| ParentRef {
            name: n.into(),
            state_crc: 0,
            bytes_stored: 0,
        };
        assert_eq!(
            p("snapshot-4").resolve(child).unwrap(),
            Path::new("/data/sandboxes/x/snapshot-4")
        );
        for bad in ["", ".", "..", "/etc", "../y/snapshot-1", "a/b", "a\0b"] {
            let e = p(bad).resolve(child).unwrap_err();
            assert!(e.contains("not a plain directory name"), "{bad:?}: {e}");
        }
        // A chain file naming one is refused before any file is opened.
        let root = tempfile::tempdir().unwrap();
        let c = ChainFile {
            parents: vec![p("../../etc")],
            ..ChainFile::default()
        };
        let dir = root.path().join("snapshot-2");
        std::fs::create_dir(&dir).unwrap();
        c.write(&dir).unwrap();
        let e = ChainFile::read(&dir)
            .unwrap()
            .unwrap()
            .parent_dirs(&dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain directory name"), "{e}");
    }
}
