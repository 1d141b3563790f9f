#!/usr/bin/env bash
# Build the in-guest agent, stasis-envd, statically linked (the guest root
# filesystem has no shared libraries), for rootfs/build-rootfs.sh.
#
# Usage: rootfs/build-agent.sh
# Env:
#   STASIS_AGENT_TARGET_DIR  cargo target dir (default: target/agent-static).
#     A directory of its own: the `+crt-static` build differs from the normal
#     one, and a cargo running inside `cargo test` cannot take target/'s lock.
#
# Output: the last line on stdout is the absolute path of the static binary.
# Exit status: 0 built (cargo skips what is up to date), 1 failed, 2 a
# prerequisite is missing (cargo, or a tree without the stasis-envd binary).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

log() { echo "rootfs/build-agent.sh: $*" >&2; }
die() { echo "rootfs/build-agent.sh: ERROR: $*" >&2; exit 1; }
prereq() { echo "rootfs/build-agent.sh: PREREQUISITE MISSING: $*" >&2; exit 2; }

main() {
    command -v cargo >/dev/null 2>&1 || prereq "cargo"
    grep -q 'name = "stasis-envd"' "$repo/Cargo.toml" 2>/dev/null \
        || [[ -f "$repo/src/bin/stasis-envd.rs" || -f "$repo/src/bin/stasis-envd/main.rs" ]] \
        || prereq "this tree has no stasis-envd binary (src/bin/stasis-envd*) yet"
    target_dir="${STASIS_AGENT_TARGET_DIR:-$repo/target/agent-static}"
    # A cargo started by `cargo test` inherits the test's CARGO_PKG_NAME,
    # CARGO_MANIFEST_DIR, ... and ring's build script reruns when they change
    # (rerun-if-env-changed): the same build from a test and from a shell
    # would rebuild the whole dependency tree each time. The same
    # environment either way:
    local v
    for v in $(compgen -e); do
        case "$v" in
        CARGO | CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE \
            | CARGO_TARGET_TMPDIR | CARGO_RUSTC_CURRENT_DIR | OUT_DIR) unset "$v" ;;
        esac
    done
    log "cargo rustc --release --bin stasis-envd (+crt-static) into $target_dir"
    # Only the final link differs from a normal build: glibc's static libc.
    # No debug info: the guest's copy is stripped anyway, and it builds faster.
    CARGO_PROFILE_RELEASE_DEBUG=0 cargo rustc --release --manifest-path "$repo/Cargo.toml" --target-dir "$target_dir" \
        --bin stasis-envd -- -C target-feature=+crt-static >&2 \
        || die "building stasis-envd failed"
    bin="$target_dir/release/stasis-envd"
    [[ -x "$bin" ]] || die "cargo succeeded but $bin is missing"
    if command -v file >/dev/null 2>&1; then
        desc="$(file -L "$bin")"
        [[ "$desc" == *"statically linked"* || "$desc" == *"static-pie linked"* ]] \
            || die "$bin is not statically linked: $desc"
    fi
    log "built: $bin ($(du -h "$bin" | cut -f1))"
    echo "$bin"
}

main "$@"
