//! Users the agent acts as: lookups in /etc/passwd and /etc/group, the
//! user named by a request's `Authorization: Basic base64("<user>:")`
//! header, and resolution of request paths against that user's home
//! (`~` expansion, relative paths, `.`/`..` folded lexically).

use std::path::{Component, Path, PathBuf};

/// Errors of user lookups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user is not in /etc/passwd.
    #[error("user '{0}' does not exist")]
    NoSuchUser(String),
    /// The Authorization header is malformed.
    #[error("invalid Authorization header: {0}")]
    BadAuth(&'static str),
    /// An empty path.
    #[error("path is empty")]
    EmptyPath,
}

/// A user processes run as and files are owned by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory: the default cwd and the base of relative paths.
    pub home: PathBuf,
}

/// Parses passwd-format `text` for `name`.
pub fn parse_passwd(text: &str, name: &str) -> Option<User> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(User {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(if f[5].is_empty() { "/" } else { f[5] }),
        })
    })
}

/// The name of id `id` in a passwd- or group-format `text` (field 3).
pub fn name_of_id(text: &str, id: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(id)).then(|| f[0].to_string())
    })
}

/// Looks `name` up in /etc/passwd.
pub fn lookup(name: &str) -> Option<User> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd(&text, name)
}

/// The user the agent itself runs as.
pub fn current() -> User {
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = name_of_id(&passwd, uid)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string());
    let home = parse_passwd(&passwd, &name)
        .map(|u| u.home)
        .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"));
    User {
        name,
        uid,
        gid,
        home,
    }
}

/// Names of a file's owner and group ("" if unknown ids print as numbers).
pub fn owner_names(uid: u32, gid: u32) -> (String, String) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    (
        name_of_id(&passwd, uid).unwrap_or_else(|| uid.to_string()),
        name_of_id(&group, gid).unwrap_or_else(|| gid.to_string()),
    )
}

/// The user named by an `Authorization: Basic base64("<user>:<password>")`
/// header value; `None` if the user part is empty.
pub fn user_from_basic_auth(value: &str) -> Result<Option<String>, Error> {
    use base64::Engine;
    let v = value.trim();
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Err(Error::BadAuth("expected the Basic scheme"));
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| Error::BadAuth("invalid base64"))?;
    let text = String::from_utf8(raw).map_err(|_| Error::BadAuth("user is not UTF-8"))?;
    let user = text.split(':').next().unwrap_or("");
    Ok((!user.is_empty()).then(|| user.to_string()))
}

/// Resolves a request path for `home`: `~` and `~/x` expand to the home,
/// relative paths are taken relative to it, and `.`/`..` are folded
/// lexically (`..` at the root stays at the root).
pub fn resolve(path: &str, home: &Path) -> Result<PathBuf, Error> {
    if path.is_empty() {
        return Err(Error::EmptyPath);
    }
    let joined = if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else {
        home.join(path) // an absolute `path` replaces `home`
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// Gives `path` to `user` if the agent is root and `user` isn't (files and
/// directories the agent creates on a user's behalf belong to that user).
pub fn chown_to(path: &Path, user: &User) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || user.uid == 0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\nbad:x:notanumber:0::/:/bin/sh\n";

    #[test]
    fn passwd_lookup() {
        let u = parse_passwd(PASSWD, "user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert_eq!(parse_passwd(PASSWD, "nobody"), None);
        assert_eq!(parse_passwd(PASSWD, "bad"), None);
        assert_eq!(parse_passwd("garbage\n::::\n", "garbage"), None);
        assert_eq!(name_of_id(PASSWD, 0).as_deref(), Some("root"));
        assert_eq!(name_of_id(PASSWD, 42), None);
    }

    #[test]
    fn basic_auth() {
        // base64("user:") and base64("root:pw")
        assert_eq!(
            user_from_basic_auth("Basic dXNlcjo=").unwrap().as_deref(),
            Some("user")
        );
        assert_eq!(
            user_from_basic_auth("Basic cm9vdDpwdw==")
                .unwrap()
                .as_deref(),
            Some("root")
        );
        assert_eq!(user_from_basic_auth("Basic Og==").unwrap(), None);
        assert!(user_from_basic_auth("Bearer x").is_err());
        assert!(user_from_basic_auth("Basic !!!").is_err());
    }

    #[test]
    fn paths_resolve_against_home() {
        let home = Path::new("/home/user");
        let r = |p| resolve(p, home).unwrap();
        assert_eq!(r("a/b.txt"), PathBuf::from("/home/user/a/b.txt"));
        assert_eq!(r("~"), PathBuf::from("/home/user"));
        assert_eq!(r("~/x"), PathBuf::from("/home/user/x"));
        assert_eq!(r("/etc/./passwd"), PathBuf::from("/etc/passwd"));
        assert_eq!(r("../../../../x"), PathBuf::from("/x"));
        assert_eq!(r("/a/b/../c/"), PathBuf::from("/a/c"));
        assert!(resolve("", home).is_err());
    }
}
