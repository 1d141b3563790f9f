//! The lifecycle API fuzzed from its own `/openapi.json` with schemathesis
//! (issue 14, item 8): `tests/fuzz/run.sh` starts `stasis serve --backend
//! fake`, runs a bounded number of examples per operation (default 60, with
//! a fixed, printed seed) with the `not_a_server_error` check, and fails on
//! any 5xx or a panic in the server's log. The venv (target/fuzz-venv) is
//! made on first use from PyPI. No KVM needed.

use std::process::Command;

#[test]
fn schemathesis_finds_no_server_error_and_no_panic() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("STASIS_BIN", env!("CARGO_BIN_EXE_stasis"))
        .output()
        .expect("run tests/fuzz/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the API fuzzer failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // It ran: schemathesis reports the operations it tested.
    assert!(
        stdout.contains("passed") || stdout.contains("Passed"),
        "schemathesis reported nothing passed:\n{stdout}"
    );
}
