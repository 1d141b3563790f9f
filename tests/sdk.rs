//! Flows through the real `novita-sandbox` Python SDK (from PyPI) against
//! `stasis serve`: runs `tests/sdk/run.sh`, which makes its virtualenv on
//! first use.
//! - the seed's lifecycle flows (`test_seed.py`) with real KVM guests;
//! - commands and files (`test_agent.py`) routed to the fake backend's host
//!   agent (`stasis-envd --uds`, built next to the stasis binary), before and
//!   after a pause; no KVM needed.

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
