"""``hybridkit bench train`` on one process or on N data-parallel ranks under ``torchrun``.

Why its own module: the single-device measurement (:mod:`hybridkit.train.bench`) times a model it
is given; a data-parallel measurement must also join the process group, shard or wrap the model
exactly as the trainer does (:func:`hybridkit.train.distributed.wrap_model`, so FSDP2's per-block
sharding and mixed-precision policy are what is timed), and combine the ranks' numbers.

Batch: ``batch`` is the number of sequences **per rank** (weak scaling: every GPU does the work of
a one-GPU run, which is what scaling efficiency ``tokens/s(N) / (N x tokens/s(1))`` compares).
Without it, the recipe's ``train.batch_size`` (a *global* batch, as in training) is split over
the ranks.

Combining ranks: a data-parallel step ends in a collective, so the job runs at the pace of its
slowest rank: the step time is the largest of the ranks' median step times, total tokens/s is
``world x batch x seq_len`` over it, per-GPU TFLOP/s and MFU are rank 0's scaled to that step
time, and peak memory is the largest over the ranks. Every rank's own numbers are kept too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from hybridkit.build import build_model
from hybridkit.errors import RecipeError
from hybridkit.footprint import check_bench_step
from hybridkit.recipe import RecipeSpec
from hybridkit.runtime import resolve_device
from hybridkit.train import distributed as dist_utils
from hybridkit.train.bench import TrainBench, bench_train, markdown
from hybridkit.train.determinism import prepare_process
from hybridkit.train.optim import build_optimizer

__all__ = ["ParallelBench", "bench_recipe", "parallel_markdown"]


@dataclass
class ParallelBench:
    """The job's numbers (see the module docstring); for one process they equal ``rank0``'s."""

    world_size: int
    parallel: str  # "none" (one process), "ddp" or "fsdp"
    fsdp_param_dtype: str | None
    batch: int  # sequences per rank
    global_batch: int
    seq_len: int
    step_ms: float  # slowest rank's median step
    tokens_per_s: float  # all ranks together
    tokens_per_s_per_gpu: float
    tflops: float  # per GPU
    mfu_datasheet: float | None
    mfu_measured: float
    peak_memory_gb: float | None  # largest over the ranks
    per_rank: list[dict] = field(default_factory=list)
    rank0: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _per_rank_batch(recipe: RecipeSpec, batch: int | None, world: int) -> int:
    if batch is not None:
        return batch
    total = recipe.train.batch_size
    if total % world:
        raise RecipeError(
            "<recipe>",
            [("train.batch_size", f"{total} sequences do not split over {world} ranks")],
        )
    return total // world


def bench_recipe(
    recipe: RecipeSpec,
    *,
    device: str = "auto",
    batch: int | None = None,
    seq_len: int = 2048,
    steps: int = 10,
    warmup: int = 3,
    compile_model: bool = False,
    profile: bool = True,
    top_kernels: int | None = None,
) -> tuple[dist_utils.DistInfo, ParallelBench, TrainBench]:
    """Benchmark ``recipe``'s model on this process, or on every rank of a ``torchrun`` job
    (every rank calls this and gets the same combined result; rank 0 reports it).

    Returns this process's rank information, the job's numbers and this rank's own record. The
    process group stays up (a caller may still need it); end it with
    :func:`hybridkit.train.distributed.shutdown`."""
    spec = recipe.train
    prepare_process(spec.deterministic)
    name = device if device != "auto" else spec.device
    info = dist_utils.init_distributed(resolve_device(name).type)
    where = resolve_device(name, info.local_rank)
    per_rank = _per_rank_batch(recipe, batch, info.world_size)
    check_bench_step(recipe.model, per_rank, seq_len, where)
    model = build_model(recipe, seed=0).to(where)
    model.activation_checkpointing = spec.activation_checkpointing
    model.loss_chunk_tokens = spec.resolved_loss_chunk(where.type)
    param_dtype = dist_utils.fsdp_param_dtype(spec.fsdp_mixed_precision, where, spec.precision)
    wrapped = dist_utils.wrap_model(model, info, spec.parallel, where, param_dtype)
    # FSDP2 replaced the parameters with sharded ones: build the optimizer on those.
    result = bench_train(
        model,
        build_optimizer(model, spec),
        batch=per_rank,
        seq_len=seq_len,
        steps=steps,
        warmup=warmup,
        precision=spec.precision,
        compile_model=compile_model,
        compile_mode=spec.compile_mode,
        deterministic=spec.deterministic,
        profile=profile,
        top_kernels=top_kernels,
        module=None if wrapped is model else wrapped,
    )
    mine = {
        "rank": info.rank,
        "step_ms": result.step_ms,
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_gb": result.peak_memory_gb,
    }
    ranks = [mine]
    if info.enabled:
        ranks = [{}] * info.world_size
        dist.all_gather_object(ranks, mine)
    dtype_name = None
    if info.enabled and spec.parallel == "fsdp":
        dtype_name = "bfloat16" if param_dtype is torch.bfloat16 else "float32"
    parallel = spec.parallel if info.enabled else "none"
    job = _combine(result, ranks, parallel=parallel, fsdp_param_dtype=dtype_name)
    return info, job, result


def _combine(
    rank0: TrainBench, ranks: list[dict], *, parallel: str, fsdp_param_dtype: str | None
) -> ParallelBench:
    """The job's numbers from rank 0's full record and every rank's step time and memory."""
    world = len(ranks)
    step_ms = max(r["step_ms"] for r in ranks)
    slowdown = rank0.step_ms / step_ms  # <= 1: rank 0's rates at the job's pace
    memory = [r["peak_memory_gb"] for r in ranks if r["peak_memory_gb"] is not None]
    per_gpu = rank0.batch * rank0.seq_len / (step_ms / 1e3)
    return ParallelBench(
        world_size=world,
        parallel=parallel,
        fsdp_param_dtype=fsdp_param_dtype,
        batch=rank0.batch,
        global_batch=rank0.batch * world,
        seq_len=rank0.seq_len,
        step_ms=step_ms,
        tokens_per_s=per_gpu * world,
        tokens_per_s_per_gpu=per_gpu,
        tflops=rank0.tflops * slowdown,
        mfu_datasheet=None if rank0.mfu_datasheet is None else rank0.mfu_datasheet * slowdown,
        mfu_measured=rank0.mfu_measured * slowdown,
        peak_memory_gb=max(memory) if memory else None,
        per_rank=ranks,
        rank0=rank0.to_dict(),
    )


def parallel_markdown(job: ParallelBench, rank0: TrainBench) -> str:
    """Rank 0's report, preceded (on more than one rank) by the job's combined numbers."""
    if job.world_size == 1:
        return markdown(rank0)
    mfu = f"{job.mfu_datasheet:.1%}" if job.mfu_datasheet is not None else "n/a"
    mem = f"{job.peak_memory_gb:.1f} GB" if job.peak_memory_gb is not None else "n/a"
    dtype = f", FSDP2 parameters in {job.fsdp_param_dtype}" if job.fsdp_param_dtype else ""
    lines = [
        f"# Data-parallel training throughput: {job.world_size} ranks, {job.parallel}{dtype}",
        "",
        f"{job.batch} x {job.seq_len} tokens per rank (global batch {job.global_batch}); the "
        "step time is the slowest rank's median, memory the largest over the ranks.",
        "",
        "| ranks | step ms | tokens/s (total) | tokens/s per GPU | TFLOP/s per GPU | "
        "MFU (datasheet) | MFU (measured matmul) | peak memory per GPU (max) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {job.world_size} | {job.step_ms:.1f} | {job.tokens_per_s:,.0f} | "
        f"{job.tokens_per_s_per_gpu:,.0f} | {job.tflops:.1f} | {mfu} | {job.mfu_measured:.1%} | "
        f"{mem} |",
        "",
        "Rank 0's own measurement:",
        "",
    ]
    return "\n".join(lines) + markdown(rank0)
