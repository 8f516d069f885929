#!/bin/sh
# Picks the CUDA agent build for the GPU this container sees and runs it through the launcher
# (deploy/fleetmark-agent.sh, which checks the driver and CUDA libraries first).
#
# The image holds one build per GPU generation, /opt/fleetmark-agent/libexec/fleetmark-agent-sm<CAP>
# (CAP 75 T4, 80 A100, 86 A10/A10G, 89 L4/L40S, 90 H100/H200; the CAPS build argument chooses
# which). `nvidia-smi --query-gpu=compute_cap` names the card's generation; the exact build is
# used, or else the newest older one (it runs through the driver's PTX compiler, untuned; the
# agent warns). FLEETMARK_COMPUTE_CAP=86 overrides the detection.
set -eu
libexec="${FLEETMARK_LIBEXEC:-/opt/fleetmark-agent/libexec}"
launcher="${FLEETMARK_LAUNCHER:-/opt/fleetmark-agent/bin/fleetmark-agent}"

cap="${FLEETMARK_COMPUTE_CAP:-}"
if [ -z "$cap" ]; then
  if ! caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>&1); then
    echo "error: nvidia-smi failed, so no GPU is visible to this container: $caps" >&2
    echo "hint: run it with the NVIDIA container toolkit (docker run --gpus all, or a" >&2
    echo "      Kubernetes node with the NVIDIA device plugin), or use --device cpu." >&2
    exit 69
  fi
  distinct=$(printf '%s\n' "$caps" | tr -d ' .' | grep -v '^$' | sort -u)
  [ -n "$distinct" ] || { echo "error: nvidia-smi lists no GPU" >&2; exit 69; }
  if [ "$(printf '%s\n' "$distinct" | wc -l)" -gt 1 ]; then
    echo "error: this container sees GPUs of different generations ($(echo $distinct | tr ' ' ,));" >&2
    echo "       run one agent per generation (NVIDIA_VISIBLE_DEVICES=<index> for each)." >&2
    exit 69
  fi
  cap="$distinct"
fi
case "$cap" in
  *[!0-9]*|'') echo "error: compute capability '$cap' is not a number like 75 or 90" >&2; exit 64 ;;
esac

best=""
for bin in "$libexec"/fleetmark-agent-sm*; do
  [ -x "$bin" ] || continue
  c="${bin##*-sm}"
  case "$c" in *[!0-9]*|'') continue ;; esac
  if [ "$c" -le "$cap" ] && { [ -z "$best" ] || [ "$c" -gt "${best##*-sm}" ]; }; then
    best="$bin"
  fi
done
if [ -z "$best" ]; then
  have=$(ls "$libexec" 2>/dev/null | sed -n 's/^fleetmark-agent-sm//p' | tr '\n' ' ')
  echo "error: no agent build in this image runs on sm_$cap (builds: ${have:-none});" >&2
  echo "       rebuild the image with --build-arg CAPS=$cap" >&2
  exit 69
fi
if [ "${best##*-sm}" != "$cap" ]; then
  echo "warning: no sm_$cap build in this image; using ${best##*/} through the driver's PTX compiler (slower start, untuned kernels)" >&2
fi
FLEETMARK_AGENT_BIN="$best"
export FLEETMARK_AGENT_BIN
exec "$launcher" "$@"
