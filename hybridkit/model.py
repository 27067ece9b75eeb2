"""HybridLM: embedding -> pre-norm residual blocks (mixer + optional MLP) -> final norm -> head.

The same module serves training (``forward`` over whole sequences, optionally packed with
``cu_seqlens``), prefill (``forward`` with an :class:`InferenceCache`, which every recurrent layer
continues from and updates) and decoding (``step``: one token per sequence). Token-by-token
decoding reproduces the full forward (``hybridkit check`` measures it per layer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridkit.cache import InferenceCache
from hybridkit.kernels.config import norm_linear_enabled, train_norms_enabled
from hybridkit.kernels.embedding import embedding_lookup
from hybridkit.kernels.loss import cross_entropy_sum
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.layers.linear import Linear
from hybridkit.layers.norm import PendingNorm, RMSNorm

if TYPE_CHECKING:
    from hybridkit.spec import BlockSpec, ModelSpec


class Block(nn.Module):
    """``h += mixer(norm1(h)); h += mlp(norm2(h))`` (either part may be absent)."""

    def __init__(self, spec: BlockSpec, *, d_model: int, layer_idx: int, eps: float):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.norm1 = self.mixer = self.norm2 = self.mlp = None
        if spec.mixer is not None:
            self.norm1 = RMSNorm(d_model, eps)
            self.mixer = spec.mixer.build(d_model, layer_idx)
        if spec.mlp is not None:
            self.norm2 = RMSNorm(d_model, eps)
            self.mlp = spec.mlp.build(d_model, layer_idx)
        # asked once here, not per forward: torch 2.5's Dynamo cannot trace ``vars`` of a class
        self.takes_pending = (
            self.mixer is not None and takes_pending_norm(self.mixer),
            self.mlp is not None and takes_pending_norm(self.mlp),
        )

    def forward_pending(
        self,
        h: torch.Tensor,
        pending: torch.Tensor | None,
        *,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream ``h`` with the previous block's last output ``pending`` not yet
        added, -> the same for this block. Each add then happens together with the pre-norm
        after it (``RMSNorm.add_forward``: one launch instead of two when decoding with the
        kernel setting ``fused_add_norm``; otherwise the same two ops). Inference with a cache
        carries ``pending`` from block to block (``HybridLM.forward``). With the kernel setting
        ``norm_linear`` a layer that takes it (``accepts_pending_norm``) is given the add and
        norm still pending (:class:`PendingNorm`), which its first projection folds into its own
        launch; with ``train_norms`` too, so that the normed input is stored in the projection's
        dtype while the layer still sees the residual stream's. Training without activation
        checkpointing carries ``pending`` from block to block as well (``HybridLM.forward``),
        so that every add meets the norm after it."""
        fold = norm_linear_enabled() or train_norms_enabled()
        parts = ((self.norm1, self.mixer), (self.norm2, self.mlp))
        for (norm, layer), takes_pending in zip(parts, self.takes_pending, strict=True):
            if layer is None:
                continue
            if fold and takes_pending:
                x = PendingNorm(h, pending, norm)
                pending = layer(x, cache=cache, cu_seqlens=cu_seqlens)
                h = x.finish()
            elif pending is None:
                pending = layer(norm(h), cache=cache, cu_seqlens=cu_seqlens)
            else:
                h, x = norm.add_forward(h, pending)
                pending = layer(x, cache=cache, cu_seqlens=cu_seqlens)
        return h, pending

    def forward(
        self,
        h: torch.Tensor,
        *,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
        carry: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``h`` -> the block's output; with ``carry`` :meth:`forward_pending`'s pair instead
        (``pending``: the previous block's last output, not yet added). Through here rather
        than ``forward_pending`` directly, a wrapper's hooks run (FSDP gathers the block's
        parameters in one)."""
        h, pending = self.forward_pending(h, pending, cache=cache, cu_seqlens=cu_seqlens)
        if carry:
            return h, pending
        return h if pending is None else h + pending

    def part_params(self) -> list[tuple[str, int]]:
        """``(layer kind, parameters)`` of each present part, its pre-norm counted with it.

        The one place that decides how a block's parameters are attributed, so that the totals
        per kind (:meth:`HybridLM.param_counts`) and the per-layer rows of ``hybridkit show``
        always add up to the same numbers.
        """
        return [
            (layer.spec.kind, _count(layer) + _count(norm))
            for norm, layer in ((self.norm1, self.mixer), (self.norm2, self.mlp))
            if layer is not None
        ]

    def num_params(self) -> int:
        """Parameters of the whole block (both parts with their pre-norms)."""
        return sum(n for _, n in self.part_params())


def takes_pending_norm(layer: nn.Module) -> bool:
    """Whether ``layer`` may be given a :class:`PendingNorm`: the class that defines its
    ``forward`` says so itself (``accepts_pending_norm``), so a subclass that overrides
    ``forward`` (and may compute with its input) does not inherit the promise."""
    owner = next(c for c in type(layer).__mro__ if "forward" in vars(c))
    return bool(vars(owner).get("accepts_pending_norm", False))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class HybridLM(nn.Module):
    """A causal language model compiled from a :class:`~hybridkit.spec.ModelSpec`."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        layers = spec.layers()
        self.embedding = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(
            Block(b, d_model=spec.d_model, layer_idx=i, eps=spec.norm_eps)
            for i, b in enumerate(layers)
        )
        self.norm_f = RMSNorm(spec.d_model, spec.norm_eps)
        self.lm_head = Linear(spec.d_model, spec.vocab_size, bias=False)
        # recompute each block in the backward instead of keeping its activations (training
        # only: a call with a cache or without gradients runs the blocks directly)
        self.activation_checkpointing = False
        # rows per chunk of the fused head + cross-entropy when ``forward`` gets targets (None:
        # full logits and F.cross_entropy); the trainer sets it from train.loss_chunk_tokens
        self.loss_chunk_tokens: int | None = None
        if spec.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.init_weights()

    # --- initialisation ---------------------------------------------------------------------
    def init_weights(self) -> None:
        """GPT-2/Mamba-style init (docs/mamba3.md 6.1).

        Embeddings ~ N(0, init_std); Linear biases zero; every residual-branch output projection
        (named by its module's ``residual_out_names``) is re-drawn and divided by
        sqrt(number of residual branches), i.e. sqrt(2 * n_layer) when every block has a mixer
        and an MLP, so the residual stream's variance does not grow with depth. Layer-specific
        parameters (Mamba-3's dt_bias, biases, D) keep the values their constructors gave them.
        """
        nn.init.normal_(self.embedding.weight, std=self.spec.init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        outs = [
            getattr(layer, name).weight
            for block in self.blocks
            for layer in (block.mixer, block.mlp)
            if layer is not None
            for name in getattr(layer, "residual_out_names", ())
        ]
        scale = 1.0 / math.sqrt(
            max(1, sum(1 for b in self.blocks for m in (b.mixer, b.mlp) if m is not None))
        )
        with torch.no_grad():
            for weight in outs:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                weight.mul_(scale)
        if not self.spec.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.spec.init_std)

    # --- running ----------------------------------------------------------------------------
    def forward(
        self,
        ids: torch.Tensor,
        *,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_hidden: bool = False,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``ids`` (B, L) -> logits (B, L, vocab).

        With ``cache`` the call continues the cached sequences (prefill or several new tokens)
        and advances the cache. ``cu_seqlens`` packs sequences in a batch of one. With
        ``return_hidden`` also returns each block's output (for per-layer checks).

        With ``targets`` (B, L) the call returns the float32 cross-entropy *summed* over the
        positions whose target is not ``ignore_index`` instead of logits: the training path.
        The loss is computed inside ``forward`` so that a DDP / ``torch.compile`` wrapper
        covers it, and so that with ``loss_chunk_tokens`` set the full logits never exist
        (:mod:`hybridkit.kernels.loss`). ``scored`` (flat indices into the B x L positions, from
        :func:`hybridkit.kernels.loss.scored_rows`) limits the final norm, the head and the loss
        to those rows; it must hold every position whose target is not ``ignore_index``.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, seqlen), got shape {tuple(ids.shape)}")
        if targets is not None and (cache is not None or return_hidden):
            raise ValueError(
                "targets (the training loss) cannot be combined with a cache or hidden"
            )
        # the lookup reads the weight directly (hybridkit/kernels/embedding.py); the module
        # keeps nn.Embedding's defaults (no padding_idx, max_norm or sparse gradient)
        h = embedding_lookup(ids, self.embedding.weight)
        hidden = []
        if cache is not None and targets is None and not return_hidden:
            # inference: every residual add goes with the norm after it (Block.forward_pending)
            pending = None
            for block in self.blocks:
                h, pending = block.forward_pending(h, pending, cache=cache)
            if pending is None:
                x = self.norm_f(h)
            elif norm_linear_enabled():  # the head folds the add + final norm in
                x = PendingNorm(h, pending, self.norm_f)
            else:
                x = self.norm_f.add_forward(h, pending)[1]
            return self._logits(x, cache, ids.shape[1])
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        pending = None
        chained = not (recompute or return_hidden or cache is not None)
        for block in self.blocks:
            if chained:
                # each block's last output is added together with the next norm (Block.
                # forward_pending; with train_norms one kernel pair per add in eager training)
                h, pending = block(h, cu_seqlens=cu_seqlens, pending=pending, carry=True)
            elif recompute:
                # non-reentrant: works with kwargs, under torch.compile, and with the Triton
                # scan op (its backward reads the saved tensors exactly once)
                h = checkpoint(block, h, cu_seqlens=cu_seqlens, use_reentrant=False)
            else:
                h = block(h, cache=cache, cu_seqlens=cu_seqlens)
            if return_hidden:
                hidden.append(h)
        if targets is not None:
            if scored is not None:  # the rows the loss scores (and a few unscored ones)
                h = h.reshape(-1, h.shape[-1]).index_select(0, scored)
                if pending is not None:
                    pending = pending.reshape(-1, h.shape[-1]).index_select(0, scored)
                targets = targets.reshape(-1).index_select(0, scored)
            return cross_entropy_sum(
                self._final_norm(h, pending),
                self.lm_head.weight,
                targets,
                chunk_tokens=self.loss_chunk_tokens,
                ignore_index=ignore_index,
            )
        logits = self._logits(self._final_norm(h, pending), cache, ids.shape[1])
        return (logits, hidden) if return_hidden else logits

    def _final_norm(self, h: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """``norm_f(h + pending)`` (``norm_f(h)`` without ``pending``) in the dtype of the head
        that reads it, the add and the norm as one op where they can (``PendingNorm``)."""
        return PendingNorm(h, pending, self.norm_f).materialize()

    def _logits(self, x: torch.Tensor, cache: InferenceCache | None, tokens: int) -> torch.Tensor:
        """The head on the final-normed stream, and the cache advanced by ``tokens``."""
        logits = self.lm_head(x)
        if cache is not None:
            if cache.position is not None:
                # static decoding counts on the device only: a replayed graph runs no Python,
                # and a host int bumped here would be a guard torch.compile re-specialises on
                # at every token (a recompile inside the CUDA-graph capture)
                cache.position += tokens
            else:
                cache.seqlen_offset += tokens
        return logits

    def allocate_cache(
        self,
        batch_size: int,
        max_seqlen: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> InferenceCache:
        """Fresh per-layer states for ``batch_size`` sequences of up to ``max_seqlen`` tokens.

        ``ssm_dtype`` (e.g. ``torch.bfloat16``) stores the Mamba-3 states h in that dtype
        instead of float32: half the bytes a decode step reads and writes, at the cost of a
        rounding per token (the update itself still runs in float32)."""
        ref = self.embedding.weight
        dtype = dtype or ref.dtype
        device = device or ref.device
        cache = InferenceCache(batch_size, max_seqlen)
        for block in self.blocks:
            for layer in (block.mixer, block.mlp):
                if layer is not None and hasattr(layer, "allocate_cache"):
                    state = layer.allocate_cache(batch_size, max_seqlen, dtype, device)
                    if ssm_dtype is not None and isinstance(state, Mamba3State):
                        state = state._replace(ssm=state.ssm.to(ssm_dtype))
                    cache.layers[block.layer_idx] = state
        return cache

    def step(self, token: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Decode one token per sequence: ``token`` (B,) or (B, 1) -> logits (B, vocab)."""
        if token.dim() == 1:
            token = token[:, None]
        return self.forward(token, cache=cache)[:, -1]

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_id: int | None = None,
        use_graph: bool | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations for a batch of equal-length prompts.

        ``temperature == 0`` is greedy. Sampling draws from a private ``torch.Generator``: seeded
        with ``seed`` the samples are reproducible, without one it starts from fresh OS entropy.
        Either way torch's global RNG is neither read nor re-seeded, so calling ``generate`` in
        the middle of a seeded training or evaluation run does not change what that run draws
        next. Sequences that emitted ``eos_id`` keep emitting it. Returns
        (B, L + max_new_tokens) including the prompt.

        Runs through :mod:`hybridkit.generation`: a static cache and, on CUDA, the decode step
        captured in a CUDA graph (``use_graph=False`` runs the same step eagerly);
        ``ssm_dtype=torch.bfloat16`` halves the Mamba-3 state bytes.
        """
        from hybridkit.generation import Sampling, generate

        sampling = Sampling(temperature=temperature, top_k=top_k, eos_id=eos_id)
        was_training = self.training
        self.eval()
        try:
            return generate(
                self,
                ids,
                max_new_tokens,
                sampling=sampling,
                seed=seed,
                use_graph=use_graph,
                ssm_dtype=ssm_dtype,
            )
        finally:
            self.train(was_training)

    # --- bookkeeping ------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameters per layer kind (each block's pre-norm counted with its layer), plus
        ``embedding``, ``head`` (0 when tied) and ``final_norm``."""
        counts: dict[str, int] = defaultdict(int)
        counts["embedding"] = self.embedding.weight.numel()
        counts["head"] = 0 if self.spec.tie_embeddings else self.lm_head.weight.numel()
        counts["final_norm"] = _count(self.norm_f)
        for block in self.blocks:
            for kind, n in block.part_params():
                counts[kind] += n
        return dict(counts)

    def num_params(self) -> int:
        """All parameters, a tied head counted once (``parameters()`` yields shared ones once)."""
        return _count(self)
