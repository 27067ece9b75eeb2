"""Layer math: the Mamba-3 block against a from-scratch per-token loop written from the spec,
projection layout, gates, init, output-norm variants; attention masks and errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from hybridkit.kernels import attention as attn_ops
from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec, heavy_tail
from tests.helpers import qkv


def make_layer(d_model=16, dtype=torch.float64, **kw) -> Mamba3:
    spec = Mamba3Spec(**{"d_state": 8, "headdim": 8, "chunk_size": 4, **kw})
    layer = Mamba3(spec, d_model=d_model, layer_idx=0).to(dtype)
    with torch.no_grad():  # move every parameter off its structured init
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def spec_loop(layer: Mamba3, u: torch.Tensor) -> torch.Tensor:
    """The whole Mamba-3 block for one sequence, token by token, straight from docs/mamba3.md."""
    s = layer.spec
    B, L, _ = u.shape
    H, P, N, G, R, S = layer.nheads, s.headdim, s.d_state, s.ngroups, s.mimo_rank, layer.n_angles
    proj = u @ layer.in_proj.weight.T
    sizes = layer.split_sizes
    z, x, b, c, ddt, dda, trap, ang = torch.split(proj, sizes, dim=-1)
    out = torch.zeros(B, L, H * P, dtype=u.dtype)
    for bi in range(B):
        h = torch.zeros(H, P, N, dtype=u.dtype)
        theta = torch.zeros(H, S, dtype=u.dtype)
        kprev = torch.zeros(H, R, N, dtype=u.dtype)
        xprev = torch.zeros(H, P, dtype=u.dtype)
        for t in range(L):
            dt = F.softplus(ddt[bi, t] + layer.dt_bias)  # (H,)
            phi = (
                heavy_tail(dda[bi, t]) if s.a_activation == "heavy_tail" else F.softplus(dda[bi, t])
            )
            A = -torch.clamp(phi, min=s.a_floor)
            lam = torch.sigmoid(trap[bi, t]) if s.trapezoid else torch.ones(H, dtype=u.dtype)
            bt = b[bi, t].reshape(R, G, N)
            ct = c[bi, t].reshape(R, G, N)
            bt = (
                bt / torch.sqrt(bt.pow(2).mean(-1, keepdim=True) + s.norm_eps) * layer.B_norm.weight
            )
            ct = (
                ct / torch.sqrt(ct.pow(2).mean(-1, keepdim=True) + s.norm_eps) * layer.C_norm.weight
            )
            xt = x[bi, t].reshape(H, P)
            zt = z[bi, t].reshape(H, P)
            o = torch.zeros(H, P, dtype=u.dtype)
            for hh in range(H):
                g = hh // (H // G)
                theta[hh] = torch.remainder(
                    theta[hh] + math.pi * torch.tanh(ang[bi, t]) * dt[hh], 2 * math.pi
                )
                ks, qs = [], []
                for r in range(R):
                    k = bt[r, g] + layer.B_bias[hh, r]
                    q = ct[r, g] + layer.C_bias[hh, r]
                    k, q = k.clone(), q.clone()
                    for j in range(S):
                        i0, i1 = (2 * j, 2 * j + 1) if R == 1 else (j, j + N // 2)
                        cs, sn = torch.cos(theta[hh, j]), torch.sin(theta[hh, j])
                        k[i0], k[i1] = k[i0] * cs - k[i1] * sn, k[i0] * sn + k[i1] * cs
                        q[i0], q[i1] = q[i0] * cs - q[i1] * sn, q[i0] * sn + q[i1] * cs
                    ks.append(k)
                    qs.append(q)
                psi = layer.mimo_x[hh] if R > 1 else torch.ones(1, P, dtype=u.dtype)
                alpha = torch.exp(A[hh] * dt[hh])
                beta = (1 - lam[hh]) * dt[hh] * alpha
                gamma = lam[hh] * dt[hh]
                upd = sum(
                    beta * torch.outer(xprev[hh] * psi[r], kprev[hh, r])
                    + gamma * torch.outer(xt[hh] * psi[r], ks[r])
                    for r in range(R)
                )
                h[hh] = alpha * h[hh] + upd
                for r in range(R):
                    y = h[hh] @ qs[r] + layer.D[hh] * xt[hh] * psi[r]
                    zr = zt[hh] * (layer.mimo_z[hh, r] if R > 1 else 1.0)
                    g_ = y * F.silu(zr)
                    if s.outproj_norm == "grouped_pregate":
                        w = layer.norm.weight.reshape(H, P)[hh]
                        g_ = w * y / torch.sqrt(y.pow(2).mean() + s.norm_eps) * F.silu(zr)
                    o[hh] += g_ * (layer.mimo_o[hh, r] if R > 1 else 1.0)
                kprev[hh] = torch.stack(ks)
                xprev[hh] = xt[hh]
            out[bi, t] = o.reshape(-1)
    return out @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ngroups": 2},
        {"mimo_rank": 2},
        {"outproj_norm": "grouped_pregate"},
        {"mimo_rank": 2, "outproj_norm": "grouped_pregate", "rope_fraction": 1.0},
        {"rope": False},
        {"trapezoid": False, "a_activation": "softplus"},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
def test_layer_matches_spec_loop(kw):
    layer = make_layer(**kw)
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(u), spec_loop(layer, u), rtol=1e-9, atol=1e-10)


def test_in_proj_layout_widths():
    # Din 128, H 8, N 16, S 4: 2*128 + 2*16 + 3*8 + 4 (docs/mamba3.md 1.2)
    layer = Mamba3(Mamba3Spec(d_state=16, headdim=16), d_model=64, layer_idx=0)
    assert layer.in_proj.weight.shape == (316, 64)
    mimo = Mamba3(Mamba3Spec(d_state=16, headdim=16, mimo_rank=4), d_model=64, layer_idx=0)
    assert mimo.in_proj.weight.shape == (316 + 2 * 16 * 3, 64)
    assert mimo.mimo_x.shape == (8, 4, 16)
    ablated = Mamba3(
        Mamba3Spec(d_state=16, headdim=16, rope=False, trapezoid=False),
        d_model=64,
        layer_idx=0,
    )
    assert ablated.in_proj.weight.shape == (316 - 4 - 8, 64)


def test_paper_sizes():
    # docs/mamba3.md 1.2 worked example: Dm 2048, SISO Dproj 8672, MIMO R=4 9440; S = 32
    spec = Mamba3Spec()
    assert spec.n_angles() == 32
    h = 64
    assert 2 * 4096 + 2 * 128 + 3 * h + 32 == 8672
    assert (
        Mamba3Spec(d_state=64).n_angles() == 16 and Mamba3Spec(rope_fraction=1.0).n_angles() == 64
    )


def test_gates_and_init():
    spec = Mamba3Spec(d_state=8, headdim=8, dt_min=1e-3, dt_max=0.1)
    layer = Mamba3(spec, d_model=64, layer_idx=0)
    dt0 = F.softplus(layer.dt_bias)
    assert (dt0 >= 1e-3 - 1e-7).all() and (dt0 <= 0.1 + 1e-7).all()
    assert all(
        getattr(p, "_no_weight_decay", False)
        for p in (layer.dt_bias, layer.D, layer.B_bias, layer.C_bias)
    )
    assert torch.equal(layer.B_bias, torch.ones_like(layer.B_bias)) and torch.equal(
        layer.D, torch.ones(16)
    )
    dt, adt = layer.gates(torch.zeros(1, 1, 16), torch.full((1, 1, 16), -1e6))
    assert (adt / dt <= -spec.a_floor + 1e-12).all()  # A floored
    v = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    assert torch.allclose(heavy_tail(v), torch.tensor([0.5, 1.0, 2.0, 4.0]))


def test_mimo_inits():
    layer = Mamba3(Mamba3Spec(d_state=8, headdim=8, mimo_rank=4), d_model=16, layer_idx=0)
    assert torch.allclose(layer.mimo_x, torch.full_like(layer.mimo_x, 0.25))
    assert torch.allclose(layer.mimo_z, torch.ones_like(layer.mimo_z))
    assert torch.allclose(layer.mimo_o, torch.full_like(layer.mimo_o, 0.25))


def test_backends_agree_in_layer():
    layer = make_layer(mimo_rank=2)
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    ref = layer(u)
    layer.spec.backend = "reference"
    torch.testing.assert_close(layer(u), ref, rtol=1e-10, atol=1e-12)


# --- attention --------------------------------------------------------------------------------
def test_attention_bottom_right_and_window_semantics():
    q, k, v = qkv(1, 2, 5, 1, 1, 4)
    out = attn_ops.attention(q, k, v, window=2, backend="reference")
    # the last query sits at key position 4 and sees keys 3 and 4 only
    s = (q[0, 1, 0] @ k[0, 3:5, 0].T) / 2.0
    expect = torch.softmax(s, -1) @ v[0, 3:5, 0]
    torch.testing.assert_close(out[0, 1, 0], expect)
    mask = attn_ops.attention_mask(2, 5, causal=True, window=None)
    assert mask.tolist() == [[True, True, True, True, False], [True] * 5]


def test_attention_errors():
    q = torch.randn(1, 3, 3, 8)
    k = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attn_ops.attention(q, k, k)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_ops.attention(q, q, q, backend="nope")


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("norm", ["grouped_pregate", "none"])
@pytest.mark.parametrize("fold", [True, False])
def test_backward_copies_nothing_it_can_avoid(backend, norm, fold, monkeypatch):
    """Two copies of a whole activation that eager autograd made per layer and step:

    * ``in_proj``'s output gradient is one ``cat`` of the split's pieces; every piece reaches
      it contiguous (the scan hands dt's and trap's back transposed), which keeps CUDA's
      ``cat`` on its vectorized path (``_ContiguousGrad``);
    * the SISO output reads y (B, L, 1, H, P) through a view: indexing ``y[:, :, 0]`` made
      autograd zero-fill a buffer of y's size and copy the gradient into it (the norm folded
      into ``out_proj`` or not, as on CUDA in eager mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hybridkit.kernels.config import kernel_config
    from hybridkit.kernels.mamba3 import chunkscan

    pieces, ops = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            if func.overloadpacket is torch.ops.aten.cat:
                pieces.append([t.is_contiguous() for t in args[0]])
            return func(*args, **(kwargs or {}))

    layer = make_layer(
        d_model=32, dtype=torch.float32, backend=backend, chunk_size=16, outproj_norm=norm
    )
    # bf16 autocast as in training; the interpreter runs the scan's exact (not fast) variant
    scan = chunkscan.mamba3_scan_triton
    monkeypatch.setattr(chunkscan, "mamba3_scan_triton", functools.partial(scan, fast=False))
    with kernel_config(fold_norm_weight=fold), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 32, 32))
    with Record():
        out.square().sum().backward()
    in_proj = [p for p in pieces if len(p) == len(layer.split_sizes)]
    assert in_proj and all(all(p) for p in in_proj), pieces
    if backend == "triton":  # (the chunked torch scan indexes its chunks' ends itself)
        assert "select_backward" not in ops
