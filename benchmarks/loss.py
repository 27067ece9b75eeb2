"""The fused cross-entropy on the GPU: the chunk kernels (``hybridkit/kernels/loss``) against
the ATen chunk path (eager, and inside the ``loss_op`` custom ops) and against Inductor's fusion
of the traced Function (the compiled default), at the 400M hybrid's head (4 x 4,096 tokens,
d_model 1,024, vocabulary 32,000, 4,096-token chunks, bf16 autocast).

Two levels, each checked against the ATen path before it is timed:
* one chunk's element-wise work alone (forward: log-sum-exp and loss from the bf16 logits;
  backward: the softmax gradient from them), against its byte floor at the copy bandwidth
  measured in the same run;
* the whole loss, forward and forward + backward: ATen eager, ours eager, Inductor (traced
  Function), and the custom op (``loss_op``) with ours. Since 2026-12-07 the forward forms both
  gradients (its head matmul and the two gradient matmuls), and the backward only scales them.

    python benchmarks/loss.py --out benchmarks/results/loss_kernels_h100
"""

from __future__ import annotations

import argparse

import torch
from launch_sweep import cell, measure_cases, timed_if_right, write_results

from hybridkit.kernels.config import kernel_config
from hybridkit.kernels.loss import _chunk_grad, _chunk_stats, linear_cross_entropy
from hybridkit.train.provenance import run_environment

# (tokens, d_model, vocabulary, chunk tokens, label smoothing)
CASES = ((16384, 1024, 32000, 4096, 0.0), (16384, 1024, 32000, 4096, 0.1))


def _chunk_level(rec: dict, logits: torch.Tensor, targets: torch.Tensor, s: float, bw: float):
    """One chunk's forward and backward element-wise work, torch against ours."""
    ref_f = _chunk_stats(logits, targets, -100, s, "torch")
    lse = ref_f[1]
    scale = torch.ones((), device=logits.device)
    ref_b = (_chunk_grad(logits.clone(), targets, lse, scale, -100, s, "torch"),)
    work = logits.clone()  # ours overwrites its input: time it on a scratch copy

    def refill():
        return (work.copy_(logits),)

    copy_ms = timed_if_right(refill, (logits,), refill)  # taken off the backward's times
    for name in ("torch", "triton"):
        rec[f"chunk_{name}_fwd_ms"] = timed_if_right(
            lambda n=name: _chunk_stats(logits, targets, -100, s, n), ref_f,
            lambda n=name: _chunk_stats(logits, targets, -100, s, n),
        )  # fmt: skip

        def bwd(n=name):
            work.copy_(logits)
            return (_chunk_grad(work, targets, lse, scale, -100, s, n),)

        total = timed_if_right(bwd, ref_b, bwd)
        rec[f"chunk_{name}_bwd_ms"] = total - copy_ms if isinstance(total, float) else total
    n = logits.numel() * logits.element_size()
    rec.update(chunk_fwd_floor_ms=n / bw * 1e3, chunk_bwd_floor_ms=2 * n / bw * 1e3)


def _measure(tokens: int, dim: int, vocab: int, chunk: int, s: float, *, bw: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, dim, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(vocab, dim, device="cuda", generator=g) * dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    targets[::97] = -100
    rec: dict = dict(case=f"{tokens} x {dim} -> {vocab}, chunks of {chunk}, smoothing {s}")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = hidden[:chunk] @ weight.t()
    _chunk_level(rec, logits, targets[:chunk], s, bw)

    def loss(backend: str) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(
                hidden, weight, targets, chunk_tokens=chunk, label_smoothing=s, backend=backend
            )

    compiled = torch.compile(loss)
    variants = {
        "torch": (lambda: loss("torch"), False),
        "ours": (lambda: loss("triton"), False),
        "inductor": (lambda: compiled("auto"), False),
        "ops_ours": (lambda: compiled("auto"), True),
    }
    ref_f = (loss("torch").detach(),)
    ref_g = torch.autograd.grad(loss("torch"), (hidden, weight))
    for name, (fn, ops) in variants.items():
        torch._dynamo.reset()
        with kernel_config(loss_op=ops):

            def fb(fn=fn):
                return torch.autograd.grad(fn(), (hidden, weight))

            rec[f"{name}_fwd_ms"] = timed_if_right(
                lambda fn=fn: (fn().detach(),), ref_f, lambda fn=fn: fn().detach()
            )
            rec[f"{name}_fb_ms"] = timed_if_right(fb, ref_g, fb)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--cases", type=int, default=len(CASES), help="only the first N cases")
    args = ap.parse_args()
    dev, bw, records = measure_cases(
        CASES[: args.cases], lambda i, case, bw_: _measure(*case, bw=bw_)
    )
    lines = [
        "# Fused cross-entropy, bf16: the chunk kernels against ATen and Inductor",
        "",
        f"Copy bandwidth measured in the same run: {bw / 1e9:,.0f} GB/s. do_bench medians (ms), "
        "L2 cleared, each variant checked against the ATen path first.",
        "",
        "One chunk's element-wise work (floor: the bf16 logits read once forward, read and "
        "written once backward):",
        "",
        "| case | torch fwd | ours fwd | floor fwd | torch bwd | ours bwd | floor bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    chunk_cols = ("chunk_torch_fwd_ms", "chunk_triton_fwd_ms", "chunk_fwd_floor_ms")
    chunk_cols += ("chunk_torch_bwd_ms", "chunk_triton_bwd_ms", "chunk_bwd_floor_ms")
    for r in records:
        lines.append(f"| {r['case']} | " + " | ".join(cell(r[c]) for c in chunk_cols) + " |")
    lines += [
        "",
        "The whole loss (head matmuls included; the forward forms the gradients, f+b adds their "
        "scaling): ATen eager, ours eager, the compiled default (the Function traced, Inductor's "
        "fusion) and the compiled custom op (`loss_op`) running ours:",
        "",
        "| case | torch fwd | ours fwd | inductor fwd | op fwd | torch f+b | ours f+b "
        "| inductor f+b | op f+b |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = ("torch", "ours", "inductor", "ops_ours")
    cols = tuple(f"{n}_fwd_ms" for n in names) + tuple(f"{n}_fb_ms" for n in names)
    for r in records:
        lines.append(f"| {r['case']} | " + " | ".join(cell(r[c]) for c in cols) + " |")
    write_results(args.out, lines, run_environment(dev), bw, records)


if __name__ == "__main__":
    main()
