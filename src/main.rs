//! The `stasis` command line: a thin layer over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use stasis::error_chain as chain;
use stasis::guest::{self, Workload};
use stasis::vmm::{Console, ConsoleBuffer, Kernel, RestoreMode, Vm, VmConfig};

#[derive(Parser)]
#[command(
    name = "stasis",
    version,
    about = "Sandboxes on KVM that pause to disk and resume in milliseconds"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a kernel (or, without --kernel, the built-in test guest) and run it to the end.
    Run(RunArgs),
    /// Restore a snapshot and run it to the end.
    Resume {
        /// Snapshot directory.
        dir: PathBuf,
        /// Read all memory before running instead of on demand.
        #[arg(long, conflicts_with = "lazy")]
        eager: bool,
        /// Serve memory on demand with userfaultfd (the default).
        #[arg(long)]
        lazy: bool,
        /// Refuse the snapshot unless it has this many vCPUs.
        #[arg(long)]
        vcpus: Option<u8>,
        /// Write the serial console to this file instead of stdout.
        #[arg(long)]
        console: Option<PathBuf>,
        /// On SIGUSR1 or SIGTERM, pause the guest into this directory and exit.
        #[arg(long)]
        snapshot_on_signal: Option<PathBuf>,
        /// Host Unix socket of the vsock device (required if the snapshot
        /// has one; a path stored in the snapshot is never used).
        #[arg(long)]
        vsock: Option<PathBuf>,
        /// Base image of the disk (required if the snapshot has one; the
        /// disk is the snapshot's overlay, used in place, over this base;
        /// the path the snapshot records is never used).
        #[arg(long, value_name = "BASE")]
        disk: Option<PathBuf>,
        /// The resumed VM's own writable disk overlay (must not exist):
        /// forked from the snapshot's, which is left untouched, so the
        /// snapshot can be resumed again, even concurrently.
        #[arg(long, value_name = "OWN")]
        overlay: Option<PathBuf>,
        /// Guest memory backing: auto (default), hugetlb, thp or 4k; any
        /// snapshot restores on any backing.
        #[arg(long, default_value = "auto")]
        memory_backing: stasis::vmm::memory::MemoryBacking,
    },
    /// Inspect snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Measure pause and resume latency at several guest sizes.
    Bench {
        /// Guest sizes.
        #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G", value_parser = parse_size)]
        sizes: Vec<u64>,
        /// Fractions of guest memory the workload touches, in percent.
        #[arg(long, value_delimiter = ',', default_value = "10,100")]
        touched: Vec<u64>,
        /// Scratch directory on the disk to measure.
        #[arg(long, default_value = "stasis-bench")]
        dir: PathBuf,
        /// Also write the results as JSON to this file ("-" for stdout).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measure the lifecycle HTTP API instead (create, pause, connect,
        /// kill of 256 MiB guests through an in-process server).
        #[arg(long)]
        api: bool,
        /// With --api: cycles in the sequential phase and per concurrent client.
        #[arg(long, default_value_t = 20, requires = "api")]
        count: usize,
        /// With --api: clients in the concurrent phase.
        #[arg(long, default_value_t = 4, requires = "api")]
        concurrency: usize,
        /// With --api: guest sizes, a run each (e.g. 256M,1G).
        #[arg(long, value_delimiter = ',', default_value = "256M", value_parser = parse_size, requires = "api")]
        api_sizes: Vec<u64>,
        /// With --api: run the workers without the jail (to measure its
        /// cost).
        #[arg(long, requires = "api")]
        no_jail: bool,
        /// Memory backings to measure, each a row (auto, hugetlb, thp, 4k).
        #[arg(long, default_value = "auto")]
        backing: String,
        /// Measure only the incremental pause (a child layer of what the
        /// guest changed since its resume, against a full pause of the same
        /// state) at `--sizes`, the guest changing `--touched` percent.
        /// Without it, the table is followed by the 1 GiB / 10 % case.
        #[arg(long)]
        incremental: bool,
        /// Skip the incremental case after the table.
        #[arg(long, conflicts_with = "incremental")]
        no_incremental: bool,
    },
    /// Serve the sandbox lifecycle HTTP API (what the novita-sandbox SDK speaks).
    Serve(Box<stasis::api::ServeArgs>),
    /// Build the Linux sandbox artifacts: kernel, agent, the `base` image and
    /// the `code-interpreter-v1` image (cached by content hash; the first
    /// build of an image downloads Debian packages, 8-13 min on 2 cores).
    /// The last stdout line is the `stasis serve` arguments that use them.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
    },
    /// The metadata database (`stasis serve --database`).
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// Internal: run one sandbox's VM, driven by the server over a socket.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        socket: PathBuf,
        /// Jail spec (JSON, see `stasis::jail::JailSpec`): confine this
        /// worker before serving.
        #[arg(long)]
        jail: Option<String>,
    },
    /// Boot the built-in test guest on a workload and report what happened.
    Demo {
        /// MiB of guest memory the workload fills and mutates.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Mutate-and-hash rounds.
        #[arg(long, default_value_t = 40)]
        rounds: u64,
    },
}

#[derive(Subcommand)]
enum DbCmd {
    /// Rebuild a lost shared database's snapshot records from the
    /// snapshot manifests in the data dir's snapshot store (creating the
    /// schema first); prints each snapshot id recorded.
    Rebuild {
        /// `postgres://USER@HOST/DB`.
        #[arg(long, value_name = "URL")]
        database: String,
        /// The data dir whose `snapshots/` to read.
        #[arg(long, default_value = "stasis-data")]
        data_dir: PathBuf,
        /// The host id to record as the snapshots' host (default: the
        /// hostname).
        #[arg(long)]
        host_id: Option<String>,
    },
    /// Print the hosts heard from within the TTL (one JSON object a line).
    Hosts {
        /// `postgres://USER@HOST/DB`.
        #[arg(long, value_name = "URL")]
        database: String,
        /// Seconds since a host's last heartbeat for it to count as live.
        #[arg(long, default_value_t = 10)]
        ttl_secs: u64,
    },
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Build (or find cached) the kernel, the agent and both images, one
    /// progress line per step; prints `--kernel K --rootfs BASE
    /// --interpreter-rootfs CI` last, e.g. `stasis serve $(stasis images build | tail -n1)`.
    Build {
        /// The stasis source tree whose kernel/ and rootfs/ scripts build
        /// them (default: $STASIS_SOURCE, else the tree this binary was
        /// built from).
        #[arg(long)]
        source: Option<PathBuf>,
        /// Only the kernel, the agent and the base image (`code-interpreter-v1`
        /// then runs on it without the interpreter server).
        #[arg(long)]
        base_only: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Print a snapshot's format version, vCPUs, memory and checksum status.
    Info {
        /// Snapshot directory.
        dir: PathBuf,
    },
    /// Make a snapshot directory a reusable snapshot of a store
    /// (`<data>/snapshots`): writes its manifest and moves it there;
    /// prints its path.
    Save {
        /// Snapshot directory (moved into the store).
        dir: PathBuf,
        /// The store's directory.
        #[arg(long)]
        store: PathBuf,
        /// The snapshot's id (default: a new random one).
        #[arg(long)]
        id: Option<String>,
    },
    /// Upload a snapshot directory to the snapshot store (chunks the
    /// bucket lacks, then the manifest: the commit); prints the counts.
    Push {
        /// Snapshot directory.
        dir: PathBuf,
        /// Its id in the bucket (committed once: a second push of the id
        /// fails).
        #[arg(long)]
        id: String,
        #[command(flatten)]
        s3: stasis::snapshot::remote::S3Args,
    },
    /// Download a snapshot from the snapshot store into a new directory
    /// (every chunk checked), through the chunk cache if given.
    Pull {
        /// Its id in the bucket.
        id: String,
        /// The directory to make.
        dest: PathBuf,
        #[command(flatten)]
        s3: stasis::snapshot::remote::S3Args,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// ELF vmlinux or bzImage; without it, the built-in test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (for the test guest: stasis.mib=N stasis.rounds=N stasis.seed=N).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// On SIGUSR1 or SIGTERM, pause the guest into this directory and exit.
    #[arg(long)]
    snapshot_on_signal: Option<PathBuf>,
    /// Base image of a virtio-blk disk (/dev/vda; put root=/dev/vda in
    /// --cmdline), never written: writes go to a copy-on-write overlay.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// The disk's overlay file (reused if it exists, with PATH.map);
    /// without it, a temporary overlay removed at exit.
    #[arg(long, requires = "disk")]
    overlay: Option<PathBuf>,
    /// Give the guest a virtio-vsock device whose host side is this Unix
    /// socket ("CONNECT <port>\n" reaches guest port <port>).
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Guest memory backing: auto (default: hugetlb if the pool has room,
    /// else THP, else 4k), hugetlb, thp or 4k. On auto and hugetlb the
    /// memory is rounded up to a multiple of 2 MiB.
    #[arg(long, default_value = "auto")]
    memory_backing: stasis::vmm::memory::MemoryBacking,
}

/// Parses "512M", "2G", "65536K" or a plain byte count.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 512M, 2G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs a line per request and lifecycle transition by default.
    let default_level = match cli.cmd {
        Cmd::Serve(_) | Cmd::Worker { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Demo { mib, rounds } => demo(mib, rounds),
        Cmd::Serve(args) => (*args)
            .into_options()
            .and_then(stasis::api::serve_blocking)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| chain(&e)),
        Cmd::Images {
            cmd: ImagesCmd::Build { source, base_only },
        } => images_build(source, base_only),
        Cmd::Worker { socket, jail: None } => stasis::worker::run_worker(&socket)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| chain(&e)),
        Cmd::Worker {
            socket,
            jail: Some(spec),
        } => stasis::worker::run_worker_jailed(&socket, &spec)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| chain(&e)),
        Cmd::Bench {
            api: true,
            dir,
            json,
            count,
            concurrency,
            api_sizes,
            no_jail,
            ..
        } => api_bench_sizes(&api_sizes, count, concurrency, dir, json, no_jail),
        Cmd::Bench {
            sizes,
            touched,
            dir,
            json,
            backing,
            incremental: true,
            ..
        } => stasis::vmm::memory::MemoryBacking::parse_list(&backing)
            .map_err(|e| e.to_string())
            .and_then(|b| bench_incremental(sizes, touched, dir, json, b)),
        Cmd::Bench {
            sizes,
            touched,
            dir,
            json,
            backing,
            no_incremental,
            ..
        } => stasis::vmm::memory::MemoryBacking::parse_list(&backing)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                let code = bench(sizes, touched, dir.clone(), json, b.clone())?;
                if !no_incremental {
                    println!();
                    bench_incremental(vec![1 << 30], vec![10], dir, None, b)?;
                }
                Ok(code)
            }),
        Cmd::Resume {
            dir,
            eager,
            lazy: _,
            vcpus,
            console,
            snapshot_on_signal,
            vsock,
            disk,
            overlay,
            memory_backing,
        } => resume(
            dir,
            eager,
            vcpus,
            console,
            snapshot_on_signal,
            RestorePathArgs {
                vsock,
                disk,
                overlay,
                memory_backing,
            },
        ),
        Cmd::Db { cmd } => db(cmd),
        Cmd::Snapshot {
            cmd: SnapshotCmd::Info { dir },
        } => snapshot_info(dir),
        Cmd::Snapshot {
            cmd: SnapshotCmd::Save { dir, store, id },
        } => snapshot_save(dir, store, id),
        Cmd::Snapshot {
            cmd: SnapshotCmd::Push { dir, id, s3 },
        } => snapshot_push(dir, id, s3),
        Cmd::Snapshot {
            cmd: SnapshotCmd::Pull { id, dest, s3 },
        } => snapshot_pull(id, dest, s3),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `stasis db …`.
fn db(cmd: DbCmd) -> Result<ExitCode, String> {
    use stasis::api::store::{default_host_id, DatabaseSpec, Store};
    let open = |url: &str, host: Option<String>| {
        let spec = DatabaseSpec::parse(url).map_err(|e| chain(&e))?;
        Store::open_spec(&spec, &host.unwrap_or_else(default_host_id)).map_err(|e| chain(&e))
    };
    match cmd {
        DbCmd::Rebuild {
            database,
            data_dir,
            host_id,
        } => {
            let store = open(&database, host_id)?;
            let ids = store
                .rebuild_snapshots(&data_dir.join("snapshots"))
                .map_err(|e| chain(&e))?;
            for id in &ids {
                println!("{id}");
            }
            eprintln!("stasis: recorded {} snapshot(s)", ids.len());
        }
        DbCmd::Hosts { database, ttl_secs } => {
            let store = open(&database, None)?;
            for h in store
                .live_hosts(std::time::Duration::from_secs(ttl_secs))
                .map_err(|e| chain(&e))?
            {
                println!(
                    "{}",
                    serde_json::json!({"id": h.id, "address": h.info.address,
                        "fingerprint": h.info.fingerprint, "load": h.info.load,
                        "draining": h.info.draining, "memoryFree": h.info.memory_free,
                        "ageMs": h.age_ms})
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(a: RunArgs) -> Result<ExitCode, String> {
    let kernel = match a.kernel {
        Some(p) => Kernel::Path(p),
        None => Kernel::TestGuest,
    };
    let cmdline = a.cmdline.unwrap_or_else(|| match kernel {
        Kernel::TestGuest => Workload::default().cmdline(),
        Kernel::Path(_) => "console=ttyS0 reboot=k panic=1 pci=off".into(),
    });
    let cfg = VmConfig {
        kernel,
        initrd: a.initrd,
        cmdline,
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        console: a.console.map(Console::File).unwrap_or(Console::Stdout),
        disk: a.disk.map(|base| stasis::vmm::DiskConfig {
            base,
            overlay: a.overlay,
        }),
        vsock: a.vsock,
        memory_backing: a.memory_backing,
    };
    let signals = a.snapshot_on_signal.as_ref().map(|_| block_signals());
    let t = Instant::now();
    let vm = Vm::boot(cfg).map_err(|e| chain(&e))?;
    eprintln!(
        "stasis: booted a {} MiB guest on {} memory in {:.1} ms",
        vm.config().mem_bytes >> 20,
        vm.config().memory_backing,
        t.elapsed().as_secs_f64() * 1e3
    );
    supervise(vm, a.snapshot_on_signal, signals)
}

/// Blocks SIGUSR1 and SIGTERM in this thread (and so in the vCPU threads
/// started after it) and returns a channel that a thread waiting for them
/// with sigwait() feeds.
fn block_signals() -> std::sync::mpsc::Receiver<i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the
    // pthread_sigmask and sigwait calls get valid pointers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || loop {
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) == 0 && tx.send(sig).is_err() {
                break;
            }
        });
    }
    rx
}

/// Runs the VM to its end, or, on a signal, pauses it into `snap_dir`.
fn supervise(
    mut vm: Vm,
    snap_dir: Option<PathBuf>,
    signals: Option<std::sync::mpsc::Receiver<i32>>,
) -> Result<ExitCode, String> {
    let reason = loop {
        if let Some(r) = vm.wait(Some(Duration::from_millis(20))) {
            break r;
        }
        if let (Some(rx), Some(dir)) = (&signals, &snap_dir) {
            if rx.try_recv().is_ok() {
                let t = Instant::now();
                vm.pause().map_err(|e| chain(&e))?;
                let st = vm.snapshot(dir).map_err(|e| chain(&e))?;
                eprintln!(
                    "stasis: paused into {} in {:.1} ms ({:.1} MiB written of {} MiB guest)",
                    dir.display(),
                    t.elapsed().as_secs_f64() * 1e3,
                    st.bytes_written as f64 / (1 << 20) as f64,
                    st.mem_bytes >> 20
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    };
    drop(vm);
    match reason {
        stasis::vmm::ExitReason::GuestExit(c) => Ok(ExitCode::from(c)),
        r if r.is_clean() => Ok(ExitCode::SUCCESS),
        r => Err(r.to_string()),
    }
}

/// `resume`'s host paths (never taken from the snapshot).
struct RestorePathArgs {
    vsock: Option<PathBuf>,
    disk: Option<PathBuf>,
    overlay: Option<PathBuf>,
    memory_backing: stasis::vmm::memory::MemoryBacking,
}

fn resume(
    dir: PathBuf,
    eager: bool,
    vcpus: Option<u8>,
    console: Option<PathBuf>,
    snapshot_on_signal: Option<PathBuf>,
    paths: RestorePathArgs,
) -> Result<ExitCode, String> {
    let signals = snapshot_on_signal.as_ref().map(|_| block_signals());
    let mode = if eager {
        RestoreMode::Eager
    } else {
        RestoreMode::Lazy
    };
    let console = console.map(Console::File).unwrap_or(Console::Stdout);
    let own_overlay = paths.overlay.clone();
    let backing = paths.memory_backing;
    let paths = stasis::vmm::RestorePaths {
        vsock: paths.vsock.as_deref(),
        disk_base: paths.disk.as_deref(),
        own_overlay: own_overlay.as_deref(),
        netns: None,
    };
    let (vm, stats) =
        Vm::restore_backed(&dir, mode, console, vcpus, paths, backing).map_err(|e| chain(&e))?;
    eprintln!(
        "stasis: resumed {} ({:?}, {} memory{}) in {:.2} ms",
        dir.display(),
        stats.mode,
        vm.config().memory_backing,
        stats
            .huge_fill
            .map(|f| format!(", filled with UFFDIO_{}", f.name().to_uppercase()))
            .unwrap_or_default(),
        stats.to_running.as_secs_f64() * 1e3
    );
    let lazy = vm.lazy_stats();
    let res = supervise(vm, snapshot_on_signal, signals);
    if let Some(l) = lazy {
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "stasis: lazy loader: {} faults, {} pages on demand, {} prefetched, {} verified, {} faulters woken by the timeout",
            l.faults.load(Relaxed),
            l.pages_demand.load(Relaxed),
            l.pages_prefetched.load(Relaxed),
            l.pages_verified.load(Relaxed),
            l.timeout_wakes.load(Relaxed)
        );
    }
    res
}

/// `stasis snapshot save`: imports a snapshot directory into a store.
fn snapshot_save(dir: PathBuf, store: PathBuf, id: Option<String>) -> Result<ExitCode, String> {
    use stasis::snapshot::store::{ImportOpts, SnapshotStore};
    let store = SnapshotStore::open(store).map_err(|e| chain(&e))?;
    let id = id.unwrap_or_else(SnapshotStore::new_id);
    let s = store
        .import(
            &dir,
            &id,
            ImportOpts {
                kind: stasis::snapshot::manifest::SnapshotKind::User,
                source_sandbox: None,
                labels: Default::default(),
            },
        )
        .map_err(|e| chain(&e))?;
    println!("{}", s.dir.display());
    Ok(ExitCode::SUCCESS)
}

/// The manifest part of `snapshot info` (a store's snapshot has one).
fn print_manifest(dir: &std::path::Path) -> Result<(), String> {
    use stasis::snapshot::manifest::{Manifest, MANIFEST_FILE, MANIFEST_VERSION};
    if !dir.join(MANIFEST_FILE).exists() {
        return Ok(());
    }
    let m = Manifest::read_from(dir).map_err(|e| chain(&e))?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "manifest:        version {MANIFEST_VERSION} (checksum OK), id {}, {:?}",
        m.id, m.kind
    );
    println!(
        "parent:          {}",
        m.parent.as_deref().unwrap_or("none (full snapshot)")
    );
    for (i, l) in m.layers.iter().enumerate() {
        println!(
            "layer {i}:         {} ({}), {:.1} MiB stored",
            l.file,
            l.parent
                .as_deref()
                .map(|p| format!("pages changed since {p}"))
                .unwrap_or_else(|| "full".into()),
            mib(l.bytes_stored)
        );
    }
    if let Some(d) = &m.disk_layer {
        let len = m.files.iter().find(|f| &f.name == d).map(|f| f.allocated);
        println!(
            "disk layer:      {d} ({:.1} MiB allocated)",
            mib(len.unwrap_or(0))
        );
    }
    let host = stasis::snapshot::manifest::HostFingerprint::current();
    println!(
        "host:            {} signature {:#x}, KVM API {}{}",
        m.fingerprint.cpu_vendor,
        m.fingerprint.cpu_signature,
        m.fingerprint.kvm_api_version,
        match m.fingerprint.mismatch(&host) {
            None => " (this host matches)".to_string(),
            Some(d) => format!(" (this host differs: {d})"),
        }
    );
    println!(
        "layout:          {}",
        if m.chunk_size == 0 {
            "per-layer files".to_string()
        } else {
            format!("{} MiB chunks", m.chunk_size >> 20)
        }
    );
    Ok(())
}

/// `snapshot info`: the memory layers, nearest first, with their bytes and
/// parents; each parent is checked to be the layer the child was written on.
fn print_layers(dir: &Path, own_bytes: u64) -> Result<(), String> {
    use stasis::snapshot::layers::{state_crc, ChainFile};
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let parents = ChainFile::read(dir)
        .map_err(|e| chain(&e))?
        .map(|c| c.parents)
        .unwrap_or_default();
    if parents.is_empty() {
        println!("layers:          1 (a full memory layer, no parent)");
        return Ok(());
    }
    println!(
        "layers:          {} (nearest first; each page comes from the nearest layer that stores it)",
        parents.len() + 1
    );
    let dirs: Vec<PathBuf> = parents
        .iter()
        .map(|p| p.resolve(dir))
        .collect::<Result<_, _>>()?;
    println!(
        "  layer 0:       this snapshot, {:.1} MiB, parent {}",
        mib(own_bytes),
        dirs[0].display()
    );
    for (i, p) in parents.iter().enumerate() {
        let check = match state_crc(&dirs[i]) {
            Ok(c) if c == p.state_crc => "intact".to_string(),
            Ok(_) => "CHANGED since the child was written: the chain will not resume".into(),
            Err(e) => format!("MISSING ({e}): the chain will not resume"),
        };
        let parent = dirs
            .get(i + 1)
            .map(|q| format!("parent {}", q.display()))
            .unwrap_or_else(|| "full layer".into());
        println!(
            "  layer {}:       {}, {:.1} MiB, {parent} ({check})",
            i + 1,
            dirs[i].display(),
            mib(p.bytes_stored)
        );
    }
    Ok(())
}

fn snapshot_info(dir: PathBuf) -> Result<ExitCode, String> {
    print_manifest(&dir)?;
    let (st, found) = stasis::vmm::persist::inspect(&dir).map_err(|e| chain(&e))?;
    let on_disk = found.allocated;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("snapshot:        {}", dir.display());
    println!(
        "format version:  {} (state checksum OK, memory file length OK, memory checksums OK ({} pages), holes OK)",
        stasis::snapshot::format::FORMAT_VERSION,
        found.pages_verified
    );
    println!("kernel:          {}", st.kernel);
    println!("cmdline:         {}", st.cmdline);
    println!("vCPUs:           {}", st.vcpus.len());
    println!(
        "memory:          {:.0} MiB (4 KiB pages in the file: restores on any backing; on this host `auto` would pick {})",
        mib(st.mem_bytes),
        stasis::vmm::memory::MemoryBacking::Auto
            .resolve(st.mem_bytes)
            .map(|b| b.name())
            .unwrap_or("4k")
    );
    println!(
        "bytes stored:    {:.1} MiB ({:.1} MiB allocated on disk)",
        mib(st.memory.bytes_stored),
        mib(on_disk)
    );
    println!(
        "working set:     {} pages ({:.1} MiB)",
        st.memory.working_set.count_ones(),
        mib(st.memory.working_set.count_ones() as u64 * 4096)
    );
    print_layers(&dir, st.memory.bytes_stored)?;
    for d in &st.virtio.devices {
        use stasis::vmm::virtio::DeviceKind;
        match &d.kind {
            DeviceKind::Block { base, size } => {
                // Every written block of the overlay against its checksum;
                // the recorded base is shown, never opened.
                let overlay = dir.join(stasis::vmm::virtio::SNAPSHOT_OVERLAY);
                let blocks = stasis::vmm::virtio::cow::verify_overlay(&overlay, *size)
                    .map_err(|e| chain(&e))?;
                println!(
                    "disk:            {} MiB, overlay {} ({blocks} written blocks, checksums OK); \
                     recorded base {:?} (not opened: `resume --disk` names it)",
                    size >> 20,
                    stasis::vmm::virtio::SNAPSHOT_OVERLAY,
                    base.display().to_string()
                )
            }
            DeviceKind::Vsock { cid, .. } => {
                println!(
                    "vsock:           guest CID {cid} (`resume --vsock` names the host socket)"
                )
            }
            DeviceKind::Net { mac } => println!(
                "network:         virtio-net, MAC {} (the tap is re-created on resume)",
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            ),
        }
    }
    println!("taken at:        {} (unix seconds)", st.created_unix);
    Ok(ExitCode::SUCCESS)
}

fn bench(
    sizes: Vec<u64>,
    touched: Vec<u64>,
    dir: PathBuf,
    json: Option<PathBuf>,
    backings: Vec<stasis::vmm::memory::MemoryBacking>,
) -> Result<ExitCode, String> {
    if let Some(p) = touched.iter().find(|p| **p == 0 || **p > 100) {
        return Err(format!("--touched {p}: a percentage from 1 to 100"));
    }
    let opts = stasis::bench::BenchOpts {
        sizes,
        percents: touched,
        dir: dir.clone(),
        backings,
    };
    println!(
        "stasis bench: built-in test guest, scratch dir {}",
        dir.display()
    );
    println!("pause = vCPUs stopped + state + sparse memory file + fsync + rename; resume = lazy (userfaultfd);");
    println!("round = one workload pass touching every touched page; 1st-rnd = resume until the first round after it completed\n");
    let rows = stasis::bench::run(&opts, &mut std::io::stdout()).map_err(|e| chain(&e))?;
    let _ = std::fs::remove_dir(&dir);
    write_json(json, &rows)
}

/// `stasis bench --incremental`: incremental against full pause of the
/// same state, side by side.
fn bench_incremental(
    sizes: Vec<u64>,
    touched: Vec<u64>,
    dir: PathBuf,
    json: Option<PathBuf>,
    backings: Vec<stasis::vmm::memory::MemoryBacking>,
) -> Result<ExitCode, String> {
    if let Some(p) = touched.iter().find(|p| **p == 0 || **p > 100) {
        return Err(format!("--touched {p}: a percentage from 1 to 100"));
    }
    let opts = stasis::bench::BenchOpts {
        sizes,
        percents: touched,
        dir: dir.clone(),
        backings,
    };
    let rows =
        stasis::bench::run_incremental_all(&opts, &mut std::io::stdout()).map_err(|e| chain(&e))?;
    let _ = std::fs::remove_dir(&dir);
    write_json(json, &rows)
}

/// `stasis bench --api`: latency of create, pause, connect and kill through
/// the lifecycle HTTP API.
fn api_bench(
    count: usize,
    concurrency: usize,
    dir: PathBuf,
    json: Option<PathBuf>,
    no_jail: bool,
) -> Result<ExitCode, String> {
    let opts = stasis::api::bench::ApiBenchOpts {
        no_jail,
        count,
        concurrency,
        dir: dir.clone(),
        worker_exe: Some(
            std::env::current_exe().map_err(|e| format!("locating the stasis binary: {e}"))?,
        ),
        ..Default::default()
    };
    let report = stasis::api::bench::run_api_bench(opts, &mut std::io::stdout());
    let _ = std::fs::remove_dir(&dir);
    write_json(json, &report.map_err(|e| chain(&e))?)
}

/// `stasis bench --api --api-sizes S1,S2`: [`api_bench`] once per guest
/// size (one size: exactly `api_bench`; more: a JSON array of reports).
fn api_bench_sizes(
    sizes: &[u64],
    count: usize,
    concurrency: usize,
    dir: PathBuf,
    json: Option<PathBuf>,
    no_jail: bool,
) -> Result<ExitCode, String> {
    if let [one] = sizes {
        if *one == 256 << 20 {
            return api_bench(count, concurrency, dir, json, no_jail);
        }
    }
    let mut reports = Vec::new();
    for &size in sizes {
        let opts = stasis::api::bench::ApiBenchOpts {
            no_jail,
            count,
            concurrency,
            dir: dir.clone(),
            memory_mb: size >> 20,
            worker_exe: Some(
                std::env::current_exe().map_err(|e| format!("locating the stasis binary: {e}"))?,
            ),
            ..Default::default()
        };
        let report = stasis::api::bench::run_api_bench(opts, &mut std::io::stdout());
        reports.push(report.map_err(|e| chain(&e))?);
    }
    let _ = std::fs::remove_dir(&dir);
    write_json(json, &reports)
}

/// Writes `value` as JSON to `path` ("-" for stdout), if given.
fn write_json(path: Option<PathBuf>, value: &impl serde::Serialize) -> Result<ExitCode, String> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        if p.as_os_str() == "-" {
            println!("{text}");
        } else {
            std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until the guest has completed more than `round` rounds.
fn wait_for_round(vm: &Vm, round: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if vm.guest_status().is_some_and(|s| s.round > round) {
            return Ok(());
        }
        if let Some(r) = vm.exited() {
            return Err(format!("guest ended before round {round}: {r}"));
        }
        if Instant::now() > deadline {
            return Err(format!("guest did not reach round {round} within 300 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pauses `vm` into `dir` and reports what it cost.
fn demo_pause(mut vm: Vm, dir: &std::path::Path) -> Result<(), String> {
    let t = Instant::now();
    vm.pause().map_err(|e| chain(&e))?;
    let stopped = t.elapsed();
    let at = vm.guest_status().map(|s| s.round).unwrap_or(0);
    let st = vm.snapshot(dir).map_err(|e| chain(&e))?;
    let total = t.elapsed();
    drop(vm);
    let gib = st.mem_bytes as f64 / (1u64 << 30) as f64;
    println!(
        "  paused at round {at}: vCPUs stopped in {:.2} ms; snapshot durable after {:.1} ms \
         ({:.3} s per GiB of guest memory); {:.1} MiB written of a {} MiB guest; working set {} pages",
        stopped.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3,
        total.as_secs_f64() / gib,
        st.bytes_written as f64 / (1 << 20) as f64,
        st.mem_bytes >> 20,
        st.working_set_pages
    );
    Ok(())
}

/// Resumes `dir` lazily and reports how fast it ran and filled.
fn demo_resume(dir: &std::path::Path, console: &ConsoleBuffer) -> Result<Vm, String> {
    let (vm, rs) = Vm::restore(
        dir,
        RestoreMode::Lazy,
        Console::Buffer(console.clone()),
        None,
    )
    .map_err(|e| chain(&e))?;
    let ws = vm.wait_working_set().map_err(|e| chain(&e))?;
    let all = vm.wait_memory_complete().map_err(|e| chain(&e))?;
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0);
    println!(
        "  resumed lazily: guest running {:.2} ms after the call; working set ({} pages) resident \
         after {:.1} ms; all {:.1} MiB after {:.1} ms",
        rs.to_running.as_secs_f64() * 1e3,
        rs.working_set_pages,
        ms(ws),
        rs.bytes_stored as f64 / (1 << 20) as f64,
        ms(all)
    );
    Ok(vm)
}

fn demo(mib: u64, rounds: u64) -> Result<ExitCode, String> {
    if rounds < 3 {
        return Err("--rounds must be at least 3 (the demo pauses twice mid-workload)".into());
    }
    let w = Workload {
        mib,
        rounds,
        seed: 42,
        report: 0,
        base_mib: 16,
    };
    let cfg = VmConfig {
        cmdline: w.cmdline(),
        mem_bytes: (w.min_mem_bytes() + (64 << 20)).next_multiple_of(2 << 20),
        ..VmConfig::default()
    };
    println!(
        "stasis demo: built-in test guest in a {} MiB VM; it fills {mib} MiB, runs {rounds} \
         mutate-and-hash rounds and prints a checksum",
        cfg.mem_bytes >> 20
    );
    let base = std::env::temp_dir().join(format!("stasis-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    let result = (|| {
        let t0 = Instant::now();
        let vm = Vm::boot(cfg).map_err(|e| chain(&e))?;
        println!("booted in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        wait_for_round(&vm, rounds / 3)?;
        println!("pause 1 (a booted guest):");
        demo_pause(vm, &base.join("a"))?;
        let console = ConsoleBuffer::new();
        let vm = demo_resume(&base.join("a"), &console)?;
        wait_for_round(&vm, 2 * rounds / 3)?;
        println!("pause 2 (a lazily resumed guest: it records the pages it needed first):");
        demo_pause(vm, &base.join("b"))?;
        let vm = demo_resume(&base.join("b"), &console)?;
        let reason = vm.wait(Some(Duration::from_secs(600)));
        drop(vm);
        println!(
            "guest finished: {}",
            reason.map(|r| r.to_string()).unwrap_or("timeout".into())
        );
        let expected = guest::reference(&w);
        let got = guest::parse_checksum(&console.text());
        let ok = got == Some(expected.checksum);
        println!(
            "checksum: guest {} / expected {:016x} (computed independently) -> {}",
            got.map(|c| format!("{c:016x}")).unwrap_or("missing".into()),
            expected.checksum,
            if ok { "MATCH" } else { "MISMATCH" }
        );
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })();
    let _ = std::fs::remove_dir_all(&base);
    result
}

/// `stasis images build`: runs the source tree's build scripts in order
/// (each prints its artifact's path as its last stdout line and logs to
/// stderr), one progress line per step on stderr.
fn images_build(source: Option<PathBuf>, base_only: bool) -> Result<ExitCode, String> {
    let source = source
        .or_else(|| std::env::var_os("STASIS_SOURCE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    if !source.join("rootfs/build-image.sh").is_file() || !source.join("kernel/build.sh").is_file()
    {
        return Err(format!(
            "{} is not a stasis source tree (no rootfs/build-image.sh and kernel/build.sh): \
             pass --source DIR or set STASIS_SOURCE",
            source.display()
        ));
    }
    let total = if base_only { 3 } else { 4 };
    let started = Instant::now();
    let step = |n: usize, what: &str, script: &str, args: &[&std::ffi::OsStr]| {
        eprintln!("stasis images: [{n}/{total}] {what} ({script})");
        let t = Instant::now();
        let out = std::process::Command::new(source.join(script))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("starting {script}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = stdout
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_file());
        match (out.status.code(), path) {
            (Some(0), Some(path)) => {
                eprintln!(
                    "stasis images: [{n}/{total}] {what}: {} ({:.1} s)",
                    path.display(),
                    t.elapsed().as_secs_f64()
                );
                Ok(path)
            }
            (Some(2), _) => Err(format!(
                "{script}: a prerequisite is missing (its message is above)"
            )),
            (code, _) => Err(format!(
                "{script} failed ({}); its log is above",
                code.map_or("killed by a signal".to_owned(), |c| format!(
                    "exit status {c}"
                ))
            )),
        }
    };
    let kernel = step(1, "the guest kernel", "kernel/build.sh", &[])?;
    let agent = step(2, "the static agent", "rootfs/build-agent.sh", &[])?;
    let base = step(
        3,
        "the base image (Debian bookworm)",
        "rootfs/build-image.sh",
        &[agent.as_os_str()],
    )?;
    let mut args = format!("--kernel {} --rootfs {}", kernel.display(), base.display());
    if !base_only {
        let ci = step(
            4,
            "the code-interpreter image",
            "rootfs/build-image.sh",
            &[
                std::ffi::OsStr::new("--code-interpreter"),
                agent.as_os_str(),
            ],
        )?;
        args.push_str(&format!(" --interpreter-rootfs {}", ci.display()));
    }
    eprintln!(
        "stasis images: done in {:.1} s; serve them with: stasis serve {args}",
        started.elapsed().as_secs_f64()
    );
    println!("{args}");
    Ok(ExitCode::SUCCESS)
}

fn remote_store(
    s3: &stasis::snapshot::remote::S3Args,
) -> Result<stasis::snapshot::remote::RemoteStore, String> {
    let cfg = s3
        .config()
        .ok_or("--snapshot-store s3://bucket is required")?;
    stasis::snapshot::remote::RemoteStore::open(&cfg).map_err(|e| chain(&e))
}

fn tokio_rt() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

fn snapshot_push(
    dir: PathBuf,
    id: String,
    s3: stasis::snapshot::remote::S3Args,
) -> Result<ExitCode, String> {
    let store = remote_store(&s3)?;
    let t = Instant::now();
    let progress = stasis::snapshot::remote::UploadProgress::default();
    let st = tokio_rt()?
        .block_on(store.upload_dir(&dir, &id, Default::default(), &progress))
        .map_err(|e| chain(&e))?;
    println!(
        "{}",
        serde_json::json!({
            "id": id,
            "stats": st,
            "ms": t.elapsed().as_secs_f64() * 1e3,
        })
    );
    Ok(ExitCode::SUCCESS)
}

fn snapshot_pull(
    id: String,
    dest: PathBuf,
    s3: stasis::snapshot::remote::S3Args,
) -> Result<ExitCode, String> {
    let store = remote_store(&s3)?;
    let cache = match &s3.chunk_cache_dir {
        Some(d) => Some(
            stasis::snapshot::remote::ChunkCache::open(d, s3.chunk_cache_bytes)
                .map_err(|e| chain(&e))?,
        ),
        None => None,
    };
    let t = Instant::now();
    let st = tokio_rt()?
        .block_on(store.download(&id, &dest, cache.as_ref()))
        .map_err(|e| chain(&e))?;
    println!(
        "{}",
        serde_json::json!({
            "id": id,
            "stats": st,
            "ms": t.elapsed().as_secs_f64() * 1e3,
        })
    );
    Ok(ExitCode::SUCCESS)
}
