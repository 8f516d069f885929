#!/usr/bin/env python3
"""Side-by-side Markdown report: Candle (Fleetmark result records) against PyTorch.

Reads

* a Candle results file: JSON lines of Fleetmark ``BenchResult`` records, as
  ``fleetmark-agent run --out results.jsonl`` writes them (or ``fleetmark results --json``);
* a PyTorch results file: JSON lines from ``scripts/bench/pytorch_reference.py bench``;

and prints Markdown with

(a) per precision, one table with, for every batch size, Candle stock, Candle fused, PyTorch
    eager NCHW, PyTorch eager channels_last and PyTorch channels_last + CUDA graph: p50 and p99
    latency (ms), images/s (from the mean latency) and peak memory (MiB);
(b) per precision, Candle fused images/s divided by PyTorch eager channels_last and by PyTorch
    channels_last + CUDA graph (and by the fastest PyTorch configuration, named), ratios >= 1.0
    in bold;
(c) Candle fused peak memory divided by PyTorch eager channels_last peak memory;
(d) if the PyTorch file has ``--article`` records: the T4 article's ``time.time()``-without-
    synchronize timing against CUDA events for the same points;
(e) a table in the T4 article's shape for Candle fused: batch, FP32 ms, FP16 ms, images/s;

under header lines naming the card, driver, dates, commit and versions, all taken from the
records. Points absent from the files (or failed) show as "—"; failed PyTorch points are listed
at the end. Standard library only.

Usage::

    python3 scripts/bench/side_by_side.py --candle results.jsonl --pytorch pytorch.jsonl \\
        [--hardware H100] [--image-size 224] [--out report.md]

If the files hold more than one card, ``--hardware`` (a case-insensitive substring of the card
name) picks one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

DASH = "—"
PRECISIONS = ["f32", "f16", "bf16"]
PRECISION_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16",
                     "half": "f16", "bfloat16": "bf16"}


class InputError(Exception):
    pass


def read_jsonl(path: str, what: str):
    try:
        f = open(path)
    except OSError as e:
        raise InputError(f"cannot read the {what} file {path}: {e.strerror}") from None
    records, bad = [], 0
    with f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                bad += 1
                print(f"side_by_side: {path}:{n}: not JSON ({e.msg}); skipped", file=sys.stderr)
                continue
            if isinstance(r, dict):
                records.append(r)
            else:
                bad += 1
    return records, bad


def norm_precision(p) -> str:
    p = str(p or "").lower()
    return PRECISION_ALIASES.get(p, p)


def dig(d, *keys, default=None):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
    return d


# ----------------------------------------------------------------------------------------------
# Normalised points
# ----------------------------------------------------------------------------------------------


class Point:
    """One measured point, whichever side it came from."""

    def __init__(self, p50, p99, mean, ips, peak, flags="", raw=None, count=0):
        self.p50, self.p99, self.mean, self.ips, self.peak = p50, p99, mean, ips, peak
        self.flags = flags
        self.raw = raw
        self.count = count


def candle_point(r) -> Point:
    lat = r.get("latency") or {}
    flags = ""
    corr = r.get("correctness")
    if isinstance(corr, dict) and corr.get("passed") is False:
        flags += "⚠"
    if dig(r, "telemetry", "throttled") is True:
        flags += "†"
    return Point(lat.get("p50_ms"), lat.get("p99_ms"), lat.get("mean_ms"),
                 r.get("images_per_sec"), r.get("peak_memory_bytes"), flags, r,
                 lat.get("count", 0))


def pytorch_point(r) -> Point:
    return Point(r.get("p50_ms"), r.get("p99_ms"), r.get("mean_ms"), r.get("images_per_sec"),
                 r.get("peak_memory_bytes"), "", r, r.get("count", 0))


def pick(points):
    """Repeated points: the one with the median images/s (the lower median for an even count)."""
    points = [p for p in points if p.ips is not None]
    if not points:
        return None
    points.sort(key=lambda p: p.ips)
    return points[(len(points) - 1) // 2]


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def fms(v) -> str:
    if v is None:
        return DASH
    if v < 1:
        return f"{v:.3f}"
    if v < 100:
        return f"{v:.2f}"
    return f"{v:.1f}"


def fips(v) -> str:
    if v is None:
        return DASH
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def fmib(v) -> str:
    if v is None or v <= 0:
        return DASH
    return f"{v / 2**20:,.0f}"


def fratio(num, den, mark=True) -> str:
    if num is None or den is None or den <= 0:
        return DASH
    r = num / den
    s = f"{r:.2f}"
    if r < 1.0 and s == "1.00":  # never show a loss as an even 1.00
        s = f"{min(r, 0.999):.3f}"
    return f"**{s}**" if mark and r >= 1.0 else s


def table(head, rows, left=1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned, the rest (numbers) right."""
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" if i < left else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


PT_CONFIGS = [
    ("PyTorch eager NCHW", "nchw", "eager"),
    ("PyTorch eager channels_last", "channels_last", "eager"),
    ("PyTorch channels_last + graph", "channels_last", "graph"),
]


def select_hardware(names, wanted, side):
    names = sorted(n for n in names if n)
    if wanted:
        hit = [n for n in names if wanted.lower() in n.lower()]
        if not hit:
            raise InputError(f"no {side} records for hardware matching '{wanted}' "
                             f"(the file has: {', '.join(names) or 'none'})")
        names = hit
    if len(names) > 1:
        raise InputError(f"the {side} records cover several cards ({'; '.join(names)}): pick "
                         "one with --hardware")
    return names[0] if names else None


def build(args):
    candle_raw, candle_bad = read_jsonl(args.candle, "Candle") if args.candle else ([], 0)
    torch_raw, torch_bad = read_jsonl(args.pytorch, "PyTorch") if args.pytorch else ([], 0)

    # Candle: real (not simulated) records, one card, one image size.
    candle = [r for r in candle_raw
              if isinstance(r.get("spec"), dict) and isinstance(r.get("backend"), dict)
              and not dig(r, "backend", "simulated", default=False)]
    if args.candle and candle_raw and not candle:
        raise InputError(f"{args.candle} has no real Candle BenchResult records "
                         "(simulated ones are ignored)")
    gpu_only = [r for r in candle if str(r.get("device", "")).startswith("cuda")]
    if gpu_only and not args.include_cpu:
        candle = gpu_only
    torch_recs = [r for r in torch_raw if r.get("framework") == "pytorch"]
    if args.pytorch and torch_raw and not torch_recs:
        raise InputError(f"{args.pytorch} has no pytorch_reference.py records")
    torch_gpu = [r for r in torch_recs if str(r.get("device", "")).startswith("cuda")]
    if torch_gpu and not args.include_cpu:
        torch_recs = torch_gpu

    card = select_hardware({r.get("hardware_name", "") for r in candle}, args.hardware, "Candle")
    candle = [r for r in candle if r.get("hardware_name") == card]
    pt_card = select_hardware({r.get("device_name", "") for r in torch_recs},
                              args.hardware, "PyTorch")
    torch_recs = [r for r in torch_recs if r.get("device_name") == pt_card]
    if not candle and not torch_recs:
        raise InputError("no records to report (give --candle and/or --pytorch files with data)")

    sizes = [dig(r, "spec", "image_size") for r in candle]
    sizes += [r.get("image_size") for r in torch_recs]
    sizes = [s for s in sizes if s]
    size = args.image_size or (statistics.mode(sizes) if sizes else 224)
    candle = [r for r in candle if dig(r, "spec", "image_size") == size]
    torch_recs = [r for r in torch_recs if r.get("image_size", size) == size]

    c_pts = defaultdict(list)  # (precision, path, batch) -> [Point]
    for r in candle:
        key = (norm_precision(dig(r, "spec", "precision")), dig(r, "backend", "path"),
               dig(r, "spec", "batch_size"))
        c_pts[key].append(candle_point(r))
    p_pts = defaultdict(list)  # (precision, layout, mode, timing, batch) -> [Point]
    failed = []
    for r in torch_recs:
        key = (norm_precision(r.get("precision")), r.get("layout"), r.get("mode"),
               r.get("timing", "cuda-events"), r.get("batch"))
        if "error" in r:
            failed.append(r)
        else:
            p_pts[key].append(pytorch_point(r))
    C = {k: pick(v) for k, v in c_pts.items()}
    P = {k: pick(v) for k, v in p_pts.items()}
    dups = sum(len(v) - 1 for v in c_pts.values()) + sum(len(v) - 1 for v in p_pts.values())

    precisions = [p for p in PRECISIONS
                  if any(k[0] == p for k in C) or any(k[0] == p for k in P)]
    batches = sorted({k[2] for k in C} | {k[4] for k in P})
    timing = "cuda-events" if torch_gpu or not torch_recs else "perf_counter"

    def c(prec, path, b):
        return C.get((prec, path, b))

    def p(prec, layout, mode, b, t=None):
        return P.get((prec, layout, mode, t or timing, b))

    out = []
    w = out.append

    # -- header --------------------------------------------------------------------------------
    title_card = card or pt_card or "unknown card"
    w(f"# ResNet18 inference: Candle (Fleetmark) vs PyTorch on {title_card}")
    w("")
    dev_idx = 0
    if candle:
        d = str(candle[0].get("device", ""))
        if d.startswith("cuda:") and d[5:].isdigit():
            dev_idx = int(d[5:])
    drivers = sorted({str(g.get("driver_version")) for r in candle
                      for g in dig(r, "host", "gpus", default=[]) or []
                      if g.get("index", dev_idx) == dev_idx and g.get("driver_version")}
                     | {str(r["driver_version"]) for r in torch_recs if r.get("driver_version")})
    dates = sorted(str(x)[:10] for r in candle + torch_recs
                   for x in (r.get("started_at"), r.get("finished_at")) if x)
    commits = sorted({dig(r, "environment", "git_commit") for r in candle} - {None, ""})
    candle_v = sorted({dig(r, "environment", "candle_version") for r in candle} - {None, ""})
    candle_cudnn = sorted({dig(r, "environment", "cudnn_version") for r in candle} - {None, ""})
    cuda_drv = sorted({dig(r, "environment", "cuda_driver_version") for r in candle} - {None, ""})
    torch_v = sorted({r.get("torch_version") for r in torch_recs} - {None, ""})
    torch_cudnn = sorted({r.get("cudnn_version") for r in torch_recs} - {None, ""})

    def joined(xs):
        return ", ".join(xs) if xs else DASH

    w(f"- Card: {card or DASH} (Candle records); {pt_card or DASH} (PyTorch records)")
    w(f"- Driver: {joined(drivers)}; CUDA driver API {joined(cuda_drv)}")
    if dates and dates[0] != dates[-1]:
        w(f"- Date: {dates[0]} to {dates[-1]}")
    else:
        w(f"- Date: {dates[0] if dates else DASH}")
    if candle:
        w(f"- Fleetmark commit: {joined(commits)}; Candle {joined(candle_v)}, "
          f"cuDNN {joined(candle_cudnn)}")
        fused_opts = sorted({str(dig(r, "backend", "details", "fused_options"))
                             for r in candle if dig(r, "backend", "path") == "fused"
                             and dig(r, "backend", "details", "fused_options")})
        if fused_opts:
            w(f"- Candle fused options: {'; '.join(f'`{o}`' for o in fused_opts)}")
    else:
        w(f"- Candle: no records{' in ' + args.candle if args.candle else ''}")
    if torch_recs:
        tf32 = sorted({str(r.get("cudnn_allow_tf32")) for r in torch_recs
                       if "cudnn_allow_tf32" in r})
        w(f"- PyTorch {joined(torch_v)}, cuDNN {joined(torch_cudnn)}, cudnn.benchmark on, "
          f"cudnn.allow_tf32 = {joined(tf32)}")
    else:
        w(f"- PyTorch: no records{' in ' + args.pytorch if args.pytorch else ''}")
    w(f"- Image size {size}x{size}. Latency per iteration ({timing} for PyTorch; Candle "
      "times each iteration by its backend's clock); p50/p99 by linear interpolation; images/s = "
      "batch x 1000 / mean latency. Peak memory: Candle as each record's `memory_scope`; PyTorch "
      "`torch.cuda.max_memory_allocated()`.")
    sm = [dig(r, "telemetry", "sm_clock_mhz") for r in candle]
    sm = [s for s in sm if isinstance(s, dict)]
    if sm:
        w(f"- Candle SM clock during timing: {min(s['min'] for s in sm):.0f} to "
          f"{max(s['max'] for s in sm):.0f} MHz; "
          f"{sum(1 for r in candle if dig(r, 'telemetry', 'throttled'))} of {len(candle)} "
          "records saw clock-limiting throttling (marked †)")
    pw = [dig(r, "telemetry", "power_watts") for r in candle]
    pw = [s for s in pw if isinstance(s, dict)]
    if pw:
        w(f"- Candle board power during timing: up to {max(s['max'] for s in pw):.0f} W")
    if any("⚠" in pt.flags for pt in C.values() if pt):
        w("- ⚠ marks a Candle record whose output check failed: its speed is not to be trusted")
    if dups:
        w(f"- {dups} repeated point(s): the repetition with the median images/s is shown")
    if candle_bad or torch_bad:
        w(f"- Skipped unreadable lines: {candle_bad} (Candle), {torch_bad} (PyTorch)")
    w("")

    # -- (a) -----------------------------------------------------------------------------------
    w("## Latency, throughput and memory per precision")
    w("")
    for prec in precisions:
        maths = sorted({dig(pt.raw, "backend", "math") for (pp, _, _), pt in C.items()
                        if pp == prec and pt} - {None, ""})
        pt_tf32 = any(pt.raw.get("tf32") for k, pt in P.items() if k[0] == prec and pt)
        note = []
        if maths and maths != [prec]:
            note.append(f"Candle math: {', '.join(maths)}")
        if pt_tf32:
            note.append("PyTorch convolutions may use TF32 (cudnn.allow_tf32)")
        w(f"### {prec}" + (f" ({'; '.join(note)})" if note else ""))
        w("")
        rows = []
        for b in batches:
            cells = [("Candle stock", c(prec, "stock", b)), ("Candle fused", c(prec, "fused", b))]
            cells += [(label, p(prec, layout, mode, b)) for label, layout, mode in PT_CONFIGS]
            if all(pt is None for _, pt in cells):
                continue
            for label, pt in cells:
                if pt is None:
                    rows.append([b, label, DASH, DASH, DASH, DASH])
                else:
                    rows.append([b, label + (f" {pt.flags}" if pt.flags else ""), fms(pt.p50),
                                 fms(pt.p99), fips(pt.ips), fmib(pt.peak)])
        w(table(["Batch", "Engine", "p50 ms", "p99 ms", "images/s", "peak MiB"], rows, left=2)
          if rows else "_no points_")
        w("")

    # -- (b) -----------------------------------------------------------------------------------
    w("## Throughput ratios: Candle fused images/s ÷ PyTorch")
    w("")
    w("Bold: Candle fused at least as fast. \"Best PyTorch\" is the fastest of every PyTorch "
      "configuration measured at that point (layout, eager or graph).")
    w("")
    for prec in precisions:
        rows = []
        for b in batches:
            f = c(prec, "fused", b)
            ecl = p(prec, "channels_last", "eager", b)
            gcl = p(prec, "channels_last", "graph", b)
            cands = [(f"{k[1]}+{k[2]}", v) for k, v in P.items()
                     if v and k[0] == prec and k[4] == b and k[3] == timing]
            best = max(cands, key=lambda kv: kv[1].ips or 0, default=(None, None))
            if f is None and ecl is None and gcl is None:
                continue
            fi = f.ips if f else None
            rows.append([b, fips(fi), fips(ecl.ips if ecl else None),
                         fratio(fi, ecl.ips if ecl else None),
                         fips(gcl.ips if gcl else None), fratio(fi, gcl.ips if gcl else None),
                         f"{fips(best[1].ips)} ({best[0]})" if best[1] else DASH,
                         fratio(fi, best[1].ips if best[1] else None)])
        w(f"### {prec}")
        w("")
        w(table(["Batch", "Candle fused img/s", "PyTorch eager CL img/s", "÷ eager CL",
                 "PyTorch CL+graph img/s", "÷ CL+graph", "best PyTorch img/s", "÷ best"], rows)
          if rows else "_no points_")
        w("")

    # -- (c) -----------------------------------------------------------------------------------
    w("## Peak memory ratio: Candle fused ÷ PyTorch eager channels_last")
    w("")
    rows = []
    for b in batches:
        row = [b]
        for prec in precisions:
            f = c(prec, "fused", b)
            e = p(prec, "channels_last", "eager", b)
            row.append(fratio(f.peak if f else None, e.peak if e else None, mark=False))
        if any(x != DASH for x in row[1:]):
            rows.append(row)
    scopes = sorted({r.get("memory_scope", "") for r in candle} - {""})
    w(f"Candle peak memory scope: {joined(scopes)}; below 1.0 means Candle used less.")
    w("")
    w(table(["Batch"] + precisions, rows) if rows else "_no points_")
    w("")

    # -- (d) -----------------------------------------------------------------------------------
    article = {k: v for k, v in P.items() if k[3] == "time.time-no-sync" and v}
    if article:
        w("## The article's timing: time.time() without synchronize vs CUDA events")
        w("")
        w("PyTorch eager NCHW. `time.time()` around `model(x)` without `torch.cuda.synchronize()` "
          "times the kernel launches, not the GPU work; \"wall\" is the timed loop's wall time "
          "per iteration including one final synchronize, i.e. what the GPU sustained.")
        w("")
        rows = []
        for (prec, layout, mode, _, b), a in sorted(article.items(),
                                                    key=lambda kv: (PRECISIONS.index(kv[0][0])
                                                                    if kv[0][0] in PRECISIONS
                                                                    else 9, kv[0][4])):
            e = P.get((prec, layout, mode, "cuda-events", b))
            wall = a.raw.get("wall_ms_per_iter_incl_final_sync")
            rows.append([prec, b, fms(a.mean), fms(e.mean if e else None), fms(wall),
                         fratio(e.mean if e else None, a.mean, mark=False),
                         fips(a.ips), fips(e.ips if e else None),
                         fips(b * 1000 / wall if wall else None)])
        w(table(["Precision", "Batch", "no-sync mean ms", "CUDA events mean ms", "wall ms/iter",
                 "events ÷ no-sync", "no-sync img/s", "events img/s", "wall img/s"], rows))
        w("")

    # -- (e) -----------------------------------------------------------------------------------
    w(f"## Candle fused in the T4 article's shape ({title_card})")
    w("")
    w("Mean latency per batch; images/s from it.")
    w("")
    rows = []
    for b in batches:
        f32, f16 = c("f32", "fused", b), c("f16", "fused", b)
        if f32 is None and f16 is None:
            continue
        rows.append([b, fms(f32.mean if f32 else None), fms(f16.mean if f16 else None),
                     fips(f32.ips if f32 else None), fips(f16.ips if f16 else None)])
    w(table(["Batch", "FP32 ms", "FP16 ms", "FP32 images/s", "FP16 images/s"], rows)
      if rows else "_no points_")
    w("")

    if failed:
        w("## Failed PyTorch points")
        w("")
        w(table(["Precision", "Layout", "Mode", "Batch", "Error"],
                [[r.get("precision"), r.get("layout"), r.get("mode"), r.get("batch"),
                  str(r.get("error")).replace("|", "\\|")[:160]] for r in failed], left=5))
        w("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Markdown side-by-side of Candle (Fleetmark) and PyTorch ResNet18 results.")
    ap.add_argument("--candle", help="Fleetmark results, JSON lines of BenchResult")
    ap.add_argument("--pytorch", help="pytorch_reference.py bench output, JSON lines")
    ap.add_argument("--hardware", help="card to report (substring of its name), when the files "
                    "hold several")
    ap.add_argument("--image-size", type=int, help="image size to report (default: the most "
                    "common one)")
    ap.add_argument("--include-cpu", action="store_true",
                    help="keep CPU records even when GPU records are present")
    ap.add_argument("--out", help="write the Markdown here instead of stdout")
    args = ap.parse_args(argv)
    if not args.candle and not args.pytorch:
        ap.error("give --candle and/or --pytorch")
    try:
        md = build(args)
    except InputError as e:
        print(f"side_by_side: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
        print(f"side_by_side: wrote {args.out}", file=sys.stderr)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
