//! Shared by the Linux-guest tests (tests/linux_*.rs, included with
//! `#[path = "nested/support.rs"] mod support;`): running the repository's
//! build scripts and the nested-emulation harness with bounded time, the
//! direct-or-nested route decision, and loud failures for missing
//! prerequisites. Not a test target of its own.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Exit status the repository's scripts use for "a prerequisite is missing".
pub const PREREQ_EXIT: i32 = 2;
/// Exit status of tests/nested/run-l1.sh when the emulated machine (L1)
/// itself failed, not stasis: QEMU 7.2's TCG with emulated AMD-V now and then
/// freezes L1 or makes its kernel report a lockup.
pub const L1_FAULT_EXIT: i32 = 3;
/// Nested runs per test: an L1 fault gets up to two more tries, reported
/// loudly; a stasis failure gets none.
pub const L1_ATTEMPTS: usize = 3;

/// Can this host's KVM run guest ring-0 code at native speed?
///
/// Our build and CI machines are themselves VMs whose `/dev/kvm` is backed by
/// a shadow-paging hypervisor (PVM): guest ring-3 code runs natively but every
/// ring-0 instruction is emulated (~1 µs each) and some (`xsaves`,
/// `cmpxchg16b`) fail, so a Linux guest cannot boot on it and the nested
/// harness is used instead. There is no cheap, reliable probe for that, so the
/// answer is "no" unless the environment says otherwise: set
/// `STASIS_NATIVE_KVM=1` on a host with VT-x/AMD-V (bare metal or nested
/// virtualization) to boot the guest on `/dev/kvm` directly.
pub fn host_runs_ring0_natively() -> bool {
    std::env::var("STASIS_NATIVE_KVM").is_ok_and(|v| v == "1")
}

/// A nested run through tests/nested/run-l1.sh: `make` builds a fresh command
/// for each attempt. An attempt that ends in an L1 fault (exit status 3) is
/// reported with a banner and retried, up to L1_ATTEMPTS in all; the last run
/// is returned with the reasons for the earlier faults. Callers treat a last
/// run that is still an L1 fault as a failure (stasis was not shown to work).
pub fn run_nested(
    test: &str,
    limit: Duration,
    mut make: impl FnMut() -> Command,
) -> (Run, Vec<String>) {
    let mut faults = Vec::new();
    loop {
        let run = run_bounded(make(), limit);
        if run.status.and_then(|s| s.code()) != Some(L1_FAULT_EXIT)
            || faults.len() + 1 >= L1_ATTEMPTS
        {
            return (run, faults);
        }
        let why = l1_fault_reason(&run);
        let bar = "#".repeat(78);
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\n# {test}: nested attempt {} of {L1_ATTEMPTS} hit an L1 FAULT (the emulated\n\
             # machine failed, not stasis): {why}\n# Not a stasis result: running the whole nested run again.\n{bar}\n",
            faults.len() + 1
        );
        faults.push(why);
    }
}

/// The reason run-l1.sh gave for an L1 fault.
pub fn l1_fault_reason(run: &Run) -> String {
    run.output
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix("run-l1: L1 FAULT: "))
        .unwrap_or("no reason given")
        .to_owned()
}

/// A prerequisite the test cannot provide itself.
pub struct Prereq(pub String);

pub fn prerequisite_missing(test: &str, reason: &str) {
    if std::env::var("STASIS_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        let bar = "#".repeat(78);
        // Bypasses the harness's output capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\n# {test}: SKIPPED (not passed): {reason}\n\
             # (STASIS_ALLOW_SKIP=1 is set; unset it to make this a failure)\n{bar}\n"
        );
        return;
    }
    panic!(
        "\n{test}: PREREQUISITE MISSING: {reason}\n\
         The test cannot run, so it fails. Install what is missing, or set \
         STASIS_ALLOW_SKIP=1 to report a loud skip instead.\n"
    );
}

/// Runs one of the repository's build scripts; returns the path it prints last.
/// Exit status 2 means a missing prerequisite; any other failure panics.
pub fn build_artifact(script: &str, limit: Duration) -> Result<(PathBuf, Duration), Prereq> {
    build_artifact_with(script, &[], limit)
}

/// build_artifact with arguments for the script.
pub fn build_artifact_with(
    script: &str,
    args: &[&Path],
    limit: Duration,
) -> Result<(PathBuf, Duration), Prereq> {
    let mut cmd = Command::new(repo().join(script));
    cmd.args(args);
    let run = run_bounded(cmd, limit);
    let code = run.status.and_then(|s| s.code());
    if code == Some(PREREQ_EXIT) {
        return Err(Prereq(format!("{script}: {}", tail(&run.output, 10))));
    }
    if run.timed_out || code != Some(0) {
        panic!(
            "{script} failed ({}{}):\n{}",
            describe(run.status),
            if run.timed_out { ", timed out" } else { "" },
            tail(&run.output, 60)
        );
    }
    let artifact = run
        .stdout_last_line
        .as_deref()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{script} succeeded but its last stdout line is not a file:\n{}",
                run.output
            )
        });
    Ok((artifact, run.elapsed))
}

pub struct Run {
    /// None when the process was killed by a signal or could not be waited for.
    pub status: Option<ExitStatus>,
    /// stdout and stderr interleaved as written.
    pub output: String,
    /// The last non-empty line the process wrote to stdout.
    pub stdout_last_line: Option<String>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Runs `cmd` in its own process group with stdin closed, collecting stdout and
/// stderr. After `limit` the whole group (scripts, QEMU, stasis) is killed.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Run {
    /// How long to wait for output and exit status after killing the group.
    const GRACE: Duration = Duration::from_secs(30);

    let start = Instant::now();
    let (out_r, out_w) = std::io::pipe().expect("creating a pipe for stdout");
    let (err_r, err_w) = std::io::pipe().expect("creating a pipe for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out_w)
        .stderr(err_w)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    // Our copies of the write ends must go, or the readers never see EOF.
    drop(cmd);
    let pid = child.id();

    // Each reader forwards chunks as they arrive; the channel closes when both
    // pipes reach EOF. A waiter thread reports the exit status.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (is_stdout, mut r) in [
        (true, Box::new(out_r) as Box<dyn Read + Send>),
        (false, Box::new(err_r)),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                if tx.send((is_stdout, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let (wtx, wrx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = wtx.send(child.wait());
    });

    let mut deadline = start + limit;
    let mut killed = false;
    let mut output = Vec::new();
    let mut stdout = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((is_stdout, chunk)) => {
                // Live progress with --nocapture; shown on failure otherwise.
                eprint!("{}", String::from_utf8_lossy(&chunk));
                if is_stdout {
                    stdout.extend_from_slice(&chunk);
                }
                output.extend_from_slice(&chunk);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            // Something outside the group still holds the pipes: give up on them.
            Err(mpsc::RecvTimeoutError::Timeout) if killed => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_group(pid);
                killed = true;
                deadline = Instant::now() + GRACE;
            }
        }
    }
    let status = match wrx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(r) => r.ok(),
        Err(_) => {
            // Outputs closed but the process lives on past its limit.
            if !killed {
                kill_group(pid);
                killed = true;
            }
            wrx.recv_timeout(GRACE).ok().and_then(|r| r.ok())
        }
    };
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    Run {
        status: status.filter(|s| s.code().is_some()),
        output: String::from_utf8_lossy(&output).into_owned(),
        stdout_last_line: stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned()),
        timed_out: killed,
        elapsed: start.elapsed(),
    }
}

pub fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created
    // with process_group(0); it touches no memory of ours.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

pub fn describe(status: Option<ExitStatus>) -> String {
    match status.and_then(|s| s.code()) {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_owned(),
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
