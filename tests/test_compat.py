"""The version workarounds of ``hybridkit.compat``."""

from __future__ import annotations

import torch

from hybridkit import compat


def test_triton_too_old_or_missing_is_said_plainly():
    assert compat._why_triton_unusable(None, False) == "Triton is not installed"
    assert compat._why_triton_unusable(compat.MIN_TRITON, False) is None
    assert "older than 3.6, the oldest the kernels run on" in compat._why_triton_unusable(
        (3, 1), False
    )
    # the interpreter needs a newer one than the GPU
    assert compat._why_triton_unusable((3, 6), False) is None
    assert "interpreter" in compat._why_triton_unusable((3, 6), True)
    assert (compat.TRITON_UNUSABLE is None) == compat.HAVE_TRITON


def _flag() -> bool:
    return True


FLAG = compat.trace_constant(_flag)


def _uses_flag(x: torch.Tensor) -> torch.Tensor:
    return x + 1 if FLAG() else x


def test_trace_constant_is_read_once_and_leaves_the_module_alone():
    """torch 2.5's Dynamo stored the constant under the function's code name in the compiled
    frame's module (a ``flag`` imported there became ``True``): the name is one no module uses,
    and the module's function stays a function after compiling."""
    torch._dynamo.reset()
    out = torch.compile(_uses_flag, backend="eager", fullgraph=True)(torch.zeros(2))
    assert out.tolist() == [1.0, 1.0]
    assert callable(FLAG) and callable(globals()["_flag"]) and FLAG() is True
    assert FLAG.__code__.co_name == "_hybridkit_constant__flag"
    torch._dynamo.reset()


def test_triton_dispatch_without_a_usable_triton(monkeypatch):
    """auto runs the chunked scan and says why; an explicit ``triton`` is a clear error."""
    import pytest

    from hybridkit.errors import HybridkitError
    from hybridkit.kernels.mamba3 import ops

    why = "Triton 3.1 is older than 3.6, the oldest the kernels run on"
    monkeypatch.setattr(ops, "TRITON_UNUSABLE", why)
    monkeypatch.setattr(ops, "HAVE_TRITON", False)
    sizes = dict(dtype=torch.bfloat16, length=64, rank=1, d_state=16, headdim=8, chunk_size=16)
    assert ops.plan_scan("auto", device="cuda", **sizes) == ops.ScanPlan("chunked", 16, why)
    with pytest.raises(HybridkitError, match=f"mixer.backend 'triton': {why}; allowed"):
        ops.plan_scan("triton", device="cuda", **sizes)
    with pytest.raises(HybridkitError, match="mixer.backend 'triton'"):
        ops.plan_step("triton", device="cuda", dtype=torch.bfloat16)
    assert ops.plan_step("auto", device="cuda", dtype=torch.bfloat16).backend == "reference"
