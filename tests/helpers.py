"""Helpers shared by the tests: ``slow`` parameters, random inputs, error measures and small
recipe builders. (Shared fixtures live in ``conftest.py``.)"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from torch import Tensor

from hybridkit.compat import TORCH_VERSION, fsdp_on_cpu_problem
from hybridkit.recipe import load_recipe

#: FSDP2 on the CPU (gloo): torch 2.5's fully_shard needs CUDA (the trainer then says so)
needs_fsdp_on_cpu = pytest.mark.skipif(
    fsdp_on_cpu_problem() is not None, reason=str(fsdp_on_cpu_problem())
)
#: what only torch >= 2.6's compiler handles: 2.5's Dynamo breaks the graph at ``.tolist()`` of
#: packed batches and fails inlining the deterministic embedding's mode check, and its Inductor
#: fails lowering a ``cat`` of the reduce-overhead training step ('View' object has no attribute
#: 'is_input_buffer')
needs_torch_2_6_compile = pytest.mark.skipif(
    TORCH_VERSION < (2, 6), reason="torch.compile behaviour of torch >= 2.6"
)


def slow_params(values: Iterable[str], slow: set[str]) -> list:
    """``values`` for ``parametrize``, those in ``slow`` marked ``slow``."""
    values = list(values)
    assert slow <= set(values), f"no such parameters: {sorted(slow - set(values))}"
    return [pytest.param(v, marks=pytest.mark.slow) if v in slow else v for v in values]


# --- random inputs and error measures -------------------------------------------------------------
def qkv(b, lq, lk, h, hk, d, dtype=torch.float64, device="cpu", grad=False) -> list[Tensor]:
    """Random attention inputs: q (b, lq, h, d); k and v (b, lk, hk, d), drawn in that order."""
    out = [
        torch.randn(b, lq, h, d, dtype=dtype, device=device),
        torch.randn(b, lk, hk, d, dtype=dtype, device=device),
        torch.randn(b, lk, hk, d, dtype=dtype, device=device),
    ]
    return [t.requires_grad_(grad) for t in out]


def rel_err(a: Tensor, b: Tensor) -> float:
    """Relative error of ``a`` in norm against the reference ``b`` (absolute when ``b`` is zero)."""
    # the reference may live on another device (a float64 CPU reference of a GPU kernel)
    a, b = a.detach().double(), b.detach().double().to(a.device)
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def angle_err(a: Tensor, b: Tensor) -> float:
    """Max difference of two angles modulo 2 pi (the representative may legitimately differ)."""
    if a.numel() == 0:
        return 0.0
    d = torch.remainder(a.double() - b.double().to(a.device) + math.pi, 2 * math.pi) - math.pi
    return d.abs().max().item()


# --- tiny recipes ---------------------------------------------------------------------------------
def mamba_block(**mixer: Any) -> dict:
    base = {"kind": "mamba3", "d_state": 8, "headdim": 8, "chunk_size": 8}
    base.update(mixer)
    return {"mixer": base, "mlp": {"kind": "mlp", "d_ff": 32}}


def attn_block(**mixer: Any) -> dict:
    base = {"kind": "attention", "n_heads": 2, "head_dim": 8, "position": "nope"}
    base.update(mixer)
    return {"mixer": base, "mlp": {"kind": "mlp", "d_ff": 32}}


def tiny_model(layout: str = "m a", *, d_model: int = 16, vocab: int = 64, **blocks: dict) -> dict:
    """A recipe's ``model`` section; by default one Mamba-3 block ``m`` and one attention ``a``."""
    blocks = blocks or {"m": mamba_block(), "a": attn_block()}
    return {"d_model": d_model, "vocab_size": vocab, "blocks": blocks, "layout": layout}


def tiny_recipe(layout: str = "m a", *, d_model: int = 16, vocab: int = 64, **blocks: dict):
    return load_recipe({"model": tiny_model(layout, d_model=d_model, vocab=vocab, **blocks)})


# --- subprocesses ---------------------------------------------------------------------------------
def checkout_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default ``os.environ``) with this checkout first on ``PYTHONPATH``, plus
    ``extra``: a child Python then imports the hybridkit under test, not the one the virtual
    environment installed (a git worktree shares the main checkout's venv)."""
    import os
    from pathlib import Path

    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def fake_study_worker(study_path, overrides, plugins, slot, out, device, tag, threads, deadline):
    """A ``study --jobs`` worker for scheduler tests (module level, so a spawned process can
    import it): the variant ``crash`` kills its process the way a segfault or the OOM killer
    would, a second after it starts; ``raise`` raises one of our errors (which does not pickle
    as it is); ``slow`` takes three seconds, so that it is still running when the crash beside
    it happens; ``parent`` starts a process of its own; ``late`` stops as a trainer does whose
    run would pass the deadline (projected 1,000 s); ``crowded`` does so the first time it runs
    (projected 150 s, as a run slowed by others beside it would) and finishes the next time,
    writing when it ran to ``out``; every other run "runs" at once."""
    import os
    import time
    from pathlib import Path

    from hybridkit.errors import RecipeError

    if slot.variant == "crash":
        time.sleep(1.0)
        os._exit(3)
    if slot.variant == "raise":
        raise RecipeError("x.yaml", [("model.d_model", "too big")])
    if slot.variant == "slow":
        time.sleep(3.0)
    if slot.variant == "late":
        assert deadline is not None
        return "deferred", 1000.0
    if slot.variant == "crowded":
        first = Path(out) / f"crowded-{slot.seed}-tried"
        if not first.exists():
            first.touch()
            return "deferred", 150.0
        began = time.time()
        time.sleep(0.3)
        (Path(out) / f"crowded-{slot.seed}-ran").write_text(f"{began} {time.time()}")
        return "ran", 0.3
    if slot.variant == "parent":  # a worker may start processes of its own (batch prefetch)
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0.0,))
        child.start()
        child.join()
        assert child.exitcode == 0
    return "ran", 0.01


def set_launch(
    monkeypatch: pytest.MonkeyPatch, module: Any, launch: tuple[int, ...] | dict[str, int]
) -> None:
    """Set a kernels module's launch constants for one test: ``launch`` names them (a dict), or
    is (forward tile elements, forward warps, backward tile elements, backward warps, backward
    programs per SM), the knobs ``benchmarks/launch_sweep.py`` sweeps. A name the module lacks
    is an error (``monkeypatch.setattr``'s ``raising``)."""
    if not isinstance(launch, dict):
        names = ("FWD_TILE_ELEMENTS", "FWD_WARPS", "BWD_TILE_ELEMENTS", "BWD_WARPS")
        launch = dict(zip((*names, "BWD_PROGRAMS_PER_SM"), launch, strict=True))
    for name, value in launch.items():
        monkeypatch.setattr(module, name, value)


# --- the model-level check of the Triton scan (CPU interpreter and GPU) -----------------------
def spy_triton_scan(monkeypatch) -> list[bool]:
    """Record ``return_state`` of every call into the Triton scan (the list is filled as the
    model runs): which layers took the kernels, and whether they handed a state on."""
    from hybridkit.kernels.mamba3 import chunkscan

    calls: list[bool] = []
    real = chunkscan.mamba3_scan_triton

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("return_state", True)))
        return real(*args, **kwargs)

    monkeypatch.setattr(chunkscan, "mamba3_scan_triton", spy)
    return calls


def assert_same_loss_and_grads(a: torch.nn.Module, b: torch.nn.Module, ids: Tensor, tol_loss: float,
                               tol_grad: float) -> None:  # fmt: skip
    """Next-token cross-entropy of ``ids`` and every parameter's gradient: model ``a`` against
    the reference ``b`` (the same weights on another path)."""
    import torch.nn.functional as F

    out = []
    for net in (a, b):
        logits = net(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = out
    assert rel_err(loss_a, loss_b) < tol_loss
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_b.items():
        assert grads_a[name] is not None and torch.isfinite(grads_a[name]).all(), name
        assert rel_err(grads_a[name], g) < tol_grad, name


def prefill_then_steps(model: torch.nn.Module, ids: Tensor, first: int, second: int) -> Tensor:
    """Logits of ``ids`` through a prefill of ``first`` tokens, a continued prefill of
    ``second`` and one step per remaining token (to compare with the full forward)."""
    with torch.no_grad():
        cache = model.allocate_cache(ids.shape[0], ids.shape[1])
        parts = [model(ids[:, :first], cache=cache)]
        parts.append(model(ids[:, first : first + second], cache=cache))
        parts += [
            model.step(ids[:, t], cache)[:, None] for t in range(first + second, ids.shape[1])
        ]
    return torch.cat(parts, dim=1)
