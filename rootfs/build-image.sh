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
# Two stages, each cached by content hash:
#   1. the Debian userland (rootfs/build-userland.sh: mmdebstrap and an ext4
#      image, 8-13 min on 2 cores), keyed by that script, the package list
#      and the free space;
#   2. a sparse copy of it with stasis's files written in by debugfs (no
#      mount, no loop device; each file read back and compared), keyed by
#      the userland, this script, and the agent, init and interpreter
#      server: a new agent makes a new image in seconds.
# Exit status: 0 built or cached, 1 failed, 2 a prerequisite is missing.
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
userland_sh="$here/build-userland.sh"
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
    command -v debugfs >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
    if ((${#need_pkgs[@]})); then
        [[ "${STASIS_NO_APT:-0}" != 1 ]] \
            || prereq "packages ${need_pkgs[*]}; install them with: apt-get install -y ${need_pkgs[*]}"
        log "installing missing packages: ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${need_pkgs[@]}" >&2 || prereq "apt-get install ${need_pkgs[*]} failed"
    fi

    pkgs=("${BASE_PKGS[@]}")
    ((ci)) && pkgs+=("${CI_PKGS[@]}")
    t0=$SECONDS
    log "[1/3] the Debian userland ($( ((ci)) && echo code-interpreter || echo base) packages)"
    userland="$("$userland_sh" "$free_mib" "${pkgs[@]}" | tail -n1)" \
        || { st=$?; ((st == 2)) && exit 2; die "rootfs/build-userland.sh failed"; }
    [[ -s "$userland" ]] || die "rootfs/build-userland.sh printed no image"

    # name in the image, host file, mode (octal, no leading 0)
    files=("/usr/local/bin/stasis-envd" "$agent" 755
        "/usr/sbin/init" "$init" 755
        "/etc/stasis/init-setup.sh" "$setup" 644)
    ((ci)) && files+=("/usr/local/lib/stasis/stasis_interpreter.py" "$interp" 644)
    hash="$( { echo "userland $userland"; sha256sum "$self"
        for ((i = 0; i < ${#files[@]}; i += 3)); do
            echo "${files[i]} ${files[i + 2]} $(sha256sum "${files[i + 1]}" | cut -d' ' -f1)"
        done; } | sha256sum | cut -c1-16)"
    out_dir="$icache/$hash"
    out="$out_dir/rootfs.ext4"
    if [[ -s "$out" && -s "$out_dir/manifest" ]]; then
        log "cached: $out"
        echo "$out"
        exit 0
    fi
    mkdir -p "$icache"
    stage="$(mktemp -d "$icache/stage.XXXXXX")"
    trap '[[ -n "${STASIS_KEEP_STAGE:-}" ]] || rm -rf "$stage"' EXIT

    log "[2/3] stasis's files into a copy of $userland: agent, init$( ((ci)) && echo ', the interpreter server')"
    img="$stage/rootfs.ext4"
    cp --sparse=always "$userland" "$img" || die "copying $userland failed"
    agent_copy="$stage/stasis-envd"
    cp "$agent" "$agent_copy"
    strip --strip-debug "$agent_copy" 2>/dev/null || true
    files[1]="$agent_copy"
    # debugfs writes into the image without mounting it (no loop device
    # needed). It reports errors but exits 0, so each file is read back
    # below; and one session per file (a session that allocates after it
    # freed was seen to hand out a block twice).
    for ((i = 0; i < ${#files[@]}; i += 3)); do
        name="${files[i]}" src="${files[i + 1]}" mode="${files[i + 2]}"
        cmds="$stage/debugfs.cmds"
        {
            echo "rm $name"
            echo "write $src $name"
            echo "sif $name mode 0100$mode"
            echo "sif $name uid 0"
            echo "sif $name gid 0"
        } >"$cmds"
        # A missing directory first, in a session of its own.
        debugfs -R "stat $(dirname "$name")" "$img" 2>/dev/null | grep -q '^Inode:' \
            || debugfs -w -R "mkdir $(dirname "$name")" "$img" >>"$stage/debugfs.log" 2>&1
        debugfs -w -f "$cmds" "$img" >>"$stage/debugfs.log" 2>&1 \
            || { cat "$stage/debugfs.log" >&2; die "debugfs failed"; }
    done
    for ((i = 0; i < ${#files[@]}; i += 3)); do
        name="${files[i]}" src="${files[i + 1]}" mode="${files[i + 2]}"
        debugfs -R "dump $name $stage/check" "$img" >/dev/null 2>&1 || true
        cmp -s "$src" "$stage/check" \
            || { cat "$stage/debugfs.log" >&2; die "$name in the image differs from $src after debugfs"; }
        got="$(debugfs -R "stat $name" "$img" 2>/dev/null | sed -n 's/.*Mode: *\(0[0-7]*\).*/\1/p' | head -n1)"
        [[ "$got" == "0$mode" ]] || die "$name has mode ${got:-?} in the image, not 0$mode"
        rm -f "$stage/check"
    done
    e2fsck -fn "$img" >"$stage/fsck.log" 2>&1 \
        || { tail -n 20 "$stage/fsck.log" >&2; die "e2fsck found problems in the new image"; }

    log "[3/3] cache"
    mkdir -p "$out_dir.tmp.$$"
    mv "$img" "$out_dir.tmp.$$/rootfs.ext4"
    { echo "agent $(sha256sum "$agent" | cut -d' ' -f1)"; echo "userland $userland"
      echo "image_secs $((SECONDS - t0))"; cat "$(dirname "$userland")/manifest"; } >"$out_dir.tmp.$$/manifest"
    rm -rf "$out_dir"
    mv "$out_dir.tmp.$$" "$out_dir"
    log "done in $((SECONDS - t0)) s: $out ($(du -h --apparent-size "$out" | cut -f1), $(du -h "$out" | cut -f1) on disk)"
    echo "$out"
}

main "$@"
