#!/usr/bin/env bash
# The Linux SDK proof (tests/nested/test_linux_sdk.py) N times in a row
# against one `stasis serve` in one emulated machine (run-l1.sh's serve
# scenario; L1 boots once), then the distribution of "resume -> first agent
# answer" (the SDK's connect plus its first agent call) and the failures.
#
# Usage: tests/nested/sdk-proof-loop.sh STASIS_BIN VMLINUX ROOTFS_EXT4 PYTHON N
#   PYTHON: the SDK virtualenv's python (target/sdk-venv/bin/python, made by
#   tests/linux_sdk.rs); the artifacts as tests/linux_sdk.rs builds them.
# Output: each run's PROOF lines, then "sdk-loop: ..." summary lines.
set -euo pipefail
(($# == 5)) || { echo "usage: $0 STASIS_BIN VMLINUX ROOTFS_EXT4 PYTHON N" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
# Not realpath: a virtualenv's python is a symlink to the base interpreter.
python="$(cd "$(dirname "$4")" && pwd)/$(basename "$4")"
n="$5"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer" >&2; exit 2; }
out="$(mktemp -d "${TMPDIR:-/tmp}/stasis-sdk-loop.XXXXXX")"
key=sdk-loop-proof
client="for i in \$(seq 1 $n); do
  echo \"sdk-loop: run \$i of $n\";
  NOVITA_API_URL=\"\$STASIS_L1_URL\" NOVITA_SANDBOX_URL=\"\$STASIS_L1_URL\" NOVITA_API_KEY=$key \
  STASIS_PROOF_PYTHON=1 PYTHONDONTWRITEBYTECODE=1 \
  '$python' -m pytest -q -s -p no:cacheprovider '$here/test_linux_sdk.py' >'$out/run.'\$i 2>&1;
  echo \"sdk-loop: run \$i exit \$?\"; grep -a -e '^PROOF:' -e 'Exception' -e 'Error' '$out/run.'\$i | tail -n 20;
done; exit 0"
STASIS_L1_SCENARIO=serve STASIS_SERVE_ARGS="--api-key $key" STASIS_SERVE_CLIENT="$client" \
    STASIS_L1_TIMEOUT="${STASIS_L1_TIMEOUT:-$((300 + 150 * n))}" \
    STASIS_INNER_TIMEOUT="${STASIS_INNER_TIMEOUT:-$((280 + 150 * n))}" STASIS_L1_MEM=3072 \
    "$here/run-l1.sh" "$1" "$2" "$3" | tee "$out/all.log" | grep -a -e '^sdk-loop' -e '^PROOF' -e '^run-l1: \(PASS\|FAIL\|L1\|qemu\|total\)' || true
python3 - "$out" "$n" <<'PY'
import glob, os, re, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
times, fails = [], []
for i in range(1, n + 1):
    p = os.path.join(out, f"run.{i}")
    text = open(p, errors="replace").read() if os.path.exists(p) else ""
    m = re.search(r"PROOF: RESUME-TO-FIRST-ANSWER ([0-9.]+) s", text)
    ok = re.search(r"\b1 passed\b", text) is not None
    if not ok:
        why = [l for l in text.splitlines() if "Error" in l or "Exception" in l][-1:] or ["no run"]
        fails.append(f"run {i}: {why[0][:200]}")
    if m:
        times.append(float(m.group(1)))
print(f"sdk-loop: {n} runs, {n - len(fails)} passed, {len(fails)} failed")
for f in fails:
    print(f"sdk-loop: FAILED {f}")
if times:
    t = sorted(times)
    p90 = t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
    print(f"sdk-loop: resume -> first agent answer over {len(t)} runs: min {t[0]:.2f} s, "
          f"median {statistics.median(t):.2f} s, p90 {p90:.2f} s, max {t[-1]:.2f} s")
    print("sdk-loop: all: " + " ".join(f"{x:.2f}" for x in times))
print(f"sdk-loop: logs in {out}")
PY
