#!/bin/sh
# Launcher for CUDA builds of fleetmark-agent. The CUDA agent links libcuda (the driver),
# cuBLAS, cuRAND, NVRTC and cuDNN; when one is missing the dynamic loader refuses to start it
# with a terse message. This checks first and says what is wrong and what to do.
# Layout (as deploy/build-agents.sh makes it): bin/fleetmark-agent (this), libexec/fleetmark-agent.
here=$(dirname "$(readlink -f "$0")")
bin="${FLEETMARK_AGENT_BIN:-$here/../libexec/fleetmark-agent}"
# The token may come from a file (systemd credentials, container secrets): FLEETMARK_TOKEN_FILE.
if [ -n "${FLEETMARK_TOKEN_FILE:-}" ]; then
  if [ -n "${FLEETMARK_TOKEN:-}" ]; then
    echo "error: both FLEETMARK_TOKEN and FLEETMARK_TOKEN_FILE are set; set only one" >&2
    exit 64
  fi
  FLEETMARK_TOKEN=$(cat "$FLEETMARK_TOKEN_FILE") || { echo "error: cannot read FLEETMARK_TOKEN_FILE=$FLEETMARK_TOKEN_FILE" >&2; exit 66; }
  [ -n "$FLEETMARK_TOKEN" ] || { echo "error: FLEETMARK_TOKEN_FILE=$FLEETMARK_TOKEN_FILE is empty" >&2; exit 66; }
  export FLEETMARK_TOKEN
  unset FLEETMARK_TOKEN_FILE
fi
if [ ! -x "$bin" ]; then
  echo "error: $bin is missing or not executable" >&2
  exit 127
fi
missing=$(ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
  for lib in $missing; do
    case "$lib" in
      libcuda.so*)
        echo "error: $lib not found: the NVIDIA driver is not installed, so this machine has no usable GPU. Install the driver, or run a CPU build of fleetmark-agent (--device cpu)." ;;
      libcudnn*)
        echo "error: $lib not found: install cuDNN 9 (for example the nvidia-cudnn-cu13 wheel) and add its lib folder to LD_LIBRARY_PATH." ;;
      libcublas*|libcurand*|libnvrtc*|libcudart*)
        echo "error: $lib not found: install the CUDA 13 runtime libraries (nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc wheels or the CUDA toolkit) and add their lib folder to LD_LIBRARY_PATH." ;;
      *)
        echo "error: $lib not found (needed by $bin)." ;;
    esac
  done >&2
  exit 127
fi
exec "$bin" "$@"
