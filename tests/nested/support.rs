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
/// itself failed, not stasis: QEMU crashed, or L1 failed before it launched
/// stasis (see [`classify_l1_run`]).
pub const L1_FAULT_EXIT: i32 = 3;
/// Printed by L1's init (tests/nested/run-l1.sh) at the start of a line, just
/// before it launches stasis (or the scenario that runs it). Absent from a
/// failed run: L1 failed before stasis existed in it.
pub const L1_LAUNCH_MARKER: &str = "STASIS-L1-LAUNCH";
/// Nested retries allowed in one run of the whole suite (all test binaries of
/// one `cargo test`): a second L1 fault fails the run instead of retrying.
pub const SUITE_RETRY_BUDGET: usize = 1;
/// Environment variable naming the suite run whose retries are counted
/// together (default: the `cargo test` process that started this binary).
pub const SUITE_RUN_ENV: &str = "STASIS_SUITE_RUN_ID";

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

/// What a finished nested run (the output of tests/nested/run-l1.sh) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L1Verdict {
    /// run-l1.sh exited 0.
    Passed,
    /// A missing prerequisite (exit status 2).
    Prereq,
    /// The run failed with evidence that cannot come from stasis: retryable.
    L1Fault(String),
    /// The run failed and nothing outside stasis explains it: never retried,
    /// whatever else L1 reported (a soft lockup, an RCU stall or a silent
    /// heartbeat in L1 is what a guest spinning under a stasis bug causes).
    Failed(String),
}

/// Judges a nested run from its output alone (pure, so that it can be tested
/// on recorded text). Only two kinds of evidence make a failure an L1 fault:
/// - L1's init never printed [`L1_LAUNCH_MARKER`]: L1 (its kernel, its init,
///   the KVM modules) failed before stasis was started in it;
/// - QEMU itself ended abnormally: its exit status (`run-l1: qemu exit: N`)
///   is neither 0 nor one the harness caused by stopping it (`run-l1: qemu
///   stopped by the harness: yes` for the hard timeout, the heartbeat
///   watchdog and the end of the serve scenario): e.g. an abort or a crash
///   of QEMU, which no guest code can cause short of a QEMU bug.
///
/// Everything else (including the L1 kernel's lockup and stall reports, L1
/// going quiet, or timeouts) is a stasis failure.
pub fn classify_l1_run(status: Option<i32>, timed_out: bool, output: &str) -> L1Verdict {
    if status == Some(0) && !timed_out {
        return L1Verdict::Passed;
    }
    if status == Some(PREREQ_EXIT) && !timed_out {
        return L1Verdict::Prereq;
    }
    let lines = || output.lines().map(|l| l.trim_end_matches(['\r', '\n']));
    let launched = lines().any(|l| l.starts_with(L1_LAUNCH_MARKER));
    let summary = |key: &str| {
        lines()
            .rev()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let fail_line = lines()
        .rev()
        .find(|l| l.starts_with("run-l1: FAIL"))
        .unwrap_or("run-l1.sh gave no FAIL line")
        .to_owned();
    let Some(qemu_exit) = summary("run-l1: qemu exit: ") else {
        // run-l1.sh itself never finished (the outer limit killed it, or it
        // died before its summary): nothing outside stasis is known to have
        // failed.
        return L1Verdict::Failed(if timed_out {
            "the nested run passed its outer time limit (no run-l1.sh summary)".to_owned()
        } else {
            format!("run-l1.sh ended without its summary ({fail_line})")
        });
    };
    let qemu_code: Option<i32> = qemu_exit
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok());
    let stopped_by_harness = summary("run-l1: qemu stopped by the harness: ") != Some("no");
    if !launched {
        return L1Verdict::L1Fault(format!(
            "L1 failed before it launched stasis (no {L1_LAUNCH_MARKER} line; qemu exit: {qemu_exit})"
        ));
    }
    if !stopped_by_harness && qemu_code != Some(0) {
        return L1Verdict::L1Fault(format!(
            "QEMU itself ended abnormally after stasis started (qemu exit: {qemu_exit})"
        ));
    }
    L1Verdict::Failed(fail_line)
}

/// [`classify_l1_run`] of a [`Run`].
pub fn classify(run: &Run) -> L1Verdict {
    classify_l1_run(
        run.status.and_then(|s| s.code()),
        run.timed_out,
        &run.output,
    )
}

/// The suite-wide count of nested retries: one line per retry in a file under
/// target/nested-retries/ named after the suite run, appended with O_APPEND
/// (atomic for one short line) and counted after the append, so that two
/// tests retrying at the same time both see both retries.
pub struct RetryLedger {
    path: PathBuf,
}

impl RetryLedger {
    /// The ledger of this suite run: `$STASIS_SUITE_RUN_ID` if set, else the
    /// parent process (the `cargo test` that runs every test binary of one
    /// invocation), named by its pid and start time so that a reused pid
    /// starts afresh.
    pub fn for_this_suite() -> RetryLedger {
        let dir = repo().join("target/nested-retries");
        let key = std::env::var(SUITE_RUN_ENV)
            .ok()
            .filter(|k| !k.is_empty())
            .map(|k| {
                k.chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect::<String>()
            })
            .unwrap_or_else(|| {
                // SAFETY: getppid(2) has no arguments and cannot fail.
                let ppid = unsafe { libc::getppid() };
                format!("cargo-{ppid}-{}", process_start_ticks(ppid as u32))
            });
        // Ledgers of suite runs more than a week old are of no use.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(7 * 24 * 3600));
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        RetryLedger {
            path: dir.join(key),
        }
    }

    pub fn at(path: PathBuf) -> RetryLedger {
        RetryLedger { path }
    }

    /// Retries recorded so far in this suite run.
    pub fn count(&self) -> usize {
        std::fs::read_to_string(&self.path)
            .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }

    /// The recorded retries, one line each.
    pub fn entries(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Records one retry; returns the count including it.
    pub fn record(&self, test: &str, reason: &str) -> usize {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        let line = format!(
            "{test} (pid {}): {}\n",
            std::process::id(),
            reason.replace('\n', " ")
        );
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()));
        f.write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.path.display()));
        drop(f);
        self.count()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), or 0.
fn process_start_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name (field 2) may hold spaces: count after its ')'.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(19)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A nested run through tests/nested/run-l1.sh and how it went.
pub struct Nested {
    /// The last attempt.
    pub run: Run,
    pub verdict: L1Verdict,
    /// Why the first attempt was retried, if it was.
    pub retried: Option<String>,
    /// Retries in the whole suite run so far (this one's included).
    pub suite_retries: usize,
}

impl Nested {
    /// "suite retries: N of 1 allowed", for the tests' summaries.
    pub fn retry_note(&self) -> String {
        let mut s = format!(
            "nested retries in this suite run: {} (at most {SUITE_RETRY_BUDGET} allowed)",
            self.suite_retries
        );
        if let Some(why) = &self.retried {
            s.push_str(&format!("; this test was retried after an L1 fault: {why}"));
        }
        s
    }
}

/// A nested run through tests/nested/run-l1.sh: `make` builds a fresh command
/// for each attempt. An attempt that [`classify`] calls an L1 fault is
/// retried once, loudly, if the suite's retry budget allows: the retry is
/// recorded in the suite's [`RetryLedger`] first, and when that makes more
/// than [`SUITE_RETRY_BUDGET`] retries in this suite run the test fails
/// instead (an emulated machine that fails that often proves nothing). A
/// stasis failure is never retried. The caller judges the last attempt; one
/// whose verdict is still an L1 fault is a failure (stasis was not shown to
/// work).
pub fn run_nested(test: &str, limit: Duration, make: impl FnMut() -> Command) -> Nested {
    run_nested_with(&RetryLedger::for_this_suite(), test, limit, make)
}

/// [`run_nested`] with a given ledger (the tests of the retry rule use their own).
pub fn run_nested_with(
    ledger: &RetryLedger,
    test: &str,
    limit: Duration,
    mut make: impl FnMut() -> Command,
) -> Nested {
    let run = run_bounded(make(), limit);
    let verdict = classify(&run);
    let L1Verdict::L1Fault(why) = &verdict else {
        return Nested {
            run,
            verdict,
            retried: None,
            suite_retries: ledger.count(),
        };
    };
    let why = why.clone();
    let count = ledger.record(test, &why);
    let bar = "#".repeat(78);
    if count > SUITE_RETRY_BUDGET {
        panic!(
            "\n{bar}\n# {test}: L1 FAULT ({why}), and this suite run already needed \
             {} nested retr{} (budget {SUITE_RETRY_BUDGET}, ledger {}):\n# {}\n\
             # Not retried: FAILED. An emulated machine failing this often hides too much.\n{bar}\n\
             ---- output of the failed attempt ----\n{}\n",
            count - 1,
            if count == 2 { "y" } else { "ies" },
            ledger.path().display(),
            ledger.entries().join("\n# "),
            run.output
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n# {test}: the nested run hit an L1 FAULT (evidence from outside stasis): {why}\n\
         # Not a stasis result: running the whole nested run again (suite retry {count} of at \
         most {SUITE_RETRY_BUDGET}).\n{bar}\n"
    );
    let run = run_bounded(make(), limit);
    let verdict = classify(&run);
    Nested {
        run,
        verdict,
        retried: Some(why),
        suite_retries: ledger.count(),
    }
}

/// The common end of a nested run's first judgement: `Some(())` after a
/// missing prerequisite was reported (the test returns), a panic when the
/// last attempt is still an L1 fault (stasis was not shown to work), `None`
/// to go on and judge the run.
pub fn nested_prereq_or_fault(test: &str, what: &str, nested: &Nested) -> Option<()> {
    match &nested.verdict {
        L1Verdict::Prereq => {
            prerequisite_missing(
                test,
                &format!(
                    "tests/nested/run-l1.sh reported a missing prerequisite:\n{}",
                    tail(&nested.run.output, 20)
                ),
            );
            Some(())
        }
        L1Verdict::L1Fault(why) => panic!(
            "\n==== {what} NOT TESTED: the nested run hit an L1 fault (evidence from outside \
             stasis: {why}) {} ====\n{}\n{}\n",
            if nested.retried.is_some() {
                "again after its retry"
            } else {
                "(no retry left)"
            },
            nested.retry_note(),
            nested.run.output
        ),
        L1Verdict::Passed | L1Verdict::Failed(_) => None,
    }
}

/// The reason run-l1.sh gave for an L1 fault.
pub fn l1_fault_reason(run: &Run) -> String {
    match classify(run) {
        L1Verdict::L1Fault(why) => why,
        other => format!("{other:?}"),
    }
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

/// Single-quotes a path for `bash -c`.
pub fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The SDK virtualenv's python (target/sdk-venv, or `STASIS_SDK_VENV`),
/// made as tests/sdk/run.sh makes it (novita-sandbox `sdk_version` and
/// pytest, under the venv's lock) when `python -c import_check` fails.
pub fn sdk_python(
    import_check: &str,
    sdk_version: &str,
    limit: Duration,
) -> Result<PathBuf, Prereq> {
    let venv = std::env::var_os("STASIS_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/sdk-venv"));
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", import_check])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready() {
        return Ok(python);
    }
    let mut make = Command::new("bash");
    make.arg("-c").arg(format!(
        "exec 9>{lock}; flock 9; python3 -m venv {v} && \
         {v}/bin/pip install --quiet novita-sandbox=={sdk_version} pytest",
        v = sh_quote(&venv),
        lock = sh_quote(&venv.with_extension("lock"))
    ));
    let run = run_bounded(make, limit);
    if !run.status.is_some_and(|s| s.success()) || !ready() {
        return Err(Prereq(format!(
            "the SDK virtualenv {} could not be made (python3-venv and PyPI needed):\n{}",
            venv.display(),
            tail(&run.output, 20)
        )));
    }
    Ok(python)
}

/// Starts `stasis serve` (its stdout piped) and returns it with the URL its
/// first "listening on" line names; panics (after killing it) naming `test`
/// if that line does not come within `limit`.
pub fn spawn_serve(
    test: &str,
    mut serve: Command,
    limit: Duration,
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut server = serve
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting stasis serve");
    let (tx, rx) = mpsc::channel();
    let stdout = server.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("stasis: listening on ") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(limit) {
        Ok(url) => (server, url),
        Err(_) => {
            let _ = server.kill();
            let _ = server.wait();
            panic!("{test}: stasis serve did not say where it listens within {limit:?}");
        }
    }
}
