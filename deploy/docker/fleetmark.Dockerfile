# syntax=docker/dockerfile:1
# The `fleetmark` image: fleetmark-coordinator (the entrypoint), the fleetmark CLI, and a CPU
# build of fleetmark-agent (for trying a sweep without a GPU). Build from the repository root:
#   docker build -f deploy/docker/fleetmark.Dockerfile -t fleetmark:latest .
# With --build-arg BINARIES=prebuilt it packages binaries already built on a bookworm host
# (copied into prebuilt/ at the repository root) instead of compiling them again; CI's podman
# smoke test (.ci/podman-smoke.sh) does that.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# protoc comes from the protoc-bin-vendored crate; nothing else is needed to build.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p fleetmark-coordinator -p fleetmark -p fleetmark-agent \
 && mkdir -p /out \
 && cp target/release/fleetmark-coordinator target/release/fleetmark target/release/fleetmark-agent /out/

FROM scratch AS prebuilt
COPY prebuilt/fleetmark-coordinator prebuilt/fleetmark prebuilt/fleetmark-agent /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binaries /out/ /usr/local/bin/
COPY deploy/docker/entrypoint.sh /usr/local/bin/fleetmark-entrypoint
# A fixed unprivileged user (Kubernetes runAsNonRoot needs a numeric one).
RUN groupadd --system --gid 65532 fleetmark \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/fleetmark --create-home fleetmark \
 && install -d -o 65532 -g 65532 -m 700 /var/lib/fleetmark/state
USER 65532:65532
ENV XDG_STATE_HOME=/var/lib/fleetmark/state \
    FLEETMARK_LISTEN=0.0.0.0:7070
EXPOSE 7070
ENTRYPOINT ["/usr/local/bin/fleetmark-entrypoint", "/usr/local/bin/fleetmark-coordinator"]
