"""The ``train`` and ``eval`` sections of a recipe: plain settings, validated like the rest.

They sit next to ``recipe.py`` rather than inside ``train/`` and ``eval/`` because the recipe is
*read* by those packages: a recipe that imported them to get its own sections would make the
model-and-data side of hybridkit depend on the trainer and the evaluator, and ``train`` on
``eval`` on ``train`` (see the import levels in ``tests/test_imports.py``). Nothing here knows how
training or evaluation is done; ``train/optim.py`` and ``train/trainer.py`` interpret these
fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from hybridkit.schema import StrictModel

#: torch.compile modes a recipe may ask for (hybridkit/train/compile.py)
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]

__all__ = ["MAX_LR", "EvalSpec", "TrainSpec"]

#: the largest ``train.lr``: far above any that learns (such runs stop with the divergence
#: message), and below ~1e37, where AdamW's float32 step overflows (a RuntimeError traceback)
MAX_LR = 1e6

#: ``train.loss_chunk_tokens: auto`` on CUDA: 4096 rows x a 32k vocabulary are 256 MB of bf16
#: logits per chunk (plus their float32 softmax), few enough launches that the chunk loop costs
#: nothing next to the head matmuls.
AUTO_LOSS_CHUNK_TOKENS = 4096


class TrainSpec(StrictModel):
    """How to train. ``batch_size`` is the *global* number of examples per optimizer step; it is
    split over data-parallel ranks and gradient-accumulation micro-batches."""

    steps: int = Field(default=1000, gt=0, description="optimizer steps")
    batch_size: int = Field(default=32, gt=0, description="global examples per optimizer step")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per step and rank")
    lr: float = Field(default=1e-3, gt=0, le=MAX_LR, description="peak learning rate")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final lr / peak lr")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int | None = Field(default=None, ge=0, description="default: 5% of steps")
    decay_fraction: float = Field(
        default=0.2, gt=0, le=1, description="WSD: share of steps in decay"
    )
    weight_decay: float = Field(default=0.1, ge=0, le=10)  # AdamW decays by lr x this per step
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.95,
    )
    eps: float = Field(default=1e-8, gt=0, le=1)  # past ~1 it swamps every Adam update
    grad_clip: float | None = Field(default=1.0, gt=0, description="max grad norm; null = off")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto = bf16 autocast on GPU, fp32 on CPU"
    )
    compile: bool = Field(default=False, description="torch.compile the model")
    compile_mode: CompileMode = Field(
        default="default",
        description="torch.compile mode when train.compile is on; reduce-overhead adds CUDA "
        "graphs (for host-bound small models with fixed shapes; hybridkit/train/compile.py)",
    )
    prefetch: bool | Literal["auto"] = Field(
        default="auto",
        description="make training batches ahead in a worker process (hybridkit/train/"
        "prefetch.py); auto = on when training on CUDA, off on the CPU",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="recompute each block's activations in the backward (long contexts fit)",
    )
    loss_chunk_tokens: int | Literal["auto"] | None = Field(
        default="auto",
        description="rows per chunk of the fused head + cross-entropy (never materialises the "
        "tokens x vocab logits); auto = 4096 on CUDA, off on CPU; null = off (full logits)",
    )
    deterministic: bool = Field(
        default=False,
        description="bitwise-reproducible GPU runs of one recipe and seed: fixed kernel launches "
        "instead of timed choices, FA4's deterministic backward, torch deterministic algorithms "
        "(slower; hybridkit/train/determinism.py)",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="data parallelism under torchrun (FSDP2 = fully_shard)"
    )
    fsdp_mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="FSDP2 parameter dtype (gradients always reduce in fp32): bf16 gathers and "
        "computes in bf16 weights; auto = bf16 when the step runs under bf16 autocast (GPU), "
        "else fp32",
    )
    checkpoint_format: Literal["auto", "full", "sharded"] = Field(
        default="auto",
        description="full = one set of safetensors gathered on rank 0; sharded = "
        "torch.distributed.checkpoint, every rank writes its shard (resumes on any world "
        "size); auto = sharded for FSDP, full otherwise",
    )
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=0, ge=0, description="in-training eval cadence; 0 = at the end")
    checkpoint_every: int = Field(default=200, ge=0, description="0 = only the final checkpoint")
    keep_checkpoints: int = Field(default=2, gt=0, description="checkpoints kept on disk")
    seed: int | None = Field(
        default=None,
        ge=0,
        description="init seed, and data seed unless task.seed is set; null = the recipe's seed",
    )
    tensorboard: bool = Field(default=True, description="also log to TensorBoard if installed")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}; allowed: auto, cpu, cuda, cuda:N")
        return value

    @field_validator("loss_chunk_tokens", mode="before")
    @classmethod
    def _loss_chunk(cls, value: object) -> object:
        ok = value is None or value == "auto"
        ok = ok or (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**24)
        if not ok:
            raise ValueError(
                f"allowed: a positive number of tokens (up to 2**24), 'auto' or null; got {value!r}"
            )
        return value

    @field_validator("prefetch", mode="before")
    @classmethod
    def _prefetch(cls, value: object) -> object:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"allowed: true, false or 'auto'; got {value!r}")

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}"
            )
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        if self.fsdp_mixed_precision == "bf16" and self.precision == "fp32":
            raise ValueError(
                "fsdp_mixed_precision bf16 contradicts precision fp32 (full precision "
                "everywhere); allowed with fp32: auto, fp32"
            )
        return self

    def resolved_checkpoint_format(self) -> str:
        """``full`` or ``sharded`` (see ``checkpoint_format``)."""
        if self.checkpoint_format == "auto":
            return "sharded" if self.parallel == "fsdp" else "full"
        return self.checkpoint_format

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def resolved_prefetch(self, device_type: str) -> bool:
        """``prefetch`` for a device: ``auto`` prefetches on CUDA, where the batch would sit
        between GPU steps, and not on CPU, where the worker would take a core from the step."""
        if self.prefetch == "auto":
            return device_type == "cuda"
        return self.prefetch

    def resolved_loss_chunk(self, device_type: str) -> int | None:
        """``loss_chunk_tokens`` for a device: ``auto`` chunks on CUDA (where the logits' memory
        and traffic matter) and keeps the plain loss on CPU (tiny vocabularies, and CPU runs
        stay bit-comparable with earlier ones)."""
        if self.loss_chunk_tokens == "auto":
            return AUTO_LOSS_CHUNK_TOKENS if device_type == "cuda" else None
        return self.loss_chunk_tokens


class EvalSpec(StrictModel):
    """Length-generalisation evaluation. Lengths are in the task's natural unit."""

    lengths: list[int] | None = Field(
        default=None, description="lengths to evaluate; default: the task's eval_lengths"
    )
    batch_size: int = Field(default=64, gt=0, description="examples per forward pass")
    examples: int | None = Field(
        default=None,
        gt=0,
        le=10**7,  # task.eval_examples' bound: one evaluation set is held in memory per length
        description="examples per length; default: task.eval_examples",
    )
    decode_examples: int = Field(
        default=8,
        ge=0,
        le=4096,  # one decode batch: the subset checks the path, it does not score the task
        description="examples per length also run through token-by-token decode",
    )
    decode_max_length: int = Field(
        default=1024,
        ge=0,
        le=2**24,  # the longest length a task may generate (tasks.base.MAX_LENGTH)
        description="skip the decode-path check above this many tokens",
    )
