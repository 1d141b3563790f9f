//! TLS for sandbox addresses: `https://{port}-{sandboxId}.{domain}`.
//!
//! The SDKs reach a sandbox's ports (the code interpreter's 49999, a user's
//! web server) at `https://{port}-{id}.{domain}`, with the domain from the
//! create response. So `stasis serve --domain D --tls-listen ADDR` serves the
//! same routes as the plain listener over TLS, with a certificate for `D` and
//! `*.D`:
//!
//! - the operator's own (`--tls-cert`, `--tls-key`: PEM chain and key), or
//! - one stasis issues from a CA it creates once per data directory
//!   (`<data-dir>/tls/ca.pem`; its key `ca.key` is 0600 and never leaves the
//!   directory). Clients trust that CA explicitly: `SSL_CERT_FILE` for the
//!   Python SDK, `NODE_EXTRA_CA_CERTS` for the JS SDK. The leaf certificate
//!   is issued anew at every start, so changing `--domain` needs nothing
//!   else; the CA stays, so clients keep trusting it across restarts.
//!
//! Everything read here (PEM files) is untrusted input and gives a clear
//! error naming the file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// File names inside `<data-dir>/tls/`.
pub const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

/// Errors of loading or creating certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The domain is not a DNS name a certificate can carry.
    #[error("invalid --domain {0:?}: {1}")]
    Domain(String, String),
    /// Generating a key or certificate failed.
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// rustls refused the chain or key.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// The operator's PEM certificate chain and private key.
    Files {
        /// Certificate chain (leaf first).
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Issued by stasis's own CA in this directory (created if missing).
    OwnCa(PathBuf),
}

/// A ready TLS server configuration, and the CA file clients should trust
/// when stasis issued the certificate.
pub struct Tls {
    /// For `tokio_rustls::TlsAcceptor`.
    pub config: Arc<rustls::ServerConfig>,
    /// `<dir>/ca.pem` when the certificate comes from stasis's CA.
    pub ca_file: Option<PathBuf>,
}

/// Checks that `domain` is a plain DNS name (letters, digits, hyphens,
/// dots), as sandbox hosts `{port}-{id}.{domain}` need.
pub fn validate_domain(domain: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::Domain(domain.to_owned(), why.to_owned()));
    if domain.is_empty() || domain.len() > 200 {
        return bad("must be 1 to 200 characters");
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return bad("labels are letters, digits and inner hyphens");
        }
    }
    Ok(())
}

/// Builds the TLS configuration for `domain` from `source`.
pub fn load(domain: &str, source: &CertSource) -> Result<Tls, Error> {
    validate_domain(domain)?;
    let (chain, key, ca_file) = match source {
        CertSource::Files { cert, key } => (read_chain(cert)?, read_key(key)?, None),
        CertSource::OwnCa(dir) => {
            let (chain, key) = issue_from_own_ca(dir, domain)?;
            (chain, key, Some(dir.join(CA_CERT)))
        }
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(Tls {
        config: Arc::new(config),
        ca_file,
    })
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = fs::read(path).map_err(io("reading", path))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_owned(),
            reason: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(Error::Pem {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = fs::read(path).map_err(io("reading", path))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::Pem {
        path: path.to_owned(),
        reason: format!("no usable PEM private key: {e}"),
    })
}

/// Writes `data` to `path` with `mode`, atomically (temporary file, fsync,
/// rename), so a crash never leaves half a key.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    f.write_all(data).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

/// Loads the CA of `dir` (creating it on first use) and issues a leaf
/// certificate for `domain` and `*.domain`.
fn issue_from_own_ca(
    dir: &Path,
    domain: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod", dir))?;
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);

    let ca_params = || {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "stasis sandbox CA");
        dn.push(DnType::OrganizationName, "stasis");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let (ca_pem, ca_key) = if ca_cert_path.exists() && ca_key_path.exists() {
        let key_pem = fs::read_to_string(&ca_key_path).map_err(io("reading", &ca_key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| Error::Pem {
            path: ca_key_path.clone(),
            reason: format!("not a usable CA key: {e}"),
        })?;
        let pem = fs::read_to_string(&ca_cert_path).map_err(io("reading", &ca_cert_path))?;
        (pem, key)
    } else {
        let key = KeyPair::generate()?;
        let mut p = ca_params();
        // Ten years: clients trust this file explicitly, and replacing it
        // means every client changes its configuration.
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let cert = p.self_signed(&key)?;
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&ca_cert_path, cert.pem().as_bytes(), 0o644)?;
        (cert.pem(), key)
    };
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| Error::Pem {
        path: ca_cert_path.clone(),
        reason: format!("not a PEM certificate: {e}"),
    })?;
    // The issuer is the CA file's own subject and key, so certificates chain
    // to exactly the file clients trust.
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| Error::Pem {
        path: ca_cert_path.clone(),
        reason: format!("not a usable CA certificate: {e}"),
    })?;

    let leaf_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![domain.to_owned(), format!("*.{domain}")])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("*.{domain}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(365);
    let leaf = p.signed_by(&leaf_key, &issuer)?;
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(|e| Error::Pem {
        path: dir.to_owned(),
        reason: format!("the issued key does not encode: {e}"),
    })?;
    Ok((vec![leaf.der().clone(), ca_der], key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_checked() {
        for ok in ["sandbox.test", "localhost", "a-b.c9.example"] {
            validate_domain(ok).unwrap();
        }
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "*.x",
            "x/y",
            &"a".repeat(64),
        ] {
            assert!(validate_domain(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn own_ca_is_created_once_and_reused_with_private_key_0600() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let t1 = load("sandbox.test", &CertSource::OwnCa(tls_dir.clone())).unwrap();
        let ca1 = fs::read(tls_dir.join(CA_CERT)).unwrap();
        let mode = fs::metadata(tls_dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(t1.ca_file.as_deref(), Some(tls_dir.join(CA_CERT).as_path()));
        // A second start, for another domain, keeps the CA.
        load("other.test", &CertSource::OwnCa(tls_dir.clone())).unwrap();
        assert_eq!(fs::read(tls_dir.join(CA_CERT)).unwrap(), ca1);
    }

    #[test]
    fn bad_pem_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        fs::write(&junk, b"not pem at all").unwrap();
        let e = load(
            "sandbox.test",
            &CertSource::Files {
                cert: junk.clone(),
                key: junk.clone(),
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("junk.pem"), "{e}");
        let e = load(
            "sandbox.test",
            &CertSource::Files {
                cert: dir.path().join("missing.pem"),
                key: junk,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
