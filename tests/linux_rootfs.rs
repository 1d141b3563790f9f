//! The sandbox root filesystem (`rootfs/build-rootfs.sh`) boots with our
//! kernel (`kernel/build.sh`) as the root of a virtio-mmio disk: its init
//! mounts what a sandbox needs, starts the agent and restarts it when it
//! exits, and the image has the users, owners, modes and free space a sandbox
//! expects. The agent here is `tests/nested/standin-agent.sh`, which exits
//! once and then checks the image from inside.
//!
//! The same for the richer template (`--python`): Debian's python3, with its
//! standard library, and bash run as the user.
//!
//! The VMM is QEMU's `microvm` machine under TCG (pure emulation): this test
//! is about the image and the kernel, independent of stasis's devices and of
//! the host's KVM, and takes seconds. The sandboxes of `stasis serve` boot the
//! same image (tests/linux_sdk.rs).
//!
//! A missing prerequisite (QEMU, the kernel's build tools) fails the test
//! unless `STASIS_ALLOW_SKIP=1`.

#[path = "nested/support.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{
    build_artifact, build_artifact_with, describe, on_path, prerequisite_missing, repo,
    run_bounded, Prereq,
};

const TEST: &str = "linux_rootfs";
const KERNEL_BUILD_LIMIT: Duration = Duration::from_secs(60 * 60);
const ROOTFS_BUILD_LIMIT: Duration = Duration::from_secs(5 * 60);
/// The boot takes about 5 s of emulation.
const BOOT_LIMIT: Duration = Duration::from_secs(3 * 60);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4";

#[test]
fn rootfs_boots_runs_and_restarts_its_agent() {
    boot_and_check(false);
}

/// The richer template: Debian's python3 and bash on top.
#[test]
fn python_rootfs_runs_python_and_bash() {
    boot_and_check(true);
}

fn boot_and_check(python: bool) {
    if !on_path("qemu-system-x86_64") {
        return prerequisite_missing(
            TEST,
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
        );
    }
    let standin = repo().join("tests/nested/standin-agent.sh");
    let built = build_artifact("kernel/build.sh", KERNEL_BUILD_LIMIT).and_then(|(k, _)| {
        let args: &[&Path] = if python {
            &[Path::new("--python"), &standin]
        } else {
            &[&standin]
        };
        build_artifact_with("rootfs/build-rootfs.sh", args, ROOTFS_BUILD_LIMIT).map(|(r, _)| (k, r))
    });
    let (vmlinux, rootfs) = match built {
        Ok(v) => v,
        Err(Prereq(reason)) => return prerequisite_missing(TEST, &reason),
    };

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
        .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&vmlinux)
        .args(["-append", CMDLINE])
        // snapshot=on: the guest's writes stay in QEMU, the cached image is untouched.
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"]);
    let run = run_bounded(qemu, BOOT_LIMIT);
    let out = run.output.replace('\r', "");
    let fail = |why: &str| -> ! {
        panic!(
            "\n==== {TEST} FAILED: {why} ====\nkernel: {}\nrootfs: {}\n---- console ----\n{out}\n\
             ---- end of console ----\n",
            vmlinux.display(),
            rootfs.display()
        )
    };
    if run.timed_out || !run.status.is_some_and(|s| s.success()) {
        fail(&format!(
            "QEMU did not end cleanly ({}{}); the guest should reset after its checks",
            describe(run.status),
            if run.timed_out { ", timed out" } else { "" }
        ));
    }
    let line = |prefix: &str| out.lines().find(|l| l.starts_with(prefix));
    let field = |l: &str, key: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
            .map(str::to_owned)
    };

    let Some(init) = line("STASIS-ROOTFS-INIT-OK") else {
        fail("the init never printed STASIS-ROOTFS-INIT-OK");
    };
    if !init.contains("root=/dev/root,ext4,rw") || !init.contains("agent=present") {
        fail(&format!(
            "the root is not the ext4 disk, read-write, with the agent: {init}"
        ));
    }
    if line("STANDIN start 1 args=--vsock").is_none() {
        fail("the init did not start the agent as `stasis-envd --vsock`");
    }
    if !out.contains("stasis-init: agent exited with status 3") {
        fail("the init did not report the agent's exit");
    }
    let Some(checks) = line("STANDIN checks ") else {
        fail("the init did not restart the agent after it exited");
    };
    let expect = [
        ("uid", "0"),
        ("args", "--vsock"),
        ("user", "1000:1000:/home/user"),
        ("home", "1000:1000"),
        ("tmp", "1777"),
        ("root", "700"),
        ("pts", "1"),
        ("shm", "1"),
        ("lo", "1"),
        ("host", "stasis"),
        ("write", "ok"),
    ];
    for (key, want) in expect {
        if field(checks, key).as_deref() != Some(want) {
            fail(&format!("{key} should be {want}: {checks}"));
        }
    }
    let free_kib: u64 = field(checks, "free_kib")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fail(&format!("no free_kib: {checks}")));
    if free_kib < 400 * 1024 {
        fail(&format!(
            "only {free_kib} KiB free in the root filesystem; want some 500 MiB"
        ));
    }
    let Some(user) = line("STANDIN user ") else {
        fail("`su user` did not run");
    };
    for (key, want) in [
        ("uid", "1000"),
        ("home", "/home/user"),
        ("write", "ok"),
        ("bash", "ok"),
    ] {
        if field(user, key).as_deref() != Some(want) {
            fail(&format!("as user, {key} should be {want}: {user}"));
        }
    }
    let Some(py) = line("STANDIN python ") else {
        fail("the python check did not run");
    };
    let (want_py, want_bash) = if python { ("45", "5") } else { ("", "none") };
    if python && field(py, "py").as_deref() != Some(want_py) {
        fail(&format!("python3 should print {want_py} as the user: {py}"));
    }
    if field(py, "bashv").as_deref() != Some(want_bash) {
        fail(&format!("bash's major version should be {want_bash}: {py}"));
    }
    let _ = writeln!(
        std::io::stderr(),
        "{TEST}: PASSED ({}) in {:.1}s: {init} | {checks} | {py}",
        if python { "--python" } else { "busybox" },
        run.elapsed.as_secs_f64()
    );
}
