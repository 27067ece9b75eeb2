"""Fast generation: a static cache, a CUDA-graph-captured decode step, sampling on the device.

:class:`DecodeRunner` owns everything one generation needs, allocated once for a batch-size
bucket and a maximum length: the :class:`~hybridkit.cache.InferenceCache` (static after the
prefill: fixed-size KV rings, Mamba-3 states updated in place, a device-side position), the
logits of the last step, the sampled tokens and the per-sequence EOS flags. One decode step
(:meth:`DecodeRunner._step`) samples the next token from the stored logits (inside the step, with
the runner's ``torch.Generator``), appends it to the output, runs the model on it and stores the
new logits; every tensor it touches is the runner's, so on CUDA it is captured once in a
``torch.cuda.CUDAGraph`` and replayed per token with no host work and no synchronisation (the
only sync is an optional EOS check every ``eos_check_every`` tokens). On the CPU the same step
runs eagerly, so the CPU tests exercise the code the GPU replays.

The prompt is prefilled by the model's ordinary forward with the cache (chunked / Triton scan,
FA4 or sdpa attention), which is why the static form starts only after it.

With ``forced=True`` the same runner decodes teacher-forced: each step feeds the next token of a
given sequence instead of a sampled one and records the argmax after it
(:meth:`DecodeRunner.force`). Evaluation's decode-path subset runs through it, so the predictions
it compares with the full forward come from the step that generation replays (static cache and,
on CUDA, the graph).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hybridkit.cache import in_place_state
from hybridkit.kernels.sampling import greedy_record

if TYPE_CHECKING:
    from hybridkit.model import HybridLM


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temperature`` 0, else top-k sampling."""

    temperature: float = 1.0
    top_k: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        for name in ("top_k", "eos_id"):
            value, low = getattr(self, name), 1 if name == "top_k" else 0
            if value is not None and (not _is_int(value) or value < low):
                raise ValueError(f"{name} must be None or an integer >= {low}, got {value!r}")


def _is_int(value: object) -> bool:
    """A plain integer (Python or NumPy-like, not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def sample(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    Sampling uses the Gumbel-max trick, ``argmax(logits / T + Gumbel noise)``, which draws from
    ``softmax(logits / T)`` exactly; unlike ``torch.multinomial`` it is a fixed sequence of
    element-wise ops and an argmax with no data-dependent shapes, so it is captured in a CUDA
    graph as it is."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    # relative to the row's best logit, so that a tiny temperature sends the others to -inf
    # (not the best one to +inf, which ties with every other overflow), and never below
    # float32's smallest normal number (a temperature that rounds to 0 would make 0 / 0)
    scores = logits.float()
    best = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    scores = (scores - best) / max(sampling.temperature, torch.finfo(torch.float32).tiny)
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    u = torch.rand(scores.shape, generator=generator, device=scores.device)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
    return (scores + gumbel).argmax(dim=-1)


def batch_bucket(batch: int) -> int:
    """The batch a graph is captured for: the next power of two (fewer captures, small waste)."""
    return 1 << max(0, batch - 1).bit_length()


def generation_bytes(model: HybridLM, batch: int, prompt: int, new: int) -> int:
    """About the bytes :func:`generate` allocates beyond the weights for ``batch`` prompts of
    ``prompt`` tokens and ``new`` new ones: every layer's cache for the padded batch and the
    whole length (sized on the meta device, as ``hybridkit show`` does), the prefill's logits
    and the token buffer. Activations of the prefill come on top; a caller compares this with
    the free memory to refuse a call that cannot fit before it allocates anything."""
    from hybridkit.layers.base import cache_bytes

    if new == 0:  # generate() returns the prompt as it is
        return 0
    bucket, total = batch_bucket(batch), prompt + new
    dtype = model.embedding.weight.dtype
    layers = [layer for block in model.blocks for layer in (block.mixer, block.mlp) if layer]
    per_seq = sum(cache_bytes(layer, total, dtype) for layer in layers)
    logits = bucket * prompt * model.spec.vocab_size * torch.finfo(dtype).bits // 8
    return bucket * (per_seq + 8 * total) + logits


def can_capture(device: torch.device, sampling: Sampling) -> tuple[bool, str]:
    """Whether a decode step on ``device`` can be a CUDA graph, and why not."""
    if device.type != "cuda":
        return False, "not a CUDA device"
    if sampling.temperature > 0 and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return False, "this torch cannot capture a private generator (sampling runs eagerly)"
    return True, ""


class DecodeRunner:
    """Static cache + (on CUDA) one captured decode step for ``batch`` sequences.

    ``max_seqlen`` bounds prompt + new tokens (the cache's size), ``max_new`` the new tokens.
    Use: ``runner.prefill(ids)`` then ``runner.decode(n)``; ``runner.tokens[:, :n]`` holds the
    sampled tokens. ``use_graph=None`` captures when :func:`can_capture` allows it;
    ``compile_step`` runs ``model.step`` through ``torch.compile`` first (experimental). (The last
    step also runs the model on the last token, whose logits nobody reads: the price of keeping
    sampling inside the captured step.) ``forced=True``: the step reads its token from a device
    buffer that :meth:`force` fills, and ``tokens`` holds the argmax after each one (sampling
    is not used).
    """

    def __init__(
        self,
        model: HybridLM,
        batch: int,
        max_seqlen: int,
        max_new: int,
        sampling: Sampling,
        *,
        seed: int | None = None,
        use_graph: bool | None = None,
        ssm_dtype: torch.dtype | None = None,
        eos_check_every: int = 32,
        compile_step: bool = False,
        forced: bool = False,
    ):
        if eos_check_every < 1:
            raise ValueError(f"eos_check_every must be >= 1, got {eos_check_every}")
        ref = model.embedding.weight
        self.model, self.sampling, self.seed = model, sampling, seed
        # opt-in: torch.compile fuses the norms' and MLP's element-wise ops (hundreds of small
        # kernels per token at batch 1); the graph is still ours (captured around it)
        self.model_step = torch.compile(model.step, dynamic=False) if compile_step else model.step
        self.device = ref.device
        self.max_new, self.eos_check_every = max_new, eos_check_every
        self.cache = model.allocate_cache(batch, max_seqlen, ssm_dtype=ssm_dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.count = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(batch, model.spec.vocab_size, dtype=ref.dtype, device=self.device)
        self.tokens = torch.zeros(batch, max_new, dtype=torch.long, device=self.device)
        # teacher forcing: the tokens the steps feed, written by force() before it decodes
        self.forced = torch.zeros_like(self.tokens) if forced else None
        self.done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.produced = 0  # tokens since the last prefill (host side: the buffer's bound)
        self.generator = torch.Generator(device=self.device)
        # states of layer kinds that replace them per call: restored per prompt, never captured
        self.fresh = {i: s for i, s in self.cache.layers.items() if not in_place_state(s)}
        capturable, self.eager_reason = can_capture(self.device, sampling)
        if capturable and self.fresh:
            capturable, self.eager_reason = False, "a layer kind keeps a state it replaces"
        self.use_graph = capturable if use_graph is None else use_graph and capturable
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.use_graph:
            self._capture()

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    # --- the step -------------------------------------------------------------------------
    def _step(self) -> None:
        """Sample from ``logits``, record the token, run the model on it, store new logits
        (forced: feed the next given token and record the argmax after it)."""
        if self.forced is not None:
            given = self.forced.index_select(1, self.count)[:, 0]
            greedy_record(self.model_step(given, self.cache), self.tokens, self.count)
            self.count += 1
            return
        eos = self.sampling.eos_id
        if self.sampling.temperature == 0:  # argmax, EOS rule and record in one launch
            done = None if eos is None else self.done
            nxt = greedy_record(self.logits, self.tokens, self.count, done, eos)
        else:
            nxt = sample(self.logits, self.sampling, self.generator)
            if eos is not None:
                nxt = torch.where(self.done, torch.full_like(nxt, eos), nxt)
                self.done |= nxt == eos
            self.tokens.index_copy_(1, self.count, nxt[:, None])
        self.count += 1
        self.logits.copy_(self.model_step(nxt, self.cache))

    def _capture(self) -> None:
        """Warm up (compiles kernels, creates library handles) and capture one step.

        Both run on the fresh cache made static at position 0; :meth:`prefill` then resets
        every tensor the graph reads, keeping their addresses."""
        self.cache.make_static(self.position)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            # twice: a compiled step that re-specialises on its second call (torch.compile's
            # automatic dynamic shapes) must do so here, not inside the capture, where
            # compiling is a CUDA error that also leaves the default generator unusable
            for _ in range(min(2, self.max_new)):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._reset_counters()
        self.graph = torch.cuda.CUDAGraph()
        if self.sampling.temperature > 0:
            self.graph.register_generator_state(self.generator)
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._step()

    def _reset_counters(self) -> None:
        self.count.zero_()
        self.done.zero_()
        self.position.zero_()

    # --- running --------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        """Reset the cache and run the prompts ``ids`` (batch, L) through the forward (a forced
        runner may start from an empty prompt: its first step then sees no context)."""
        if ids.shape[0] != self.batch:
            raise ValueError(f"runner holds {self.batch} sequences, got {ids.shape[0]} prompts")
        if ids.shape[1] == 0 and self.forced is None:
            raise ValueError("the prompt is empty: sampling needs at least one token of context")
        if ids.shape[1] + self.max_new > self.cache.max_seqlen:
            # the static rings would wrap: full attention would silently become a window
            raise ValueError(
                f"a prompt of {ids.shape[1]} tokens and {self.max_new} new ones need "
                f"{ids.shape[1] + self.max_new} positions; the runner's cache holds "
                f"{self.cache.max_seqlen} (build it with a larger max_seqlen)"
            )
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)
        self.cache.reset()
        for idx in [i for i, st in self.cache.layers.items() if not in_place_state(st)]:
            del self.cache.layers[idx]
        self.cache.layers.update({i: copy.deepcopy(s) for i, s in self.fresh.items()})
        self._reset_counters()
        self.produced = 0
        if ids.shape[1] > 0:
            self.logits.copy_(self.model(ids, cache=self.cache)[:, -1])
        self.cache.make_static(self.position)

    @torch.no_grad()
    def force(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoding after :meth:`prefill`: feed ``ids`` (batch, n) one token per
        step; returns the argmax after each fed token, (batch, n) on the device."""
        if self.forced is None:
            raise ValueError("force() needs a runner built with forced=True")
        n = ids.shape[1]
        if ids.shape[0] != self.batch or self.produced + n > self.max_new:
            raise ValueError(
                f"runner holds {self.batch} sequences and {self.max_new - self.produced} more "
                f"steps, got ids of shape {tuple(ids.shape)}"
            )
        first = self.produced
        self.forced[:, first : first + n].copy_(ids)
        self.decode(n)
        return self.tokens[:, first : first + n]

    @torch.no_grad()
    def decode(self, n: int) -> int:
        """Sample ``n`` tokens (fewer when every sequence has emitted EOS); returns how many."""
        if self.produced + n > self.max_new:
            raise ValueError(
                f"runner was built for {self.max_new} new tokens per prompt, asked for "
                f"{self.produced + n} (prefill a new prompt to start again)"
            )
        for i in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            self.produced += 1
            if self._all_done(i + 1, n):
                return i + 1
        return n

    def _all_done(self, produced: int, n: int) -> bool:
        """Every ``eos_check_every`` tokens (one host sync), whether all sequences stopped."""
        if self.sampling.eos_id is None or produced % self.eos_check_every or produced == n:
            return False
        return bool(self.done.all())


@torch.no_grad()
def generate(
    model: HybridLM,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: Sampling,
    seed: int | None = None,
    use_graph: bool | None = None,
    ssm_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Prompt + ``max_new_tokens`` sampled tokens (B, L + max_new_tokens), through a runner.

    The batch is padded to its bucket (:func:`batch_bucket`) with copies of the last prompt so
    that the captured graph's shapes repeat across calls of similar sizes. Sequences that emitted
    ``eos_id`` keep emitting it (also after an early stop)."""
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(
            f"ids must be (batch, length) with batch >= 1, got shape {tuple(ids.shape)}"
        )
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    batch, length = ids.shape
    if max_new_tokens == 0:
        return ids
    bucket = batch_bucket(batch)
    padded = torch.cat((ids, ids[-1:].expand(bucket - batch, length)), dim=0)
    runner = DecodeRunner(
        model,
        bucket,
        length + max_new_tokens,
        max_new_tokens,
        sampling,
        seed=seed,
        use_graph=use_graph,
        ssm_dtype=ssm_dtype,
    )
    runner.prefill(padded)
    produced = runner.decode(max_new_tokens)
    new = runner.tokens[:batch, :max_new_tokens].clone()
    if produced < max_new_tokens:
        new[:, produced:] = sampling.eos_id
    return torch.cat((ids, new), dim=1)
