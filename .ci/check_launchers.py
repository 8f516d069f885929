#!/usr/bin/env python3
"""Parses the SkyPilot and dstack agent tasks with those tools' own code, for check-deploy.sh.

Each is parsed as a user would launch it (the required settings given), and once with a
misspelt key, which must be rejected, so the check can fail.

Usage: check_launchers.py SKYPILOT_YAML DSTACK_YAML
"""

import copy
import sys

import yaml
import sky
from dstack._internal.core.models.configurations import parse_run_configuration

sky_path, dstack_path = sys.argv[1], sys.argv[2]
env = [("FLEETMARK_COORDINATOR", "https://coordinator.example.com:7070"),
       ("FLEETMARK_AGENT_URL", "https://downloads.example.com/fleetmark-agent-sm{cap}.tar.xz")]
secrets = [("FLEETMARK_TOKEN", "token")]

cfg = yaml.safe_load(open(sky_path))
task = sky.Task.from_yaml_config(copy.deepcopy(cfg), env_overrides=env, secrets_overrides=secrets)
res = next(iter(task.resources))
assert res.accelerators == {"T4": 1}, res.accelerators
assert res.use_spot, "the default is a spot instance"
print(f"skypilot {sky.__version__}: {sky_path} parses: {res}")
bad = copy.deepcopy(cfg)
bad["resources"]["use_spott"] = bad["resources"].pop("use_spot")
try:
    sky.Task.from_yaml_config(bad, env_overrides=env, secrets_overrides=secrets)
    sys.exit("skypilot accepted a misspelt key")
except Exception as e:  # noqa: BLE001 - the rejection is what is tested
    print(f"skypilot rejects a misspelt key: {type(e).__name__}")

cfg = yaml.safe_load(open(dstack_path))
run = parse_run_configuration(copy.deepcopy(cfg))
assert run.type == "task" and run.resources.gpu.name == ["T4"], run.resources.gpu
print(f"dstack: {dstack_path} parses: gpu {run.resources.gpu.name} x{run.resources.gpu.count}, spot policy {run.spot_policy.value}")
bad = copy.deepcopy(cfg)
bad["spot_polcy"] = bad.pop("spot_policy")
try:
    parse_run_configuration(bad)
    sys.exit("dstack accepted a misspelt key")
except Exception as e:  # noqa: BLE001
    print(f"dstack rejects a misspelt key: {type(e).__name__}")
