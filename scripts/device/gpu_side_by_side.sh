#!/usr/bin/env bash
# Candle (through the real agent) and PyTorch on the same GPU, in one run, then the report.
# This is the one command behind docs/benchmarks.md's GPU tables:
#
#   scripts/device/gpu_side_by_side.sh AGENT OUTDIR
#
# AGENT is a CUDA build of fleetmark-agent (or a .xz of one). Everything lands in OUTDIR:
# inventory.json, verify.txt, candle.jsonl, pytorch.jsonl, report.md, log.txt.
# Environment knobs (defaults in brackets):
#   PHASES      [inventory,verify,candle,pytorch,report]  also: stock, multigpu, variants, profile
#   BATCHES     [1,4,8,16,32,64,128,256]
#   PRECISIONS  [f32,f16,bf16]
#   MIN_TIME    [2]   seconds of timing per point, both sides
#   MIN_ITERS   [50]
#   PY          [python3]
#   ARTICLE     [1]   also time the T4 article's time.time()-without-synchronize points (PyTorch)
#   DEADLINE    [none] epoch seconds by which every phase must have ended: each phase runs
#               under `timeout` with what is left, less RESERVE [20] seconds kept for the report
#   FUSED_CAP, STOCK_CAP, PYTORCH_CAP [0: none]  at most this many seconds for that phase
#   VARIANTS    [--fused-cuda-graph=off;--fused-epilogue=separate;--fused-stem-channels=3;
#               --fused-algo-candidates=1]  agent flag sets for the variants phase, ';' between
#               sets, spaces between the flags of one set; the set `defaults` runs no flags
#   VARIANT_BATCHES [1,16,256], VARIANT_PRECISIONS [f16]
#   FUSED_FLAGS [none]  agent flags for the `verify` and `candle` phases (the report's fused
#               column; verify checks that configuration against PyTorch's logits), e.g.
#               "--fused-pool=auto --fused-layer-timing=graph"; spaces between flags
#   PYTORCH_LAYOUTS [nchw,channels_last]  the PyTorch layouts timed (the report's ratio is
#               against channels_last with a CUDA graph; its memory check against eager)
#   PROFILE_FLAGS [none], PROFILE_BATCHES [1,256], PROFILE_PRECISIONS [f16,bf16]  the profile phase
# Needs python3 with torch, torchvision, numpy, safetensors; the CUDA and cuDNN libraries on
# LD_LIBRARY_PATH. No network.
set -uo pipefail
agent_in=${1:?usage: gpu_side_by_side.sh AGENT OUTDIR}
out=${2:?usage: gpu_side_by_side.sh AGENT OUTDIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
PHASES=${PHASES:-inventory,verify,candle,pytorch,report}
BATCHES=${BATCHES:-1,4,8,16,32,64,128,256}
PRECISIONS=${PRECISIONS:-f32,f16,bf16}
MIN_TIME=${MIN_TIME:-2}
MIN_ITERS=${MIN_ITERS:-50}
PY=${PY:-python3}
ARTICLE=${ARTICLE:-1}
DEADLINE=${DEADLINE:-0}
RESERVE=${RESERVE:-20}
VARIANTS=${VARIANTS:---fused-cuda-graph=off;--fused-epilogue=separate;--fused-stem-channels=3;--fused-algo-candidates=1}
VARIANT_BATCHES=${VARIANT_BATCHES:-1,16,256}
VARIANT_PRECISIONS=${VARIANT_PRECISIONS:-f16}
read -ra fused_flags <<< "${FUSED_FLAGS:-}"
read -ra profile_flags <<< "${PROFILE_FLAGS:-}"
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
has() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
# Runs "$@", under a timeout of what is left before DEADLINE (less `reserve` seconds, and at
# most `cap` seconds when that is set) if DEADLINE is set.
limit() {
  [ "$DEADLINE" -gt 0 ] || { "$@"; return; }
  local left=$((DEADLINE - $(date +%s) - ${reserve:-$RESERVE}))
  [ "${cap:-0}" -gt 0 ] && [ "$cap" -lt "$left" ] && left=$cap
  if [ "$left" -le 5 ]; then
    echo "SKIPPED (time budget spent): $*"
    return 124
  fi
  timeout -k 5 "$left" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "STOPPED at the time budget: $*"
  return "$rc"
}

agent=/tmp/fleetmark-agent
case "$agent_in" in
  *.xz) xz -dc "$agent_in" > "$agent" ;;
  *) cp "$agent_in" "$agent" ;;
esac
chmod +x "$agent"

step "machine"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cudnn", torch.backends.cudnn.version())'
date -u +"%Y-%m-%dT%H:%M:%SZ"

if has inventory; then
  step "inventory and start-up checks"
  limit "$agent" inventory --device cuda:0 > "$out/inventory.json"
  head -c 2000 "$out/inventory.json"; echo
fi

if has verify; then
  step "PyTorch golden logits and Candle against them (fused flags: ${FUSED_FLAGS:-none})"
  limit "$agent" export --seed 0 --weights /tmp/w_seed0.safetensors --input /tmp/x.safetensors --batch 2 --image-size 224
  limit $PY "$here/scripts/bench/pytorch_reference.py" golden --seed 0 --input /tmp/x.safetensors \
    --weights-out /tmp/w_torch0.safetensors --golden-out "$out/golden_torch0.json" --device cuda
  limit "$agent" verify --weights /tmp/w_torch0.safetensors --input /tmp/x.safetensors \
    --golden "$out/golden_torch0.json" --device cuda:0 --engine stock,fused \
    ${fused_flags[@]+"${fused_flags[@]}"} | tee "$out/verify.txt"
fi

sweep() { # name engine batches precisions min_iters [repetitions]
  cat > "/tmp/$1.toml" <<TOML
name = "$1"
repetitions = ${6:-1}
batch_sizes = [$3]
precisions = [$(echo "$4" | sed 's/[^,]*/"&"/g')]
gpus = ["gpu"]
engine = "$2"
[measurement]
warmup_iterations = 10
warmup_duration = "500ms"
min_iterations = $5
min_duration = "${MIN_TIME}s"
max_duration = "60s"
TOML
  echo "/tmp/$1.toml"
}

if has pytorch; then
  step "PyTorch, same card, same run"
  article=(); [ "$ARTICLE" = 1 ] && article=(--article)
  cap=${PYTORCH_CAP:-0} limit env PYTHONUNBUFFERED=1 $PY "$here/scripts/bench/pytorch_reference.py" bench --weights /tmp/w_torch0.safetensors \
    --device cuda --batches "$BATCHES" --precisions "$PRECISIONS" --layouts "${PYTORCH_LAYOUTS:-nchw,channels_last}" \
    --modes eager,graph --warmup-iters 10 --min-iters "$MIN_ITERS" --min-time "$MIN_TIME" \
    --out "$out/pytorch.jsonl" "${article[@]}"
fi

if has candle; then
  step "Candle fused path, every point (flags: ${FUSED_FLAGS:-none})"
  cap=${FUSED_CAP:-0} limit "$agent" run --sweep "$(sweep fused fused "$BATCHES" "$PRECISIONS" "$MIN_ITERS")" \
    --out "$out/candle.jsonl" --device cuda:0 --name h100-fused ${fused_flags[@]+"${fused_flags[@]}"}
fi

if has stock; then
  step "Candle stock path (candle-nn as it comes)"
  cap=${STOCK_CAP:-0} limit "$agent" run --sweep "$(sweep stock stock "${STOCK_BATCHES:-$BATCHES}" "$PRECISIONS" 20)" \
    --out "$out/candle_stock.jsonl" --device cuda:0 --name h100-stock
  cat "$out/candle_stock.jsonl" >> "$out/candle.jsonl" 2>/dev/null
fi

if has variants; then
  step "fused-path variants (VARIANTS: flag sets separated by ';'), batches $VARIANT_BATCHES, $VARIANT_PRECISIONS"
  IFS=';' read -ra variant_sets <<< "$VARIANTS"
  for v in "${variant_sets[@]}"; do
    flags=()
    [ "$v" = defaults ] || read -ra flags <<< "$v"
    echo "--- $v"
    limit "$agent" run --sweep "$(sweep "var" fused "$VARIANT_BATCHES" "$VARIANT_PRECISIONS" "$MIN_ITERS")" \
      --out "/tmp/var.jsonl" --device cuda:0 --name "variant $v" ${flags[@]+"${flags[@]}"} \
      && $PY - "$v" /tmp/var.jsonl >> "$out/variants.txt" <<'PYEOF'
import json, sys
for line in open(sys.argv[2]):
    r = json.loads(line); d = r['backend']['details']
    print(f"{sys.argv[1]:<48} b{r['spec']['batch_size']:<4} {r['spec']['precision']:<5} p50 {r['latency']['p50_ms']:.3f} ms  {r['images_per_sec']:.0f} img/s  peak {r['peak_memory_bytes']/2**20:.0f} MiB  graph={d.get('cuda_graph')} stem={d.get('stem_layout')}{d.get('stem_channels')} pool={d.get('pool_search', '-')} stem_pool={d.get('stem_pool_search', '-')}")
PYEOF
  done
  cat "$out/variants.txt"
fi

if has profile; then
  step "per-layer profile of the fused plan (${PROFILE_PRECISIONS:-f16,bf16}, batches ${PROFILE_BATCHES:-1,256}, flags: ${PROFILE_FLAGS:-none})"
  limit "$agent" run --sweep "$(sweep prof fused "${PROFILE_BATCHES:-1,256}" "${PROFILE_PRECISIONS:-f16,bf16}" 10)" \
    --out /tmp/prof.jsonl --device cuda:0 --name profile --fused-profile ${profile_flags[@]+"${profile_flags[@]}"}
  cp /tmp/prof.jsonl "$out/profile.jsonl"
  $PY - /tmp/prof.jsonl <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); d = r["backend"]["details"]
    print(f"b{r['spec']['batch_size']} {r['spec']['precision']}: forward p50 {r['latency']['p50_ms']:.3f} ms; stem search {d.get('stem_search')}; stem channels {d.get('stem_channels')}")
    print("  plan:", d.get("plan"))
    print("  stem and pool as one kernel:", d.get("stem_pool_search", "-"))
    print("  per-step ms:", d.get("profile_ms"))
    for key in sorted(k for k in d if k.startswith("layer_search_ms.")):
        print(f"  searched {key[len('layer_search_ms.'):]}: {d[key]}")
PYEOF
fi

if has multigpu; then
  step "one agent, every GPU: jobs run in parallel, one per GPU"
  n=$(nvidia-smi -L | wc -l)
  limit "$agent" run --sweep "$(sweep multi fused "64,128" f16 "$MIN_ITERS" 4)" \
    --out /tmp/multigpu.jsonl --device cuda:all --name multi-gpu
  $PY - /tmp/multigpu.jsonl "$n" <<'PYEOF' | tee "$out/multigpu.txt"
import json, sys
from datetime import datetime
rs = [json.loads(l) for l in open(sys.argv[1])]
def t(s): return datetime.fromisoformat(s.replace("Z", "+00:00"))
print(f"{len(rs)} jobs on {sys.argv[2]} GPUs")
for r in sorted(rs, key=lambda r: r["started_at"]):
    print(f"{r['device']:<7} {r['hardware_name']:<28} b{r['spec']['batch_size']:<4} {t(r['started_at']).time()} -> {t(r['finished_at']).time()} {r['images_per_sec']:.0f} img/s")
devs = sorted({r["device"] for r in rs})
overlap = any(t(a["started_at"]) < t(b["finished_at"]) and t(b["started_at"]) < t(a["finished_at"])
              for a in rs for b in rs if a["device"] != b["device"])
print("devices used:", devs, "; jobs on different GPUs overlapped in time:", overlap)
PYEOF
fi

if has report; then
  step "report"
  reserve=0 limit $PY "$here/scripts/bench/side_by_side.py" --candle "$out/candle.jsonl" --pytorch "$out/pytorch.jsonl" \
    --out "$out/report.md" && cat "$out/report.md"
fi
