//! Flows through the real `novita-sandbox` Python SDK (from PyPI) against
//! `stasis serve`: runs `tests/sdk/run.sh`, which makes its virtualenv on
//! first use.
//! - the seed's lifecycle flows (`test_seed.py`) with real KVM guests;
//! - commands and files (`test_agent.py`) routed to the fake backend's host
//!   agent (`stasis-envd --uds`, built next to the stasis binary), before and
//!   after a pause; no KVM needed;
//! - the venv is made once when runs start in parallel (`run.sh`'s lock).

mod common;

use std::path::Path;
use std::process::Command;

fn run_sdk(test_file: &str, env: &[(&str, &str)]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(test_file)
        .env("STASIS_BIN", env!("CARGO_BIN_EXE_stasis"))
        .envs(env.iter().copied())
        .output()
        .expect("run tests/sdk/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "SDK tests {test_file} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(" passed"), "pytest ran no tests:\n{stdout}");
    assert!(
        !stdout.contains(" skipped"),
        "some SDK tests were skipped:\n{stdout}"
    );
}

#[test]
fn novita_sandbox_sdk_runs_the_seed_flows() {
    if !common::kvm_or_skip("novita_sandbox_sdk_runs_the_seed_flows") {
        return;
    }
    run_sdk("test_seed.py", &[]);
}

#[test]
fn novita_sandbox_sdk_commands_and_files_through_the_host_agent() {
    let agent = Path::new(env!("CARGO_BIN_EXE_stasis")).with_file_name("stasis-envd");
    assert!(
        agent.is_file(),
        "the agent binary {} is missing (it is built with the crate: cargo build --release --bin stasis-envd)",
        agent.display()
    );
    run_sdk("test_agent.py", &[("STASIS_BACKEND", "fake")]);
}

/// The SDK venv is made once even when several runs start together (as
/// `tests/sdk.rs` and `tests/envd_sdk.rs` do when cargo runs test binaries
/// in parallel): `run.sh` holds a lock around its check-and-create. Checked
/// hermetically with a stand-in `python3` whose venv becomes usable only
/// once its `pip install` ran, and which logs every venv it makes.
#[test]
fn sdk_venv_is_created_once_by_parallel_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let shims = tmp.path().join("shims");
    std::fs::create_dir_all(&shims).unwrap();
    let log = tmp.path().join("venvs.log");
    let python = r#"#!/bin/bash
# Stand-in for `python3 -m venv --clear DIR` (all run.sh asks of it).
[ "$1 $2 $3" = "-m venv --clear" ] || { echo "unexpected: $*" >&2; exit 2; }
d=$4
rm -rf "$d"; mkdir -p "$d/bin"
echo "venv $d" >>"$SHIM_LOG"
printf '#!/bin/bash\n[ -f "%s/ready" ]\n' "$d" >"$d/bin/python"
# pip takes a while (a download), widening the window for a second creator.
printf '#!/bin/bash\nsleep 0.3\ntouch "%s/ready"\n' "$d" >"$d/bin/pip"
chmod +x "$d/bin/python" "$d/bin/pip"
"#;
    let shim = shims.join("python3");
    std::fs::write(&shim, python).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let venv = tmp.path().join("venv");
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/run.sh");
    let runs: Vec<_> = (0..4)
        .map(|_| {
            Command::new("bash")
                .arg(script)
                .arg("--venv-only")
                .env("PATH", &path)
                .env("STASIS_SDK_VENV", &venv)
                .env("SHIM_LOG", &log)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in runs {
        let out = r.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), venv.to_str().unwrap());
    }
    let made = std::fs::read_to_string(&log).unwrap();
    assert_eq!(made.lines().count(), 1, "venvs made:\n{made}");
}
