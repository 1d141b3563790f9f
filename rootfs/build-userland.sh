#!/usr/bin/env bash
# The slow, rarely changing half of rootfs/build-image.sh: a Debian bookworm
# userland built with mmdebstrap into an ext4 image, without anything of
# stasis's own (agent, init, interpreter server; build-image.sh writes those
# into a copy in seconds). Cached by content hash: this script, the package
# list and the free space, so a new agent or interpreter never downloads or
# unpacks a package again.
#
# Usage: rootfs/build-userland.sh FREE_MIB PACKAGE...
#   (called by rootfs/build-image.sh; FREE_MIB is the space left free)
# Env: STASIS_CACHE, STASIS_DEBIAN_MIRROR as build-image.sh.
# Output: the last stdout line is $STASIS_CACHE/userland/<hash>/rootfs.ext4,
# with a `manifest` beside it (build time, size, every package and version).
# Exit status: 0 built or cached, 1 failed, 2 a prerequisite is missing.
#
# What is inside: Debian bookworm (minbase, no Recommends) with PACKAGE...
# and their dependencies; users root and user (uid 1000, /home/user, bash,
# passwordless sudo); /etc/hostname `stasis`, /etc/hosts, an empty
# /etc/resolv.conf; /usr/local/bin, /usr/local/lib/stasis and /etc/stasis
# exist (empty).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/build-userland.sh"
cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
ucache="$cache_root/userland"

log() { echo "rootfs/build-userland.sh: $*" >&2; }
die() { echo "rootfs/build-userland.sh: ERROR: $*" >&2; exit 1; }
prereq() { echo "rootfs/build-userland.sh: PREREQUISITE MISSING: $*" >&2; exit 2; }

main() {
    (($# >= 2)) || { echo "usage: $0 FREE_MIB PACKAGE..." >&2; exit 2; }
    free_mib="$1"
    shift
    [[ "$free_mib" =~ ^[0-9]+$ ]] || die "FREE_MIB must be a number of MiB"
    pkgs=("$@")
    command -v mmdebstrap >/dev/null 2>&1 || prereq "mmdebstrap (apt-get install mmdebstrap)"
    command -v mkfs.ext4 >/dev/null 2>&1 || prereq "mkfs.ext4 (apt-get install e2fsprogs)"
    [[ "$(id -u)" == 0 ]] || prereq "root (mmdebstrap's root mode runs the packages' maintainer scripts in a chroot)"

    mirror="${STASIS_DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" ]]; then
        mirror="$(grep -hs '^URIs:.*/debian$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')"
        mirror="${mirror:-http://deb.debian.org/debian}"
    fi
    # The mirror is not in the hash: any bookworm mirror gives the same packages.
    hash="$( { sha256sum "$self" | cut -d' ' -f1; echo "free=$free_mib"; echo "${pkgs[*]}"; } \
        | sha256sum | cut -c1-16)"
    out_dir="$ucache/$hash"
    out="$out_dir/rootfs.ext4"
    if [[ -s "$out" && -s "$out_dir/manifest" ]]; then
        log "cached: $out"
        echo "$out"
        exit 0
    fi
    mkdir -p "$ucache"
    # One build of a given userland at a time; a second caller waits and
    # then finds it cached.
    exec 9>"$ucache/.lock.$hash"
    log "waiting for the build lock ($ucache/.lock.$hash)"
    flock 9
    if [[ -s "$out" && -s "$out_dir/manifest" ]]; then
        log "cached (built meanwhile): $out"
        echo "$out"
        exit 0
    fi
    stage="$(mktemp -d "$ucache/stage.XXXXXX")"
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    t0=$SECONDS

    log "[userland 1/2] mmdebstrap bookworm (${#pkgs[@]} packages and their dependencies) from $mirror"
    include="$(IFS=,; echo "${pkgs[*]}")"
    mmdebstrap --mode=root --variant=minbase --include="$include" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --customize-hook='chroot "$1" useradd -m -u 1000 -U -s /bin/bash user' \
        --customize-hook='echo "user ALL=(ALL:ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/user" && chmod 0440 "$1/etc/sudoers.d/user"' \
        --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > "$1/.stasis-manifest"' \
        --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
        bookworm "$root" "$mirror" >&2 || die "mmdebstrap failed"
    log "[userland 1/2] done in $((SECONDS - t0)) s: $(du -sh "$root" | cut -f1)"
    echo stasis >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tstasis\n' >"$root/etc/hosts"
    : >"$root/etc/resolv.conf"
    install -d -m 0755 "$root/usr/local/bin" "$root/usr/local/lib/stasis" "$root/etc/stasis"
    mv "$root/.stasis-manifest" "$stage/packages"

    log "[userland 2/2] ext4 image"
    content_kib="$(du -sk --apparent-size "$root" | cut -f1)"
    size_mib=$(((content_kib / 1024) * 5 / 4 + free_mib + 64))
    img="$stage/rootfs.ext4"
    # Built as root: the tree's owners (root, user's home) go into the image as they are.
    mkfs.ext4 -q -F -L stasis-root -m 0 -d "$root" "$img" "${size_mib}M" >&2 || die "mkfs.ext4 -d failed"
    e2fsck -fn "$img" >"$stage/fsck.log" 2>&1 \
        || { tail -n 20 "$stage/fsck.log" >&2; die "e2fsck found problems in the new image"; }

    mkdir -p "$out_dir.tmp.$$"
    mv "$img" "$out_dir.tmp.$$/rootfs.ext4"
    { echo "size_mib $size_mib"; echo "build_secs $((SECONDS - t0))"; cat "$stage/packages"; } \
        >"$out_dir.tmp.$$/manifest"
    rm -rf "$out_dir"
    mv "$out_dir.tmp.$$" "$out_dir"
    log "built in $((SECONDS - t0)) s: $out (${size_mib} MiB, $(du -h "$out" | cut -f1) on disk)"
    echo "$out"
}

main "$@"
