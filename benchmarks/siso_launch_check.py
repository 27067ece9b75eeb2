"""Correctness of the Triton scan under each launch candidate of the tuned kernels (GPU).

For bf16 inputs at a few (N, P), runs the scan with every candidate of each tuned kernel forced
in turn (the other kernels at their defaults) and prints the relative error against the float64
chunked path: of y for the forward kernels, of dq / dk / dv for ``_bwd_dstate``. The tuner keeps
the fastest candidate, so one that miscompiles must show up here as a large error first.

    python benchmarks/siso_launch_check.py [--rank 4]
"""

from __future__ import annotations

import argparse

import torch

from hybridkit.kernels.config import kernel_config
from hybridkit.kernels.mamba3.chunked import mamba3_scan_chunked
from hybridkit.kernels.mamba3.chunkscan import launch
from hybridkit.kernels.mamba3.chunkscan.scan import mamba3_scan_triton
from tests.helpers import rel_err
from tests.test_triton_siso import Case, _inputs

GRAD_OF = ("q", "k", "v")


def _each_candidate(name: str):
    """Force each launch candidate of the tuned kernel ``launch.<name>`` in turn (the default
    is what an untuned launch runs); the default is restored afterwards."""
    tuned = getattr(launch, name)
    default = tuned.default
    try:
        for cand in tuned.candidates:
            tuned.default = cand
            torch.full((64 << 20,), float("nan"), device="cuda")  # poison the allocator
            yield cand
    finally:
        tuned.default = default


def _run(inp: dict, c: Case, dy: torch.Tensor | None) -> tuple[torch.Tensor, list]:
    """y, and with ``dy`` the gradients of ``GRAD_OF``, with launch tuning off."""
    leaves = {k: v.clone().requires_grad_(dy is not None) for k, v in inp.items() if v is not None}
    with kernel_config(autotune=False):
        y, _ = mamba3_scan_triton(**leaves, chunk_size=c.C, pairing=c.pairing, return_state=False)
        if dy is None:
            return y.detach(), []
        y.backward(dy)
    return y.detach(), [leaves[k].grad for k in GRAD_OF]


def _reference(inp: dict, c: Case, dy: torch.Tensor) -> tuple[torch.Tensor, list]:
    leaves = {k: v.double().requires_grad_() if v is not None else None for k, v in inp.items()}
    y, _ = mamba3_scan_chunked(**leaves, pairing=c.pairing)
    y.backward(dy.double())
    return y.detach(), [leaves[k].grad for k in GRAD_OF]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=1, help="MIMO rank (1: SISO)")
    args = ap.parse_args()
    R = args.rank
    for N, P in ((128, 32), (128, 64), (64, 32)):
        c = Case(B=2, L=385, H=2, G=1, N=N, P=P, S=N // 4, C=64 // R, R=R, halves=R > 1)
        inp = _inputs(c, torch.bfloat16, "cuda", 0)
        y0, _ = _run(inp, c, None)
        dy = torch.randn_like(y0)
        ref, ref_grads = _reference(inp, c, dy)
        for name in ("FWD_STATE", "FWD_OUT", "BWD_DSTATE"):
            for cand in _each_candidate(name):
                y, grads = _run(inp, c, dy if name == "BWD_DSTATE" else None)
                errs = [rel_err(a, b) for a, b in zip(grads, ref_grads, strict=False)]
                grad_txt = f"; dq, dk, dv {', '.join(f'{e:.2e}' for e in errs)}" if errs else ""
                print(
                    f"R {R} N {N} P {P} {name} {cand}: y rel err {rel_err(y, ref):.2e}{grad_txt}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
