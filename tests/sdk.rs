//! The seed's flows through the real `novita-sandbox` Python SDK (from
//! PyPI) against `stasis serve` with real KVM guests: runs
//! `tests/sdk/run.sh`, which makes its virtualenv on first use.

mod common;

use std::process::Command;

#[test]
fn novita_sandbox_sdk_runs_the_seed_flows() {
    if !common::kvm_or_skip("novita_sandbox_sdk_runs_the_seed_flows") {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("STASIS_BIN", env!("CARGO_BIN_EXE_stasis"))
        .output()
        .expect("run tests/sdk/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "SDK tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(" passed"), "pytest ran no tests:\n{stdout}");
    assert!(
        !stdout.contains(" skipped"),
        "some SDK tests were skipped:\n{stdout}"
    );
}
