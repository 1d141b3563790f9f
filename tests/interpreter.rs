//! The code-interpreter server (`rootfs/interpreter/stasis_interpreter.py`,
//! the service on port 49999 behind the SDK's `run_code`) on the host,
//! driven by the real `novita-sandbox` SDK's code-interpreter client
//! (tests/interpreter, pytest): results and rich outputs, streams, errors,
//! contexts (python and bash), env vars, timeouts that interrupt the kernel,
//! client disconnects, a crashing kernel, 20 MiB of stdout, bad input.
//! Then (tests/interpreter/sdk) the seed's persistence flow written with
//! `run_code`, through the real Python and JS SDKs against `stasis serve
//! --backend fake --domain sandbox.test --tls-listen ...`: the SDKs reach
//! the interpreter at `https://49999-{id}.sandbox.test` exactly as a
//! self-hosted user's code does (only DNS is stood in for). Last, the SDK's
//! own shipped code-interpreter test suite (charts, images, display data,
//! contexts, streaming, ...) against the server, with the tests that cannot
//! apply to a host-run server deselected by an explicit, printed list
//! (tests/interpreter/sdk_suite.py). No KVM needed.
//! The venv and the JS SDK come from PyPI and npm (tests/interpreter/run.sh).

use std::process::Command;

#[test]
fn sdk_run_code_against_the_interpreter_server() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interpreter/run.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("STASIS_BIN", env!("CARGO_BIN_EXE_stasis"))
        .output()
        .expect("run tests/interpreter/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the code-interpreter SDK tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(" passed") && !stdout.contains(" skipped"),
        "pytest ran no test or skipped some:\n{stdout}"
    );
}
