#!/usr/bin/env python3
"""PyTorch CPU against Candle CPU, back to back, on this machine: ResNet18 f32 224x224 at batch
1 and 8, same seeded weights, same warm-up and iteration minimums.

Runs

1. ``fleetmark-agent export --seed 0`` (the weights Candle's seeded jobs use, for PyTorch too);
2. ``pytorch_reference.py bench --device cpu`` with the venv's python (eager, NCHW, f32,
   ``time.perf_counter`` around each synchronous forward, all of torch's threads);
3. ``fleetmark-agent run --sweep scripts/bench/cpu_sweep.toml`` (Candle CPU, engine auto: the
   NHWC executor with batch norm folded, each forward timed by a host clock the same way);

then prints the machine (``nproc``, CPU model, load average), the versions, a table per batch and
the ratio Candle images/s ÷ PyTorch images/s (images/s = batch x 1000 / mean latency).

Usage, from the repository root (standard library only; needs a built agent)::

    cargo build -p fleetmark-agent
    python3 scripts/bench/cpu_side_by_side.py --save scripts/bench/cpu_side_by_side.out.txt

Options: ``--python`` (the interpreter with torch; default ``$FLEETMARK_TORCH_PYTHON``, else
/work/.venv-torch/bin/python if present, else this interpreter), ``--agent`` (default
target/release/fleetmark-agent if built, else target/debug/fleetmark-agent), ``--sweep``,
``--work-dir`` (JSON lines and weights; default out/cpu_side_by_side, git-ignored).

Both halves share the machine with whatever else runs: the load average before and after each
is printed, and a warning if it was high. On a busy machine, rerun.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
VENV_PYTHON = "/work/.venv-torch/bin/python"


def die(msg: str) -> None:
    print(f"cpu_side_by_side: error: {msg}", file=sys.stderr)
    sys.exit(2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_sweep(sweep: str) -> dict:
    """Batches, image size and the [measurement] rules of the sweep, so PyTorch runs the same
    points under the same rules."""
    try:
        import tomllib
    except ImportError:
        die("needs Python 3.11 or later (tomllib) to read the sweep file")
    try:
        with open(sweep, "rb") as f:
            spec = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        die(f"cannot read the sweep {sweep}: {e}")
    m = spec.get("measurement", {})

    def secs(v, default):
        if v is None:
            return default
        if isinstance(v, (int, float)):
            return float(v)
        mt = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", str(v))
        if not mt:
            die(f"{sweep}: cannot read the duration '{v}' (use forms like 500ms, 5s, 2m)")
        n, unit = float(mt.group(1)), mt.group(2) or "s"
        return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n

    if spec.get("precisions") not in (["f32"], ["fp32"]):
        die(f"{sweep}: the comparison is f32 only (precisions = [\"f32\"])")
    return {
        "batches": [int(b) for b in spec.get("batch_sizes", [])],
        "image_size": int(spec.get("image_size", 224)),
        "warmup_iters": int(m.get("warmup_iterations", 10)),
        "warmup_time": secs(m.get("warmup_duration"), 0.5),
        "min_iters": int(m.get("min_iterations", 50)),
        "min_time": secs(m.get("min_duration"), 5.0),
        "max_time": secs(m.get("max_duration"), 120.0),
    }


def run(cmd, what):
    log(f"$ {' '.join(cmd)}")
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:])
        die(f"{what} failed (exit {p.returncode})")
    return p.stdout, time.time() - t0


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="PyTorch CPU vs Candle CPU, back to back.")
    default_py = os.environ.get("FLEETMARK_TORCH_PYTHON") or (
        VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable)
    release = os.path.join(ROOT, "target", "release", "fleetmark-agent")
    debug = os.path.join(ROOT, "target", "debug", "fleetmark-agent")
    ap.add_argument("--python", default=default_py, help=f"python with torch ({default_py})")
    ap.add_argument("--agent", default=release if os.path.exists(release) else debug)
    ap.add_argument("--sweep", default=os.path.join(HERE, "cpu_sweep.toml"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "out", "cpu_side_by_side"))
    ap.add_argument("--save", help="also write the report to this file")
    args = ap.parse_args(argv)

    if not os.path.exists(args.agent):
        die(f"no agent at {args.agent}: build it with `cargo build -p fleetmark-agent`")
    if not os.path.exists(args.sweep):
        die(f"no sweep file at {args.sweep}")
    if shutil.which(args.python) is None and not os.path.exists(args.python):
        die(f"no python at {args.python} (pass --python, or set FLEETMARK_TORCH_PYTHON)")
    os.makedirs(args.work_dir, exist_ok=True)
    m = read_sweep(args.sweep)
    if not m["batches"]:
        die(f"{args.sweep} has no batch_sizes")
    weights = os.path.join(args.work_dir, "w_seed0.safetensors")
    pt_out = os.path.join(args.work_dir, "pytorch_cpu.jsonl")
    candle_out = os.path.join(args.work_dir, "candle_cpu.jsonl")
    started = _dt.datetime.now(_dt.timezone.utc)

    run([args.agent, "export", "--seed", "0", "--weights", weights], "weights export")

    load_before_pt = loadavg()
    _, pt_secs = run([args.python, os.path.join(HERE, "pytorch_reference.py"), "bench",
                      "--device", "cpu", "--weights", weights, "--batches", ",".join(map(str, m["batches"])),
                      "--image-size", str(m["image_size"]),
                      "--warmup-iters", str(m["warmup_iters"]),
                      "--warmup-time", str(m["warmup_time"]),
                      "--min-iters", str(m["min_iters"]), "--min-time", str(m["min_time"]),
                      "--max-time", str(m["max_time"]), "--out", pt_out], "PyTorch CPU bench")
    load_after_pt = loadavg()
    _, candle_secs = run([args.agent, "run", "--sweep", args.sweep, "--out", candle_out,
                          "--device", "cpu"], "Candle CPU sweep")
    load_after_candle = loadavg()

    pt = {r["batch"]: r for r in load_jsonl(pt_out) if "error" not in r}
    candle = {r["spec"]["batch_size"]: r for r in load_jsonl(candle_out)}
    if not pt or not candle:
        die(f"missing results (PyTorch: {len(pt)}, Candle: {len(candle)} points)")
    any_pt = next(iter(pt.values()))
    any_c = next(iter(candle.values()))

    nproc = os.cpu_count()
    lines = []
    w = lines.append
    w(f"PyTorch CPU vs Candle CPU: ResNet18 f32, {m['image_size']}x{m['image_size']}, "
      "seeded weights (seed 0)")
    w(f"date:        {started.strftime('%Y-%m-%d %H:%M UTC')}")
    w(f"machine:     nproc {nproc}, {cpu_model()}, "
      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB, "
      f"{platform.system()} {platform.release()}")
    w(f"pytorch:     torch {any_pt['torch_version']}, torchvision {any_pt['torchvision_version']}"
      f", python {any_pt['python_version']}, {any_pt['num_threads']} threads "
      "(torch.get_num_threads), eager NCHW, torch.inference_mode, time.perf_counter")
    env = any_c.get("environment", {})
    profile = ("release" if os.sep + "release" + os.sep in args.agent
               else "debug (dependencies such as candle and gemm at opt-level 3)"
               if os.sep + "debug" + os.sep in args.agent else "?")
    w(f"candle:      candle {env.get('candle_version', '?')}, fleetmark "
      f"{env.get('fleetmark_version', '?')} at {env.get('git_commit', '?')}, "
      f"{env.get('rustc_version', '?')}, agent build {profile}, "
      f"path {any_c['backend']['path']} "
      f"({', '.join(f'{k}={v}' for k, v in sorted(any_c['backend']['details'].items()))})")
    w(f"measurement: warm-up {m['warmup_iters']} iterations; then at least {m['min_iters']} "
      f"iterations and {m['min_time']:g} s (at most {m['max_time']:g} s), both sides; "
      "images/s = batch x 1000 / mean")
    w(f"load avg:    {load_before_pt} before PyTorch, {load_after_pt} after it, "
      f"{load_after_candle} after Candle (PyTorch half {pt_secs:.0f} s, Candle half "
      f"{candle_secs:.0f} s)")
    loads = [float(x.split()[0]) for x in (load_before_pt, load_after_pt, load_after_candle)
             if x != "?"]
    busiest = max(loads, default=0.0)
    if nproc and busiest > 0.5 * nproc + 1:
        w(f"WARNING:     the 1-minute load average reached {busiest:.1f} on {nproc} CPUs: other "
          "work shared the machine, so both sides' numbers are pessimistic and noisy")
    w("")
    head = ["batch", "engine", "iters", "p50 ms", "mean ms", "95% CI of mean ms", "images/s",
            "peak RSS MiB"]
    rows = []
    ratios = []
    for b in sorted(set(pt) | set(candle)):
        p, c = pt.get(b), candle.get(b)
        if p:
            rows.append([str(b), "pytorch", str(p["count"]), f"{p['p50_ms']:.1f}",
                         f"{p['mean_ms']:.1f}",
                         f"{p['ci95_low_ms']:.1f} to {p['ci95_high_ms']:.1f}",
                         f"{p['images_per_sec']:.2f}", f"{p['peak_memory_bytes'] / 2**20:.0f}"])
        if c:
            lat = c["latency"]
            ok = c.get("correctness") or {}
            rows.append([str(b), "candle " + c["backend"]["path"], str(lat["count"]),
                         f"{lat['p50_ms']:.1f}", f"{lat['mean_ms']:.1f}",
                         f"{lat['ci95_low_ms']:.1f} to {lat['ci95_high_ms']:.1f}",
                         f"{c['images_per_sec']:.2f}", f"{c['peak_memory_bytes'] / 2**20:.0f}"
                         + ("" if ok.get("passed", True) else " (output check FAILED)")])
        if p and c:
            ratios.append((b, c["images_per_sec"] / p["images_per_sec"]))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    w("  ".join(h.ljust(wd) for h, wd in zip(head, widths)))
    for r in rows:
        w("  ".join(v.ljust(wd) for v, wd in zip(r, widths)))
    w("")
    w("Candle images/s ÷ PyTorch images/s:")
    for b, r in ratios:
        w(f"  batch {b}: {r:.3f}  (PyTorch is {1 / r:.1f}x faster)" if r < 1
          else f"  batch {b}: {r:.3f}  (Candle is {r:.2f}x as fast)")
    w("")
    w("Peak RSS is each process's peak resident set after warm-up (VmHWM, reset through "
      "/proc/self/clear_refs), so it includes each runtime's own libraries.")
    report = "\n".join(lines)
    print(report)
    if args.save:
        with open(args.save, "w") as f:
            f.write(report + "\n")
        log(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
