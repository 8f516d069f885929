#!/usr/bin/env python3
"""Golden ResNet18 logits from PyTorch on the CPU, for Fleetmark's Candle golden test.

Loads ResNet18 weights (a safetensors file with torchvision ``state_dict`` names, as written by
``fleetmark-agent export``) into ``torchvision.models.resnet18()`` with ``strict=True``, runs the
input batch stored under the key ``"input"`` of another safetensors file in float64 on the CPU
(float64 makes the reference an order of magnitude more exact than any f32 implementation, so
the test measures Candle's error, not PyTorch's), and writes the logits as JSON.

Regenerate ``engine/tests/golden/resnet18_seed0_224.json`` from the repository root with:

    cargo build -p fleetmark-agent
    ./target/debug/fleetmark-agent export --seed 0 --batch 2 --image-size 224 \\
        --weights out/golden/w_seed0.safetensors --input out/golden/x_seed0_b2_224.safetensors
    /work/.venv-torch/bin/python scripts/reference/golden_cpu.py \\
        --weights out/golden/w_seed0.safetensors --input out/golden/x_seed0_b2_224.safetensors \\
        --seed 0 --out engine/tests/golden/resnet18_seed0_224.json \\
        --expect-weights-sha256 <the sha256 that `export` printed>

(``out/`` and ``*.safetensors`` are git-ignored; any python3 with torch, torchvision, numpy and
safetensors will do in place of the venv.)

The JSON records two hashes of the weights:

* ``weights_sha256``: SHA-256 of the weights *file's bytes*. It identifies the file, but the
  byte layout belongs to whichever safetensors writer produced it and may change with a Candle
  or safetensors upgrade even when every tensor is the same.
* ``weights_content_sha256``: Fleetmark's content hash (``engine/src/weights.rs``,
  ``hash_tensors``): SHA-256 over each tensor in name order of the name's bytes, each dimension
  as a little-endian u64, then the values as little-endian f32 (i64 for ``num_batches_tracked``).
  It depends only on the tensors, and for seeded weights it is exactly
  ``ModelWeights::seeded(seed).info.sha256``, which ``export`` prints. The golden test compares
  this one, because it is the robust one.

Only the standard library, torch, torchvision, numpy and safetensors are used; no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys

GENERATOR = "scripts/reference/golden_cpu.py"


def die(msg: str) -> None:
    print(f"golden_cpu.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(state_dict) -> str:
    """Fleetmark's ``hash_tensors`` (engine/src/weights.rs), byte for byte."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):  # ASCII names: str order == Rust's byte order
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode("utf-8"))
        for d in t.shape:
            h.update(struct.pack("<Q", int(d)))
        if t.dtype == torch.int64:
            h.update(t.numpy().astype("<i8", copy=False).tobytes())
        else:
            h.update(t.to(torch.float32).numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def round_sig(v: float, digits: int) -> float:
    return float(f"{v:.{digits}g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Golden ResNet18 logits (PyTorch CPU) for Fleetmark's golden test.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (or scripts/reference/README.md) for the exact "
        "regeneration commands.",
    )
    p.add_argument("--weights", required=True, help="safetensors file, torchvision names")
    p.add_argument("--input", required=True, help="safetensors file with an NCHW f32 'input'")
    p.add_argument("--out", required=True, help="golden JSON to write")
    p.add_argument("--seed", type=int, required=True,
                   help="the seed the weights were exported with (recorded, not used)")
    p.add_argument("--compute-dtype", choices=["float64", "float32"], default="float64",
                   help="arithmetic of the reference forward pass (default float64)")
    p.add_argument("--digits", type=int, default=7,
                   help="significant digits kept per logit (default 7)")
    p.add_argument("--expect-weights-sha256", default=None,
                   help="abort unless the weights' content hash (what `fleetmark-agent export` "
                   "prints) is this")
    args = p.parse_args(argv)

    for path in (args.weights, args.input):
        if not os.path.isfile(path):
            die(f"{path} does not exist (create it with `fleetmark-agent export`, see --help)")
    if not 3 <= args.digits <= 17:
        die("--digits must be between 3 and 17")

    import torch
    import torchvision
    from safetensors.torch import load_file

    try:
        state = load_file(args.weights)
    except Exception as e:  # safetensors raises its own error types
        die(f"{args.weights} is not a readable safetensors file: {e}")
    try:
        inputs = load_file(args.input)
    except Exception as e:
        die(f"{args.input} is not a readable safetensors file: {e}")
    if "input" not in inputs:
        die(f"{args.input} has no tensor 'input' (it has: {', '.join(sorted(inputs)) or 'none'})")
    x = inputs["input"]
    if x.dim() != 4 or x.shape[1] != 3:
        die(f"input must be NCHW with 3 channels, got shape {list(x.shape)}")
    if x.dtype != torch.float32:
        die(f"input must be float32, got {x.dtype}")

    content = content_sha256(state)
    if args.expect_weights_sha256 and args.expect_weights_sha256.lower() != content:
        die(f"weights content hash is {content}, expected {args.expect_weights_sha256}: "
            "the file is not the weights you think it is")

    model = torchvision.models.resnet18()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        die(f"{args.weights} does not fit torchvision's resnet18: {e}")
    dtype = torch.float64 if args.compute_dtype == "float64" else torch.float32
    model = model.to(dtype).eval()

    with torch.inference_mode():
        logits = model(x.to(dtype))
    if not torch.isfinite(logits).all():
        die("the reference produced non-finite logits")
    rows = [[round_sig(float(v), args.digits) for v in row] for row in logits.tolist()]

    # How far apart the top two classes are, relative to the largest logit: the golden test's
    # top-1 check is only meaningful if this is well above the error bound.
    top2 = torch.topk(logits, 2, dim=1).values
    margins = ((top2[:, 0] - top2[:, 1]) / logits.abs().max()).tolist()

    golden = {
        "generator": GENERATOR,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "weights_sha256": file_sha256(args.weights),
        "weights_content_sha256": content,
        "seed": args.seed,
        "input_sha256": file_sha256(args.input),
        "input_shape": list(x.shape),
        "dtype": "float32",
        "compute_dtype": args.compute_dtype,
        "device": "cpu",
        "significant_digits": args.digits,
        "top1": [int(i) for i in logits.argmax(dim=1).tolist()],
        "top1_margin_rel": [round_sig(m, 4) for m in margins],
        "logits": rows,
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, args.out)

    print(f"weights file sha256:    {golden['weights_sha256']}")
    print(f"weights content sha256: {content}")
    print(f"top-1 classes: {golden['top1']}, relative top-2 margins: {golden['top1_margin_rel']}")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
