"""Correctness of the SISO forward under each launch candidate of the tuned kernels (GPU).

For bf16 inputs at a few (N, P), runs the Triton forward with every candidate of each tuned
kernel forced in turn (the other kernels at their defaults) and prints the relative error of y
against the float64 chunked path: a candidate that miscompiles shows up as a large error.

    python benchmarks/siso_launch_check.py
"""

from __future__ import annotations

import torch

from hybridkit.kernels.config import kernel_config
from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked
from hybridkit.kernels.mamba3.chunkscan import launch
from hybridkit.kernels.mamba3.chunkscan.scan import mamba3_scan_triton
from tests.helpers import rel_err
from tests.test_triton_siso import Case, _inputs


def main() -> None:
    for N, P in ((128, 32), (128, 64), (64, 32)):
        c = Case(B=2, L=385, H=2, G=1, N=N, P=P, S=N // 4, C=64)
        inp = _inputs(c, torch.bfloat16, "cuda", 0)
        ref, _ = mamba3_scan_chunked(
            **{k: v.double() if v is not None else None for k, v in inp.items()}
        )
        for name in ("FWD_STATE", "FWD_OUT"):
            tuned = getattr(launch, name)
            default = tuned.default
            for cand in tuned.candidates:
                tuned.default = cand
                torch.full((64 << 20,), float("nan"), device="cuda")
                with kernel_config(autotune=False):
                    y, _ = mamba3_scan_triton(**inp, chunk_size=64, return_state=False)
                print(f"N {N} P {P} {name} {cand}: y rel err {rel_err(y, ref):.2e}", flush=True)
            tuned.default = default


if __name__ == "__main__":
    main()
