"""Compile the CuTe DSL decode-step kernel for sm_90a without a GPU (or run nothing else).

Loads ``hybridkit/kernels/mamba3/step/cute_kernel.py`` by path (it needs no torch and no
hybridkit package), compiles it for every (P, N, state dtype) given, and prints what compiled.
Needs only the CuTe DSL (nvidia-cutlass-dsl with its cuda-bindings); ``CUTE_DSL_ARCH`` must be
set before ``cutlass`` is imported, which this script does.

    python benchmarks/cute_step_compile.py [--shapes 64x128,32x64] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "hybridkit/kernels/mamba3/step/cute_kernel.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x128,32x64", help="PxN pairs")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="state dtypes")
    ap.add_argument("--arch", default="sm_90a")
    args = ap.parse_args()
    os.environ.setdefault("CUTE_DSL_ARCH", args.arch)
    spec = importlib.util.spec_from_file_location("cute_kernel", KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for shape in args.shapes.split(","):
        p, n = (int(v) for v in shape.split("x"))
        for dtype in args.dtypes.split(","):
            module.compiled_update(p, n, dtype)
            print(f"compiled P={p} N={n} state={dtype} for {os.environ['CUTE_DSL_ARCH']}")


if __name__ == "__main__":
    main()
