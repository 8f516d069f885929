# syntax=docker/dockerfile:1
# The CUDA agent image on NVIDIA's CUDA runtime base with cuDNN. It holds one build per GPU
# generation named in CAPS, and picks the one for the card it finds at start-up
# (deploy/docker/agent-select.sh). Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t fleetmark-agent:cuda .          # all five
#   docker build -f deploy/docker/agent.Dockerfile --build-arg CAPS=75 -t fleetmark-agent:sm75 .
# CAPS: 75 T4, 80 A100, 86 A10/A10G, 89 L4/L40S, 90 H100/H200. Each build takes a while; an image
# for one generation is the quick way to a single kind of node.
#
# The toolkit (CUDA 13.0, from deploy/cuda-toolchain.sh's PyPI wheels) needs driver 580 or
# newer on the node; the runtime base below must be the same CUDA major version.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG CUDA_RUNTIME_IMAGE=docker.io/nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

FROM ${RUST_IMAGE} AS build
ARG CAPS="75 80 86 89 90"
# deploy/cuda-toolchain.sh is a bash script.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/fleetmark-cuda-13.0 \
    --mount=type=cache,target=/src/target \
    set -e; \
    cargo fetch --locked; \
    . deploy/cuda-toolchain.sh; \
    mkdir -p /out; \
    for cap in $CAPS; do \
      CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR=target/cuda-sm$cap \
        cargo build --release --locked -p fleetmark-agent --features cudnn; \
      cp target/cuda-sm$cap/release/fleetmark-agent /out/fleetmark-agent-sm$cap; \
      strip /out/fleetmark-agent-sm$cap; \
    done

FROM ${CUDA_RUNTIME_IMAGE}
COPY --from=build /out/ /opt/fleetmark-agent/libexec/
COPY deploy/fleetmark-agent.sh /opt/fleetmark-agent/bin/fleetmark-agent
COPY deploy/docker/agent-select.sh /usr/local/bin/fleetmark-agent-select
COPY deploy/docker/entrypoint.sh /usr/local/bin/fleetmark-entrypoint
RUN groupadd --system --gid 65532 fleetmark \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/fleetmark --create-home fleetmark \
 && install -d -o 65532 -g 65532 -m 700 /var/lib/fleetmark/state
USER 65532:65532
# Undelivered results are kept under $XDG_STATE_HOME/fleetmark/: mount a volume there to keep
# them across container restarts.
ENV XDG_STATE_HOME=/var/lib/fleetmark/state \
    FLEETMARK_DEVICE=cuda:all \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/var/lib/fleetmark/state"]
ENTRYPOINT ["/usr/local/bin/fleetmark-entrypoint", "/usr/local/bin/fleetmark-agent-select"]
