"""The kernel setting ``fold_norm_weight``: a SISO Mamba-3 layer whose gated output norm runs as
the torch formula multiplies the norm's weight into ``out_proj``'s columns
(``Mamba3.project_out``). Same function, same gradients; only where the product happens moves.
"""

from __future__ import annotations

import pytest
import torch

from hybridkit.kernels.config import kernel_config
from hybridkit.layers.norm import GatedRMSNorm
from tests.test_layers import make_layer

NORMS = ("grouped_pregate", "grouped_postgate", "pregate", "postgate")


def _run(layer, u):
    """Output and every parameter's gradient of ``sum(out * probe)`` (a fixed random probe)."""
    layer.zero_grad(set_to_none=True)
    u = u.detach().requires_grad_(True)
    out = layer(u)
    probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * probe).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), u.grad.clone(), grads


@pytest.mark.parametrize("norm", NORMS)
def test_fold_matches_the_unfolded_layer(norm):
    torch.manual_seed(0)
    layer = make_layer(outproj_norm=norm)
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    with kernel_config(fold_norm_weight=False):
        ref = _run(layer, u)
    with kernel_config(fold_norm_weight=True):
        got = _run(layer, u)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:  # the norm weight and out_proj's included
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_fold_takes_the_folded_path(monkeypatch):
    """On: the weighted norm never runs (a setting that silently did nothing would pass the
    equality test above); off: it does."""
    layer = make_layer(outproj_norm="grouped_pregate")
    u = torch.randn(1, 5, 16, dtype=torch.float64)
    calls = []
    weighted = GatedRMSNorm.forward

    def counting(self, y, z, out_dtype=None):
        calls.append(1)
        return weighted(self, y, z, out_dtype)

    monkeypatch.setattr(GatedRMSNorm, "forward", counting)
    with kernel_config(fold_norm_weight=True):
        layer(u)
    assert not calls
    with kernel_config(fold_norm_weight=False):
        layer(u)
    assert calls


def test_mimo_layers_do_not_fold(monkeypatch):
    """A MIMO layer's norm is part of its rank sum (``mimo_output``), where w cannot move."""
    layer = make_layer(outproj_norm="grouped_pregate", mimo_rank=2)
    u = torch.randn(1, 6, 16, dtype=torch.float64)

    def refuse(self, y, z):
        raise AssertionError("a MIMO layer folded its norm weight")

    monkeypatch.setattr(GatedRMSNorm, "unweighted", refuse)
    with kernel_config(fold_norm_weight=True):
        on = layer(u)
    with kernel_config(fold_norm_weight=False):
        off = layer(u)
    assert torch.equal(on, off)


def test_fold_compiles_fullgraph():
    """Traced by Dynamo (the setting is a trace-time constant): no graph break, and the compiled
    layer's output and gradients equal eager ones."""
    torch.manual_seed(0)
    layer = make_layer(outproj_norm="grouped_pregate", dtype=torch.float32)
    u = torch.randn(2, 8, 16)
    with kernel_config(fold_norm_weight=True):
        eager = _run(layer, u)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got = _run(compiled, u)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-5)
    for name in eager[2]:
        key = name if name in got[2] else f"_orig_mod.{name}"
        torch.testing.assert_close(got[2][key], eager[2][name], rtol=1e-4, atol=1e-5, msg=name)


def _scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


@pytest.mark.gpu
def test_fold_compiled_bf16_on_gpu():
    """The training configuration: CUDA, bf16 autocast, ``torch.compile`` (Inductor). The two
    round at different places (the weight product against the activation product), so each is
    compared with the float32 eager layer: folding may not make the bf16 error grow beyond what
    the unfolded layer has (output, input gradient, every parameter gradient). Both are far
    from the float32 layer at these random parameters (output 0.119 / 0.120 of its largest
    value with / without the fold, H100): bf16 scan and projections, not the fold."""
    torch.manual_seed(0)
    layer = make_layer(d_model=256, outproj_norm="grouped_pregate", dtype=torch.float32,
                       d_state=64, headdim=32, chunk_size=64).cuda()  # fmt: skip
    u = torch.randn(2, 512, 256, device="cuda")

    def run(model, autocast: bool):
        layer.zero_grad(set_to_none=True)
        x = u.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().pow(2).mean().backward()
        grads = {n: p.grad.float().clone() for n, p in layer.named_parameters()}
        return {"out": out.float().detach(), "input": x.grad.float(), **grads}

    ref = run(layer, autocast=False)
    errors = {}
    for on in (False, True):
        with kernel_config(fold_norm_weight=on):
            torch._dynamo.reset()
            got = run(torch.compile(layer, fullgraph=True), autocast=True)
        errors[on] = {name: _scaled_error(got[name], ref[name]) for name in ref}
    for name in ref:
        off, on = errors[False][name], errors[True][name]
        assert on <= 1.5 * off + 2e-3, (name, on, off)
