"""Correctness of the scan under each launch candidate of the tuned kernels (GPU).

For bf16 inputs at a few (N, P), runs the Triton forward with every candidate of each tuned
kernel forced in turn (the other kernels at their defaults) and prints the relative error of y
against the float64 chunked path: a candidate that miscompiles shows up as a large error.
``--tiles T [--rank R]``: the tiled forward's two kernels instead (``state_tiles`` = T), each
candidate also with a gradient (the output kernel then stores the per-tile states the backward
reads): the error of y and of dq, dk, dv against the one-tile kernels' gradients.

    python benchmarks/siso_launch_check.py [--tiles 4 --rank 4]
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


def _with_grads(inp: dict, c: Case, dy: torch.Tensor, tiles: int) -> tuple:
    """y and (dq, dk, dv) of the Triton scan with ``state_tiles`` = tiles."""
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
    with kernel_config(autotune=False, state_tiles=tiles):
        y, _ = mamba3_scan_triton(**leaves, chunk_size=c.C, pairing=c.pairing, return_state=False)
    y.backward(dy)
    return y.detach(), [leaves[k].grad for k in ("q", "k", "v")]


def check_tiled(tiles: int, rank: int) -> None:
    for N, P in ((128, 64), (64, 32)):
        C = 64 // rank
        c = Case(B=2, L=385, H=2, G=1, N=N, P=P, S=N // 4, C=C, R=rank, halves=rank > 1)
        inp = _inputs(c, torch.bfloat16, "cuda", 0)
        ref, _ = mamba3_scan_chunked(
            **{k: v.double() if v is not None else None for k, v in inp.items()},
            pairing=c.pairing,
        )
        dy = torch.randn_like(ref).to(torch.bfloat16)
        _, want = _with_grads(inp, c, dy, 1)
        for name in ("FWD_STATE_TILED", "FWD_OUT_TILED"):
            for cand in _each_candidate(name):
                with kernel_config(autotune=False, state_tiles=tiles), torch.no_grad():
                    y, _ = mamba3_scan_triton(
                        **inp, chunk_size=C, pairing=c.pairing, return_state=False
                    )
                yg, got = _with_grads(inp, c, dy, tiles)
                errs = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
                print(
                    f"R {rank} N {N} P {P} tiles {tiles} {name} {cand}: y rel err "
                    f"{rel_err(y, ref):.2e} (with grad {rel_err(yg, ref):.2e}); dq, dk, dv vs "
                    f"one tile {', '.join(f'{e:.2e}' for e in errs)}",
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=1, help="check the tiled forward's kernels")
    ap.add_argument("--rank", type=int, default=1, help="MIMO rank (with --tiles)")
    args = ap.parse_args()
    if args.tiles > 1:
        check_tiled(args.tiles, args.rank)
        return
    for N, P in ((128, 32), (128, 64), (64, 32)):
        c = Case(B=2, L=385, H=2, G=1, N=N, P=P, S=N // 4, C=64)
        inp = _inputs(c, torch.bfloat16, "cuda", 0)
        ref, _ = mamba3_scan_chunked(
            **{k: v.double() if v is not None else None for k, v in inp.items()}
        )
        for name in ("FWD_STATE", "FWD_OUT"):
            for cand in _each_candidate(name):
                with kernel_config(autotune=False):
                    y, _ = mamba3_scan_triton(**inp, chunk_size=64, return_state=False)
                print(f"N {N} P {P} {name} {cand}: y rel err {rel_err(y, ref):.2e}", flush=True)


if __name__ == "__main__":
    main()
