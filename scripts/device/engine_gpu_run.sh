#!/usr/bin/env bash
# The engine's run on one GPU machine (H200/H100: driver, nvcc, python with torch and the CUDA
# and cuDNN wheels; no Rust, no PostgreSQL, no network). Run it from the repository root:
#
#   scripts/device/engine_gpu_run.sh [MODE[,MODE...]]        (default: as75,sbs)
#
#   as75  the sm_90 build told the device is sm_75: bf16 refused in one line, f32 without TF32,
#         and a bad flag value (--fused-epilogue apii) refused at start-up
#   sbs   inventory; stock and fused against PyTorch's golden logits (`verify`, same weights and
#         input); the fused sweep, the stock sweep and PyTorch (eager/graph, NCHW/channels_last)
#         on the same card; report.md (scripts/bench/side_by_side.py)
#   smoke the kernel pool with graph timing, the defaults before 2026-12-06 and the graph API
#         once each, f16 and f32 at batch 1 and 256, with each record's pool, stem and graph API
#         search: a short first call, so a lost lease costs little
#   ptx   the sm_75 build (fleetmark-agent-sm75.xz) on this card through PTX
#   health  `fleetmark-agent health --device cuda:0` twice, beside nvidia-smi's clocks, power
#         limit, ECC and PCIe link
#   i12   issue 12, the whole system on this machine (coordinator_on_gpu.sh; needs
#         fleetmark-coordinator.xz, fleetmark.xz and pg.tar.xz in BIN as well)
#
# Binaries come from BIN (default: .device-bin in the repository): fleetmark-agent-cuda.xz (or
# fleetmark-agent.xz), a stripped, xz'd `--features cudnn` release build.
# Everything is written under OUT (default /tmp/out): engine_gpu_run.log, as75/, sbs/
# (verify.txt, candle.jsonl with fused and stock records, pytorch.jsonl, report.md, log.txt).
#
# Time: the run ends within BUDGET_S seconds (default 450) however slow a phase is: each phase
# runs under `timeout` with what is left of the budget (less a reserve for the report), and a
# phase that finds the budget spent is skipped with a line saying so. Records are written as
# each job finishes, so a phase cut short still leaves the points it measured.
# Phase caps (seconds): PYTORCH_CAP [150], FUSED_CAP [210], STOCK_CAP [90]; the order is verify,
# PyTorch, fused, stock, report.
# Knobs: BATCHES [1,16,64,256], PRECISIONS [f32,f16,bf16], MIN_TIME [1] seconds per point,
# MIN_ITERS [50], STOCK_BATCHES [$BATCHES], ARTICLE [0], PY [python3, or /opt/torch/.venv/bin/python].
set -uo pipefail
modes=${1:-as75,sbs}
here=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$here/.device-bin}
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-450}
START=$(date +%s)
export DEADLINE=$((START + BUDGET_S))
mkdir -p "$OUT"
exec > >(tee -a "$OUT/engine_gpu_run.log") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), $(($(date +%s) - START)) s in)"; }

# Python with torch: python3 if it has torch, else the machine's torch environment.
PY=${PY:-python3}
if ! $PY -c 'import torch' 2>/dev/null && [ -x /opt/torch/.venv/bin/python ]; then
  PY=/opt/torch/.venv/bin/python
fi
export PY
# The CUDA 13 and cuDNN libraries the agent loads live inside that Python environment.
site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
for d in "$site/nvidia/cu13/lib" "$site/nvidia/cudnn/lib" \
         /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib \
         /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib; do
  [ -d "$d" ] && case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d ;; esac
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}

agent_xz=""
for f in "$BIN/fleetmark-agent-cuda.xz" "$BIN/fleetmark-agent.xz"; do
  [ -f "$f" ] && { agent_xz=$f; break; }
done

step "machine"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
echo "python: $PY; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "agent: ${agent_xz:-none found in $BIN}; budget ${BUDGET_S}s; modes $modes"
ls -l "$BIN" 2>&1

# Runs "$@" under a timeout of what is left of the budget, less RESERVE seconds.
limit() {
  local left=$((DEADLINE - $(date +%s) - ${RESERVE:-0}))
  if [ "$left" -le 5 ]; then
    echo "SKIPPED (time budget spent): $*"
    return 124
  fi
  timeout -k 5 "$left" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "STOPPED after the time budget: $*"
  return "$rc"
}

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
  [ -s "$1" ] || { echo "(no records in $1)"; return 0; }
  $PY - "$1" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    b = r.get("backend", {}); d = b.get("details", {}); c = r.get("correctness") or {}
    err = c.get("max_rel_error")
    print(f"b{r['spec']['batch_size']:<4} {r['spec']['precision']:<5} {b.get('path', '?'):<6} math {b.get('math', '?'):<5} "
          f"p50 {r['latency']['p50_ms']:.3f} ms {r['images_per_sec']:>9.0f} img/s peak {r['peak_memory_bytes']/2**20:.0f} MiB  "
          f"rel err {'-' if err is None else format(err, '.2e')}  stem={d.get('stem_channels')} graph={d.get('cuda_graph')}")
    t = r.get("telemetry") or {}
    def mean(k):
        v = (t.get(k) or {}).get("mean")
        return "-" if v is None else f"{v:.0f}"
    if b.get("path") == "fused":
        print(f"      stem_chunk={d.get('stem_chunk', '-')} pool={d.get('pool_search', '-')} conv_api={d.get('conv_api', '-')} "
              f"graph_api_plan_s={d.get('graph_api_plan_seconds', '-')} sm {mean('sm_clock_mhz')} MHz power {mean('power_watts')} W "
              f"throttled={t.get('throttled', '-')}")
        print(f"      stem_search={d.get('stem_search', '-')}")
    s = r.get("stability")
    if s:
        n = len(s.get("windows") or [])
        more = n > s.get("required_windows", 0)
        counts = globals().setdefault("counts", {"points": 0, "stable": 0, "longer": 0})
        counts["points"] += 1; counts["stable"] += bool(s.get("stable")); counts["longer"] += more
        spread = s.get("spread")
        print(f"      stability: {s.get('stop_reason')} after {n} windows of {s.get('window_seconds')} s, "
              f"spread {'-' if spread is None else format(spread, '.3f')}, timed {r.get('timed_seconds', 0):.2f} s"
              f"{'  (more than the minimum)' if more else ''}")
c = globals().get("counts")
if c:
    print(f"stability rule: {c['stable']} of {c['points']} points stable; "
          f"{c['longer']} needed more than the minimum {''}windows")
PYEOF
}

unpack() { # xz file -> executable path
  xz -dc "$1" > "$2" && chmod +x "$2"
}

for mode in $(echo "$modes" | tr ',' ' '); do
case "$mode" in
as75)
  step "as75: the sm_90 build told the device is sm_75"
  [ -n "$agent_xz" ] || { echo "no agent binary in $BIN"; continue; }
  mkdir -p "$OUT/as75"; a=/tmp/agent90; unpack "$agent_xz" $a || continue
  RESERVE=$((${BUDGET_S} * 3 / 4)) limit $a run --sweep "$(sweep as75 fused 1 bf16,f32)" \
    --out "$OUT/as75/as75.jsonl" --device cuda:0 --name as-sm75 --assume-compute-capability 7.5
  echo "exit code $? (bf16 must be refused in one line; f32 must run with math f32, not tf32)"
  summary "$OUT/as75/as75.jsonl"
  echo "--- a bad flag value stops the agent at start-up"
  limit $a run --sweep /tmp/as75.toml --out "$OUT/as75/bad.jsonl" --device cuda:0 --fused-epilogue apii
  echo "exit code $? (must be non-zero, naming the flag)"
  ;;
sbs)
  step "sbs: verify, fused, stock and PyTorch on this card"
  [ -n "$agent_xz" ] || { echo "no agent binary in $BIN"; continue; }
  PHASES=${PHASES:-inventory,verify,candle,stock,pytorch,report} \
    BATCHES=${BATCHES:-1,16,64,256} STOCK_BATCHES=${STOCK_BATCHES:-${BATCHES:-1,16,64,256}} \
    MIN_TIME=${MIN_TIME:-1} MIN_ITERS=${MIN_ITERS:-50} RESERVE=${RESERVE:-20} ARTICLE=${ARTICLE:-0} \
    PYTORCH_CAP=${PYTORCH_CAP:-150} FUSED_CAP=${FUSED_CAP:-210} STOCK_CAP=${STOCK_CAP:-90} PY=$PY \
    "$here/scripts/device/gpu_side_by_side.sh" "$agent_xz" "$OUT/sbs"
  echo "--- every Candle record (fused and stock)"
  summary "$OUT/sbs/candle.jsonl" | tee "$OUT/sbs/candle-summary.txt"
  ;;
smoke)
  step "smoke: the opt-in levers once each, f16 and f32 at batch 1 and 256 (short)"
  [ -n "$agent_xz" ] || { echo "no agent binary in $BIN"; continue; }
  mkdir -p "$OUT/smoke"; a=/tmp/agents; unpack "$agent_xz" $a || continue
  # cuDNN's description of this card, for planning the graph API in CI without it: commit it
  # as engine/testdata/<card>-deviceprop.json.
  limit $a cudnn-device --device cuda:0 >"$OUT/smoke/cudnn-deviceprop.json" \
    && echo "cuDNN device description: $(wc -c <"$OUT/smoke/cudnn-deviceprop.json") bytes"
  i=0
  # Run 1 is the defaults with the kernel pool forced and a per-layer profile; run 2 is the
  # defaults before 2026-12-06, to compare against the current ones.
  runs=("--fused-pool=kernel --fused-profile"
    "--fused-pool=cudnn --fused-layer-timing=launch --fused-stem-channels=auto --fused-plan=both --fused-conv-api=legacy"
    "--fused-conv-api=auto --fused-layer-timing=graph --fused-stem-channels=s2d")
  # The graph API compiles each plan's kernel while planning (graph_api_plan_seconds says how
  # long): its run is at batch 1 only, where split-K is expected to matter, and with the
  # space-to-depth stems only.
  batches=("1,256" "1,256" "1")
  for flags in "${runs[@]}"; do
    i=$((i + 1))
    echo "--- $flags"
    # Each run leaves the later ones their share of the budget.
    # shellcheck disable=SC2086  # several flags in one string, split on purpose
    RESERVE=$(( BUDGET_S * (${#runs[@]} - i) / ${#runs[@]} )) limit $a run --sweep "$(sweep smoke fused "${batches[i-1]}" f16,f32)" \
      --out "$OUT/smoke/smoke-$i.jsonl" --device cuda:0 --name "smoke $i" $flags
    echo "exit code $?"
    summary "$OUT/smoke/smoke-$i.jsonl"
    [ -s "$OUT/smoke/smoke-$i.jsonl" ] && $PY - "$OUT/smoke/smoke-$i.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    d = r["backend"]["details"]
    print(f"b{r['spec']['batch_size']} {r['spec']['precision']}: pool_search={d.get('pool_search')} "
          f"layer_timing={d.get('layer_timing')} stem_search={d.get('stem_search')}")
    if d.get("conv_api", "legacy") != "legacy":
        print(f"  plan={d.get('plan')}")
        print(f"  graph_api={d.get('graph_api')} plan_seconds={d.get('graph_api_plan_seconds')}")
PYEOF
  done
  ;;
ptx)
  step "ptx: the sm_75 build through PTX"
  [ -f "$BIN/fleetmark-agent-sm75.xz" ] || { echo "no $BIN/fleetmark-agent-sm75.xz"; continue; }
  mkdir -p "$OUT/ptx"; a=/tmp/agent75; unpack "$BIN/fleetmark-agent-sm75.xz" $a || continue
  limit $a inventory --device cuda:0 > "$OUT/ptx/inventory.json"
  limit $a export --seed 0 --weights /tmp/w0.safetensors --input /tmp/x.safetensors --batch 2 --image-size 224
  limit $PY "$here/scripts/bench/pytorch_reference.py" golden --seed 0 --input /tmp/x.safetensors \
    --weights-out /tmp/wt0.safetensors --golden-out "$OUT/ptx/golden.json" --device cuda
  limit $a verify --weights /tmp/wt0.safetensors --input /tmp/x.safetensors --golden "$OUT/ptx/golden.json" \
    --device cuda:0 --engine fused | tee "$OUT/ptx/verify.txt"
  limit $a run --sweep "$(sweep ptx fused 1,16,256 f32,f16,bf16)" --out "$OUT/ptx/ptx.jsonl" --device cuda:0 --name sm75-ptx
  summary "$OUT/ptx/ptx.jsonl"
  limit $a run --sweep "$(sweep as75 fused 1 bf16,f32)" --out "$OUT/ptx/as75.jsonl" --device cuda:0 \
    --name as-sm75 --assume-compute-capability 7.5
  echo "exit code $?"
  summary "$OUT/ptx/as75.jsonl"
  ;;
health)
  step "health: the node health check on this card, twice, beside nvidia-smi's view"
  mkdir -p "$OUT/health"; a=/tmp/agenth; unpack "$agent_xz" $a || continue
  nvidia-smi --query-gpu=clocks.max.sm,power.limit,ecc.mode.current,pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max \
    --format=csv | tee "$OUT/health/nvidia-smi.csv"
  for i in 1 2; do
    limit $a health --device cuda:0 > "$OUT/health/health-$i.json"
    echo "exit code $?"
    cat "$OUT/health/health-$i.json"
  done
  ;;
i12)
  step "i12: coordinator, agent, CLI and PostgreSQL on this machine"
  limit "$here/scripts/device/coordinator_on_gpu.sh" "$BIN" "$OUT/i12" "${I12_DEVICE:-cuda:all}"
  ;;
*)
  echo "unknown mode '$mode' (as75, sbs, smoke, ptx, health, i12)"
  ;;
esac
done
step "done"
