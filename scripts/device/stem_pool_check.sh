#!/usr/bin/env bash
# Checks the stem-and-pool kernel (engine/kernels/stem_pool.cu) on a GPU machine from outside
# the planner's own comparison, run from the repository root:
#   1. the standalone probe against a plain stem and pool, at 224 pixels and at sizes whose
#      edge tiles are partial (200 and 161 pixels: pooled sides 50 and 41);
#   2. the agent with the kernel forced (--fused-stem-pool=kernel) at those sizes, in f16 and
#      bf16, each job's logits checked against Candle's CPU model (the record's correctness).
# Writes OUT/stem_pool_check.txt. Needs nvcc and a CUDA agent (.device-bin/fleetmark-agent-cuda.xz).
set -uo pipefail
OUT=${OUT:-/tmp/out}
BIN=${BIN:-.device-bin}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/stem_pool_check.txt") 2>&1
echo "=== probe ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
nvcc -std=c++17 -O3 -arch=sm_90 -I engine/kernels scripts/device/stem_pool_probe.cu -o /tmp/stem_pool_probe
for args in "3 200" "3 161" "2 33" "256 224"; do /tmp/stem_pool_probe $args; done
echo "=== the agent, kernel forced, odd sizes"
xz -dc "$BIN/fleetmark-agent-cuda.xz" > /tmp/agent_sp && chmod +x /tmp/agent_sp
for size in 200 161 224; do
  cat > /tmp/sp_$size.toml <<TOML
name = "stem-pool-$size"
batch_sizes = [3, 64]
precisions = ["f16", "bf16"]
gpus = ["gpu"]
engine = "fused"
image_size = $size
[measurement]
warmup_iterations = 3
min_iterations = 10
min_duration = "200ms"
TOML
  /tmp/agent_sp run --sweep /tmp/sp_$size.toml --out /tmp/sp_$size.jsonl --device cuda:0 \
    --fused-stem-pool=kernel >/tmp/sp_$size.log 2>&1
  echo "size $size: exit $?"; tail -3 /tmp/sp_$size.log
  python3 - /tmp/sp_$size.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); d = r["backend"]["details"]; c = r["correctness"]
    print(f"  {r['spec']['image_size']}px b{r['spec']['batch_size']} {r['spec']['precision']}: "
          f"correctness {'passed' if c['passed'] else 'FAILED'} max_rel {c['max_rel_error']:.2e} "
          f"top1 {c['top1_agreement']:.2f} vs {c['reference']}; {d.get('plan', '').split()[0]}; "
          f"{d.get('stem_pool_search')}")
PY
done
