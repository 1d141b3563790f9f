//! SDK fidelity (issue 15) through the real `novita-sandbox` SDK against
//! `stasis serve --backend fake` (no KVM needed): runs
//! `tests/sdk_fidelity/run.sh`, which makes the shared SDK virtualenv on
//! first use.
//! - `test_files.py`: agent behaviours as E2B's envd (remove of a missing
//!   path, entry fields, gzip both ways, malformed gzip);
//! - `test_signed_urls.py`: signed file URLs (valid, expired, tampered,
//!   missing) in both addressing forms;
//! - `test_proxy.py`: header case/order and hop-by-hop fields through the
//!   proxy, a WebSocket echo server in the sandbox reached through it;
//! - `test_routes.py`: every route of the SDK's API client is served or 501;
//! - `test_metrics_logs.py`: `get_metrics()` after CPU load, the
//!   multi-sandbox metrics route, logs with paging;
//! - `test_js.py`: the JS SDK under node (signed URLs, getMetrics); needs
//!   Debian's `nodejs` and `npm` (fails loudly without them);
//! - `test_confinement.py`: the fake agent runs confined by bwrap as `user`
//!   and sees nothing of the host.

use std::path::Path;
use std::process::Command;

fn run_fidelity(test_file: &str) {
    let agent = Path::new(env!("CARGO_BIN_EXE_stasis")).with_file_name("stasis-envd");
    assert!(
        agent.is_file(),
        "the agent binary {} is missing (cargo build --release --bin stasis-envd)",
        agent.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_fidelity/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(test_file)
        .env("STASIS_BIN", env!("CARGO_BIN_EXE_stasis"))
        .output()
        .expect("run tests/sdk_fidelity/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "SDK fidelity tests {test_file} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(" passed"), "pytest ran no tests:\n{stdout}");
    assert!(
        !stdout.contains(" skipped"),
        "some SDK fidelity tests were skipped:\n{stdout}"
    );
}

#[test]
fn sdk_agent_behaves_as_envd() {
    run_fidelity("test_files.py");
}

#[test]
fn sdk_signed_file_urls() {
    run_fidelity("test_signed_urls.py");
}

#[test]
fn sdk_proxy_keeps_headers_and_proxies_websockets() {
    run_fidelity("test_proxy.py");
}

#[test]
fn sdk_routes_are_served_or_501() {
    run_fidelity("test_routes.py");
}

#[test]
fn sdk_metrics_and_logs() {
    run_fidelity("test_metrics_logs.py");
}

#[test]
fn js_sdk_signed_urls_and_metrics() {
    run_fidelity("test_js.py");
}

#[test]
fn fake_agent_is_confined() {
    run_fidelity("test_confinement.py");
}
