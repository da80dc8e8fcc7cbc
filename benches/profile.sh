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
log, div, out, name = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
units = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
tot, cnt = collections.Counter(), collections.Counter()
try:
    lines = open(log, errors="replace").read().splitlines()
except OSError:
    lines = []
for line in lines:
    m = re.match(r"\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)$", line)
    if not m:
        continue
    kernel = re.sub(r"\s+", " ", m.group(3)).strip()
    # Variants of one kernel (fused element-wise kernels above all) differ in a hash suffix:
    # group them as one family.
    kernel = re.sub(r"_[0-9a-f]{8}\b", "", kernel)
    # Matmul names spell out every generic argument; keep the ones that tell routines apart.
    kernel = re.sub(r"\s*\|\s*(TensorArgs|DynamicScalar|DynamicSize|__\w+|\(\))(?=\s*\||$)", "", kernel)
    kernel = kernel.replace(" | ", " / ")
    # cubecl's one-off probes of the device's throughput at start-up are no part of a step.
    if kernel.endswith("DirectThroughput") or kernel == "PrimeBuffer":
        continue
    tot[kernel] += float(m.group(1)) * units[m.group(2)]
    cnt[kernel] += 1
total = sum(tot.values())
rows = [f"# {name}: {sum(cnt.values()) / div:.0f} launches and {1e3 * total / div:.2f} ms of kernel time per unit (divisor {div:g})",
        "", "| kernel | launches | ms | share |", "|---|---:|---:|---:|"]
for k, t in tot.most_common(30):
    rows.append(f"| `{k[:160]}` | {cnt[k] / div:.1f} | {1e3 * t / div:.3f} | {100 * t / max(total, 1e-12):.1f}% |")
open(out, "w").write("\n".join(rows) + "\n")
print("\n".join(rows[:22]))
PY
exit "$rc"
