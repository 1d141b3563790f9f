//! The jail around VM workers, one test per layer, each observed from
//! inside a real jailed worker (`stasis worker --jail`) through the test-only
//! probe request (`STASIS_FAULT=jail-probe`, see `worker::probe`):
//! filesystem (host files invisible, root read-only), credentials (own uid,
//! no capabilities, pid 1 of its own pid namespace), environment (no
//! secrets), seccomp (`execve` and a forbidden ioctl kill the worker, an
//! allowed KVM ioctl works), cgroup (exceeding memory.max kills that worker
//! only; another keeps running), and a real KVM guest booted, paused and
//! lazily restored inside jails (every thread kind's allowlist in use).
//!
//! Needs root, cgroups and /dev/kvm: without them the tests fail, or with
//! STASIS_ALLOW_SKIP=1 print a "SKIPPED (not passed)" banner.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stasis::jail::{JailRequest, Jailer};
use stasis::worker::client::WorkerClient;
use stasis::worker::protocol::{
    BackendKind, BootConfig, ConsoleSpec, KernelSpec, Reply, Request, RestoreModeSpec,
};
use stasis::worker::Error as WorkerError;

const EXE: &str = env!("CARGO_BIN_EXE_stasis");
const T: Duration = Duration::from_secs(30);

/// The jailer for one test (its own uid range), or None when skipping.
fn jailer(test: &str, dir: &Path, uid_base: u32) -> Option<Arc<Jailer>> {
    // The probe switch reaches jailed workers (JAIL_ENV); the fake secret
    // must not.
    std::env::set_var("STASIS_FAULT", "jail-probe");
    std::env::set_var("STASIS_API_KEY", "test-secret-must-not-leak");
    // As the server runs (the jail must not depend on the umask).
    // SAFETY: umask only swaps the process's file mode mask.
    unsafe { libc::umask(0o077) };
    match Jailer::detect(&dir.join("jail"), uid_base, 64) {
        Ok(j) => Some(j),
        Err(e) => {
            let msg = format!("{test}: this host cannot jail workers: {e}");
            if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
                eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
                None
            } else {
                panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip explicitly");
            }
        }
    }
}

struct Sandbox {
    dir: PathBuf,
    worker: WorkerClient,
}

async fn spawn(j: &Arc<Jailer>, root: &Path, name: &str, memory_max: Option<u64>) -> Sandbox {
    spawn_in(j, root, name, memory_max, None).await
}

async fn spawn_in(
    j: &Arc<Jailer>,
    root: &Path,
    name: &str,
    memory_max: Option<u64>,
    netns: Option<&Path>,
) -> Sandbox {
    spawn_ro(j, root, name, memory_max, netns, Vec::new()).await
}

/// [`spawn_in`] with host paths the worker sees read-only.
async fn spawn_ro(
    j: &Arc<Jailer>,
    root: &Path,
    name: &str,
    memory_max: Option<u64>,
    netns: Option<&Path>,
    ro: Vec<PathBuf>,
) -> Sandbox {
    let dir = root.join("sandboxes").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mine.txt"), b"sandbox file").unwrap();
    let req = JailRequest {
        name: format!("jailtest-{name}"),
        sandbox_dir: dir.clone(),
        mem_bytes: 64 << 20,
        vcpus: 1,
        memory_max,
        ro,
        netns: netns.map_or(stasis::jail::Netns::New, |p| {
            stasis::jail::Netns::Join(p.to_owned())
        }),
    };
    let prepared = j.prepare(&req).unwrap();
    let socket = root.join(format!("{name}.sock"));
    let worker = WorkerClient::spawn_jailed(Path::new(EXE), &socket, T, Some(prepared))
        .await
        .unwrap();
    Sandbox { dir, worker }
}

async fn probe(w: &WorkerClient, op: &str) -> Result<String, WorkerError> {
    match w
        .request(
            Request::Probe {
                probe: op.to_string(),
            },
            T,
        )
        .await?
    {
        Reply::Probe { outcome } => Ok(outcome),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn finish(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
}

/// Filesystem, credentials, namespaces and environment, from inside.
#[tokio::test(flavor = "multi_thread")]
async fn jailed_worker_sees_only_its_sandbox() {
    let root = common::scratch("jail-fs");
    let Some(j) = jailer("jailed_worker_sees_only_its_sandbox", &root, 910_000) else {
        return;
    };
    let s = spawn(&j, &root, "fs", None).await;
    let w = &s.worker;

    // Host files are not there; its own are.
    let r = probe(w, "read:/etc/shadow").await.unwrap();
    assert!(r.starts_with("error:") && r.contains("No such file"), "{r}");
    let r = probe(w, "read:/etc/passwd").await.unwrap();
    assert!(r.starts_with("error:"), "{r}");
    let own = s.dir.join("mine.txt");
    let r = probe(w, &format!("read:{}", own.display())).await.unwrap();
    assert_eq!(r, "ok: 12 bytes");
    // The server's database and other sandboxes' dirs are invisible.
    let other = root.join("sandboxes").join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret"), b"x").unwrap();
    let r = probe(w, &format!("read:{}", other.join("secret").display()))
        .await
        .unwrap();
    assert!(r.starts_with("error:"), "{r}");
    // Its root is read-only; its sandbox dir is writable.
    let r = probe(w, "write:/evil").await.unwrap();
    assert!(r.starts_with("error:") && r.contains("Read-only"), "{r}");
    let r = probe(w, &format!("write:{}", s.dir.join("new").display()))
        .await
        .unwrap();
    assert_eq!(r, "ok: written");

    // Credentials: the allocated uid, no capabilities, pid 1 of its own pid
    // namespace, its own hostname.
    let uid = w.jail().unwrap().spec.uid;
    assert_eq!(uid, 910_000);
    let r = probe(w, "id").await.unwrap();
    assert!(
        r.contains(&format!("uid={uid} gid={uid} pid=1 capeff=Some(0)")),
        "{r}"
    );
    assert!(r.contains("host=stasis-sandbox"), "{r}");

    // Environment: only what the worker needs; no secret.
    let r = probe(w, "env").await.unwrap();
    assert!(!r.contains("STASIS_API_KEY"), "{r}");
    let mut names: Vec<&str> = r.trim_start_matches("ok: ").split(',').collect();
    names.sort_unstable();
    assert!(
        names.iter().all(|n| [
            "STASIS_FAULT",
            "STASIS_WORKER_PARENT_PID",
            "RUST_LOG",
            "RUST_BACKTRACE"
        ]
        .contains(n)),
        "{r}"
    );

    // The allowed KVM ioctl works under the filter.
    let r = probe(w, "ioctl-kvm").await.unwrap();
    assert_eq!(r, "ok: KVM API 12");

    let cgroup_dirs = w.jail().unwrap().cgroup.dirs();
    assert!(cgroup_dirs.iter().all(|d| d.is_dir()));
    s.worker.shutdown(T).await;
    // The uid and the cgroup are released once the worker is gone.
    common::wait_for(T, "the uid to be freed", || j.uids().in_use() == 0);
    assert!(cgroup_dirs.iter().all(|d| !d.exists()), "{cgroup_dirs:?}");
    finish(&root);
}

/// seccomp: `execve` kills the worker process (SIGSYS).
#[tokio::test(flavor = "multi_thread")]
async fn execve_kills_the_jailed_worker() {
    let root = common::scratch("jail-exec");
    let Some(j) = jailer("execve_kills_the_jailed_worker", &root, 911_000) else {
        return;
    };
    let s = spawn(&j, &root, "exec", None).await;
    // Put a real executable in its own dir (a path it can see).
    let sh = s.dir.join("sh");
    std::fs::copy("/bin/true", &sh).unwrap();
    let r = probe(&s.worker, &format!("exec:{}", sh.display())).await;
    assert!(matches!(r, Err(WorkerError::WorkerGone(_))), "{r:?}");
    let why = s.worker.wait_exit().await;
    assert!(why.contains("signal 31"), "worker exit: {why}");
    common::wait_for(T, "the uid to be freed", || j.uids().in_use() == 0);
    finish(&root);
}

/// seccomp: an ioctl outside the allowlist (TIOCSTI) kills the worker.
#[tokio::test(flavor = "multi_thread")]
async fn forbidden_ioctl_kills_the_jailed_worker() {
    let root = common::scratch("jail-ioctl");
    let Some(j) = jailer("forbidden_ioctl_kills_the_jailed_worker", &root, 912_000) else {
        return;
    };
    let s = spawn(&j, &root, "ioctl", None).await;
    assert_eq!(
        probe(&s.worker, "ioctl-kvm").await.unwrap(),
        "ok: KVM API 12"
    );
    let r = probe(&s.worker, "ioctl-tty").await;
    assert!(matches!(r, Err(WorkerError::WorkerGone(_))), "{r:?}");
    let why = s.worker.wait_exit().await;
    assert!(why.contains("signal 31"), "worker exit: {why}");
    finish(&root);
}

/// cgroup: a worker that exceeds its memory.max is killed inside its cgroup;
/// another sandbox's worker (and this process, the "server") carry on.
#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_kills_only_that_worker() {
    let root = common::scratch("jail-mem");
    let Some(j) = jailer("memory_limit_kills_only_that_worker", &root, 913_000) else {
        return;
    };
    let hog = spawn(&j, &root, "hog", Some(64 << 20)).await;
    let calm = spawn(&j, &root, "calm", None).await;
    assert_eq!(
        hog.worker.jail().unwrap().cgroup.memory_limit(),
        Some(64 << 20)
    );
    assert!(probe(&hog.worker, "alloc:16")
        .await
        .unwrap()
        .starts_with("ok:"));
    let r = probe(&hog.worker, "alloc:256").await;
    assert!(matches!(r, Err(WorkerError::WorkerGone(_))), "{r:?}");
    let why = hog.worker.wait_exit().await;
    assert!(
        why.contains("signal 9") && why.contains("out of memory"),
        "{why}"
    );
    // The other sandbox is untouched.
    assert!(calm.worker.exited().is_none());
    let r = probe(&calm.worker, "alloc:32").await.unwrap();
    assert_eq!(r, "ok: touched 8192 pages");
    calm.worker.shutdown(T).await;
    common::wait_for(T, "the uids to be freed", || j.uids().in_use() == 0);
    finish(&root);
}

/// A real guest in jails: boot, pause (snapshot into the sandbox dir),
/// lazy restore in a fresh jail; the vCPU, device and userfaultfd threads
/// all run under their seccomp filters.
#[tokio::test(flavor = "multi_thread")]
async fn kvm_guest_boots_pauses_and_resumes_in_jails() {
    kvm_cycle(
        "kvm_guest_boots_pauses_and_resumes_in_jails",
        914_000,
        false,
    )
    .await;
}

/// The same with a virtio-net device: the jailed worker joins the
/// sandbox's network namespace and opens its tap before it drops its
/// privileges (after `pivot_root` neither the namespace nor /dev/net/tun is
/// reachable), at boot and again at the restore in a fresh jail.
#[tokio::test(flavor = "multi_thread")]
async fn kvm_guest_with_a_network_device_in_jails() {
    kvm_cycle("kvm_guest_with_a_network_device_in_jails", 916_000, true).await;
}

/// A namespace `stasis-jt<pid>` holding a tap `tap0`, removed on drop.
struct TapNs(PathBuf);

impl TapNs {
    fn new() -> TapNs {
        let name = format!("stasis-jt{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["-n", &name, "link", "set", "tap0", "up"],
        ] {
            let st = std::process::Command::new("ip").args(&args).status();
            assert!(
                st.map(|s| s.success()).unwrap_or(false),
                "ip {args:?} failed (iproute2 and netns support are needed)"
            );
        }
        TapNs(PathBuf::from("/run/netns").join(name))
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        if let Some(name) = self.0.file_name().and_then(|n| n.to_str()) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

/// Restores `snapshot_dir` lazily (tracking writes) in the jailed sandbox
/// `s`, then waits until its guest passes round `past` (`what`: for the
/// failure message).
async fn restore_until_past(
    s: &Sandbox,
    snapshot_dir: PathBuf,
    net: Option<stasis::vmm::NetAttach>,
    past: u64,
    what: &str,
) {
    let r = s
        .worker
        .request(
            Request::Restore {
                backend: BackendKind::Vm,
                snapshot_dir,
                mode: RestoreModeSpec::Lazy,
                console: ConsoleSpec::File(s.dir.join("console.log")),
                vsock: None,
                disk_base: None,
                own_overlay: None,
                memory_backing: Default::default(),
                net,
                track_writes: true,
            },
            T,
        )
        .await
        .unwrap();
    assert!(matches!(r, Reply::Running { .. }), "{what}: {r:?}");
    let deadline = std::time::Instant::now() + T;
    loop {
        match s.worker.request(Request::Status, T).await.unwrap() {
            Reply::Status {
                alive: true,
                guest: Some(g),
                ..
            } if g.round > past => break,
            Reply::Status { alive: true, .. } => {}
            other => panic!("guest not running {what}: {other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "no progress {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn kvm_cycle(test: &str, uid_base: u32, with_net: bool) {
    if !common::kvm_or_skip(test) {
        return;
    }
    let root = common::scratch(if with_net { "jail-kvm-net" } else { "jail-kvm" });
    let Some(j) = jailer(test, &root, uid_base) else {
        return;
    };
    let tapns = with_net.then(TapNs::new);
    let netns = tapns.as_ref().map(|t| t.0.as_path());
    let net = netns.map(|p| stasis::vmm::NetAttach {
        netns: p.to_owned(),
        mac: [0x02, 0x5e, 0, 0, 0, 1],
    });
    // Cgroups are named for the sandbox: each test its own.
    let name = if with_net { "vmnet" } else { "vm" };
    let s = spawn_in(&j, &root, name, None, netns).await;
    let workload = stasis::guest::Workload {
        mib: 16,
        rounds: 0,
        seed: 7,
        report: 1,
        base_mib: 16,
    };
    let cfg = BootConfig {
        kernel: KernelSpec::TestGuest,
        initrd: None,
        cmdline: workload.cmdline(),
        mem_bytes: 64 << 20,
        vcpus: 1,
        console: ConsoleSpec::File(s.dir.join("console.log")),
        disk: None,
        vsock: None,
        interpreter: None,
        memory_backing: Default::default(),
        net: net.clone(),
    };
    let r = s
        .worker
        .request(
            Request::Boot {
                backend: BackendKind::Vm,
                config: cfg,
            },
            T,
        )
        .await
        .unwrap();
    assert!(matches!(r, Reply::Running { .. }), "{r:?}");
    // Let the guest run until it reports progress.
    let deadline = std::time::Instant::now() + T;
    loop {
        let st = s.worker.request(Request::Status, T).await.unwrap();
        match st {
            Reply::Status {
                alive: true,
                guest: Some(g),
                ..
            } if g.round > 0 => break,
            Reply::Status { alive: true, .. } => {}
            other => panic!("guest not running: {other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "no guest progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = s.dir.join("snapshot-1");
    let r = s
        .worker
        .request(
            Request::Pause {
                snapshot_dir: snap.clone(),
                incremental: true,
            },
            T,
        )
        .await
        .unwrap();
    let Reply::Paused {
        snapshot_bytes,
        guest: Some(before),
    } = r
    else {
        panic!("pause: {r:?}");
    };
    assert!(snapshot_bytes > 0);
    s.worker.wait_exit().await;
    // A booted VM's pause is a full layer, incremental asked or not.
    assert!(!snap.join(stasis::snapshot::layers::LAYERS_FILE).exists());

    // Resume in a fresh jail (the sandbox dir is handed to the new uid).
    let s2 = spawn_in(&j, &root, name, None, netns).await;
    restore_until_past(&s2, snap.clone(), net.clone(), before.round, "after resume").await;
    if let Some(peak) = s2.worker.jail().and_then(|p| p.cgroup.memory_peak()) {
        eprintln!(
            "jailed worker memory peak (64 MiB guest, lazy restore): {} MiB",
            peak >> 20
        );
    }
    // Paused again while lazily restored, incrementally: a child layer
    // over snapshot-1 (the loader needs not finish: a page never fetched
    // was not written).
    let snap2 = s2.dir.join("snapshot-2");
    let r = s2
        .worker
        .request(
            Request::Pause {
                snapshot_dir: snap2.clone(),
                incremental: true,
            },
            T,
        )
        .await
        .unwrap();
    let Reply::Paused {
        guest: Some(before2),
        ..
    } = r
    else {
        panic!("incremental pause: {r:?}");
    };
    s2.worker.wait_exit().await;
    let chain = stasis::snapshot::layers::ChainFile::read(&snap2)
        .unwrap()
        .expect("the second pause wrote a child layer");
    assert_eq!(chain.parents.len(), 1);
    assert_eq!(chain.parents[0].name, "snapshot-1");

    // The child resumes in a third jail that sees its parent read-only.
    let s3 = spawn_ro(&j, &root, name, None, netns, vec![snap.clone()]).await;
    restore_until_past(&s3, snap2, net.clone(), before2.round, "resuming the chain").await;
    let parent_write = probe(
        &s3.worker,
        &format!("write:{}", snap.join("probe.txt").display()),
    )
    .await
    .unwrap();
    assert!(
        parent_write.contains("Read-only file system"),
        "the parent layer is writable in the jail: {parent_write}"
    );
    let own_write = probe(
        &s3.worker,
        &format!("write:{}", s3.dir.join("probe.txt").display()),
    )
    .await
    .unwrap();
    assert!(own_write.starts_with("ok"), "{own_write}");
    let r = s3.worker.request(Request::Shutdown, T).await.unwrap();
    assert!(matches!(r, Reply::ShuttingDown), "{r:?}");
    s3.worker.wait_exit().await;
    common::wait_for(T, "the uids to be freed", || j.uids().in_use() == 0);
    finish(&root);
}

/// Cgroups left by a server that died (`kill -9`) are removed by the next
/// one: their names start with the dead server's pid.
#[test]
fn stale_cgroups_of_a_dead_server_are_swept() {
    let root = common::scratch("jail-sweep");
    if jailer("stale_cgroups_of_a_dead_server_are_swept", &root, 915_000).is_none() {
        return;
    }
    let layout = stasis::jail::cgroup::Layout::detect().unwrap();
    // No pid is this large (pid_max is at most 2^22).
    let cg = layout
        .create(
            "4000000000-jailtest-stale",
            stasis::jail::cgroup::Limits {
                memory: 64 << 20,
                cpus: 1,
                pids: 16,
            },
        )
        .unwrap();
    assert!(cg.dirs().iter().all(|d| d.is_dir()));
    assert!(layout.sweep_stale() >= 1);
    assert!(cg.dirs().iter().all(|d| !d.exists()));
    finish(&root);
}
