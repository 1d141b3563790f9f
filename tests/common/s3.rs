//! A real S3 server for tests: moto's server (from the venv that
//! tests/s3/setup.sh makes in target/s3-venv, once, under a lock) on a
//! free loopback port, with the test bucket made; killed on drop.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The bucket every test server has.
pub const BUCKET: &str = "stasis-test";

/// The moto venv (made once, under a lock).
pub fn venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("tests/s3/setup.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running tests/s3/setup.sh");
    assert!(
        out.status.success(),
        "tests/s3/setup.sh failed: the S3 test server (moto) is not available"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A moto S3 server on loopback; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> S3Server {
        let venv = venv();
        let log = dir.join(format!("moto-{port}.log"));
        let child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("starting moto_server");
        let mut s = S3Server { child, port, log };
        crate::common::wait_for(Duration::from_secs(60), "moto_server listening", || {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "moto_server exited ({st}): {}",
                    std::fs::read_to_string(s.log.with_extension("err")).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        s.create_bucket();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `PUT /bucket` (moto does not check signatures).
    pub fn create_bucket(&mut self) {
        let r = crate::api_support::http(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            "PUT",
            &format!("/{BUCKET}"),
            &[],
            None,
        );
        assert!(
            r.status == 200 || r.status == 409,
            "create bucket: {} {}",
            r.status,
            r.body
        );
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The credentials and region moto accepts (it checks no signature).
pub fn s3_env() -> [(&'static str, &'static str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// `stasis serve` flags for this server's bucket.
pub fn serve_args(s3: &S3Server) -> Vec<String> {
    vec![
        "--snapshot-store".into(),
        format!("s3://{BUCKET}"),
        "--s3-endpoint".into(),
        s3.endpoint(),
    ]
}
