#!/usr/bin/env bash
# Per-kernel GPU time of one ember command, from cubecl's own profiler: a `cubecl.toml` in a
# scratch working directory turns on its profiling logger, which times every launch on the
# device (each launch then waits for the one before it, so totals are kernel time, not the
# wall time of a normal run) and logs `| duration | kernel`. The lines are folded into a
# table of kernels by total time, with launch counts, written as markdown.
#
#   benches/profile.sh NAME DIVISOR EMBER ARGS...
#
# NAME names the output ($OUT/profile-NAME.md, or /tmp when OUT is unset); DIVISOR divides
# the counts and times (steps, or decoded tokens) so that the table reads per step. Paths
# in ARGS must be absolute: the command runs in the scratch directory.
#
# DIVISOR `steady:K` keeps only the steady state: the log's last K repeats of one sequence of
# kernel names (a training step after the first, whose compilation probes and autotune
# candidates are launches too), found as the longest period that the log's tail repeats K
# times, and divides by K. Run at least K + 1 steps. With no such period it says so and folds
# the whole log, divided by K.
set -uo pipefail
name=$1 divisor=$2; shift 2
dir=${OUT:-/tmp}; mkdir -p "$dir"
work=$(mktemp -d /tmp/ember-profile-XXXX)
log="$work/kernels.log"
cat >"$work/cubecl.toml" <<EOF
[profiling.logger]
level = "basic"
file = "$log"
EOF
(cd "$work" && "$@") 2>&1 | grep -v '^step [0-9]*/'
rc=${PIPESTATUS[0]}
python3 - "$log" "$divisor" "$dir/profile-$name.md" "$name" <<'PY'
import collections, re, sys
log, div_arg, out, name = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
div = 1.0 if div_arg.startswith("steady:") else float(div_arg)
units = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
tot, cnt = collections.Counter(), collections.Counter()
try:
    lines = open(log, errors="replace").read().splitlines()
except OSError:
    lines = []
launches = []
for line in lines:
    m = re.match(r"\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)$", line)
    if m:
        launches.append((float(m.group(1)) * units[m.group(2)], re.sub(r"\s+", " ", m.group(3)).strip()))


def steady_tail(names, k):
    """The length of the longest period that the tail of `names` repeats `k` times, or None.
    On the reversed sequence, z[p] (the Z-function) is how far it matches itself shifted by
    p, so a tail made of k copies of p names has z[p] >= (k - 1) * p. The longest such p is
    one whole step: a shorter one only repeats within a step (a run of identical update
    kernels), and a multiple of a step needs more identical steps than the run has."""
    r = names[::-1]
    n = len(r)
    z, left, right = [0] * n, 0, 0
    for i in range(1, n):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < n and r[z[i]] == r[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    # A step is at least a small share of the log (unless the first step's probes outweigh
    # some 50 steps); a period within a step (the update's per-layer kernels) may not be.
    shortest = n // (4 * (k + 2))
    found = [p for p in range(max(1, shortest), n // k + 1) if z[p] >= (k - 1) * p]
    return max(found) if found else None


note = ""
if div_arg.startswith("steady:"):
    k = int(div_arg.split(":", 1)[1])
    div = float(k)
    period = steady_tail([name for _, name in launches], k) if k >= 2 else None
    if period:
        launches = launches[-k * period:]
        note = f"; the last {k} repeats of a {period}-launch step, out of {len(lines)} log lines"
    else:
        note = f"; no step repeated {k} times at the end of the log, so all of it"
for secs, kernel in launches:
    # Variants of one kernel (fused element-wise kernels above all) differ in a hash suffix:
    # group them as one family.
    kernel = re.sub(r"_[0-9a-f]{8}\b", "", kernel)
    # Matmul names spell out every generic argument; keep the ones that tell routines apart.
    kernel = re.sub(r"\s*\|\s*(TensorArgs|DynamicScalar|DynamicSize|__\w+|\(\))(?=\s*\||$)", "", kernel)
    kernel = kernel.replace(" | ", " / ")
    # cubecl's one-off probes of the device's throughput at start-up are no part of a step.
    if kernel.endswith("DirectThroughput") or kernel == "PrimeBuffer":
        continue
    tot[kernel] += secs
    cnt[kernel] += 1
total = sum(tot.values())
rows = [f"# {name}: {sum(cnt.values()) / div:.0f} launches and {1e3 * total / div:.2f} ms of kernel time per unit (divisor {div:g}{note})",
        "", "| kernel | launches | ms | share |", "|---|---:|---:|---:|"]
for k, t in tot.most_common(30):
    rows.append(f"| `{k[:160]}` | {cnt[k] / div:.1f} | {1e3 * t / div:.3f} | {100 * t / max(total, 1e-12):.1f}% |")
open(out, "w").write("\n".join(rows) + "\n")
print("\n".join(rows[:22]))
PY
exit "$rc"
