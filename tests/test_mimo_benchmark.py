"""``benchmarks/mamba3_mimo.py``'s arithmetic and report, on the CPU: the FLOP and byte counts
it divides by (shared with the SISO benchmark) and the table's rates as shares of the ceilings
measured in the same run, so a GPU call is not the first to find a broken column."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
mimo = pytest.importorskip("mamba3_mimo")


def test_counts_reduce_to_siso_and_scale_with_rank():
    shape = (8, 4096, 32, 64, 128)
    siso = mimo.flops_bytes(*shape)
    assert mimo.flops_bytes(*shape, C=64, R=1) == siso
    ff, fb, bf, bb = mimo.flops_bytes(*shape, C=16, R=4)
    B, L, H, P, N = shape
    # R rows per token, 64-row tiles: scores + values over 64 rows, state in / out per row
    assert ff == B * L * 4 * H * (2 * 64 * (N + P) + 4 * N * P)
    assert bf == 3 * ff
    # MIMO moves the R-fold q / k / y, otherwise SISO's bytes
    assert fb - siso[1] == B * L * 3 * (2 * N * 2 + H * P * 2)
    assert bb > fb


def test_report_rates_against_the_measured_ceilings():
    rates = mimo.rates((2.0e12, 4.0e9, 6.0e12, 1.0e10), fwd_ms=4.0, fwdbwd_ms=12.0)
    assert rates == pytest.approx(
        {"fwd_tflops": 500.0, "fwd_gbps": 1000.0, "fwdbwd_tflops": 500.0, "fwdbwd_gbps": 833.333},
        rel=1e-5,
    )
    meta = dict(device="GPU", date="today", torch="t", triton="tr", commit="c",
                copy_gbps=4000.0, matmul_tflops=800.0)  # fmt: skip

    def row(rank: int, chunk: int, ms: float) -> dict:
        return {"rank": rank, "chunk": chunk, "fwd_ms": ms, "fwdbwd_ms": 3 * ms, "peak_gb": 1.0,
                **rates}  # fmt: skip

    shape = [8, 4096, 32, 64, 128]
    table = mimo.markdown(
        meta, [{"shape": shape, "mimo": row(4, 16, 4.0), "siso": row(1, 64, 1.0)}]
    )
    line = [x for x in table.splitlines() if x.startswith("| 8, 4096")][0]
    assert "| 500 / 500 (62% / 62%) | 1000 / 833 (25% / 21%) | 1.0 |" in line
    assert "| 1.3 / 5.0 |" in line and "| 4.00x |" in line  # 12 ms against SISO's 3
