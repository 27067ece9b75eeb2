"""The one configuration of our Triton kernel launches, settable from code or one variable.

Fields (defaults in :class:`KernelConfig`):

* ``autotune``: time the launch-configuration candidates of the tuned kernels once per
  specialisation and keep the fastest (off: each kernel's measured default, no timing runs);
* ``bwd_warps``: warps of the backward chunk kernels (q, k, x), which are never tuned;
* ``bwd_x_warps``: warps of the x kernel alone (None: ``bwd_warps``): at MIMO rank 4 it is the
  one that spills at 4 warps (356 B per thread compiled for sm_90, 52 B at 8; the q and k
  kernels 4 / 0 B at 4 warps, 100 / 240 B at 8). From 2026-12-04 to 12-06 the x kernel
  launched with ``bwd_warps`` whatever this said, so an H100 timing of that time ("no change
  at 8") measured nothing. Applied, at 8 on the H200 (2026-12-06, (8, 4096, 32, 64, 128)):
  MIMO R 4 forward + backward 16.58 -> 19.82 ms, SISO 3.77 -> 4.33
  (``benchmarks/results/qk_split_h200.md``); default None;
* ``bwd_maxnreg``: a register cap for those kernels (None: the compiler's choice);
* ``qk_heads``: heads per program of the backward's q and k kernels (a power of two; the
  greatest common divisor with the heads per group is used). Each head's dq / dk must be
  summed over the heads sharing its group's q / k: at 1 every (chunk, head) program writes its
  own bf16 rows and torch sums them (two (B, L, R, H, N) buffers, 537 MB each per layer of the
  400M MIMO model at 4 x 4,096 tokens, and 7.6 ms of its step on the H100 for the sums,
  ``benchmarks/results/train_mimo_output_h100.md``); above 1 a program adds its heads into
  one fp32 row per group slot, so the buffers shrink that many times (at 1 / 2 the bytes per
  element) and the grid as well. Default 1: on the H100 n 4 / 8 / 32 were no faster
  (forward + backward 17.8-18.8 ms against 16.97, ``benchmarks/results/qk_heads_h100.md``)
  and saved only 1-2 GB of peak memory at that shape;
* ``chunk_sizes``: the chunk sizes the Triton scan compiles for; a layer asking for another
  one runs the torch chunked path (``hybridkit show`` says so);
* ``step_split``: programs per (sequence, head) of the fused decode step, each owning
  ``P / step_split`` rows of the state (1: one program holds the whole head); above 1 a second
  small launch writes the head's new keys and angles and applies the gate and output norm, which
  span the whole head (default 4: on the H100 it took the d_model 2048 layer step from 63.0 to
  59.6 us at batch 16 and 275.5 to 240.8 us at 128 with an fp32 state, 225.2 to 158.2 us at 128
  with a bf16 one, and left batch 1 at 31.4 us; 2 and 8 were between,
  ``benchmarks/results/decode_step_split_h100.md``);
* ``step_warps`` / ``step_maxnreg``: warps and a register cap of the fused decode step (None:
  about 32 state elements per thread; registers capped at 128 for the SISO step at 8 warps
  with interleaved pairs, so two programs share an SM, else the compiler's choice; 255 lifts
  the cap). The step updates its state in
  place, so it cannot be timed candidate by candidate like the tuned kernels; these exist so a
  benchmark can compare launches (at 8 warps it compiles to 128 registers on sm_90: two
  programs per SM, and at batch 128 each program's chain of reductions is the limit);
* ``deterministic``: launches that give bitwise-identical results run after run: no timing-based
  choice of launch options (a candidate with other warps may reduce in another order, and which
  candidate wins depends on the timing), and FlashAttention-4's deterministic backward (its
  dQ / dK / dV accumulate in a fixed order under semaphores instead of atomics; slower).
  ``train.deterministic`` turns it on together with torch's deterministic algorithms
  (``hybridkit/train/determinism.py``; a graph compiled earlier keeps the setting it was traced
  with, but torch's flag, which the trainer sets with it, makes Dynamo trace again);
* ``skinny_linear``: linears of at most 16 rows at inference (the decode step's projections and
  head; the MLP's first projection together with its SwiGLU) through our Triton kernel instead
  of cuBLAS (``hybridkit/kernels/linear``; on: with the next two it took the 400M model's
  decode step from 1.172 to 0.654 ms at batch 1 on the H200,
  ``benchmarks/results/decode_settings_h200.md``);
* ``skinny_rows``: the most rows a plain linear sends to that kernel (1..16; the MLP's fc1 +
  SwiGLU, one launch of ours instead of two, goes to it up to 16 rows whatever this says).
  Default 16 since 2026-12-07: with PDL and the kernel's split over K the 400M model's batch-16
  step took 1.051-1.054 ms against 1.137 on cuBLAS (H100,
  ``benchmarks/results/decode_split_k_h100.md``); shape by shape, timed alone, the kernel is
  0.92-1.20x cuBLAS's time, so the gain is the launches' overlap under PDL, which cuBLAS does
  not take; without PDL (``pdl`` off, GPUs before Hopper) 16 is not measured (1 until then);
* ``norm_linear``: at inference with a cache, a block's residual add and pre-norm folded into
  its first projection when that runs the few-row kernel (``in_proj``, ``wqkv``, fc1 + SwiGLU,
  the head after the final norm) and the call has at most this many rows (0: never; 1..16): one
  launch instead of two per block part (``hybridkit/kernels/linear``, ``PRENORM``; default 1:
  on the H100 folding took the 400M model from 1,257 to 1,382 tokens/s at batch 1, while at
  batch 16, where the 16-row kernel normalises in a second pass, it went from 12,037 to 11,851,
  ``benchmarks/results/decode_model_settings_h100.md``);
* ``fused_add_norm``: at inference with a cache, every residual add and the pre-norm after it as
  one Triton launch (``kernels/norm``: ``add_rms_norm``; on, GPU-checked and timed);
* ``train_norms``: eager training on CUDA: every residual add and the pre-norm after it as one
  Triton kernel forward and one backward (which also adds the residual stream's gradient and
  writes the block output's in its dtype), and every norm whose output only feeds a projection
  (the pre-norms, the final norm, the Mamba-3 output norm) stores it in the autocast dtype
  the projection computes in (``kernels/norm``: ``add_rms_norm``, ``projection_dtype``); on:
  the eager 400M step took 142.0 ms against 155.2 without it on the H100
  (``benchmarks/results/train_norms_h100.md``; GPU tests ``bash benchmarks/gpu_pending.sh
  norms``);
* ``fa4_decode``: static (CUDA-graph) decode steps of attention layers that run FlashAttention-4
  read the KV ring through FA4's ``seqused_k`` path (one FA4 call) instead of masked SDPA (off
  until it has passed the GPU tests: ``tests/test_generation.py -m gpu -k fa4``);
* ``attention_step``: the static (CUDA-graph) decode step of an attention layer, from
  ``wqkv``'s output to ``out_proj``'s input (qk norm, rotation, ring write, attention over the
  ring), as one Triton launch instead of ~35 torch ops (``kernels/attention/step_kernel.py``;
  on: 0.708 -> 0.654 ms per token at batch 1, 1.287 -> 1.215 at 16);
* ``mimo_output``: the output of a MIMO layer (per-rank gate, output norm, ``mimo_o`` rank
  sum) through one fused Triton kernel forward and one backward on CUDA, eager and compiled
  (``hybridkit/kernels/mamba3/output``), instead of the torch formula's R-times-wider
  float32 intermediates (which ``torch.compile`` fuses itself); on: at its swept launches it
  passed the GPU tests and took the compiled 400M MIMO model's step from 294.6 to 283.7 ms on
  the H100 (``benchmarks/results/train_mimo_output_h100.md``; at its first launch it had been
  about 2x slower than Inductor's fusion, ``mimo_output_h100.md``);
* ``loss_op``: under ``torch.compile`` the fused chunked cross-entropy runs as an opaque custom
  op (``hybridkit/kernels/loss``) instead of the autograd.Function traced into the graph; off:
  on the H100 the compiled 400M step took 131.7 ms traced against 133.4 with the op (running
  the ``loss_kernels``; 27.3 vs 26.7 GB peak memory, ``benchmarks/results/loss_kernels_h100.md``;
  with ATen inside the op it had been 135.1 against 148.6, ``compile_ops_h100.md``). Both
  were measured while the backward still recomputed each chunk's logits and the traced graph
  saved the chunks' buffers between the passes. Since the forward forms the gradients neither
  path saves them; the op was then 134.6 ms against 133.8 traced
  (``benchmarks/results/train_norms_h100.md``);
* ``loss_kernels``: the fused cross-entropy's per-chunk element-wise work (log-sum-exp and
  loss, and the softmax gradient the forward forms) through two Triton kernels on CUDA
  (``hybridkit/kernels/loss/triton_kernels.py``: one pass over a chunk's logits each way, the
  gradient written in place in their dtype) instead of ATen ops over a float32 copy of the
  chunk; eager and inside the ``loss_op`` custom op (the traced Function leaves it to
  Inductor); on: the eager 400M step took 155.2 ms against 167.8 on the H100
  (``benchmarks/results/loss_kernels_h100.md``);
* ``scored_rows``: training sends only the positions a task scores (targets other than the
  ignore index) through the final norm, the head and the loss, when they are at most half of
  the batch (``hybridkit.kernels.loss.scored_rows``): the synthetic tasks score a few answer
  tokens per sequence (MQAR at D 8: 8 of 256), so the head's matmuls and the (rows x vocab)
  float32 work shrink by that factor; on: the loss is the same sum, and a compiled
  deterministic MQAR step (D 8, V 8,192, batch 128 x 256) took 7.7 ms against 12.4 ms on the
  H100 (``benchmarks/results/mqar_step_time_h100.md``); off: every position, as before
  2026-12-06;
* ``pdl``: the decode step's Triton kernels (few-row linears, fused add + norm, the fused
  Mamba-3 step) launch with programmatic dependent launch on Hopper and later: each lets the
  next start early and reads its weights before waiting for its predecessor, the one-row
  linears their whole weight tiles into registers (``hybridkit/kernels/pdl.py``; on: with those
  loads the 400M model's step went from 0.730 to 0.549 ms at batch 1 and 1.234 to 1.132 ms at
  batch 16 on the H100, batch 128 unchanged, ``benchmarks/results/decode_pdl_preload_h100.md``;
  with only an L2 prefetch of the weights, on the H200 on 2026-12-05, it had changed nothing at
  batch 1 and been 4 % slower at 16, ``decode_settings_h200.md``). Where PDL cannot run (no
  Hopper GPU, an older Triton, the interpreter, ``torch.compile``) it is simply not used.
* ``fold_norm_weight``: where the gated output norm of a SISO Mamba-3 layer runs as the torch
  formula (under ``torch.compile``, on the CPU), its weight ``w`` multiplies ``out_proj``'s
  weight columns instead of the activations: ``W (w * o) = (W diag(w)) o``. The weight's
  gradient is then a sum over ``out_proj``'s d_model rows of a product of two small matrices
  instead of a reduction over every token, which Inductor ran as a second pass over y, z and the
  output gradient (1.7 ms of the compiled 400M step on the H100,
  ``benchmarks/results/train_kernels_h100.md``). Where the Triton norm runs (eager on CUDA) its
  backward sums the weight gradient in registers in the same pass, so nothing is folded there,
  and neither in a decode step, whose kernel applies the norm itself (on: the compiled 400M step
  took 132.7 / 133.1 ms against 133.7 off on the H100,
  ``benchmarks/results/train_fold_swiglu_h100.md``);

In code: ``with kernel_config(autotune=False): ...`` (nests, thread- and task-local; the scan's
backward, which autograd runs in another thread on a GPU, launches with the settings in force at
its forward). From the
shell: ``HYBRIDKIT_KERNELS="autotune=0,bwd_warps=8,chunk_sizes=32:64"``. The variable is read
when a kernel launches, never at import, so a process may set it after importing hybridkit.
Measured effects of these settings are in ``docs/kernels.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

from hybridkit.compat import trace_constant

ENV_VAR = "HYBRIDKIT_KERNELS"
WARP_COUNTS = (1, 2, 4, 8, 16)
STEP_SPLITS = (1, 2, 4, 8)
QK_HEADS = (1, 2, 4, 8, 16, 32, 64)
TRITON_CHUNK_SIZES = (16, 32, 64, 128)

# The widest chunk a SISO kernel may use is bounded by its largest register tiles,
# C x max(N, P) elements. fp32 (precise) tiles hold twice the registers of bf16 ones and their
# dots run in fp32: at C 64 / N 128 the backward kernels spill tens of KB per thread and take
# minutes to compile, at C 128 they did not finish. In bf16, C 128 at N 128 is not validated:
# the only such cases the GPU fuzz ran (headdim 32) gave non-finite outputs (Triton 3.6, H200).
# The scan's result does not depend on the chunk, so a wider request runs narrower chunks
# (docs/kernels.md, "Chunk width").
_MAX_TILE = {False: 32 * 128, True: 64 * 128}


@dataclass(frozen=True)
class KernelConfig:
    """Launch settings of our Triton kernels (see the module docstring)."""

    autotune: bool = True
    bwd_warps: int = 4
    bwd_x_warps: int | None = None
    bwd_maxnreg: int | None = None
    qk_heads: int = 1
    chunk_sizes: tuple[int, ...] = TRITON_CHUNK_SIZES
    step_warps: int | None = None
    step_maxnreg: int | None = None
    step_split: int = 4
    fa4_decode: bool = False
    deterministic: bool = False
    skinny_linear: bool = True
    skinny_rows: int = 16
    norm_linear: int = 1
    fused_add_norm: bool = True
    train_norms: bool = True
    pdl: bool = True
    attention_step: bool = True
    mimo_output: bool = True
    loss_op: bool = False
    loss_kernels: bool = True
    scored_rows: bool = True
    fold_norm_weight: bool = True

    @property
    def tunes(self) -> bool:
        """Whether tuned kernels time their candidates (``autotune`` and not ``deterministic``)."""
        return self.autotune and not self.deterministic

    def __post_init__(self) -> None:
        self._check_types()
        if self.bwd_warps not in WARP_COUNTS:
            raise ValueError(f"bwd_warps={self.bwd_warps}: allowed {WARP_COUNTS}")
        if self.bwd_x_warps is not None and self.bwd_x_warps not in WARP_COUNTS:
            raise ValueError(f"bwd_x_warps={self.bwd_x_warps}: allowed None or {WARP_COUNTS}")
        if self.step_warps is not None and self.step_warps not in WARP_COUNTS:
            raise ValueError(f"step_warps={self.step_warps}: allowed None or {WARP_COUNTS}")
        if self.qk_heads not in QK_HEADS:
            raise ValueError(f"qk_heads={self.qk_heads}: allowed {QK_HEADS}")
        if not 1 <= self.skinny_rows <= 16:
            raise ValueError(f"skinny_rows={self.skinny_rows}: allowed 1..16")
        if not 0 <= self.norm_linear <= 16:
            raise ValueError(f"norm_linear={self.norm_linear}: allowed 0..16 (rows)")
        if self.step_split not in STEP_SPLITS:
            raise ValueError(f"step_split={self.step_split}: allowed {STEP_SPLITS}")
        for name in ("bwd_maxnreg", "step_maxnreg"):
            value = getattr(self, name)
            if value is not None and not 24 <= value <= 255:
                raise ValueError(f"{name}={value}: allowed None or 24..255")
        bad = [c for c in self.chunk_sizes if c not in TRITON_CHUNK_SIZES]
        if bad or not self.chunk_sizes:
            raise ValueError(
                f"chunk_sizes={self.chunk_sizes}: allowed a non-empty subset of "
                f"{TRITON_CHUNK_SIZES}"
            )
        # ascending, each once: the dispatch takes the last as the tallest (64:16 ran MIMO
        # rank 4 at 4 tokens per chunk instead of 16)
        if list(self.chunk_sizes) != sorted(set(self.chunk_sizes)):
            raise ValueError(
                f"chunk_sizes={self.chunk_sizes}: list each size once, in ascending order "
                f"(e.g. {':'.join(map(str, sorted(set(self.chunk_sizes))))})"
            )

    def _check_types(self) -> None:
        """Each value of the default's kind: ``kernel_config(step_split=4.0)`` passed the range
        checks (4.0 == 4) and reached a kernel as a float constexpr, ``pdl="0"`` was truthy.
        Booleans are not numbers here, nor numbers booleans."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "chunk_sizes":
                ok = isinstance(value, tuple) and all(
                    isinstance(c, int) and not isinstance(c, bool) for c in value
                )
                kind = "a tuple of ints"
            elif isinstance(f.default, bool):
                ok, kind = isinstance(value, bool), "True or False"
            else:
                optional = f.name in _OPTIONAL
                ok = (value is None and optional) or (
                    isinstance(value, int) and not isinstance(value, bool)
                )
                kind = "an int or None" if optional else "an int"
            if not ok:
                raise ValueError(f"{f.name}={value!r}: expected {kind}")


#: the settings that may be None (no cap, the default launch): ``none``, ``0`` or empty in the
#: variable
_OPTIONAL = frozenset(f.name for f in dataclasses.fields(KernelConfig) if "None" in str(f.type))

_OVERRIDE: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar(
    "hybridkit_kernel_config", default=None
)


def parse_env(text: str) -> KernelConfig:
    """A :class:`KernelConfig` from ``key=value[,key=value]`` (the ``HYBRIDKIT_KERNELS`` form)."""
    fields = {f.name for f in dataclasses.fields(KernelConfig)}
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(
                f"{ENV_VAR}={text!r}: {item!r} is not key=value with a key among "
                f"{', '.join(sorted(fields))}"
            )
        if key in values:  # the last one silently won
            raise ValueError(f"{ENV_VAR}={text!r}: {key} is given twice; give it once")
        try:
            values[key] = _parse_value(key, raw.strip())
        except ValueError as err:
            raise ValueError(f"{ENV_VAR}={text!r}: {key}: {err}") from None
    try:
        return KernelConfig(**values)
    except ValueError as err:
        raise ValueError(f"{ENV_VAR}={text!r}: {err}") from None


def _parse_value(key: str, raw: str) -> object:
    if isinstance(getattr(KernelConfig(), key), bool):
        if raw not in ("0", "1", "true", "false"):
            raise ValueError(f"{raw!r}: allowed 0, 1, true, false")
        return raw in ("1", "true")
    if key == "chunk_sizes":
        parts = raw.split(":") if raw else []
        if not all(_whole_number(c) for c in parts):
            raise ValueError(f"{raw!r}: expected whole numbers joined by ':', e.g. 32:64")
        return tuple(int(c) for c in parts)
    if key in _OPTIONAL and raw in ("", "0", "none"):
        return None
    if not _whole_number(raw):
        raise ValueError(f"{raw!r}: expected a whole number")
    return int(raw)


def _whole_number(raw: str) -> bool:
    """ASCII digits, at most 9 of them: ``str.isdigit`` also takes '²' (which ``int`` refuses)
    and other scripts' digits ('٨' read as 8), and no setting needs a number that long."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 9


def current_config() -> KernelConfig:
    """The settings in force: the innermost :func:`kernel_config`, else ``HYBRIDKIT_KERNELS``."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    return _env_config(os.environ.get(ENV_VAR, ""))


_ENV_CACHE: dict[str, KernelConfig] = {}


def _env_config(text: str) -> KernelConfig:
    # parsed once per distinct value: launches read the variable on every call
    if text not in _ENV_CACHE:
        _ENV_CACHE[text] = parse_env(text)
    return _ENV_CACHE[text]


def changed_settings(cfg: KernelConfig | None = None) -> str:
    """The settings that differ from the defaults, in the ``HYBRIDKIT_KERNELS`` form
    (``"defaults"`` when none do): what a benchmark records next to its numbers."""
    cfg = cfg or current_config()
    changed = []
    for f in dataclasses.fields(KernelConfig):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, tuple):
            value = ":".join(map(str, value))
        changed.append(f"{f.name}={value}")
    return ",".join(changed) or "defaults"


@contextlib.contextmanager
def kernel_config(**changes: object) -> Iterator[KernelConfig]:
    """Run a block with some settings changed, e.g. ``kernel_config(autotune=False)``."""
    cfg = dataclasses.replace(current_config(), **changes)
    token = _OVERRIDE.set(cfg)
    try:
        yield cfg
    finally:
        _OVERRIDE.reset(token)


@trace_constant
def triton_chunk_sizes() -> tuple[int, ...]:
    """``current_config().chunk_sizes``, read once at trace time under ``torch.compile``
    (Dynamo cannot trace a ``ContextVar`` read; the value is a constant of the graph)."""
    return current_config().chunk_sizes


def triton_chunk(chunk: int, d_state: int, headdim: int, fast: bool) -> int:
    """The chunk the SISO kernels run for a requested ``chunk``: the request, halved until the
    widest register tile fits (precise fp32 mode: C x max(N, P) <= 4096; bf16: 8192), and at
    most 32 for bf16 with headdim < d_state / 2."""
    width = max(d_state, headdim)
    while chunk > TRITON_CHUNK_SIZES[0] and chunk * width > _MAX_TILE[bool(fast)]:
        chunk //= 2
    if fast and 2 * headdim < d_state:
        # bf16 with P < N / 2 (P 32, N 128): outputs wrong at C 64, right at C 16 and 32, in
        # the GPU fuzz (Triton 3.6, H200; docs/kernels.md, "Chunk width"). Cause not found yet.
        chunk = min(chunk, 32)
    return chunk


@trace_constant
def step_launch() -> tuple[int, int, int]:
    """(``step_warps``, ``step_maxnreg``, ``step_split``) with 0 for None, read once at trace
    time under ``torch.compile`` like :func:`triton_chunk_sizes` (a compiled decode step
    launches it)."""
    cfg = current_config()
    return cfg.step_warps or 0, cfg.step_maxnreg or 0, cfg.step_split


@trace_constant
def mimo_output_enabled() -> bool:
    """``current_config().mimo_output``, a trace-time constant under ``torch.compile``: Dynamo
    cannot trace the ``ContextVar`` read, and a MIMO layer asks on every forward, so a direct
    read broke a compiled MIMO model's graph at every layer (a ``fullgraph=True`` compile
    failed; the H100 profile of 2026-12-06 found it)."""
    return current_config().mimo_output


def scored_rows_enabled() -> bool:
    """``current_config().scored_rows`` (read by the trainer, outside any compiled graph)."""
    return current_config().scored_rows


@trace_constant
def loss_op_enabled() -> bool:
    """``current_config().loss_op``, a trace-time constant under ``torch.compile`` (the loss is
    traced on every compiled step, like the MIMO output above)."""
    return current_config().loss_op


@trace_constant
def loss_kernels_enabled() -> bool:
    """``current_config().loss_kernels``, a trace-time constant under ``torch.compile`` (read
    where the loss resolves its backend, inside the compiled step with ``loss_op``)."""
    return current_config().loss_kernels


@trace_constant
def fold_norm_weight_enabled() -> bool:
    """``current_config().fold_norm_weight``, a trace-time constant under ``torch.compile``
    (every SISO layer with an output norm asks on every forward)."""
    return current_config().fold_norm_weight


@trace_constant
def train_norms_enabled() -> bool:
    """``current_config().train_norms``, a trace-time constant under ``torch.compile`` (every
    norm asks it on every forward)."""
    return current_config().train_norms


@trace_constant
def fa4_decode_enabled() -> bool:
    """``current_config().fa4_decode``, a trace-time constant under ``torch.compile``."""
    return current_config().fa4_decode


@trace_constant
def norm_linear_enabled() -> bool:
    """Whether ``current_config().norm_linear`` folds any rows, a trace-time constant under
    ``torch.compile`` (the model's blocks ask it on every decode step; whether a given call's
    rows fold is decided at the call, :func:`hybridkit.kernels.linear.add_norm_linear`)."""
    return current_config().norm_linear > 0
