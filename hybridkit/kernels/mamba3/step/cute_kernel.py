"""The CuTe DSL kernel of the ``cute`` decode backend: state update and read-out (SISO).

One CTA of 4 warps per (head, sequence); warp w owns state rows p = w, w + 4, ..., lane l the
columns n = l, l + 32, ... (coalesced 128-byte rows), so a row's output
``y[p] = sum_n h[p, n] q[n]`` is a butterfly shuffle reduction inside the warp; lane 0 adds the
D skip and writes it. Per element: ``h = alpha h + (beta v_prev[p]) k_prev[n] +
(gamma x[p]) k[n]`` in fp32, stored in place (fp32 or bf16 storage). P must be a multiple of 4
and N of 32.

All of a thread's loads (its 16 x 4 state elements at P 64 / N 128, the keys, query and row
factors) are issued before its first store: the H200 measured the first version, which loaded,
updated and stored one element at a time, 9.4x slower with a bf16 state than with fp32 at
batch 128, and its PTX shows why such a chain is slow: no global load may pass a global store.

Launch path (performance.md section 5.2): compiled once per (P, N, state dtype) with
``cute.compile(..., options="--enable-tvm-ffi")`` on fake tensors whose batch and head counts
are symbolic, kept in this module's dict, called with the raw torch tensors on torch's current
stream (so ``torch.cuda.graph`` captures it like any kernel). The module needs no torch, so a
CPU machine with the CuTe DSL can compile it for sm_90a (``benchmarks/cute_step_compile.py``).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

WARPS = 4
_DTYPES = {"float32": cutlass.Float32, "bfloat16": cutlass.BFloat16}


class _StateUpdate:
    """The compiled object: P and N are fixed per instance (they unroll the loops)."""

    def __init__(self, headdim: int, dstate: int):
        self.P, self.N = headdim, dstate

    @cute.kernel
    def kernel(
        self,
        gS: cute.Tensor,  # (B, H, P, N) state, updated in place
        gA: cute.Tensor,  # (B, H) alpha
        gXG: cute.Tensor,  # (B, H, P) gamma * x
        gVB: cute.Tensor,  # (B, H, P) beta * v_prev
        gDX: cute.Tensor,  # (B, H, P) D * x
        gKN: cute.Tensor,  # (B, H, N) new key
        gKP: cute.Tensor,  # (B, H, N) previous key
        gQ: cute.Tensor,  # (B, H, N) query
        gY: cute.Tensor,  # (B, H, P) output
    ):
        tidx, _, _ = cute.arch.thread_idx()
        h, b, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        rows, cols = self.P // WARPS, self.N // 32
        # Every load first, then the arithmetic and the stores: the compiler may not move a
        # global load above a global store (they might alias), so a load / update / store per
        # element, as this kernel first did, leaves one load in flight per thread. The lists
        # are built by Python at trace time (plain ``range`` in a comprehension is not turned
        # into a device loop): registers, not memory.
        alpha = gA[b, h]
        kp = [gKP[b, h, lane + 32 * j] for j in range(cols)]
        kn = [gKN[b, h, lane + 32 * j] for j in range(cols)]
        q = [gQ[b, h, lane + 32 * j] for j in range(cols)]
        xg = [gXG[b, h, warp + WARPS * i] for i in range(rows)]
        vb = [gVB[b, h, warp + WARPS * i] for i in range(rows)]
        dx = [gDX[b, h, warp + WARPS * i] for i in range(rows)]
        old = [
            [gS[b, h, warp + WARPS * i, lane + 32 * j] for j in range(cols)] for i in range(rows)
        ]
        for i in cutlass.range_constexpr(rows):
            p = warp + WARPS * i
            acc = cutlass.Float32(0.0)
            for j in cutlass.range_constexpr(cols):
                s = alpha * old[i][j].to(cutlass.Float32) + vb[i] * kp[j] + xg[i] * kn[j]
                gS[b, h, p, lane + 32 * j] = s.to(gS.element_type)
                acc = acc + s * q[j]
            for k in cutlass.range_constexpr(5):
                acc = acc + cute.arch.shuffle_sync_bfly(acc, offset=1 << k)
            if lane == 0:
                gY[b, h, p] = acc + dx[i]

    @cute.jit
    def __call__(self, mS, mA, mXG, mVB, mDX, mKN, mKP, mQ, mY, stream, /):
        self.kernel(mS, mA, mXG, mVB, mDX, mKN, mKP, mQ, mY).launch(
            grid=(mS.shape[1], mS.shape[0], 1), block=(32 * WARPS, 1, 1), stream=stream
        )


_COMPILED: dict[tuple[int, int, str], object] = {}


def _fake(dtype, shape: tuple) -> cute.Tensor:
    order = tuple(reversed(range(len(shape))))  # row-major, like a contiguous torch tensor
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=4)


def compiled_update(headdim: int, dstate: int, state_dtype: str):
    """The TVM-FFI function for this (P, N, state dtype), compiled at first use."""
    key = (headdim, dstate, state_dtype)
    fn = _COMPILED.get(key)
    if fn is None:
        if headdim % WARPS or dstate % 32 or state_dtype not in _DTYPES:
            raise ValueError(
                f"cute decode step needs P % {WARPS} == 0, N % 32 == 0 and an fp32/bf16 state; "
                f"got P={headdim}, N={dstate}, {state_dtype}"
            )
        b, h = cute.sym_int(), cute.sym_int()
        f32 = cutlass.Float32
        fn = cute.compile(
            _StateUpdate(headdim, dstate),
            _fake(_DTYPES[state_dtype], (b, h, headdim, dstate)),
            _fake(f32, (b, h)),
            *(_fake(f32, (b, h, headdim)) for _ in range(3)),
            *(_fake(f32, (b, h, dstate)) for _ in range(3)),
            _fake(f32, (b, h, headdim)),
            make_fake_stream(use_tvm_ffi_env_stream=True),
            options="--enable-tvm-ffi",
        )
        _COMPILED[key] = fn
    return fn
