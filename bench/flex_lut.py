#!/usr/bin/env python3
"""FlexAttention given the block mask sparq's predictor chose (issue #5's comparison), on the GPU.

Reads the LUT that `sparq-sparge-bench --lut-dir DIR` wrote (counts.i32 [B,H,nQB], indices.i32 [B,H,nQB,nKB],
lut.json), builds a FlexAttention BlockMask with the same blocks (kv_num_blocks = counts, kv_indices = indices,
BLOCK_SIZE = (block_q, block_k)), and times flex_attention (torch.compile'd) with that mask and with every block,
on fp16 q, k, v of the same shape (timing does not depend on the values). Prints one JSON object per line;
effective TOPS count the dense FLOPs 4·B·H·N²·D.

  python3 bench/flex_lut.py DIR [DIR...]
"""
import json, sys
import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention, BlockMask

def bench_ms(fn, reps=10):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]

def main():
    for i, d in enumerate(sys.argv[1:]):
        run(d, dense=i == 0)

def run(d, dense):
    meta = json.load(open(f"{d}/lut.json"))
    B, H, nqb, nkb, N, D = (meta[k] for k in ("B", "H", "nqb", "nkb", "N", "D"))
    bq, bk = meta["block_q"], meta["block_k"]
    counts = torch.from_numpy(np.fromfile(f"{d}/counts.i32", dtype=np.int32).reshape(B, H, nqb)).cuda()
    indices = torch.from_numpy(np.fromfile(f"{d}/indices.i32", dtype=np.int32).reshape(B, H, nqb, nkb)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    flops = 4 * B * H * N * N * D
    density = counts.double().sum().item() / (B * H * nqb * nkb)
    sparse = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(bq, bk))
    full_idx = torch.arange(nkb, device="cuda", dtype=torch.int32).expand(B, H, nqb, nkb).contiguous()
    full = BlockMask.from_kv_blocks(torch.full_like(counts, nkb), full_idx, BLOCK_SIZE=(bq, bk))
    runs = [("flex-sparge-lut", sparse, density)] + ([("flex-dense", full, 1.0)] if dense else [])
    for name, mask, dens in runs:
        ms = bench_ms(lambda: flex(q, k, v, block_mask=mask))
        print(json.dumps({"method": name, "B": B, "H": H, "N": N, "D": D, "block_q": bq, "block_k": bk,
                          "cdfthreshd": meta.get("cdfthreshd"), "density": dens, "ms": ms,
                          "eff_tops": flops / ms / 1e9}), flush=True)

if __name__ == "__main__":
    main()
