"""The space-to-depth stem and its max pool through PyTorch (cuDNN), timed like
stem_pool_probe.cu times the fused kernel (CUDA events, median of 20 runs of 20 launches, in a
CUDA graph), so the two can be read side by side from one device call. Prints one line per
precision. Usage: python3 scripts/device/stem_pool_probe_torch.py [batch]"""

import sys

import torch
import torch.nn.functional as F

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
torch.backends.cudnn.benchmark = True
for name, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
    x = torch.randn(n, 16, 115, 115, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    w = torch.randn(64, 16, 4, 4, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    b = torch.randn(64, device="cuda", dtype=dt)

    def step():
        return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 3, 2, 1)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    times = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        g.replay()
    for _ in range(20):
        e0.record()
        for _ in range(20):
            g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 20)
    times.sort()
    print(f"{name} b{n} torch conv+bias+relu+maxpool (graph)  p50 {times[10]:.4f} ms  min {times[0]:.4f} ms")
