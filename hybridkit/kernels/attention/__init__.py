"""The attention op: one dispatch point, several backends, one numerics contract.

Layout is FlashAttention's (batch, seqlen, heads, head_dim) for q, k and v; k/v may have fewer
heads than q (GQA/MQA, ``heads % kv_heads == 0``). Causal masking is aligned to the *bottom
right*: query i of ``Lq`` sees keys ``j <= i + (Lk - Lq)``, which is what decoding with a KV cache
needs (the new queries are the last ``Lq`` positions). ``window`` counts the keys a query sees,
itself included (so ``window=1`` is attention to self only; FA4's left window is ``window - 1``).
RoPE/NoPE is the caller's business: q and k arrive already rotated.

Backends:

* ``fa4``: FlashAttention-4 (package ``flash-attn-4``, module ``flash_attn.cute``). Under
  ``torch.compile`` it is the ``hybridkit::fa4_fwd`` / ``fa4_bwd`` custom ops of
  :mod:`.fa4` (one opaque node, fake impl, registered autograd, so
  ``fullgraph=True`` works); in eager mode the same FA4 calls run through a plain
  ``autograd.Function`` that skips the dispatcher's host overhead (see
  ``FA4_EAGER_AUTOGRAD_FUNCTION``). Needs an SM90+ GPU (its backward is SM90+ only), bf16/fp16
  inputs and a head_dim FA4 supports. Packed sequences use FA4's varlen kernel; decoding passes
  the filled part of the KV cache (a view, no copy: FA4 takes strided k/v).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; on CUDA (eager) cuDNN, then
  FlashAttention-2, are preferred over the memory-efficient and math kernels.
* ``reference``: explicit float32 (float64 for float64 inputs) math, for tests.
* ``auto``: ``fa4`` where it can run, else ``sdpa``.

A backend that cannot run here (``fa4`` without the package, on a CPU or an older GPU, with
float32 inputs, ...) falls back to ``sdpa`` with one log line per reason, never an error.

A static (CUDA-graph) decode step may instead run the layer's whole step between its
projections as one Triton launch (:mod:`.step_kernel`; kernel setting ``attention_step``).

Modules: :mod:`.ops` (the dispatch point), :mod:`.fa4`, :mod:`.sdpa`, :mod:`.reference`,
:mod:`.step_kernel`.
"""

from hybridkit.kernels.attention.fa4 import fa4_head_dim_ok, fa4_unavailable
from hybridkit.kernels.attention.ops import (
    BACKENDS,
    PACKED_MASK_MAX_TOKENS,
    attention,
    attention_step,
    clear_backend_caches,
    resolve_backend,
    static_step_kernel,
)
from hybridkit.kernels.attention.reference import attention_mask, packed_attention_mask

__all__ = [
    "BACKENDS",
    "PACKED_MASK_MAX_TOKENS",
    "attention",
    "attention_mask",
    "attention_step",
    "clear_backend_caches",
    "fa4_head_dim_ok",
    "fa4_unavailable",
    "packed_attention_mask",
    "resolve_backend",
    "static_step_kernel",
]
