//! A sandbox's network settings as the API keeps them: the SDK's controls
//! (`allowInternetAccess`, `network.allowOut` / `denyOut`,
//! `allowPublicTraffic`, `maskRequestHost`), the traffic access token and
//! the address slot. Stored as JSON with the sandbox (so a paused
//! sandbox's rules survive a restart and are applied on resume).

use serde::{Deserialize, Serialize};

use super::{EgressRules, Error, Result};

/// Name of the header carrying the traffic access token (what the SDKs
/// send; header names are case-insensitive).
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Longest `maskRequestHost`.
const MAX_MASK_LEN: usize = 255;

/// One sandbox's network settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetSpec {
    /// `allowInternetAccess` (default true).
    pub allow_internet: bool,
    /// `network.allowOut`.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// `network.denyOut`.
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// `network.allowPublicTraffic` (default true). False: user ports need
    /// [`NetSpec::traffic_token`].
    pub allow_public_traffic: bool,
    /// `network.maskRequestHost`: the proxy sets `Host` to this, with
    /// `${PORT}` replaced by the port.
    #[serde(default)]
    pub mask_request_host: Option<String>,
    /// The traffic access token (set when public traffic is not allowed).
    #[serde(default)]
    pub traffic_token: Option<String>,
    /// The address slot ([`super::Slot::index`]) of a sandbox with a
    /// network device; kept across pause so the guest keeps its address.
    #[serde(default)]
    pub slot: Option<u32>,
}

impl Default for NetSpec {
    fn default() -> Self {
        NetSpec {
            allow_internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            allow_public_traffic: true,
            mask_request_host: None,
            traffic_token: None,
            slot: None,
        }
    }
}

impl NetSpec {
    /// Builds and validates the settings of a create request. The first
    /// bad entry is the error (its message names it).
    pub fn from_request(
        allow_internet: Option<bool>,
        allow_out: Option<Vec<String>>,
        deny_out: Option<Vec<String>>,
        allow_public_traffic: Option<bool>,
        mask_request_host: Option<String>,
    ) -> Result<NetSpec> {
        let mut s = NetSpec {
            allow_internet: allow_internet.unwrap_or(true),
            allow_out: allow_out.unwrap_or_default(),
            deny_out: deny_out.unwrap_or_default(),
            allow_public_traffic: allow_public_traffic.unwrap_or(true),
            mask_request_host: mask_request_host.filter(|m| !m.is_empty()),
            ..NetSpec::default()
        };
        s.egress().validate()?;
        if let Some(m) = &s.mask_request_host {
            validate_mask(m)?;
        }
        if !s.allow_public_traffic {
            s.traffic_token = Some(new_token());
        }
        Ok(s)
    }

    /// Replaces the egress lists (`PUT /sandboxes/{id}/network`): a list
    /// that is not given is left as it was. Validated first; on error
    /// nothing changes.
    pub fn update(
        &mut self,
        allow_out: Option<Vec<String>>,
        deny_out: Option<Vec<String>>,
    ) -> Result<()> {
        let next = EgressRules {
            allow_internet: self.allow_internet,
            allow_out: allow_out.clone().unwrap_or_else(|| self.allow_out.clone()),
            deny_out: deny_out.clone().unwrap_or_else(|| self.deny_out.clone()),
        };
        next.validate()?;
        self.allow_out = next.allow_out;
        self.deny_out = next.deny_out;
        Ok(())
    }

    /// The egress rules for nftables.
    pub fn egress(&self) -> EgressRules {
        EgressRules {
            allow_internet: self.allow_internet,
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
        }
    }

    /// Whether a request to a user port with this token header may pass.
    pub fn traffic_allowed(&self, token: Option<&str>) -> bool {
        if self.allow_public_traffic {
            return true;
        }
        match (&self.traffic_token, token) {
            (Some(t), Some(given)) => crate::ct_eq(t, given),
            _ => false,
        }
    }

    /// The `Host` the proxy sends to `port`, if masked.
    pub fn masked_host(&self, port: u16) -> Option<String> {
        self.mask_request_host
            .as_ref()
            .map(|m| m.replace("${PORT}", &port.to_string()))
    }
}

/// A mask must make a valid `Host` value once `${PORT}` is replaced.
fn validate_mask(m: &str) -> Result<()> {
    let probe = m.replace("${PORT}", "8080");
    let ok = m.len() <= MAX_MASK_LEN
        && probe
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadEntry(m.to_string()))
    }
}

/// A new random traffic access token (32 hex digits).
pub fn new_token() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_request_validates_and_makes_a_token() {
        let s = NetSpec::from_request(None, None, None, None, None).unwrap();
        assert_eq!(s, NetSpec::default());
        assert!(s.traffic_allowed(None));
        let s = NetSpec::from_request(
            Some(false),
            Some(vec!["1.1.1.1".into()]),
            Some(vec!["0.0.0.0/0".into()]),
            Some(false),
            Some("${PORT}-x.example.com".into()),
        )
        .unwrap();
        let t = s.traffic_token.clone().unwrap();
        assert_eq!(t.len(), 32);
        assert!(!s.traffic_allowed(None));
        assert!(!s.traffic_allowed(Some("nope")));
        assert!(s.traffic_allowed(Some(&t)));
        assert_eq!(s.masked_host(3000).as_deref(), Some("3000-x.example.com"));
        let e = NetSpec::from_request(None, Some(vec!["1.1.1.1/99".into()]), None, None, None)
            .unwrap_err();
        assert!(e.to_string().contains("1.1.1.1/99"), "{e}");
        let e = NetSpec::from_request(None, None, None, None, Some("a\r\nb".into())).unwrap_err();
        assert!(e.to_string().contains("a\\r\\nb"), "{e}");
    }

    #[test]
    fn update_keeps_what_is_not_given_and_is_atomic() {
        let mut s =
            NetSpec::from_request(None, None, Some(vec!["8.8.8.8".into()]), None, None).unwrap();
        s.update(Some(vec!["1.1.1.0/24".into()]), None).unwrap();
        assert_eq!(s.allow_out, vec!["1.1.1.0/24"]);
        assert_eq!(s.deny_out, vec!["8.8.8.8"]);
        let before = s.clone();
        assert!(s.update(None, Some(vec!["bad/entry".into()])).is_err());
        assert_eq!(s, before);
    }
}
