#!/usr/bin/env python3
"""PyTorch reference for Fleetmark: golden logits, and ResNet18 inference timings to set
Candle's numbers against.

Runs on the GPU test machine as it is (python3 with torch, torchvision, numpy, safetensors; no
network, no Rust, nothing else from this repository) and on a CPU for the CPU comparison.

Subcommands
-----------

golden   PyTorch-initialised ResNet18 weights and their golden logits::

    python3 pytorch_reference.py golden --seed 0 --input x.safetensors \\
        --weights-out w.safetensors --golden-out golden.json --device cuda

  ``torch.manual_seed(S)``, ``torchvision.models.resnet18()`` (random init, no download), eval;
  saves the state_dict as safetensors (torchvision names, contiguous, ``num_batches_tracked`` as
  int64), runs the input (the ``"input"`` tensor of ``--input``, an NCHW f32 batch such as
  ``fleetmark-agent export --input`` writes) in fp32 with TF32 off, and writes golden JSON in
  the format of ``scripts/reference/golden_cpu.py`` plus ``"device"``. Prints the weights file's
  SHA-256 (what a Fleetmark agent reports for ``weights = {kind = "file", ...}``). Instead of
  ``--input`` you may pass ``--fleetmark-input BATCH:SIZE`` to generate Fleetmark's own
  deterministic input here (a NumPy port of ``engine/src/input.rs``, bit-identical).

bench    Latency and throughput sweep::

    python3 pytorch_reference.py bench --weights w.safetensors --device cuda \\
        --batches 1,4,8,16,32,64,128,256 --precisions f32,f16,bf16 \\
        --layouts nchw,channels_last --modes eager,graph \\
        --warmup-iters 10 --min-iters 50 --min-time 2 --out pytorch.jsonl [--article]

  One JSON line per (precision, layout, mode, batch). ``cudnn.benchmark = True``; TF32 is left
  at PyTorch's defaults (cuDNN convolutions may use TF32: ``cudnn.allow_tf32 = True``; matmuls
  may not) and recorded. Eager: every iteration is timed on its own with CUDA events (record
  start, forward, record end, synchronize, ``elapsed_time``). Graph: one forward captured in a
  ``torch.cuda.CUDAGraph`` (after a warm-up on a side stream, as the PyTorch docs show); each
  replay timed the same way. Warm-up, then timing until both ``--min-iters`` and ``--min-time``
  are met (or ``--max-time`` passes). Peak memory is ``torch.cuda.max_memory_allocated()`` after
  timing, with the peak reset after warm-up. All under ``torch.inference_mode()``.

  ``--article`` adds, for eager NCHW fp32 and fp16, the T4 article's timing: ``time.time()``
  around ``model(x)`` with no synchronize (``"timing": "time.time-no-sync"``), to show how far
  that is from the truth; the record also carries the wall time per iteration of the whole loop
  including one final synchronize, which is what the GPU actually sustained.

  ``--device cpu``: eager, NCHW, f32 only; each iteration timed with ``time.perf_counter``
  around the (synchronous) forward, ``"timing": "perf_counter"``, with ``torch.get_num_threads()``
  recorded and peak memory as the process's peak resident set (reset after warm-up, like the
  Candle CPU backend does).

  A point that fails (out of memory, unsupported dtype, capture error) is written as a record
  with ``"error"`` and the sweep goes on.

selftest Checks the statistics helpers (and, with ``--input``, the NumPy input generator against
  a file from ``fleetmark-agent export``). Needs numpy only (and safetensors for ``--input``).

Statistics match Fleetmark's ``core/src/stats.rs``: sample standard deviation (n - 1),
percentiles by linear interpolation between order statistics (``numpy.percentile``'s default),
and a 95% confidence interval of the mean from Student's t. The t quantile t(0.975, df) comes
without SciPy: exact values (to 1e-9) for df = 1..30 from a table, and for df > 30 the
Cornish-Fisher expansion of t in the normal quantile z = 1.959963984540054 to the 1/df^4 term
(Abramowitz & Stegun 26.7.5), whose error there is below 3e-8.

Progress goes to stderr line by line (run with ``PYTHONUNBUFFERED=1`` when piping); the final
table goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import platform
import socket
import struct
import subprocess
import sys
import time

GENERATOR = "scripts/bench/pytorch_reference.py"

# ----------------------------------------------------------------------------------------------
# Statistics (same definitions as core/src/stats.rs)
# ----------------------------------------------------------------------------------------------

# t(0.975, df) for df = 1..30, exact to the digits shown.
_T975 = [
    12.7062047362, 4.30265272975, 3.18244630528, 2.7764451052, 2.57058183564,
    2.44691185114, 2.36462425159, 2.3060041352, 2.2621571628, 2.22813885199,
    2.20098516009, 2.17881282967, 2.16036865646, 2.14478668792, 2.13144954556,
    2.11990529922, 2.10981557783, 2.10092204024, 2.09302405441, 2.08596344727,
    2.07961384473, 2.0738730679, 2.06865761042, 2.06389856163, 2.05953855275,
    2.05552943864, 2.05183051648, 2.0484071418, 2.04522964213, 2.0422724563,
]
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile, t(0.975, df): table up to 30, Cornish-Fisher above."""
    if df < 1:
        raise ValueError("degrees of freedom must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


def summarize(samples_ms):
    """count, mean, std (n-1), min, max, p50/p90/p99 (linear), 95% CI of the mean (Student t)."""
    import numpy as np

    a = np.asarray(samples_ms, dtype=np.float64)
    n = int(a.size)
    if n == 0:
        raise ValueError("no samples")
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if n > 1 else 0.0
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {
        "count": n,
        "mean_ms": mean,
        "std_ms": std,
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "ci95_low_ms": mean - half,
        "ci95_high_ms": mean + half,
    }


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A problem with the command line or the inputs, reported without a traceback."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(state_dict) -> str:
    """Fleetmark's content hash of a state_dict (``hash_tensors`` in engine/src/weights.rs):
    per tensor in name order, the name's bytes, each dimension as u64 LE, the values as f32 LE
    (i64 LE for integer tensors)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode("utf-8"))
        for d in t.shape:
            h.update(struct.pack("<Q", int(d)))
        if t.dtype == torch.int64:
            h.update(t.numpy().astype("<i8", copy=False).tobytes())
        else:
            h.update(t.to(torch.float32).numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def round_sig(v: float, digits: int = 7) -> float:
    return float(f"{v:.{digits}g}")


def parse_list(text: str, what: str, allowed=None, aliases=None):
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    out = []
    for s in items:
        s = (aliases or {}).get(s, s)
        if allowed is not None and s not in allowed:
            raise UsageError(f"--{what}: unknown value '{s}' (choose from {', '.join(allowed)})")
        if s not in out:
            out.append(s)
    return out


def parse_batches(text: str):
    out = []
    for s in text.split(","):
        s = s.strip()
        if not s:
            continue
        try:
            b = int(s)
        except ValueError:
            raise UsageError(f"--batches: '{s}' is not an integer") from None
        if not 1 <= b <= 4096:
            raise UsageError(f"--batches: {b} is out of range (1..4096)")
        if b not in out:
            out.append(b)
    if not out:
        raise UsageError("--batches is empty")
    return out


PRECISIONS = ["f32", "f16", "bf16"]
PRECISION_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16",
                     "half": "f16", "bfloat16": "bf16"}
LAYOUTS = ["nchw", "channels_last"]
LAYOUT_ALIASES = {"nhwc": "channels_last", "channels-last": "channels_last", "cl": "channels_last"}
MODES = ["eager", "graph"]


def torch_dtype(precision: str):
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[precision]


def check_device(device: str):
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available to this PyTorch "
                             f"({torch.__version__}, built for CUDA {torch.version.cuda})")
        dev = torch.device(device)
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if idx >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    raise UsageError(f"--device must be cpu, cuda or cuda:N, not '{device}'")


def load_weights_into(model, path: str):
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UsageError(f"--weights {path}: no such file")
    try:
        state = load_file(path)
    except Exception as e:
        raise UsageError(f"--weights {path} is not a readable safetensors file: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(f"--weights {path} does not fit torchvision's resnet18: {e}") from None
    return state


def fleetmark_input(batch: int, size: int, seed: int = 20_261_127):
    """Fleetmark's deterministic input (engine/src/input.rs), bit for bit: image i comes from a
    SplitMix64 stream seeded with seed ^ (i * 0xA24BAED4963EE407), each value
    -2 + 4 * (top 24 bits / 2^24) in f32. SplitMix64's k-th output is mix(state0 + k * gamma),
    so a whole image is one vectorised computation."""
    import numpy as np

    gamma = np.uint64(0x9E3779B97F4A7C15)
    per_image = 3 * size * size
    k = np.arange(1, per_image + 1, dtype=np.uint64)
    out = np.empty((batch, per_image), dtype=np.float32)
    with np.errstate(over="ignore"):
        for i in range(batch):
            s = np.uint64((seed ^ ((i * 0xA24BAED4963EE407) & 0xFFFFFFFFFFFFFFFF)))
            z = s + k * gamma
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            unit = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
            out[i] = np.float32(-2.0) + np.float32(4.0) * unit
    return out.reshape(batch, 3, size, size)


def parse_bxs(text: str):
    try:
        b, s = (int(v) for v in text.lower().replace("x", ":").split(":"))
    except ValueError:
        raise UsageError(
            f"--fleetmark-input wants BATCH:SIZE such as 2:224, not '{text}'") from None
    if not (1 <= b <= 4096 and 32 <= s <= 1024):
        raise UsageError("--fleetmark-input: batch must be 1..4096 and size 32..1024")
    return b, s


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
        return out[0].strip() if out else ""
    except Exception:
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_rss() -> None:
    # Linux resets VmHWM when "5" is written to clear_refs (as the Candle CPU backend does).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------
# golden
# ----------------------------------------------------------------------------------------------


def cmd_golden(args) -> int:
    import torch
    import torchvision
    from safetensors.torch import load_file, save_file

    if (args.input is None) == (args.fleetmark_input is None):
        raise UsageError("give exactly one of --input FILE and --fleetmark-input BATCH:SIZE")
    dev = check_device(args.device)
    if args.input is not None:
        if not os.path.isfile(args.input):
            raise UsageError(f"--input {args.input}: no such file "
                             "(write one with `fleetmark-agent export --input ...`)")
        try:
            tensors = load_file(args.input)
        except Exception as e:
            raise UsageError(
                f"--input {args.input} is not a readable safetensors file: {e}") from None
        if "input" not in tensors:
            raise UsageError(f"--input {args.input} has no tensor 'input' "
                             f"(it has: {', '.join(sorted(tensors)) or 'none'})")
        x = tensors["input"]
        input_desc = {"input_sha256": file_sha256(args.input)}
    else:
        b, s = parse_bxs(args.fleetmark_input)
        x = torch.from_numpy(fleetmark_input(b, s))
        input_desc = {"input_source": f"fleetmark:{b}x{s}"}
    if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.float32:
        raise UsageError(f"input must be float32 NCHW with 3 channels, got {x.dtype} "
                         f"{list(x.shape)}")

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18()  # weights=None: random init, nothing downloaded
    model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            state[k] = v.to(torch.int64)
    os.makedirs(os.path.dirname(os.path.abspath(args.weights_out)), exist_ok=True)
    save_file(state, args.weights_out, metadata={"generator": GENERATOR,
                                                  "seed": str(args.seed)})
    wsha = file_sha256(args.weights_out)
    csha = content_sha256(state)

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = model.to(dev, torch.float32)
    with torch.inference_mode():
        logits = model(x.to(dev)).float().cpu()
    if not torch.isfinite(logits).all():
        raise RuntimeError("the forward pass produced non-finite logits")
    top2 = torch.topk(logits, 2, dim=1).values
    margins = ((top2[:, 0] - top2[:, 1]) / logits.abs().max()).tolist()
    golden = {
        "generator": GENERATOR,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "weights_sha256": wsha,
        "weights_content_sha256": csha,
        "seed": args.seed,
        **input_desc,
        "input_shape": list(x.shape),
        "dtype": "float32",
        "compute_dtype": "float32",
        "tf32": False,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "significant_digits": 7,
        "top1": [int(i) for i in logits.argmax(dim=1).tolist()],
        "top1_margin_rel": [round_sig(m, 4) for m in margins],
        "logits": [[round_sig(float(v)) for v in row] for row in logits.tolist()],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.golden_out)), exist_ok=True)
    with open(args.golden_out, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"weights: {args.weights_out}")
    print(f"weights sha256 (file bytes): {wsha}")
    print(f"weights content sha256 (Fleetmark hash_tensors): {csha}")
    print(f"golden: {args.golden_out} ({golden['device_name']}, top-1 {golden['top1']})")
    return 0


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------



def run_timed(step, warmup_iters, warmup_time, min_iters, min_time, max_time, after_warmup=None):
    """Warm up, then call ``step()`` (which returns one latency in ms) until both minimums are
    met or ``max_time`` has passed, as engine/src/measure.rs does.

    Returns (samples, timed seconds, perf_counter value when timing began)."""
    t0 = time.perf_counter()
    n = 0
    while n < warmup_iters or time.perf_counter() - t0 < warmup_time:
        step()
        n += 1
        if time.perf_counter() - t0 >= max_time:
            break
    if after_warmup is not None:
        after_warmup()
    samples = []
    t0 = time.perf_counter()
    while True:
        samples.append(step())
        elapsed = time.perf_counter() - t0
        if len(samples) >= min_iters and elapsed >= min_time:
            break
        if elapsed >= max_time:
            break
    return samples, time.perf_counter() - t0, t0


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".strip()


class Bench:
    def __init__(self, args):
        import torch
        import torchvision

        self.torch = torch
        self.args = args
        self.batches = parse_batches(args.batches)
        self.dev = check_device(args.device)
        self.cuda = self.dev.type == "cuda"
        default_p = "f32,f16,bf16" if self.cuda else "f32"
        default_l = "nchw,channels_last" if self.cuda else "nchw"
        default_m = "eager,graph" if self.cuda else "eager"
        self.precisions = parse_list(args.precisions or default_p, "precisions", PRECISIONS,
                                     PRECISION_ALIASES)
        self.layouts = parse_list(args.layouts or default_l, "layouts", LAYOUTS, LAYOUT_ALIASES)
        self.modes = parse_list(args.modes or default_m, "modes", MODES)
        if not self.cuda:
            bad = [f"--{what} {v}"
                   for what, values, ok in (("precisions", self.precisions, "f32"),
                                            ("layouts", self.layouts, "nchw"),
                                            ("modes", self.modes, "eager"))
                   for v in values if v != ok]
            if bad:
                raise UsageError("--device cpu supports only --precisions f32 --layouts nchw "
                                 "--modes eager; got " + ", ".join(bad))
            if args.article:
                raise UsageError("--article needs --device cuda (it contrasts GPU timings)")
        if args.min_iters < 1:
            raise UsageError("--min-iters must be at least 1")
        if args.warmup_iters < 0 or args.min_time < 0 or args.warmup_time < 0:
            raise UsageError("warm-up counts and times must not be negative")
        if args.max_time < args.min_time:
            raise UsageError(f"--max-time ({args.max_time}) is shorter than --min-time "
                             f"({args.min_time})")
        if not 32 <= args.image_size <= 1024:
            raise UsageError("--image-size must be 32..1024")
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError("--threads must be at least 1")
            torch.set_num_threads(args.threads)

        model = torchvision.models.resnet18()  # weights=None: nothing is downloaded
        if args.weights:
            load_weights_into(model, args.weights)
            weights = {"weights": "file:" + os.path.basename(args.weights),
                       "weights_sha256": file_sha256(args.weights)}
        else:
            torch.manual_seed(args.seed)
            model = torchvision.models.resnet18()
            weights = {"weights": f"torch-init:{args.seed}", "weights_sha256": ""}
        self.model_cpu = model.eval()

        if self.cuda:
            torch.backends.cudnn.benchmark = True
            if args.tf32 == "off":
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
            cap = torch.cuda.get_device_capability(self.dev)
            self.tf32_capable = cap >= (8, 0)  # TF32 tensor cores exist from Ampere on
            self.common = {
                "device_name": torch.cuda.get_device_name(self.dev),
                "compute_capability": f"{cap[0]}.{cap[1]}",
                "driver_version": driver_version(),
                "cuda_version": torch.version.cuda or "",
            }
        else:
            self.tf32_capable = False
            self.common = {"device_name": cpu_model(), "num_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count()}
        cudnn = (torch.backends.cudnn.version()
                 if self.cuda and torch.backends.cudnn.is_available() else None)
        self.common.update({
            "framework": "pytorch",
            "generator": GENERATOR,
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
            "cudnn_version": str(cudnn) if cudnn else "",
            "python_version": platform.python_version(),
            "hostname": socket.gethostname(),
            "device": str(self.dev),
            "image_size": args.image_size,
            **weights,
        })
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--out {args.out}: directory {out_dir} does not exist")
        self.out = open(args.out, "a" if args.append else "w")

    def plan(self):
        timing = "cuda-events" if self.cuda else "perf_counter"
        pts = [(p, l, m, b, timing)
               for p in self.precisions for l in self.layouts for m in self.modes
               for b in self.batches]
        if self.args.article:
            pts += [(p, "nchw", "eager", b, "time.time-no-sync")
                    for p in ("f32", "f16") for b in self.batches]
        return pts

    def point(self, precision, layout, mode, batch, timing):
        import copy

        torch = self.torch
        a = self.args
        rec = dict(self.common)
        rec.update({
            "mode": mode, "layout": layout, "precision": precision, "batch": batch,
            "timing": timing,
            # Whether f32 convolutions may run on TF32 tensor cores here.
            "tf32": bool(self.cuda and precision == "f32" and self.tf32_capable
                         and torch.backends.cudnn.allow_tf32),
            "cudnn_allow_tf32": bool(self.cuda and torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(self.cuda and torch.backends.cuda.matmul.allow_tf32),
            "cudnn_benchmark": bool(self.cuda and torch.backends.cudnn.benchmark),
            "warmup_iters": a.warmup_iters,
            "started_at": now_iso(),
        })
        self.release()
        if self.cuda:
            # Should be 0: anything here would be counted in this point's peak memory.
            rec["allocated_at_start_bytes"] = int(torch.cuda.memory_allocated(self.dev))
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        dtype = torch_dtype(precision)
        model = x = graph = None
        try:
            if self.cuda and precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise RuntimeError(f"bf16 is not supported on {rec['device_name']}")
            model = copy.deepcopy(self.model_cpu).to(device=self.dev, dtype=dtype)
            model = model.to(memory_format=fmt).eval()
            gen = torch.Generator(device="cpu").manual_seed(a.input_seed)
            x = torch.randn(batch, 3, a.image_size, a.image_size, generator=gen)
            x = x.to(device=self.dev, dtype=dtype).contiguous(memory_format=fmt)
            timer = dict(warmup_iters=a.warmup_iters, warmup_time=a.warmup_time,
                         min_iters=a.min_iters, min_time=a.min_time, max_time=a.max_time)
            extra = {}
            with torch.inference_mode():
                if not self.cuda:
                    def step():
                        t0 = time.perf_counter()
                        model(x)
                        return (time.perf_counter() - t0) * 1e3

                    samples, secs, _ = run_timed(step, after_warmup=reset_peak_rss, **timer)
                    peak, scope = peak_rss_bytes(), "process-rss"
                else:
                    def after_warmup():
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats(self.dev)

                    if timing == "time.time-no-sync":
                        # The T4 article's method, on purpose: the host clock around an
                        # asynchronous launch measures how long queuing took, not the GPU.
                        def step():
                            t0 = time.time()
                            model(x)
                            t1 = time.time()
                            return (t1 - t0) * 1e3

                        samples, secs, t_start = run_timed(step, after_warmup=after_warmup,
                                                           **timer)
                        torch.cuda.synchronize()
                        wall = time.perf_counter() - t_start
                        extra["wall_ms_per_iter_incl_final_sync"] = wall * 1e3 / len(samples)
                    else:
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        if mode == "graph":
                            # Warm up on a side stream, then capture (PyTorch's CUDA graph docs).
                            side = torch.cuda.Stream(self.dev)
                            side.wait_stream(torch.cuda.current_stream(self.dev))
                            with torch.cuda.stream(side):
                                for _ in range(3):
                                    model(x)
                            torch.cuda.current_stream(self.dev).wait_stream(side)
                            torch.cuda.synchronize()
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph):
                                model(x)
                            torch.cuda.synchronize()
                            forward = graph.replay
                        else:
                            def forward():
                                model(x)

                        def step():
                            start.record()
                            forward()
                            end.record()
                            torch.cuda.synchronize()
                            return start.elapsed_time(end)

                        samples, secs, _ = run_timed(step, after_warmup=after_warmup, **timer)
                    peak, scope = torch.cuda.max_memory_allocated(self.dev), "device-allocations"
            stats = summarize(samples)
            rec.update(stats)
            rec.update({
                "images_per_sec": batch * 1000.0 / stats["mean_ms"] if stats["mean_ms"] > 0
                else 0.0,
                "peak_memory_bytes": int(peak),
                "memory_scope": scope,
                "timed_seconds": secs,
                **extra,
            })
            if a.keep_samples:
                rec["latencies_ms"] = samples
        except Exception as e:  # out of memory, unsupported, capture failure: record, go on
            rec["error"] = first_line(e)
        finally:
            del model, x, graph
        rec["finished_at"] = now_iso()
        return rec

    def release(self):
        """Frees what the last point left behind, so the next one's peak memory is its own:
        Python garbage, cuBLAS workspaces (PyTorch keeps one per stream it has seen, and CUDA
        graph capture uses new streams) and the caching allocator's free blocks."""
        gc.collect()
        if not self.cuda:
            return
        torch = self.torch
        try:
            torch.cuda.synchronize()
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            torch.cuda.empty_cache()
        except Exception as e:  # a broken context shows up in the next point's record anyway
            log(f"pytorch_reference: cleanup after a point failed: {first_line(e)}")

    def run(self):
        torch = self.torch
        pts = self.plan()
        c = self.common
        log(f"pytorch_reference: {c['device_name']} ({c['device']}), torch {c['torch_version']}, "
            f"cuDNN {c['cudnn_version'] or '-'}, "
            + (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
               f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
               if self.cuda else f"{torch.get_num_threads()} threads, ")
            + f"{len(pts)} points, weights {c['weights']}")
        records = []
        for i, (p, l, m, b, timing) in enumerate(pts, 1):
            rec = self.point(p, l, m, b, timing)
            self.release()
            records.append(rec)
            self.out.write(json.dumps(rec) + "\n")
            self.out.flush()
            label = f"[{i}/{len(pts)}] {p} {l} {m} b={b} {timing}"
            if "error" in rec:
                log(f"{label}: FAILED: {rec['error']}")
            else:
                log(f"{label}: p50 {rec['p50_ms']:.3f} ms, mean {rec['mean_ms']:.3f} ms, "
                    f"{rec['images_per_sec']:.1f} img/s, "
                    f"{rec['peak_memory_bytes'] / 2**20:.0f} MiB ({rec['count']} iters, "
                    f"{rec['timed_seconds']:.1f} s)"
                    + (f" [{rec['allocated_at_start_bytes'] / 2**20:.0f} MiB allocated before]"
                       if rec.get("allocated_at_start_bytes") else ""))
        self.out.close()
        print_table(records)
        log(f"wrote {len(records)} records to {self.args.out}")
        return 1 if records and all("error" in r for r in records) else 0


def print_table(records) -> None:
    head = ["precision", "layout", "mode", "timing", "batch", "p50 ms", "mean ms", "p99 ms",
            "img/s", "peak MiB"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["precision"], r["layout"], r["mode"], r["timing"], str(r["batch"]),
                         "error", r["error"][:40], "", "", ""])
        else:
            rows.append([r["precision"] + (" (tf32)" if r.get("tf32") else ""), r["layout"],
                         r["mode"], r["timing"], str(r["batch"]), f"{r['p50_ms']:.3f}",
                         f"{r['mean_ms']:.3f}", f"{r['p99_ms']:.3f}",
                         f"{r['images_per_sec']:.1f}", f"{r['peak_memory_bytes'] / 2**20:.0f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def cmd_bench(args) -> int:
    return Bench(args).run()


# ----------------------------------------------------------------------------------------------
# selftest
# ----------------------------------------------------------------------------------------------


def _t_cdf(t: float, df: int, steps: int = 200_000) -> float:
    """Student t CDF by Simpson's rule on the density (only for the self-test)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda u: c * (1 + u * u / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / steps
    s = f(0) + f(t) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, steps))
    return 0.5 + s * h / 3


def cmd_selftest(args) -> int:
    failures = []

    def check(cond, what):
        print(("ok    " if cond else "FAIL  ") + what)
        if not cond:
            failures.append(what)

    for df in (1, 2, 5, 9, 29, 30, 31, 45, 100, 1000):
        q = t975(df)
        p = _t_cdf(q, df)
        check(abs(p - 0.975) < 1e-7, f"t975({df}) = {q:.6f}, CDF there {p:.9f}")
    s = summarize([float(v) for v in range(1, 11)])
    check(abs(s["mean_ms"] - 5.5) < 1e-12, "mean of 1..10 is 5.5")
    check(abs(s["std_ms"] - math.sqrt(55 / 6)) < 1e-12, "sample std of 1..10")
    check(abs(s["p50_ms"] - 5.5) < 1e-12 and abs(s["p90_ms"] - 9.1) < 1e-12
          and abs(s["p99_ms"] - 9.91) < 1e-12, "p50/p90/p99 of 1..10 are 5.5/9.1/9.91")
    check(abs(s["ci95_high_ms"] - 5.5 - 2.1659) < 1e-3, "CI half width of 1..10 is 2.1659")
    one = summarize([4.0])
    check(one["p99_ms"] == 4.0 and one["std_ms"] == 0.0 and one["ci95_low_ms"] == 4.0,
          "a single sample")
    if args.input:
        from safetensors.numpy import load_file

        x = load_file(args.input)["input"]
        y = fleetmark_input(x.shape[0], x.shape[2])
        check(y.shape == x.shape and (y.view("u4") == x.view("u4")).all(),
              f"NumPy Fleetmark input is bit-identical to {args.input} {list(x.shape)}")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="PyTorch reference for Fleetmark: golden logits and ResNet18 timings.",
        epilog="Run `%(prog)s SUBCOMMAND --help` for each subcommand; the module docstring "
        "explains the methods.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("golden", help="PyTorch-initialised weights and their golden logits")
    g.add_argument("--seed", type=int, default=0, help="torch.manual_seed before init (0)")
    g.add_argument("--input", help="safetensors file with an NCHW f32 tensor 'input'")
    g.add_argument("--fleetmark-input", metavar="BATCH:SIZE",
                   help="generate Fleetmark's deterministic input instead of reading --input")
    g.add_argument("--weights-out", required=True, help="safetensors file to write")
    g.add_argument("--golden-out", required=True, help="golden JSON file to write")
    g.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cuda)")
    g.set_defaults(func=cmd_golden)

    b = sub.add_parser("bench", help="latency/throughput sweep, one JSON line per point")
    b.add_argument("--weights", help="safetensors weights with torchvision names "
                   "(default: torchvision's random init after torch.manual_seed(--seed))")
    b.add_argument("--seed", type=int, default=0, help="init seed when --weights is absent")
    b.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cuda)")
    b.add_argument("--batches", default="1,4,8,16,32,64,128,256")
    b.add_argument("--precisions", help="f32,f16,bf16 (default: all on CUDA, f32 on CPU)")
    b.add_argument("--layouts", help="nchw,channels_last (default: both on CUDA, nchw on CPU)")
    b.add_argument("--modes", help="eager,graph (default: both on CUDA, eager on CPU)")
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--warmup-iters", type=int, default=10)
    b.add_argument("--warmup-time", type=float, default=0.5,
                   help="warm up for at least this many seconds too (0.5, as Fleetmark)")
    b.add_argument("--min-iters", type=int, default=50)
    b.add_argument("--min-time", type=float, default=2.0, help="seconds (2)")
    b.add_argument("--max-time", type=float, default=120.0,
                   help="stop timing a point after this many seconds even below --min-iters "
                   "(120, as Fleetmark)")
    b.add_argument("--input-seed", type=int, default=0, help="seed of the random input (0)")
    b.add_argument("--tf32", choices=["default", "off"], default="default",
                   help="keep PyTorch's TF32 defaults (cuDNN on, matmul off) or turn both off")
    b.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    b.add_argument("--article", action="store_true",
                   help="also time eager NCHW f32/f16 the T4 article's way (time.time, no sync)")
    b.add_argument("--keep-samples", action="store_true",
                   help="store every iteration's latency in the records (latencies_ms)")
    b.add_argument("--out", required=True, help="JSON-lines file to write")
    b.add_argument("--append", action="store_true", help="append to --out instead of replacing")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("selftest", help="check the statistics (and the input generator)")
    t.add_argument("--input", help="a `fleetmark-agent export --input` file to compare with")
    t.set_defaults(func=cmd_selftest)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"pytorch_reference.py {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; records written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
