#!/usr/bin/env python3
"""Command line of the kernel generator, run by Meson.

  generate.py --backend cuda --head-dims 64,128 --cuda-archs sm_90a --list     files it would write
  generate.py --backend vulkan --head-dims 64,128 --out DIR                     render them into DIR
  generate.py --inputs                                                          files Meson must track
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparq_codegen import render, variants  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cuda", "vulkan"])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--cuda-archs", default="sm_90a")
    ap.add_argument("--list", action="store_true", help="print the output file names, one per line")
    ap.add_argument("--inputs", action="store_true", help="print the generator's own input files")
    ap.add_argument("--out", help="directory to render into")
    a = ap.parse_args()
    if a.inputs:
        print("\n".join(render.inputs()))
        return
    if not a.backend:
        ap.error("--backend is required")
    head_dims = tuple(sorted({int(x) for x in a.head_dims.split(",") if x}))
    for d in head_dims:
        if d % 16 or not 16 <= d <= 256:
            ap.error(f"-Dhead_dims: head dim {d} is not supported: head dims must be multiples of 16 in [16, 256]")
    archs = tuple(x for x in a.cuda_archs.split(",") if x)
    cfg = variants.Config(backend=a.backend, head_dims=head_dims, cuda_archs=archs)
    if a.list:
        print("\n".join(render.outputs(cfg)))
    elif a.out:
        render.render_all(cfg, a.out)
    else:
        ap.error("give --list or --out")


if __name__ == "__main__":
    main()
