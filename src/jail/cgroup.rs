//! Per-sandbox cgroups: memory, CPU and process-count limits for one jailed
//! worker, under a stasis-owned parent (`stasis/`).
//!
//! Works on both layouts Linux hosts have:
//! - cgroup v2 (unified, `/sys/fs/cgroup` is `cgroup2` with the memory
//!   controller): one directory `<root>/stasis/<name>` with `memory.max`,
//!   `memory.swap.max`, `cpu.max`, `pids.max`; cleanup by `cgroup.kill`.
//! - cgroup v1 (hybrid hosts, like our build machines): one directory per
//!   controller hierarchy, `<memory>/stasis/<name>`, `<cpu>/stasis/<name>`,
//!   `<pids>/stasis/<name>`, with `memory.limit_in_bytes`,
//!   `cpu.cfs_quota_us`, `pids.max`; cleanup kills every process listed.
//!
//! The server (root) creates the group and writes its limits; the worker
//! joins it ([`Cgroup::procs_files`]) before it forks into its namespaces, so
//! every process of the sandbox is inside.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of cgroup setup and cleanup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no usable cgroup hierarchy (need cgroup v2 with the memory controller, or cgroup v1 memory, cpu and pids)")]
    Unavailable,
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("cgroup {0} still has processes after killing them")]
    Busy(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io(what, e)
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at this mount point.
    V2(PathBuf),
    /// Separate hierarchies for the memory, cpu and pids controllers.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

/// Limits for one sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (anonymous + page cache) before the kernel reclaims
    /// and then OOM-kills inside the group.
    pub memory: u64,
    /// CPU time per period, in CPUs (e.g. 2 = two full cores).
    pub cpus: u32,
    /// Most tasks (threads included).
    pub pids: u32,
}

const PARENT: &str = "stasis";
const CPU_PERIOD_US: u64 = 100_000;

impl Layout {
    /// Finds the host's layout from `/proc/self/mounts`.
    pub fn detect() -> Result<Layout, Error> {
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").map_err(io("read /proc/self/mounts"))?;
        Self::from_mounts(&mounts)
    }

    fn from_mounts(mounts: &str) -> Result<Layout, Error> {
        let (mut memory, mut cpu, mut pids) = (None, None, None);
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, at, fstype, opts, ..] = f[..] else {
                continue;
            };
            let at = PathBuf::from(at);
            if fstype == "cgroup2" {
                let controllers =
                    std::fs::read_to_string(at.join("cgroup.controllers")).unwrap_or_default();
                let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
                if has("memory") && has("pids") {
                    return Ok(Layout::V2(at));
                }
            } else if fstype == "cgroup" {
                let has = |c: &str| opts.split(',').any(|x| x == c);
                if has("memory") {
                    memory = Some(at.clone());
                }
                if has("cpu") {
                    cpu = Some(at.clone());
                }
                if has("pids") {
                    pids = Some(at);
                }
            }
        }
        match (memory, cpu, pids) {
            (Some(memory), Some(cpu), Some(pids)) => Ok(Layout::V1 { memory, cpu, pids }),
            _ => Err(Error::Unavailable),
        }
    }

    /// Removes groups left by servers that are gone: names start with the
    /// creating server's pid (`<pid>-...`, see `Jailer::prepare`); a group
    /// whose server no longer runs is emptied and removed. Returns how many.
    pub fn sweep_stale(&self) -> usize {
        let parent = match self {
            Layout::V2(root) => root.join(PARENT),
            Layout::V1 { memory, .. } => memory.join(PARENT),
        };
        let Ok(entries) = std::fs::read_dir(&parent) else {
            return 0;
        };
        let mut n = 0;
        for ent in entries.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !ent.path().is_dir() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let cg = Cgroup {
                layout: self.clone(),
                name,
            };
            if cg.destroy().is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Creates `stasis/<name>` with `limits`. An existing group of that name
    /// (left by a crashed server) is emptied and reused.
    pub fn create(&self, name: &str, limits: Limits) -> Result<Cgroup, Error> {
        let cg = Cgroup {
            layout: self.clone(),
            name: name.to_string(),
        };
        match self {
            Layout::V2(root) => {
                // Controllers must be enabled on the way down; either write
                // fails harmlessly when they already are.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids");
                let parent = root.join(PARENT);
                mkdir(&parent)?;
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
                let dir = parent.join(name);
                mkdir(&dir)?;
                write(&dir.join("memory.max"), &limits.memory.to_string())?;
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                write(
                    &dir.join("cpu.max"),
                    &format!(
                        "{} {CPU_PERIOD_US}",
                        u64::from(limits.cpus.max(1)) * CPU_PERIOD_US
                    ),
                )?;
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
            }
            Layout::V1 { memory, cpu, pids } => {
                let m = memory.join(PARENT).join(name);
                mkdir(&m)?;
                write(&m.join("memory.limit_in_bytes"), &limits.memory.to_string())?;
                // With swap accounting, swap counts too (must not be below
                // the plain limit, which was just set).
                let _ = std::fs::write(
                    m.join("memory.memsw.limit_in_bytes"),
                    limits.memory.to_string(),
                );
                let c = cpu.join(PARENT).join(name);
                mkdir(&c)?;
                write(&c.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &c.join("cpu.cfs_quota_us"),
                    &(u64::from(limits.cpus.max(1)) * CPU_PERIOD_US).to_string(),
                )?;
                let p = pids.join(PARENT).join(name);
                mkdir(&p)?;
                write(&p.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(cg)
    }
}

fn mkdir(p: &Path) -> Result<(), Error> {
    match std::fs::create_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::Io(format!("create cgroup {}", p.display()), e)),
    }
}

fn write(p: &Path, v: &str) -> Result<(), Error> {
    std::fs::write(p, v).map_err(io(format!("write {v} to {}", p.display())))
}

/// One sandbox's cgroup (in each hierarchy, for v1).
#[derive(Debug, Clone)]
pub struct Cgroup {
    layout: Layout,
    name: String,
}

impl Cgroup {
    /// The group's directories: one for v2, three for v1.
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2(root) => vec![root.join(PARENT).join(&self.name)],
            Layout::V1 { memory, cpu, pids } => [memory, cpu, pids]
                .iter()
                .map(|h| h.join(PARENT).join(&self.name))
                .collect(),
        }
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> Option<u64> {
        let f = match &self.layout {
            Layout::V2(_) => "memory.max",
            Layout::V1 { .. } => "memory.limit_in_bytes",
        };
        read_u64(&self.dirs()[0].join(f))
    }

    /// Highest memory use seen, in bytes (`memory.peak` / `max_usage`).
    pub fn memory_peak(&self) -> Option<u64> {
        let f = match &self.layout {
            Layout::V2(_) => "memory.peak",
            Layout::V1 { .. } => "memory.max_usage_in_bytes",
        };
        read_u64(&self.dirs()[0].join(f))
    }

    /// How many processes the kernel OOM-killed in this group.
    pub fn oom_kills(&self) -> u64 {
        let f = match &self.layout {
            Layout::V2(_) => "memory.events",
            Layout::V1 { .. } => "memory.oom_control",
        };
        std::fs::read_to_string(self.dirs()[0].join(f))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// Process ids in the group.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(&self.procs_files()[0])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process in the group, waits (bounded) for them to go and
    /// removes the group's directories.
    pub fn destroy(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let dirs = self.dirs();
        if matches!(self.layout, Layout::V2(_)) {
            let _ = std::fs::write(dirs[0].join("cgroup.kill"), "1");
        }
        loop {
            let mut left = false;
            for d in &dirs {
                for pid in read_pids(&d.join("cgroup.procs")) {
                    left = true;
                    // SAFETY: kill(2) takes plain integers; the pid comes
                    // from the group's own process list.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if !left {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(dirs[0].clone()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for d in &dirs {
            // A just-exited process may keep the group busy for a moment.
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(Error::Io(format!("remove cgroup {}", d.display()), e))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        Ok(())
    }
}

fn read_pids(p: &Path) -> Vec<i32> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_from_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
            cgroup2 /nonexistent/unified cgroup2 rw 0 0\n";
        assert_eq!(
            Layout::from_mounts(hybrid).unwrap(),
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into(),
                pids: "/sys/fs/cgroup/pids".into(),
            }
        );
        assert!(matches!(
            Layout::from_mounts("cgroup /a cgroup rw,memory 0 0\n"),
            Err(Error::Unavailable)
        ));
    }
}
