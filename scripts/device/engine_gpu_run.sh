#!/usr/bin/env bash
# The engine helper's GPU runs, one command per device call, everything packed into $OUT:
#   engine_gpu_run.sh sbs,as75,i12   several in one call, in order
#   engine_gpu_run.sh as75   the sm_90 build told the device is sm_75 (bf16 refused, f32 not TF32)
#   engine_gpu_run.sh i12    issue 12: coordinator_on_gpu.sh
#   engine_gpu_run.sh sbs    the restructured fused path against PyTorch (gpu_side_by_side.sh)
#   engine_gpu_run.sh ptx    the sm_75 build on this card through PTX: checks, numbers, and its
#                            refusal of bf16 when told the device is sm_75; then issue 12
#                            (coordinator_on_gpu.sh) unless SKIP_I12=1
# Run from a folder holding scripts/ and the xz'd binaries (BIN, default: this script's ../..).
set -uo pipefail
mode=${1:?usage: engine_gpu_run.sh MODE[,MODE...] (sbs, as75, i12, ptx)}
here=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$here}
OUT=${OUT:-/tmp/out}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib
PY=${PY:-python3}
nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
date -u +"%Y-%m-%dT%H:%M:%SZ"
sweep() { # name engine batches precisions
  cat > "/tmp/$1.toml" <<TOML
name = "$1"
batch_sizes = [$3]
precisions = [$(echo "$4" | sed 's/[^,]*/"&"/g')]
gpus = ["gpu"]
engine = "$2"
[measurement]
warmup_iterations = 10
warmup_duration = "500ms"
min_iterations = 50
min_duration = "1s"
max_duration = "60s"
TOML
  echo "/tmp/$1.toml"
}
summary() { # jsonl
  $PY - "$1" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); d = r["backend"]["details"]
    print(f"b{r['spec']['batch_size']:<4} {r['spec']['precision']:<5} math {r['backend']['math']:<5} p50 {r['latency']['p50_ms']:.3f} ms "
          f"{r['images_per_sec']:>9.0f} img/s peak {r['peak_memory_bytes']/2**20:.0f} MiB  rel err {r['correctness']['max_rel_error']:.2e}  "
          f"kernel_code={d.get('kernel_code')} stem={d.get('stem_channels')} graph={d.get('cuda_graph')}")
PYEOF
}
mkdir -p /tmp/as75
for mode in $(echo "$mode" | tr ',' ' '); do
case "$mode" in
as75)
  # The build at hand (sm_90) on this card, told the device is sm_75: bf16 must be refused in
  # one line, f32 must run without TF32.
  a=/tmp/agent90; xz -dc "$BIN/fleetmark-agent.xz" > $a && chmod +x $a
  {
    $a run --sweep "$(sweep as75 fused 1 bf16,f32)" --out /tmp/as75/as75.jsonl --device cuda:0 \
      --name as-sm75 --assume-compute-capability 7.5
    echo "exit code $?"
    summary /tmp/as75/as75.jsonl
    echo "=== a bad flag value stops the agent at start-up"
    $a run --sweep /tmp/as75.toml --out /tmp/as75/bad.jsonl --device cuda:0 --fused-epilogue apii; echo "exit code $?"
  } 2>&1 | tee /tmp/as75/log.txt
  tar cJf "$OUT/as75.tar.xz" -C /tmp as75
  ;;
i12)
  "$here/scripts/device/coordinator_on_gpu.sh" "$BIN" /tmp/i12 "${I12_DEVICE:-cuda:all}"
  tar cJf "$OUT/i12.tar.xz" -C /tmp i12
  cp /tmp/i12/db.txt "$OUT/" 2>/dev/null
  ;;
sbs)
  PHASES=${PHASES:-inventory,verify,candle,pytorch,report} MIN_TIME=${MIN_TIME:-1} MIN_ITERS=50 BATCHES=${SBS_BATCHES:-1,4,8,16,32,64,128,256} \
    "$here/scripts/device/gpu_side_by_side.sh" "$BIN/fleetmark-agent.xz" /tmp/sbs
  summary /tmp/sbs/candle.jsonl | tee /tmp/sbs/candle-summary.txt
  tar cJf "$OUT/sbs.tar.xz" -C /tmp sbs
  cp /tmp/sbs/report.md /tmp/sbs/verify.txt "$OUT/" 2>/dev/null
  ;;
ptx)
  mkdir -p /tmp/ptx; a=/tmp/agent75
  xz -dc "$BIN/fleetmark-agent-sm75.xz" > $a && chmod +x $a
  {
    echo "=== sm_75 build: start-up checks on this card"
    time $a inventory --device cuda:0 > /tmp/ptx/inventory.json
    echo "=== sm_75 build: verify against PyTorch (same weights and input)"
    $a export --seed 0 --weights /tmp/w0.safetensors --input /tmp/x.safetensors --batch 2 --image-size 224
    $PY "$here/scripts/bench/pytorch_reference.py" golden --seed 0 --input /tmp/x.safetensors \
      --weights-out /tmp/wt0.safetensors --golden-out /tmp/ptx/golden.json --device cuda
    $a verify --weights /tmp/wt0.safetensors --input /tmp/x.safetensors --golden /tmp/ptx/golden.json \
      --device cuda:0 --engine fused
    echo "=== sm_75 build: fused numbers through PTX"
    $a run --sweep "$(sweep ptx fused 1,16,256 f32,f16,bf16)" --out /tmp/ptx/ptx.jsonl --device cuda:0 --name sm75-ptx
    summary /tmp/ptx/ptx.jsonl
    echo "=== sm_75 build told the device is sm_75: bf16 refused in one line, f32 without TF32"
    $a run --sweep "$(sweep as75 fused 1 bf16,f32)" --out /tmp/ptx/as75.jsonl --device cuda:0 \
      --name as-sm75 --assume-compute-capability 7.5
    echo "exit code $?"
    summary /tmp/ptx/as75.jsonl
    echo "=== a bad flag value stops the agent at start-up"
    $a run --sweep /tmp/as75.toml --out /tmp/ptx/bad.jsonl --device cuda:0 --fused-epilogue apii; echo "exit code $?"
  } 2>&1 | tee /tmp/ptx/log.txt
  if [ "${SKIP_I12:-0}" != 1 ]; then
    "$here/scripts/device/coordinator_on_gpu.sh" "$BIN" /tmp/i12 "${I12_DEVICE:-cuda:all}"
  fi
  tar cJf "$OUT/ptx_i12.tar.xz" -C /tmp ptx i12 2>/dev/null || tar cJf "$OUT/ptx_i12.tar.xz" -C /tmp ptx
  ;;
esac
done
