//! The deployment files in `deploy/` (issue 16, item 6), validated offline:
//! `deploy/validate.sh` parses the Nomad job with python-hcl2 and validates
//! the Kubernetes objects against the OpenAPI schemas bundled in
//! kubernetes-validate (strict), then checks what a pool needs (system job
//! / DaemonSet, KVM constraint / node selector, health checks, drain
//! timeouts, secrets). This test runs it, checks that every flag the files
//! pass to `stasis serve` is one `stasis serve --help` lists (so the files
//! don't rot), that the drain fits the scheduler's kill timeout, and that
//! the health-check path answers on a real `stasis serve` (with a static
//! pool on a throwaway PostgreSQL) without the API key. Neither Nomad nor Kubernetes runs here (neither is installable
//! offline): this proves the files are well-formed and consistent with the
//! binary, not that a cluster runs them.
//!
//! Needs `python3 -m venv` and PyPI the first time (the venv is cached in
//! target/deploy-venv); without them it fails loudly, or prints a SKIPPED
//! banner under STASIS_ALLOW_SKIP=1.

mod api_support;
mod common;
#[path = "common/postgres.rs"]
mod pg;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use api_support::{http, Server, BIN};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmpdir() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).unwrap();
    tempfile::Builder::new()
        .prefix("deploy-")
        .tempdir_in(root)
        .unwrap()
}

/// Makes sure the validation venv exists; `false` (after a SKIPPED banner)
/// only under STASIS_ALLOW_SKIP=1.
fn venv_or_skip(test: &str) -> bool {
    let out = Command::new(repo().join("deploy/validate.sh"))
        .arg("--venv-only")
        .output()
        .expect("running deploy/validate.sh");
    if out.status.success() {
        return true;
    }
    let msg = format!(
        "{test}: the validation venv could not be made (python3-venv and PyPI needed): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var("STASIS_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("\n*** SKIPPED (not passed): {msg} ***\n");
        false
    } else {
        panic!("{msg}; set STASIS_ALLOW_SKIP=1 to skip explicitly");
    }
}

/// Runs deploy/validate.sh with `args`: (success, stdout, stderr).
fn validate(args: &[&Path]) -> (bool, String, String) {
    let out = Command::new(repo().join("deploy/validate.sh"))
        .args(args)
        .output()
        .expect("running deploy/validate.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The long flags `stasis serve --help` lists.
fn serve_flags() -> BTreeSet<String> {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stasis serve --help failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut flags = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[') {
        if let Some(rest) = word.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                flags.insert(format!("--{name}"));
            }
        }
    }
    flags
}

/// Flags in `used` that `serve --help` does not list.
fn unknown_flags(used: &[String], help: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .filter(|f| !help.contains(*f))
        .cloned()
        .collect()
}

#[test]
fn deploy_files_validate_and_match_the_binary() {
    if !venv_or_skip("deploy_files_validate_and_match_the_binary") {
        return;
    }
    let (ok, stdout, stderr) = validate(&[]);
    assert!(ok, "deploy/validate.sh failed:\n{stderr}");
    let summary: Value = serde_json::from_str(&stdout).expect("validate.py's JSON");
    let help = serve_flags();
    assert!(
        help.contains("--listen") && help.contains("--pool-discovery"),
        "{help:?}"
    );
    let files: Vec<&Value> = summary["nomad"]
        .as_array()
        .unwrap()
        .iter()
        .chain(summary["kubernetes"].as_array().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "{summary}");
    for f in &files {
        let name = f["file"].as_str().unwrap();
        let used: Vec<String> = f["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let unknown = unknown_flags(&used, &help);
        assert!(
            unknown.is_empty(),
            "{name} passes flags `stasis serve --help` does not have: {unknown:?}"
        );
        // The drain (pause and upload everything) must end before the
        // scheduler's SIGKILL.
        let pause: u64 = f["values"]["--shutdown-pause-secs"]
            .as_str()
            .expect("--shutdown-pause-secs is set")
            .parse()
            .unwrap();
        let kill = f["kill_timeout_s"]
            .as_u64()
            .or(f["grace_period_s"].as_u64())
            .unwrap();
        assert!(
            kill >= pause + 30,
            "{name}: kill timeout {kill}s leaves under 30s beyond --shutdown-pause-secs {pause}"
        );
        let discovery = f["values"]["--pool-discovery"].as_str().unwrap();
        assert!(
            ["nomad", "kubernetes"].contains(&discovery),
            "{name}: {discovery}"
        );
        println!(
            "{name}: {} flags checked, drain {pause}s < kill {kill}s",
            used.len()
        );
    }
    assert_eq!(summary["nomad"][0]["health_path"], "/health");
    assert_eq!(summary["nomad"][0]["driver"], "raw_exec");
    assert_eq!(
        summary["kubernetes"][0]["health_paths"],
        serde_json::json!(["/health"])
    );
    assert_eq!(summary["kubernetes"][0]["documents"], 7);
}

#[test]
fn validator_rejects_broken_files() {
    if !venv_or_skip("validator_rejects_broken_files") {
        return;
    }
    let tmp = tmpdir();
    let nomad = std::fs::read_to_string(repo().join("deploy/nomad/stasis.nomad.hcl")).unwrap();
    let k8s = std::fs::read_to_string(repo().join("deploy/kubernetes/stasis.yaml")).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "service.nomad.hcl",
            nomad.replacen("type        = \"system\"", "type = \"service\"", 1),
            "type must be \"system\"",
        ),
        (
            "docker.nomad.hcl",
            nomad.replacen("driver = \"raw_exec\"", "driver = \"docker\"", 1),
            "driver must be raw_exec or exec",
        ),
        (
            "nocheck.nomad.hcl",
            nomad.replacen("type     = \"http\"", "type     = \"tcp\"", 1),
            "no HTTP health check",
        ),
        (
            "syntax.nomad.hcl",
            nomad.replacen("job \"stasis\" {", "job \"stasis\" {{", 1),
            "not valid HCL2",
        ),
        (
            "badtype.yaml",
            k8s.replacen("containerPort: 3000", "containerPort: \"x3000\"", 1),
            "is not of type 'integer'",
        ),
        (
            "unknownfield.yaml",
            k8s.replacen("hostPath:\n", "hostPathh:\n", 1),
            "hostPathh",
        ),
        (
            "nograce.yaml",
            k8s.replacen("      terminationGracePeriodSeconds: 300\n", "", 1),
            "terminationGracePeriodSeconds missing",
        ),
        (
            "noselector.yaml",
            k8s.replacen("stasis.dev/kvm: \"true\"", "disktype: ssd", 1),
            "no KVM node selector",
        ),
        (
            "badenv.yaml",
            k8s.replacen("$(POD_IP):3000", "$(POD_ADDR):3000", 1),
            "$(POD_ADDR)",
        ),
    ];
    for (name, text, want) in cases {
        assert_ne!(
            &text,
            if name.ends_with(".hcl") { &nomad } else { &k8s },
            "{name}: the edit did not apply"
        );
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let (ok, _, stderr) = validate(&[Path::new("--only"), &p]);
        assert!(!ok, "{name} was accepted");
        assert!(
            stderr.contains(want) && stderr.contains(name),
            "{name}: expected {want:?} in:\n{stderr}"
        );
    }
    // A flag the binary does not have is caught by this test's check.
    let help = serve_flags();
    assert_eq!(
        unknown_flags(&["--listen".into(), "--no-such-flag".into()], &help),
        ["--no-such-flag"]
    );
}

#[test]
fn health_probe_answers_without_the_api_key_and_pool_flags_are_checked() {
    let test = "health_probe_answers_without_the_api_key_and_pool_flags_are_checked";
    // A pool keeps its sandboxes' ownership in PostgreSQL.
    let Some(pg) = pg::Postgres::start_or_skip(test) else {
        return;
    };
    let tmp = tmpdir();
    let key = tmp.path().join("api-key");
    std::fs::write(&key, "deploy-test-key-0123456789\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The deployment files' flags that need no cluster, with a static pool.
    let mut s = Server::start(
        &tmp.path().join("data"),
        &[
            "--api-key-file",
            key.to_str().unwrap(),
            "--shutdown-pause-secs",
            "240",
            "--pool-discovery",
            "static",
            "--pool-hosts",
            "127.0.0.1:3000,127.0.0.2:3000",
            "--pool-host-id",
            "host-a",
            "--pool-advertise",
            "127.0.0.1:3000",
            "--database",
            &pg.url,
        ],
    );
    let r = http(s.addr, "GET", "/health", &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(s.addr, "GET", "/sandboxes", &[], None);
    assert_eq!(r.status, 401, "{}", r.body);
    s.kill9();

    // A wrong pool flag stops the server at start with the reason.
    for (args, want) in [
        (&["--pool-discovery", "static"][..], "--pool-hosts"),
        (
            &["--pool-discovery", "static", "--pool-hosts", "a:0"][..],
            "port 0",
        ),
        (
            &[
                "--pool-discovery",
                "nomad",
                "--nomad-addr",
                "https://n:4646",
            ][..],
            "--nomad-ca-cert",
        ),
        (
            &[
                "--pool-discovery",
                "static",
                "--pool-hosts",
                "127.0.0.1:3000",
            ][..],
            "needs the shared PostgreSQL metadata store",
        ),
    ] {
        let e = match Server::try_start(&tmp.path().join("data2"), args) {
            Ok(mut s) => {
                s.kill9();
                panic!("{args:?} started");
            }
            Err(e) => e,
        };
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
