"""Training throughput of a recipe's model: tokens/s, achieved FLOP/s, MFU, memory, breakdown.

What ``hybridkit bench train`` runs. Real optimizer steps (forward, backward, AdamW with the
recipe's settings, bf16 autocast on a GPU) on random tokens of the recipe's vocabulary, after
warm-up steps that absorb compilation and the kernels' launch tuning; the step time is the
median of the timed steps.

The loss goes through the model's training path (``model(ids, targets=...)``), so the fused
chunked cross-entropy runs when ``model.loss_chunk_tokens`` is set, as in the trainer.

FLOPs per token are counted by :mod:`hybridkit.train.flops` (the formula is printed with every
result). A compiled run also records what Dynamo did: graphs compiled during the warm-up and
during the timed steps (a graph there is a recompilation inside the measurement) and the graph
breaks with their reasons; a graph break splits the model into pieces Inductor cannot fuse
across. MFU is reported against the dense bf16 datasheet peak and against a large bf16 matmul
measured in the same run. Each result records its environment (date, versions, git commit).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from hybridkit import profiling
from hybridkit.kernels.config import changed_settings
from hybridkit.model import HybridLM
from hybridkit.runtime import autocast_for, elapsed_s, timer_start
from hybridkit.train.compile import begin_step, compile_module
from hybridkit.train.determinism import deterministic_mode
from hybridkit.train.flops import DATASHEET_BF16_TFLOPS, FlopCount, datasheet_peak, flops_per_token
from hybridkit.train.provenance import run_environment

__all__ = [
    "DATASHEET_BF16_TFLOPS",
    "FlopCount",
    "TrainBench",
    "bench_train",
    "flops_per_token",
    "markdown",
]

#: Breakdown categories, matched in order against the lower-cased names of profiled kernels.
#: The scan's kernels are matched by ``_bwd_`` among others, so every other kernel family whose
#: names hold it comes first: the norms (``_norm_bwd_kernel``), the SwiGLU and loss kernels
#: (``_swiglu_bwd_kernel``, ``_ce_bwd_kernel``) and FlashAttention's backward (``flash_bwd``);
#: until 2026-12-07 the last three were filed under the scan. The last three categories split
#: what used to be "other": copies and casts (``.to()``, ``.contiguous()``, ``cat``), Inductor's
#: generated kernels (everything element-wise under ``torch.compile``) and eager element-wise
#: kernels.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norms", ("rms", "norm")),
    ("SwiGLU", ("swiglu",)),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "_ce_fwd", "_ce_bwd")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax_warp")),
    ("mamba3 scan", ("_fwd_state", "_fwd_pass", "_fwd_out", "_bwd_", "mamba3")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    (
        "matmuls (projections, MLP, head)",
        ("gemm", "matmul", "cutlass", "xmma", "sm90_", "aten::mm", "aten::addmm", "aten::bmm"),
    ),
    ("copies and casts", ("copy_kernel", "catarraybatchedcopy", "cat_batched")),
    ("element-wise (Inductor)", ("triton_poi", "triton_red", "triton_per")),
    ("element-wise (eager)", ("elementwise_kernel", "reduce_kernel")),
)


def measured_matmul_tflops(device: torch.device, size: int = 8192, reps: int = 10) -> float:
    """bf16 (CUDA) or fp32 (CPU) matmul rate on random inputs, TFLOP/s: the run's own ceiling."""
    if device.type != "cuda":
        size, dtype = min(size, 512), torch.float32
    else:
        dtype = torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start = timer_start(device)
        a @ b
        times.append(elapsed_s(device, start))
    return 2 * size**3 / statistics.median(times) / 1e12


@dataclass
class TrainBench:
    batch: int
    seq_len: int
    compiled: bool
    device: str
    step_ms: float
    tokens_per_s: float
    tflops: float
    mfu_datasheet: float | None
    mfu_measured: float
    matmul_tflops: float
    peak_memory_gb: float | None
    flops: dict
    breakdown_ms: dict = field(default_factory=dict)
    top_kernels: list = field(default_factory=list)
    step_ms_all: list = field(default_factory=list)
    #: on a GPU, the host's time to issue each timed step (``step_ms_all``'s steps: from the
    #: start to the last launch, before the synchronisation). The host runs ahead of the GPU by
    #: at most the launch queue's depth, so a kernel-bound step ends that queue's worth of
    #: kernels after its host time; a step close to its host time waited on the host. None on a
    #: CPU, where the host runs the kernels itself.
    host_ms_all: list | None = None
    loss_chunk_tokens: int | None = None
    activation_checkpointing: bool = False
    compile_mode: str | None = None
    deterministic: bool = False
    environment: dict = field(default_factory=dict)
    #: compiled runs: ``graphs_warmup``, ``graphs_timed``, ``graph_breaks``, ``break_reasons``
    compile_stats: dict = field(default_factory=dict)
    #: the kernel settings that differ from the defaults (``HYBRIDKIT_KERNELS`` form), so that
    #: results of an A/B run say which side they are
    kernels: str = "defaults"

    def to_dict(self) -> dict:
        return asdict(self)


def bench_train(
    model: HybridLM,
    optimizer: torch.optim.Optimizer,
    *,
    batch: int,
    seq_len: int,
    steps: int = 10,
    warmup: int = 3,
    precision: str = "auto",
    compile_model: bool = False,
    compile_mode: str | None = None,
    deterministic: bool = False,
    profile: bool = True,
    top_kernels: int | None = None,
    # what a step calls when it is not ``model`` (a DDP wrapper, whose hooks reduce the
    # gradients); ``model`` still gives the spec and the FLOP count
    module: torch.nn.Module | None = None,
) -> TrainBench:
    """Time ``steps`` optimizer steps of ``model`` after ``warmup`` (see the module docstring).

    The model and optimizer are used as given (built from a recipe by the caller), so what is
    measured is exactly what training runs. ``compile_mode`` is ``torch.compile``'s ``mode``
    (e.g. ``max-autotune-no-cudagraphs``: Inductor times GEMM configurations for our shapes).
    ``deterministic`` runs every step as ``train.deterministic`` does (its cost is measured).
    ``top_kernels``: how many of the profiled step's longest kernels the result keeps by name
    (default :data:`hybridkit.profiling.TOP_KERNELS`; all of them tell where every millisecond
    of the element-wise categories goes)."""
    device = next(model.parameters()).device
    vocab = model.spec.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    called = model if module is None else module
    mode = compile_mode or "default"
    forward = compile_module(called, mode) if compile_model else called
    tokens = batch * seq_len

    def step() -> None:
        with deterministic_mode(deterministic):
            if compile_model:
                begin_step(mode)
            with autocast_for(device, precision):
                loss = forward(inputs, targets=targets) / tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    dynamo = _DynamoCounts() if compile_model else None
    for _ in range(warmup):
        step()
    warm = dynamo.read() if dynamo else {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if not (compile_model and mode == "reduce-overhead"):
            # the timed steps' own peak; under CUDA graphs the warm-up is when cudagraph trees
            # take their memory pool, which a reset here would leave out (it reported 5 GB for
            # a step that holds 28, benchmarks/results/compile_modes_h100.md)
            torch.cuda.reset_peak_memory_stats(device)
    times, host = [], []
    for _ in range(steps):
        start = timer_start(device)
        issued = time.perf_counter()
        step()
        host.append(time.perf_counter() - issued)
        times.append(elapsed_s(device, start))
    step_s = statistics.median(times)
    stats = {}
    if dynamo:
        total = dynamo.read()
        stats = {
            "graphs_warmup": warm["graphs"],
            "graphs_timed": total["graphs"] - warm["graphs"],
            "graph_breaks": total["graph_breaks"],
            "break_reasons": total["break_reasons"],
            "cudagraph_skips": total["cudagraph_skips"],
        }
    top = profiling.TOP_KERNELS if top_kernels is None else top_kernels
    prof = profile_step(step, device, top) if profile else profiling.KernelProfile()
    count = flops_per_token(model, seq_len)
    achieved = count.per_token * tokens / step_s / 1e12
    matmul = measured_matmul_tflops(device)
    device_peak = datasheet_peak(device)
    peak = device_peak.tflops
    return TrainBench(
        batch=batch,
        seq_len=seq_len,
        compiled=compile_model,
        device=device_peak.name,
        step_ms=step_s * 1e3,
        tokens_per_s=tokens / step_s,
        tflops=achieved,
        mfu_datasheet=achieved / peak if peak else None,
        mfu_measured=achieved / matmul,
        matmul_tflops=matmul,
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9
        if device.type == "cuda"
        else None,
        flops={"per_token": count.per_token, "formula": count.formula},
        breakdown_ms=prof.ms,
        top_kernels=prof.top,
        step_ms_all=[t * 1e3 for t in times],
        host_ms_all=[t * 1e3 for t in host] if device.type == "cuda" else None,
        loss_chunk_tokens=model.loss_chunk_tokens,
        compile_mode=compile_mode if compile_model else None,
        activation_checkpointing=model.activation_checkpointing,
        deterministic=deterministic,
        environment=run_environment(device),
        compile_stats=stats,
        kernels=changed_settings(),
    )


def _first_line(reason: object) -> str:
    """A graph break's reason as one report line (Dynamo's run over several: explanation, hint)."""
    lines = str(reason).strip().splitlines()
    return lines[0][:200] if lines else "(no reason given)"


class _DynamoCounts:
    """Dynamo's own counters (``torch._dynamo.utils.counters``: the graphs it compiled and the
    graph breaks by reason), cleared when made, so they cover this benchmark only."""

    def __init__(self) -> None:
        from torch._dynamo.utils import counters

        counters.clear()
        self.counters = counters

    def read(self) -> dict:
        breaks = self.counters["graph_break"]
        return {
            "graphs": int(self.counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(breaks.values())),
            "break_reasons": [_first_line(reason) for reason, _ in breaks.most_common(10)],
            # graphs Inductor ran without CUDA graphs although the mode asked for them (the
            # reason is in its log): reduce-overhead then measures the default mode's launches
            "cudagraph_skips": int(self.counters["inductor"]["cudagraph_skips"]),
        }


def _loss_text(chunk: int | None) -> str:
    return f"fused chunked cross-entropy, {chunk} tokens per chunk" if chunk else "full logits"


def categorize(kernel_name: str) -> str:
    """The breakdown category of a profiled kernel or op, by name (``CATEGORIES``)."""
    return profiling.categorize(kernel_name, CATEGORIES)


def profile_step(
    step, device: torch.device, top: int = profiling.TOP_KERNELS
) -> profiling.KernelProfile:
    """Milliseconds per category and the ``top`` longest kernels of one profiled training step
    (:func:`hybridkit.profiling.profile_kernels`; device kernels on a GPU, ops on a CPU)."""
    return profiling.profile_kernels(step, device, CATEGORIES, top=top)


def markdown(result: TrainBench) -> str:
    """A short report: the numbers, the FLOP formula and the breakdown."""
    mfu = f"{result.mfu_datasheet:.1%}" if result.mfu_datasheet is not None else "n/a"
    mem = f"{result.peak_memory_gb:.1f} GB" if result.peak_memory_gb is not None else "n/a"
    lines = [
        f"# Training throughput ({result.device}, batch {result.batch} x {result.seq_len}, "
        f"{'compiled' if result.compiled else 'eager'})",
        "",
        "| step ms (median) | tokens/s | TFLOP/s | MFU (datasheet) | MFU (measured matmul "
        f"{result.matmul_tflops:.3g} TFLOP/s) | peak memory |",
        "|---|---|---|---|---|---|",
        f"| {result.step_ms:.1f} | {result.tokens_per_s:,.0f} | {result.tflops:.1f} | {mfu} | "
        f"{result.mfu_measured:.1%} | {mem} |",
        "",
        f"FLOPs per token: {result.flops['per_token']:.3g} ({result.flops['formula']}).",
        f"Loss: {_loss_text(result.loss_chunk_tokens)}; activation checkpointing "
        f"{'on' if result.activation_checkpointing else 'off'}"
        f"{'; deterministic kernels (train.deterministic)' if result.deterministic else ''}.",
        f"Kernel settings: {result.kernels}.",
    ]
    if result.host_ms_all:
        lines.append(
            f"Host time to issue a step (median): {statistics.median(result.host_ms_all):.1f} ms "
            "(near the step time: the GPU waited on the host's launches or a synchronisation; "
            "well below it: the GPU had work queued)."
        )
    stats = result.compile_stats
    if stats:
        timed = stats["graphs_timed"]
        lines.append(
            f"torch.compile: {stats['graphs_warmup']} graph(s) compiled in the warm-up, "
            f"{stats['graph_breaks']} graph break(s), "
            + (f"{timed} recompilation(s) in the timed steps" if timed else "no recompilation")
            + "."
        )
        lines += [f"- graph break: {reason}" for reason in stats["break_reasons"]]
        if result.compile_mode == "reduce-overhead":
            skips = stats.get("cudagraph_skips", 0)
            lines.append(
                f"CUDA graphs: {skips} compiled graph(s) skipped them (the reason is in the log)"
                if skips
                else "CUDA graphs: every compiled graph replayed through them."
            )
    env = result.environment
    if env:
        lines.append(
            f"Measured {env.get('date')} with torch {env.get('torch')}, Triton "
            f"{env.get('triton')}, commit {str(env.get('git_commit'))[:12]}"
            f"{' (dirty)' if env.get('git_dirty') else ''}."
        )
    if result.breakdown_ms:
        total = sum(result.breakdown_ms.values())
        lines += ["", "| one profiled step | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {v / total:.0%} |" for k, v in result.breakdown_ms.items()]
        if result.top_kernels:
            shown = min(15, len(result.top_kernels))
            lines += ["", f"The {shown} longest kernels of that step:", ""]
            lines += profiling.top_kernels_table(result.top_kernels, total, rows=shown)
    return "\n".join(lines) + "\n"
