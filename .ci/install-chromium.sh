#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the `fleetmark report` rendering test
# (cli/tests/plot_report.rs). Safe to run twice. Needs root (CI runs as root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed $(chromium --version 2>/dev/null || echo chromium)"
