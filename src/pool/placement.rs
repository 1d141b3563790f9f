//! Placement and forwarding as pure functions: which host resumes a paused
//! sandbox, which host takes a new one, and whether a call this host
//! received is served here or forwarded to the sandbox's owner.
//!
//! Resume ([`place_resume`]):
//! 1. the host where the sandbox paused, if it is live, not draining,
//!    still holds the snapshot's data on its disk, and has the memory;
//! 2. else, if the snapshot's upload to the bucket finished, the least
//!    loaded of up to `sample` live hosts drawn at random (seeded RNG) among
//!    those whose CPU/KVM fingerprint matches the snapshot's (a vCPU state
//!    saved on one CPU may not load on another), that are not draining and
//!    have the memory ("power of k choices": close to least-loaded without
//!    every host herding onto the same one from a stale view);
//! 3. else a refusal that says why ([`Refusal`]): no live host, the data is
//!    only on a dead host (the upload had not finished), no fingerprint
//!    matches (each host's difference is listed), no room.
//!
//! A host whose fingerprint is unknown (a source without heartbeats) is
//! never chosen for a resume: a match cannot be checked.
//!
//! Create ([`place_create`]): the least loaded of a sample of live,
//! non-draining hosts with the memory.
//!
//! Load order ([`HostLoad`] compared by [`load_key`]): fewer running
//! sandboxes first, then more free memory, then the host id (so a tie
//! breaks the same way on every host).
//!
//! Forwarding ([`route`]): the owner recorded in the metadata store decides;
//! a call is served here when this host owns the sandbox or nobody does
//! (a paused sandbox whose data is in the bucket: this host places it),
//! forwarded to a live owner, and answered as lost (running on a dead
//! host) or as a conflict when it was already forwarded once (views of
//! ownership disagree: no forwarding loops).

use rand::seq::IndexedRandom;
use rand::Rng;

use super::discovery::{HostLoad, HostRecord};
use crate::snapshot::manifest::HostFingerprint;

/// Hosts sampled per placement unless told otherwise.
pub const DEFAULT_SAMPLE: usize = 2;

/// Why no host can take a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Discovery found no live host at all.
    #[error("no live host in the pool")]
    NoLiveHosts,
    /// The snapshot exists only on the disk of a host that is not live (its
    /// upload had not finished).
    #[error(
        "the snapshot is only on host {host}, which is not live, and its upload to the bucket had not finished"
    )]
    DataOnlyOnDeadHost {
        /// The host where it paused.
        host: String,
    },
    /// The snapshot's data is not in the bucket and the host where it paused
    /// no longer holds it.
    #[error("no copy of the snapshot: not uploaded and no longer on host {host}")]
    NoCopy {
        /// The host where it paused.
        host: String,
    },
    /// No live host has a matching CPU/KVM fingerprint.
    #[error("no live host matches the snapshot's CPU/KVM fingerprint: {}", .hosts.join("; "))]
    NoMatchingHost {
        /// Each live host with why it does not match.
        hosts: Vec<String>,
    },
    /// Matching hosts exist but none has the memory or takes sandboxes.
    #[error("no matching host can take it now: {}", .hosts.join("; "))]
    NoRoom {
        /// Each matching host with why it cannot.
        hosts: Vec<String>,
    },
}

/// What a resume placement knows about the sandbox.
#[derive(Debug, Clone)]
pub struct ResumeRequest<'a> {
    /// The fingerprint recorded with the snapshot.
    pub fingerprint: &'a HostFingerprint,
    /// The host where it paused (`None`: unknown, e.g. rebuilt metadata).
    pub paused_on: Option<&'a str>,
    /// That host still has the snapshot's files on its disk.
    pub paused_host_has_data: bool,
    /// The snapshot's upload to the bucket is committed (manifest put).
    pub uploaded: bool,
    /// Guest memory the sandbox needs, in bytes.
    pub memory: u64,
}

/// Why a host was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The host where the sandbox paused: its data is local there.
    WherePaused,
    /// The least loaded of this many sampled candidates.
    LeastLoadedOfSample(usize),
}

/// A chosen host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Its id.
    pub host_id: String,
    /// Its API address.
    pub address: String,
    /// Why.
    pub reason: Reason,
}

/// The order "less loaded first": fewer running, more free memory, id.
pub fn load_key(h: &HostRecord) -> (u32, std::cmp::Reverse<u64>, &str) {
    let HostLoad {
        running,
        memory_free,
        ..
    } = h.load;
    (running, std::cmp::Reverse(memory_free), h.id.as_str())
}

/// Whether `h` can take a sandbox of `memory` bytes now, or why not.
fn room(h: &HostRecord, memory: u64) -> Result<(), String> {
    if h.draining {
        return Err(format!("{}: draining", h.id));
    }
    // Zero free memory with nothing running means "load unknown" (a
    // source without heartbeats): the host itself answers 429 if full.
    let unknown = h.load == HostLoad::default();
    if !unknown && h.load.memory_free < memory {
        return Err(format!(
            "{}: {} MiB free, {} MiB needed",
            h.id,
            h.load.memory_free >> 20,
            memory >> 20
        ));
    }
    Ok(())
}

/// The least loaded of up to `sample` hosts drawn from `candidates`.
fn pick(candidates: &[&HostRecord], sample: usize, rng: &mut impl Rng) -> Option<Choice> {
    let k = sample.max(1).min(candidates.len());
    let drawn: Vec<&&HostRecord> = candidates.choose_multiple(rng, k).collect();
    let best = drawn.iter().min_by(|a, b| load_key(a).cmp(&load_key(b)))?;
    Some(Choice {
        host_id: best.id.clone(),
        address: best.address.clone(),
        reason: Reason::LeastLoadedOfSample(drawn.len()),
    })
}

/// Where a paused sandbox resumes (see the module docs for the rule).
pub fn place_resume(
    req: &ResumeRequest<'_>,
    live: &[HostRecord],
    sample: usize,
    rng: &mut impl Rng,
) -> Result<Choice, Refusal> {
    if live.is_empty() {
        return Err(Refusal::NoLiveHosts);
    }
    if let Some(p) = req.paused_on {
        if let Some(h) = live.iter().find(|h| h.id == p) {
            let matches = h
                .fingerprint
                .as_ref()
                .is_some_and(|f| req.fingerprint.mismatch(f).is_none());
            if req.paused_host_has_data && matches && room(h, req.memory).is_ok() {
                return Ok(Choice {
                    host_id: h.id.clone(),
                    address: h.address.clone(),
                    reason: Reason::WherePaused,
                });
            }
        }
        if !req.uploaded {
            let alive = live.iter().any(|h| h.id == p);
            return Err(if !alive {
                Refusal::DataOnlyOnDeadHost { host: p.into() }
            } else if !req.paused_host_has_data {
                Refusal::NoCopy { host: p.into() }
            } else {
                // Live and holding the data, but full, draining or (after
                // a host change) mismatched: only it could resume it.
                let why = live
                    .iter()
                    .find(|h| h.id == p)
                    .map(|h| match (&h.fingerprint, room(h, req.memory)) {
                        (None, _) => format!("{}: fingerprint unknown", h.id),
                        (Some(f), _) if req.fingerprint.mismatch(f).is_some() => format!(
                            "{}: {}",
                            h.id,
                            req.fingerprint.mismatch(f).unwrap_or_default()
                        ),
                        (_, Err(e)) => e,
                        (_, Ok(())) => format!("{}: unavailable", h.id),
                    })
                    .unwrap_or_default();
                Refusal::NoRoom {
                    hosts: vec![format!("{why} (not uploaded: no other host can)")],
                }
            });
        }
    } else if !req.uploaded {
        return Err(Refusal::NoCopy {
            host: "(unknown)".into(),
        });
    }
    let mut mismatched = Vec::new();
    let mut full = Vec::new();
    let mut candidates = Vec::new();
    for h in live {
        match &h.fingerprint {
            None => mismatched.push(format!("{}: fingerprint unknown", h.id)),
            Some(f) => match req.fingerprint.mismatch(f) {
                Some(d) => mismatched.push(format!("{}: {d}", h.id)),
                None => match room(h, req.memory) {
                    Ok(()) => candidates.push(h),
                    Err(e) => full.push(e),
                },
            },
        }
    }
    if candidates.is_empty() {
        return Err(if full.is_empty() {
            Refusal::NoMatchingHost { hosts: mismatched }
        } else {
            Refusal::NoRoom { hosts: full }
        });
    }
    Ok(pick(&candidates, sample, rng).expect("candidates is not empty"))
}

/// Where a new sandbox of `memory` bytes starts: the least loaded of a
/// sample of live, non-draining hosts with the memory.
pub fn place_create(
    live: &[HostRecord],
    memory: u64,
    sample: usize,
    rng: &mut impl Rng,
) -> Result<Choice, Refusal> {
    if live.is_empty() {
        return Err(Refusal::NoLiveHosts);
    }
    let mut full = Vec::new();
    let mut candidates = Vec::new();
    for h in live {
        match room(h, memory) {
            Ok(()) => candidates.push(h),
            Err(e) => full.push(e),
        }
    }
    pick(&candidates, sample, rng).ok_or(Refusal::NoRoom { hosts: full })
}

/// What to do with a call about one sandbox that reached this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Serve it here.
    Local,
    /// Forward it to the owner.
    Forward {
        /// The owner's id.
        host_id: String,
        /// Its API address.
        address: String,
    },
    /// The sandbox was running on a host that is gone: report it lost.
    Lost {
        /// The dead owner.
        host_id: String,
    },
    /// The call was already forwarded once and this host does not own the
    /// sandbox either: ownership moved meanwhile (answer 409, the client
    /// retries); never forward twice.
    Moved {
        /// Who this host thinks owns it.
        host_id: String,
    },
}

/// The forwarding decision. `owner`: the host the metadata store records as
/// owning the sandbox (`None`: nobody — a paused sandbox whose data is in
/// the bucket); `running`: whether it is running (a paused sandbox of a dead
/// owner is placed again, by this host); `forwarded`: the call came from
/// another host of the pool.
pub fn route(
    self_id: &str,
    owner: Option<&str>,
    running: bool,
    forwarded: bool,
    live: &[HostRecord],
) -> Route {
    let Some(owner) = owner else {
        return Route::Local;
    };
    if owner == self_id {
        return Route::Local;
    }
    match live.iter().find(|h| h.id == owner) {
        Some(_) if forwarded => Route::Moved {
            host_id: owner.into(),
        },
        Some(h) => Route::Forward {
            host_id: h.id.clone(),
            address: h.address.clone(),
        },
        None if running => Route::Lost {
            host_id: owner.into(),
        },
        // Paused on a dead host: this host decides where it resumes.
        None => Route::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::discovery::HostLoad;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    const GIB: u64 = 1 << 30;

    fn seed() -> u64 {
        let s = std::env::var("STASIS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_0016);
        println!("placement test seed: {s} (STASIS_TEST_SEED overrides)");
        s
    }

    fn fp(sig: u32) -> HostFingerprint {
        HostFingerprint {
            cpu_vendor: "GenuineIntel".into(),
            cpu_signature: sig,
            cpu_features: 0xfeed,
            kvm_api_version: 12,
        }
    }

    fn host(id: &str, sig: Option<u32>, running: u32, free_gib: u64) -> HostRecord {
        HostRecord {
            id: id.into(),
            address: format!("{id}:3000"),
            fingerprint: sig.map(fp),
            load: HostLoad {
                running,
                memory_used: u64::from(running) * GIB,
                memory_free: free_gib * GIB,
            },
            last_heartbeat: Some(std::time::SystemTime::now()),
            draining: false,
        }
    }

    fn req<'a>(f: &'a HostFingerprint, paused_on: Option<&'a str>) -> ResumeRequest<'a> {
        ResumeRequest {
            fingerprint: f,
            paused_on,
            paused_host_has_data: true,
            uploaded: true,
            memory: GIB,
        }
    }

    #[test]
    fn resume_prefers_the_host_where_it_paused() {
        let mut rng = StdRng::seed_from_u64(seed());
        let f = fp(1);
        // "a" is the busiest, but it holds the data.
        let live = [
            host("a", Some(1), 9, 4),
            host("b", Some(1), 0, 60),
            host("c", Some(1), 1, 60),
        ];
        let c = place_resume(&req(&f, Some("a")), &live, 2, &mut rng).unwrap();
        assert_eq!((c.host_id.as_str(), c.reason), ("a", Reason::WherePaused));
        assert_eq!(c.address, "a:3000");

        // Without its data there, or draining, or full: another host.
        let mut r = req(&f, Some("a"));
        r.paused_host_has_data = false;
        let c = place_resume(&r, &live, 3, &mut rng).unwrap();
        assert_eq!(c.host_id, "b");
        assert_eq!(c.reason, Reason::LeastLoadedOfSample(3));
        let mut drained = live.clone();
        drained[0].draining = true;
        let c = place_resume(&req(&f, Some("a")), &drained, 3, &mut rng).unwrap();
        assert_eq!(c.host_id, "b");
        let mut big = req(&f, Some("a"));
        big.memory = 8 * GIB;
        assert_eq!(place_resume(&big, &live, 3, &mut rng).unwrap().host_id, "b");
    }

    #[test]
    fn resume_elsewhere_only_on_matching_fingerprints() {
        let mut rng = StdRng::seed_from_u64(seed());
        let f = fp(1);
        // "a" is gone; "b" has another CPU, "d" an unknown one: "c" only.
        let live = [
            host("b", Some(2), 0, 60),
            host("c", Some(1), 5, 10),
            host("d", None, 0, 0),
        ];
        for _ in 0..50 {
            let c = place_resume(&req(&f, Some("a")), &live, 3, &mut rng).unwrap();
            assert_eq!(c.host_id, "c");
        }
        let mismatched = [host("b", Some(2), 0, 60), host("d", None, 0, 0)];
        match place_resume(&req(&f, Some("a")), &mismatched, 2, &mut rng) {
            Err(Refusal::NoMatchingHost { hosts }) => {
                assert_eq!(hosts.len(), 2);
                assert!(
                    hosts[0].starts_with("b: CPU signature 0x1 vs 0x2"),
                    "{hosts:?}"
                );
                assert_eq!(hosts[1], "d: fingerprint unknown");
            }
            other => panic!("{other:?}"),
        }
        let e = place_resume(&req(&f, Some("a")), &mismatched, 2, &mut rng)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fingerprint") && e.contains("0x2"), "{e}");
        // A paused host whose CPU changed (e.g. after a hardware swap) is
        // not "where it paused".
        let live = [host("a", Some(2), 0, 60), host("c", Some(1), 5, 10)];
        let c = place_resume(&req(&f, Some("a")), &live, 2, &mut rng).unwrap();
        assert_eq!(c.host_id, "c");
    }

    #[test]
    fn resume_refusals_say_why() {
        let mut rng = StdRng::seed_from_u64(seed());
        let f = fp(1);
        let live = [host("b", Some(1), 0, 60)];
        assert_eq!(
            place_resume(&req(&f, Some("a")), &[], 2, &mut rng),
            Err(Refusal::NoLiveHosts)
        );
        let mut r = req(&f, Some("a"));
        r.uploaded = false;
        assert_eq!(
            place_resume(&r, &live, 2, &mut rng),
            Err(Refusal::DataOnlyOnDeadHost { host: "a".into() })
        );
        // Not uploaded but live: only "a" can, and "a" is full.
        let full_a = [host("a", Some(1), 3, 0), host("b", Some(1), 0, 60)];
        let e = place_resume(&r, &full_a, 2, &mut rng)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a: 0 MiB free, 1024 MiB needed"), "{e}");
        r.paused_host_has_data = false;
        assert_eq!(
            place_resume(&r, &full_a, 2, &mut rng),
            Err(Refusal::NoCopy { host: "a".into() })
        );
        let mut big = req(&f, None);
        big.memory = 100 * GIB;
        match place_resume(&big, &live, 2, &mut rng) {
            Err(Refusal::NoRoom { hosts }) => {
                assert_eq!(hosts, ["b: 61440 MiB free, 102400 MiB needed"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sampling_spreads_load_and_prefers_the_less_loaded() {
        let s = seed();
        let f = fp(1);
        // Ten hosts, loads 0..9: with 2 samples the least loaded of the
        // pair wins, so the most loaded host is never chosen and the least
        // loaded is chosen most often; every choice is the lighter one.
        let live: Vec<_> = (0..10)
            .map(|i| host(&format!("h{i}"), Some(1), i, 60))
            .collect();
        let mut rng = StdRng::seed_from_u64(s);
        let mut counts = BTreeMap::new();
        for _ in 0..2000 {
            let c = place_resume(&req(&f, None), &live, 2, &mut rng).unwrap();
            assert_eq!(c.reason, Reason::LeastLoadedOfSample(2));
            *counts.entry(c.host_id).or_insert(0u32) += 1;
        }
        println!("2000 placements, 2 of 10 sampled, load i on host hi: {counts:?}");
        assert!(!counts.contains_key("h9"), "{counts:?}");
        assert!(counts["h0"] > counts["h8"], "{counts:?}");
        // Same seed, same choices.
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| place_create(&live, GIB, 2, &mut rng).unwrap().host_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(s), run(s));
        // A sample as large as the pool is plain least-loaded.
        let mut rng = StdRng::seed_from_u64(s);
        assert_eq!(
            place_create(&live, GIB, 10, &mut rng).unwrap().host_id,
            "h0"
        );
    }

    #[test]
    fn create_skips_draining_and_full_hosts() {
        let mut rng = StdRng::seed_from_u64(seed());
        let mut live = vec![
            host("a", Some(1), 0, 60),
            host("b", Some(2), 1, 60),
            host("c", None, 0, 0),
        ];
        live[0].draining = true;
        // "c" has unknown load (a source without heartbeats): eligible.
        for _ in 0..20 {
            let c = place_create(&live, 2 * GIB, 3, &mut rng).unwrap();
            assert_ne!(c.host_id, "a");
        }
        // Equal running counts: more free memory wins, then the id.
        let tie = [host("x", Some(1), 1, 10), host("y", Some(1), 1, 20)];
        assert_eq!(place_create(&tie, GIB, 2, &mut rng).unwrap().host_id, "y");
        live[1].load.memory_free = GIB;
        live.pop();
        match place_create(&live, 2 * GIB, 3, &mut rng) {
            Err(Refusal::NoRoom { hosts }) => {
                assert_eq!(hosts, ["a: draining", "b: 1024 MiB free, 2048 MiB needed"])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            place_create(&[], GIB, 2, &mut rng),
            Err(Refusal::NoLiveHosts)
        );
    }

    /// The rule restated independently and checked against random pools.
    #[test]
    fn placement_matches_the_rule_on_random_pools() {
        let s = seed();
        let mut rng = StdRng::seed_from_u64(s);
        let snap = fp(1);
        let (mut placed, mut refused, mut where_paused) = (0, 0, 0);
        for round in 0..5000 {
            let n = rng.random_range(0..7);
            let live: Vec<HostRecord> = (0..n)
                .map(|i| {
                    let sig = [None, Some(1), Some(1), Some(2)][rng.random_range(0..4)];
                    let mut h = host(
                        &format!("h{i}"),
                        sig,
                        rng.random_range(0..4),
                        rng.random_range(0..4),
                    );
                    if rng.random_bool(0.1) {
                        h.load = HostLoad::default();
                    }
                    h.draining = rng.random_bool(0.15);
                    h
                })
                .collect();
            let paused_on = format!("h{}", rng.random_range(0..8));
            let r = ResumeRequest {
                fingerprint: &snap,
                paused_on: rng.random_bool(0.9).then_some(paused_on.as_str()),
                paused_host_has_data: rng.random_bool(0.7),
                uploaded: rng.random_bool(0.7),
                memory: rng.random_range(0..3) * GIB,
            };
            let sample = rng.random_range(1..8);
            let eligible = |h: &HostRecord| {
                !h.draining
                    && h.fingerprint.as_ref() == Some(&snap)
                    && (h.load == HostLoad::default() || h.load.memory_free >= r.memory)
            };
            let home = r
                .paused_on
                .and_then(|p| live.iter().find(|h| h.id == p))
                .filter(|h| r.paused_host_has_data && eligible(h));
            let others: Vec<&HostRecord> = live.iter().filter(|h| eligible(h)).collect();
            let got = place_resume(&r, &live, sample, &mut rng);
            let ctx = format!("seed {s} round {round}: {r:?} sample {sample} {live:?} -> {got:?}");
            match (home, got) {
                (Some(h), Ok(c)) => {
                    assert_eq!(
                        (c.host_id.as_str(), c.reason),
                        (h.id.as_str(), Reason::WherePaused),
                        "{ctx}"
                    );
                    where_paused += 1;
                }
                (Some(_), Err(_)) => panic!("{ctx}"),
                (None, Ok(c)) => {
                    assert!(r.uploaded, "{ctx}");
                    let h = live
                        .iter()
                        .find(|h| h.id == c.host_id)
                        .expect("a live host");
                    assert!(eligible(h), "{ctx}");
                    assert_eq!(c.address, h.address);
                    if sample >= others.len() {
                        let best = others.iter().min_by(|a, b| load_key(a).cmp(&load_key(b)));
                        assert_eq!(Some(&c.host_id), best.map(|b| &b.id), "{ctx}");
                    }
                    placed += 1;
                }
                (None, Err(_)) => {
                    assert!(!r.uploaded || others.is_empty(), "{ctx}");
                    refused += 1;
                }
            }
        }
        println!(
            "5000 random pools: {where_paused} where paused, {placed} elsewhere, {refused} refused"
        );
        assert!(where_paused > 100 && placed > 100 && refused > 100);
    }

    #[test]
    fn route_serves_forwards_or_reports_lost() {
        let live = [host("a", Some(1), 0, 1), host("b", Some(1), 0, 1)];
        assert_eq!(route("a", Some("a"), true, false, &live), Route::Local);
        assert_eq!(route("a", None, false, false, &live), Route::Local);
        assert_eq!(
            route("a", Some("b"), true, false, &live),
            Route::Forward {
                host_id: "b".into(),
                address: "b:3000".into()
            }
        );
        // Forwarded already, and not ours: never a second hop.
        assert_eq!(
            route("a", Some("b"), true, true, &live),
            Route::Moved {
                host_id: "b".into()
            }
        );
        // Owner gone: running → lost; paused → placed from here.
        assert_eq!(
            route("a", Some("z"), true, false, &live),
            Route::Lost {
                host_id: "z".into()
            }
        );
        assert_eq!(route("a", Some("z"), false, false, &live), Route::Local);
        assert_eq!(route("a", Some("a"), true, true, &live), Route::Local);
    }
}
