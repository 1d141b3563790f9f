#!/usr/bin/env bash
# Build a Debian bookworm sandbox image (ext4) with mmdebstrap: the `base`
# template's userland, like E2B's base image, or with --code-interpreter the
# `code-interpreter-v1` one (adds ipykernel, jupyter-client, numpy, pandas,
# matplotlib and the code-interpreter server on port 49999). Cached by
# content hash.
#
# Usage: rootfs/build-image.sh [--code-interpreter] AGENT_BIN
#   AGENT_BIN  a statically linked stasis-envd (rootfs/build-agent.sh)
# Env:
#   STASIS_CACHE            cache root (default: $HOME/.cache/stasis)
#   STASIS_NO_APT           1: never call apt-get; fail with a hint instead
#   STASIS_ROOTFS_FREE_MIB  free space left in the filesystem (1024)
#   STASIS_DEBIAN_MIRROR    mirror for mmdebstrap (default: the first URI of
#                           this host's deb.debian.org-style apt sources, else
#                           http://deb.debian.org/debian)
#
# Output: the last line on stdout is the image's absolute path,
#   $STASIS_CACHE/image/<hash>/rootfs.ext4
# with a `manifest` beside it listing every installed package and version.
# <hash> covers this script, rootfs/init-debian.sh, the interpreter server,
# the agent, the package list and the free space. Exit status: 0 built or
# cached, 1 failed, 2 a prerequisite is missing.
#
# What is inside:
#   - Debian bookworm (minbase) with bash, python3 (`python`, `pip`),
#     python3-pip, python3-venv, curl, wget, git, sudo, ca-certificates,
#     procps, ncurses-bin, less, vim-tiny, nano, iproute2, iputils-ping,
#     util-linux (setpriv);
#   - users root and user (uid 1000, /home/user, bash, passwordless sudo);
#   - /sbin/init = rootfs/init-debian.sh: mounts, runs the agent on vsock
#     (and the interpreter as `user`), restarting each when it exits;
#   - the agent at /usr/local/bin/stasis-envd; the interpreter server at
#     /usr/local/lib/stasis/stasis_interpreter.py.
# Boot: console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/build-image.sh"
init="$here/init-debian.sh"
setup="$here/init-setup.sh"
interp="$here/interpreter/stasis_interpreter.py"
cache_root="${STASIS_CACHE:-$HOME/.cache/stasis}"
icache="$cache_root/image"

log() { echo "rootfs/build-image.sh: $*" >&2; }
die() { echo "rootfs/build-image.sh: ERROR: $*" >&2; exit 1; }
prereq() { echo "rootfs/build-image.sh: PREREQUISITE MISSING: $*" >&2; exit 2; }

BASE_PKGS=(bash python3 python-is-python3 python3-pip python3-venv curl wget git sudo
    ca-certificates procps ncurses-bin coreutils less vim-tiny nano iproute2 iputils-ping
    util-linux)
CI_PKGS=(python3-ipykernel python3-jupyter-client python3-numpy python3-pandas
    python3-matplotlib)

main() {
    ci=0
    if [[ "${1:-}" == --code-interpreter ]]; then
        ci=1
        shift
    fi
    (($# == 1)) || { echo "usage: $0 [--code-interpreter] AGENT_BIN" >&2; exit 2; }
    [[ -f "$1" ]] || prereq "no such agent binary: $1"
    agent="$(realpath "$1")"
    free_mib="${STASIS_ROOTFS_FREE_MIB:-1024}"
    [[ "$free_mib" =~ ^[0-9]+$ ]] || die "STASIS_ROOTFS_FREE_MIB must be a number of MiB"
    [[ "$(id -u)" == 0 ]] || prereq "root (mmdebstrap's root mode runs the packages' maintainer scripts in a chroot)"

    need_pkgs=()
    command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
    command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
    if ((${#need_pkgs[@]})); then
        [[ "${STASIS_NO_APT:-0}" != 1 ]] \
            || prereq "packages ${need_pkgs[*]}; install them with: apt-get install -y ${need_pkgs[*]}"
        log "installing missing packages: ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${need_pkgs[@]}" >&2 || prereq "apt-get install ${need_pkgs[*]} failed"
    fi

    pkgs=("${BASE_PKGS[@]}")
    files=("$self" "$init" "$setup" "$agent")
    if ((ci)); then
        pkgs+=("${CI_PKGS[@]}")
        files+=("$interp")
    fi
    mirror="${STASIS_DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" ]]; then
        mirror="$(grep -hs '^URIs:.*/debian$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')"
        mirror="${mirror:-http://deb.debian.org/debian}"
    fi

    hash="$( { sha256sum "${files[@]}" | cut -d' ' -f1; echo "ci=$ci free=$free_mib"
        echo "${pkgs[*]}"; } | sha256sum | cut -c1-16)"
    out_dir="$icache/$hash"
    out="$out_dir/rootfs.ext4"
    if [[ -s "$out" ]]; then
        log "cached: $out"
        echo "$out"
        exit 0
    fi
    mkdir -p "$icache"
    stage="$(mktemp -d "$icache/stage.XXXXXX")"
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    t0=$SECONDS

    log "[1/4] mmdebstrap bookworm (${#pkgs[@]} packages and their dependencies) from $mirror"
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
    log "[1/4] done in $((SECONDS - t0)) s: $(du -sh "$root" | cut -f1)"

    log "[2/4] the agent, init$( ((ci)) && echo ', the interpreter server')"
    install -m 0755 "$agent" "$root/usr/local/bin/stasis-envd"
    strip --strip-debug "$root/usr/local/bin/stasis-envd" 2>/dev/null || true
    rm -f "$root/sbin/init"
    install -m 0755 "$init" "$root/sbin/init"
    install -D -m 0644 "$setup" "$root/etc/stasis/init-setup.sh"
    if ((ci)); then
        install -d -m 0755 "$root/usr/local/lib/stasis"
        install -m 0644 "$interp" "$root/usr/local/lib/stasis/stasis_interpreter.py"
    fi
    echo stasis >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tstasis\n' >"$root/etc/hosts"
    : >"$root/etc/resolv.conf"
    mv "$root/.stasis-manifest" "$stage/manifest"

    log "[3/4] ext4 image"
    content_kib="$(du -sk --apparent-size "$root" | cut -f1)"
    size_mib=$(((content_kib / 1024) * 5 / 4 + free_mib + 64))
    img="$stage/rootfs.ext4"
    # Built as root: the tree's owners (root, user's home) go into the image as they are.
    mkfs.ext4 -q -F -L stasis-root -m 0 -d "$root" "$img" "${size_mib}M" >&2 || die "mkfs.ext4 -d failed"
    e2fsck -fn "$img" >"$stage/fsck.log" 2>&1 \
        || { tail -n 20 "$stage/fsck.log" >&2; die "e2fsck found problems in the new image"; }

    log "[4/4] cache"
    mkdir -p "$out_dir.tmp.$$"
    mv "$img" "$out_dir.tmp.$$/rootfs.ext4"
    { echo "agent $(sha256sum "$agent" | cut -d' ' -f1)"; echo "size_mib $size_mib"
      echo "build_secs $((SECONDS - t0))"; cat "$stage/manifest"; } >"$out_dir.tmp.$$/manifest"
    rm -rf "$out_dir"
    mv "$out_dir.tmp.$$" "$out_dir"
    log "built in $((SECONDS - t0)) s: $out (${size_mib} MiB, $(du -h "$out" | cut -f1) on disk)"
    echo "$out"
}

main "$@"
