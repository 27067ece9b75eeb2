"""``hybridkit check``: does incremental inference reproduce the full forward, layer by layer?

The model is built in float64 with random weights (parameters that start out constant, such as
Mamba-3's biases or D, are perturbed so every term of the math is exercised). The same ids are
run (a) through one full forward and (b) through a prefill, a second prefill that continues from
the cache (chunked prefill) and then token-by-token ``step`` calls. Every block's output must agree.
In float64 any disagreement above round-off is a bug (a state handed over wrongly, a shift that
crosses a chunk, a cache position off by one), not a precision effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkit.build import build_model
from hybridkit.errors import HybridkitError
from hybridkit.spec import ModelSpec


@dataclass
class LayerError:
    index: int
    kinds: str
    max_abs: float
    rel: float


@dataclass
class CheckReport:
    layers: list[LayerError]
    logits_rel: float
    tolerance: float
    lengths: tuple[int, int, int]

    @property
    def ok(self) -> bool:
        return self.logits_rel <= self.tolerance and all(
            e.rel <= self.tolerance for e in self.layers
        )


def _perturb_constant_params(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()) or p.numel() == 1:
                # drawn on the generator's device (the CPU), so a CUDA model gets the same values
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


def consistency_check(
    spec: ModelSpec,
    *,
    batch: int = 2,
    prefill: int | None = None,
    steps: int = 6,
    seed: int = 0,
    tolerance: float = 1e-8,
) -> CheckReport:
    """Compare full forward vs prefill + continued prefill + steps in float64."""
    forced = sorted(
        {i for i, b in enumerate(spec.layers()) for _, part in b.parts()
         if getattr(part, "backend", None) == "triton"}
    )  # fmt: skip
    if forced:
        raise HybridkitError(
            f"hybridkit check runs the model in float64, which the Triton kernels do not; "
            f"layer(s) {forced} set backend: triton. Check the recipe with backend auto (the "
            "same math, float64 through the torch paths), e.g. --set "
            "model.blocks.<name>.mixer.backend=auto"
        )
    gen = torch.Generator().manual_seed(seed)
    model = build_model(spec, seed=seed, dtype=torch.float64).eval()
    _perturb_constant_params(model, gen)
    chunk = min(
        (
            b.mixer.spec.chunk_size
            for b in model.blocks
            if hasattr(getattr(b.mixer, "spec", None), "chunk_size")
        ),
        default=16,
    )
    # Lengths that are not multiples of the chunk, so chunk-boundary handling is exercised.
    first = prefill if prefill is not None else chunk + 3
    second = chunk // 2 + 1
    total = first + second + steps
    ids = torch.randint(0, spec.vocab_size, (batch, total), generator=gen)
    with torch.no_grad():
        full_logits, full_hidden = model(ids, return_hidden=True)
        cache = model.allocate_cache(batch, total)
        parts_logits, parts_hidden = [], []
        pieces = [ids[:, :first], ids[:, first : first + second]]
        pieces += [ids[:, t : t + 1] for t in range(first + second, total)]
        for piece in pieces:
            logits, hidden = model(piece, cache=cache, return_hidden=True)
            parts_logits.append(logits)
            parts_hidden.append(hidden)
    inc_logits = torch.cat(parts_logits, dim=1)
    errors = []
    for i, block in enumerate(model.blocks):
        ref = full_hidden[i]
        got = torch.cat([h[i] for h in parts_hidden], dim=1)
        diff = (got - ref).abs().max().item()
        kinds = " + ".join(m.spec.kind for m in (block.mixer, block.mlp) if m is not None)
        errors.append(LayerError(i, kinds, diff, diff / max(ref.abs().max().item(), 1e-30)))
    logits_rel = ((inc_logits - full_logits).abs().max() / full_logits.abs().max()).item()
    return CheckReport(errors, logits_rel, tolerance, (first, second, steps))
