"""FSDP2 with the bf16 mixed-precision policy and sharded checkpoints on a one-rank process group.

Why one rank: FSDP2 applies its policy (bf16 gathered weights, fp32 master weights and gradient
reduction) whatever the world size, so a single GPU already runs the path a multi-GPU job takes
through the Triton kernels, the bf16 parameters and activation checkpointing -- on the GPU
machine that is lent most often. The CPU variant runs the same test code with gloo (~2 s).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hybridkit import build_model
from hybridkit.recipe_sections import TrainSpec
from hybridkit.runtime import autocast_for
from hybridkit.train.distributed import DistInfo, shard_model
from hybridkit.train.optim import build_optimizer
from hybridkit.train.sharded_checkpoint import load_sharded, write_sharded_checkpoint
from tests.helpers import attn_block, mamba_block, needs_fsdp_on_cpu, tiny_recipe

DEVICES = [
    pytest.param("cpu", marks=needs_fsdp_on_cpu),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.fixture
def one_rank(request) -> Iterator[torch.device]:
    """A one-rank process group (NCCL on the GPU, gloo on the CPU) for the test's device."""
    device = torch.device(request.param if request.param == "cpu" else "cuda:0")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        **kwargs,
    )
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _model(device: torch.device):
    """Two Mamba-3 layers around NoPE attention (Triton scan on CUDA, chunked on the CPU)."""
    m = dict(d_state=32, headdim=32, chunk_size=32, outproj_norm="grouped_pregate")
    blocks = {"m": mamba_block(**m), "a": attn_block(n_heads=4, head_dim=32)}
    model = build_model(tiny_recipe("m a m", d_model=128, vocab=97, **blocks).model, seed=1)
    return model.to(device)


def _losses(model, device: torch.device, steps: int = 3) -> list[float]:
    """``steps`` AdamW steps on fixed random tokens, under the trainer's autocast policy."""
    optimizer = build_optimizer(model, TrainSpec(lr=1e-3))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 129), generator=gen).to(device)
    out = []
    for _ in range(steps):
        with autocast_for(device, "auto"):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 97), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.parametrize("one_rank", DEVICES, indirect=True)
def test_bf16_parameters_with_activation_checkpointing_track_the_plain_model(one_rank):
    device = one_rank
    want = _losses(_model(device), device)
    model = _model(device)
    model.activation_checkpointing = True
    shard_model(model, torch.bfloat16)
    got = _losses(model, device)
    assert all(torch.isfinite(torch.tensor(got)))
    for g, w in zip(got, want, strict=True):
        assert abs(g / w - 1) < 3e-2, (got, want)
    # the master weights FSDP2 keeps (and the optimizer updates) stay fp32
    assert {p.to_local().dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("one_rank", DEVICES, indirect=True)
def test_sharded_checkpoint_round_trip(one_rank, tmp_path):
    """Written from the sharded model, loaded into a plain one: the same weights and moments."""
    device = one_rank
    model = shard_model(_model(device), torch.bfloat16)
    optimizer = build_optimizer(model, TrainSpec(lr=1e-3))
    _step_once(model, optimizer, device)
    info = DistInfo()
    path = write_sharded_checkpoint(tmp_path, 2, model, optimizer, {"step": 2}, 1, info)
    plain = _model(device)
    plain_opt = build_optimizer(plain, TrainSpec(lr=1e-3))
    load_sharded(path, plain, plain_opt)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), q, rtol=0, atol=0, msg=name)
    moments = [s["exp_avg"] for s in plain_opt.state.values()]
    assert len(moments) == len(list(plain.parameters())) and any(m.abs().sum() > 0 for m in moments)


def _step_once(model, optimizer, device: torch.device) -> None:
    ids = torch.randint(0, 97, (2, 65)).to(device)
    with autocast_for(device, "auto"):
        logits = model(ids[:, :-1])
    F.cross_entropy(logits.float().reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_fsdp_on_the_cpu_with_torch_2_5_is_a_clear_error(monkeypatch):
    """torch 2.5's fully_shard needs CUDA streams: the trainer names the setting instead of
    failing inside FSDP."""
    import hybridkit.compat
    from hybridkit.errors import HybridkitError

    monkeypatch.setattr(hybridkit.compat, "TORCH_VERSION", (2, 5))
    model = build_model(tiny_recipe("m a", d_model=16, vocab=32).model)
    with pytest.raises(HybridkitError, match="train.parallel 'fsdp': FSDP2 on the CPU needs torch"):
        shard_model(model)
