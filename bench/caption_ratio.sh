#!/usr/bin/env bash
# This stack's caption GRPO step against TRL's GRPOTrainer, one configuration per fresh process,
# alternated (ours, trl, ours, trl, ...), at 1 and 2 threads (bench/RESULTS.md, "Caption GRPO vs TRL").
#
#     bash bench/caption_ratio.sh [repeats=3] [steps=10] > ratio.jsonl
#
# Prints `uptime` before each pair and one JSON line per run (bench/caption_grpo_vs_trl.py), then a
# summary: the median s/step (wall and CPU) of each side and their ratio, per thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}; steps=${2:-10}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log=$(mktemp)
for threads in 1 2; do
    for ((i = 0; i < repeats; i++)); do
        echo "# $(uptime)" >&2
        for impl in ours trl; do
            python bench/caption_grpo_vs_trl.py --impl "$impl" --threads "$threads" --steps "$steps" 2>/dev/null \
                | grep '^{' | tail -1 | tee -a "$log"
        done
    done
done
python - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for threads in sorted({r["threads"] for r in rows}):
    med = {}
    for impl in ("ours", "trl"):
        rs = [r for r in rows if r["threads"] == threads and r["impl"] == impl]
        med[impl] = {k: statistics.median(r[k] for r in rs) for k in ("wall_median", "cpu_median")}
    print(f"# threads {threads}: " + ", ".join(
        f"{k}: ours {med['ours'][k]:.3f} trl {med['trl'][k]:.3f} ratio {med['ours'][k] / med['trl'][k]:.2f}x"
        for k in med["ours"]), file=sys.stderr)
PY
