//! JSON shapes of the lifecycle API (keys as the novita-sandbox / E2B SDK
//! models spell them), plus the small helpers they need: RFC 3339 time,
//! id validation, percent-decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// envd version reported for sandboxes without an agent (the built-in test
/// guest). The SDK refuses < 0.1.0 and gates newer features (recursive watch
/// 0.1.4, metrics 0.1.5, ...) on higher versions, so they claim the minimum.
pub const ENVD_VERSION: &str = "0.1.0";
/// envd version of sandboxes whose guest runs the stasis agent.
pub const AGENT_ENVD_VERSION: &str = crate::envd::VERSION;
/// `clientID` we report (E2B's field; meaningless here).
pub const CLIENT_ID: &str = "stasis";

/// Body of `POST /sandboxes` (SDK model `NewSandbox`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    pub timeout: Option<i64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub auto_pause: Option<bool>,
    pub auto_resume: Option<AutoResume>,
    pub lifecycle: Option<LifecycleIn>,
    pub secure: Option<bool>,
    #[serde(alias = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    pub volume_mounts: Option<Vec<serde_json::Value>>,
    pub mcp: Option<serde_json::Value>,
    /// SDK model `SandboxNetworkConfig`.
    pub network: Option<NetworkIn>,
    /// Sent at the top level by some SDK calls instead of in `network`.
    pub allow_public_traffic: Option<bool>,
}

/// SDK model `SandboxNetworkConfig` (create).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkIn {
    pub allow_out: Option<Vec<String>>,
    pub deny_out: Option<Vec<String>>,
    pub allow_public_traffic: Option<bool>,
    pub mask_request_host: Option<String>,
}

/// Body of `PUT /sandboxes/{id}/network` (what `Sandbox.set_network` sends).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdate {
    pub allow_out: Option<Vec<String>>,
    pub deny_out: Option<Vec<String>>,
}

/// A sandbox's network in `GET /sandboxes/{id}` (SDK `network`, plus the
/// guest's address when it has a network device).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkOut {
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    pub allow_public_traffic: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// The guest's IPv4 address, gateway and prefix (`10.11.0.10/30`),
    /// when it has a network device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct AutoResume {
    pub enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleIn {
    pub on_timeout: Option<String>,
    pub auto_resume: Option<bool>,
}

/// Body of `POST /sandboxes/{id}/connect` (SDK model `ConnectSandbox`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectBody {
    pub timeout: Option<i64>,
}

/// Body of `POST /sandboxes/{id}/pause` (the SDK's `beta_pause(sync=...)`
/// sends `{"sync": bool}`; its generated client sends no body). Without
/// `sync` the pause is synchronous: it answers once the snapshot is durable.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseBody {
    pub sync: Option<bool>,
}

/// Body of `POST /sandboxes/{id}/resume` (SDK model `ResumedSandbox`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeBody {
    pub timeout: Option<i64>,
    pub auto_pause: Option<bool>,
}

/// Body of `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Default, Deserialize)]
pub struct TimeoutBody {
    pub timeout: Option<i64>,
}

/// SDK model `Sandbox`: answer of create / connect / resume.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxOut {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(rename = "envdVersion")]
    pub envd_version: &'static str,
    /// Token the SDK then sends as `X-Access-Token` with every envd request
    /// (secured agent sandboxes only).
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Always present; null means "the SDK's configured domain".
    pub domain: Option<String>,
    /// Sandboxes created with `allowPublicTraffic: false`: the token their
    /// user ports need (header `e2b-traffic-access-token`).
    #[serde(rename = "trafficAccessToken", skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
}

/// SDK model `ListedSandbox`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedOut {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub started_at: String,
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: &'static str,
    pub envd_version: &'static str,
    pub metadata: BTreeMap<String, String>,
}

/// SDK model `SandboxDetail`, plus our own `stasis` block (ignored by SDKs).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DetailOut {
    #[serde(flatten)]
    pub listed: ListedOut,
    pub domain: Option<String>,
    pub allow_internet_access: bool,
    pub lifecycle: LifecycleOut,
    pub stasis: StasisOut,
    pub network: NetworkOut,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleOut {
    pub on_timeout: &'static str,
    pub auto_resume: bool,
}

/// Engine-specific facts about a sandbox.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StasisOut {
    /// Progress of the test guest, read from the guest itself: from the
    /// running VM, or while paused from its snapshot (the status page in the
    /// saved memory the guest resumes with), never from a stored value.
    pub guest_round: Option<u64>,
    /// The round the worker read from the stopped guest when it paused it
    /// (stored with the sandbox); while paused, `guestRound` must equal it.
    pub paused_at_round: Option<u64>,
    /// Pid of the worker process running the VM, while running.
    pub worker_pid: Option<u32>,
    /// When the sandbox was first created (retention counts from here).
    pub created_at: String,
    /// While paused: bytes the current snapshot's files take on disk
    /// (allocated blocks, `st_blocks` × 512; holes in the sparse memory file
    /// cost nothing), its parent layers included (an incremental pause's
    /// chain; what `--max-snapshot-bytes` counts).
    pub snapshot_bytes: Option<u64>,
    /// While paused: the apparent size of the snapshot's files (sum of
    /// their lengths; the memory file counts as the guest's whole RAM).
    pub snapshot_apparent_bytes: Option<u64>,
    /// Whether an operation (pause/resume) is in progress.
    pub busy: Option<&'static str>,
    /// While running (VM backend): what backs guest memory (`hugetlb`,
    /// `thp` or `4k`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<crate::vmm::memory::MemoryBacking>,
    /// While paused: whether its snapshot is durable on disk yet (`false`
    /// while an asynchronous pause (`{"sync": false}`) still writes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_durable: Option<bool>,
    /// Agent templates: `ready`, `unreachable: <why>` (it does not answer
    /// `GET /health`), `paused`, or the operation in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// With `--snapshot-store`: the upload of the current snapshot to the
    /// bucket (state, chunk counters, attempts, last error, this host's
    /// backlog).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_upload: Option<crate::snapshot::remote::UploadStatusOut>,
    /// The template snapshot this sandbox was created from (warm
    /// templates); absent for a cold boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_snapshot: Option<String>,
    /// In a pool of hosts: the host that holds the sandbox (answered this
    /// call, perhaps forwarded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Memory layers of the last pause's snapshot: 1 for a full snapshot,
    /// 1 + its parents for an incremental one (VM backend; absent before
    /// the first pause).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_layers: Option<usize>,
    /// Bytes the last pause wrote: its own layer's files on disk
    /// (allocated blocks; parents not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pause_bytes: Option<u64>,
    /// Bytes of guest memory pages the last pause's layer stores (the
    /// snapshot's own accounting, `state.bin`; VM backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pause_memory_bytes: Option<u64>,
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC
/// (`2024-01-02T03:04:05.678Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Sandbox ids and template names: 1–64 of `[A-Za-z0-9_-]` (and `.` inside,
/// for template names), so they can never name another path.
pub fn valid_name(s: &str, allow_dot: bool) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (allow_dot && b == b'.')
        })
}

/// A new random sandbox id: 20 characters of `[a-z0-9]`.
pub fn new_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Percent-decodes `s` (and `+` as space when `plus` is set). Invalid escapes
/// are kept literally; invalid UTF-8 is an error.
pub fn percent_decode(s: &str, plus: bool) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not valid UTF-8 once decoded"))
}

/// Splits a query string into decoded `(key, value)` pairs.
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// Most entries of a sandbox's `metadata`.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Most bytes of a sandbox's `metadata`, keys and values together.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Most entries of a sandbox's `envVars`.
pub const MAX_ENV_VARS_ENTRIES: usize = 1024;
/// Most bytes of a sandbox's `envVars`, names and values together.
pub const MAX_ENV_VARS_BYTES: usize = 128 * 1024;

/// Checks `metadata` and `envVars` of a new sandbox against the caps above
/// (the message says which field and limit; the API answers 400). Env var
/// names must also be non-empty and free of `=` and NUL, values free of NUL.
pub fn check_sizes(req: &NewSandbox) -> Result<(), String> {
    fn check(
        what: &str,
        map: Option<&BTreeMap<String, String>>,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<(), String> {
        let Some(map) = map else { return Ok(()) };
        if map.len() > max_entries {
            return Err(format!(
                "{what} has {} entries; at most {max_entries} are allowed",
                map.len()
            ));
        }
        let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > max_bytes {
            return Err(format!(
                "{what} takes {bytes} bytes; at most {max_bytes} are allowed"
            ));
        }
        Ok(())
    }
    check(
        "metadata",
        req.metadata.as_ref(),
        MAX_METADATA_ENTRIES,
        MAX_METADATA_BYTES,
    )?;
    check(
        "envVars",
        req.env_vars.as_ref(),
        MAX_ENV_VARS_ENTRIES,
        MAX_ENV_VARS_BYTES,
    )?;
    for (k, v) in req.env_vars.iter().flatten() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("envVars: invalid variable name {k:?}"));
        }
        if v.contains('\0') {
            return Err(format!("envVars: the value of {k:?} contains a NUL byte"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn names() {
        assert!(valid_name("abc-DEF_09", false));
        for bad in ["", "..", "a/b", "a.b", "%2e", &"x".repeat(65)] {
            assert!(!valid_name(bad, false), "{bad}");
        }
        assert!(valid_name("code-interpreter-v1.2", true));
        assert!(!valid_name("../x", true));
        assert!(!valid_name(".hidden", true));
        let id = new_id();
        assert_eq!(id.len(), 20);
        assert!(valid_name(&id, false));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c", true).unwrap(), "a b c");
        assert_eq!(percent_decode("a%2", false).unwrap(), "a%2");
        assert_eq!(percent_decode("%zz%41", false).unwrap(), "%zzA");
        assert_eq!(percent_decode("%41", false).unwrap(), "A");
        assert!(percent_decode("%ff", false).is_err());
        assert_eq!(
            parse_query("state=running,paused&metadata=a%253Db&x").unwrap(),
            vec![
                ("state".into(), "running,paused".into()),
                ("metadata".into(), "a%3Db".into()),
                ("x".into(), "".into())
            ]
        );
    }
}
