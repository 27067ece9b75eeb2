"""Decoding throughput of a recipe's model against its byte floor: what ``bench decode`` runs.

Decoding one token per sequence is a bandwidth problem (``docs/kernels.md``, "The fused decode
step"): every step reads all weights once, reads and writes every Mamba-3 state and reads the
attention KV caches. Their sum divided by the copy bandwidth measured in the same run is the
*byte floor* of a step; the benchmark reports the measured step against it. Steps run through
:class:`~hybridkit.generation.DecodeRunner` (the captured CUDA graph on a GPU, the eager step
on a CPU) after a prefill of random prompts, greedy, timed with device events over all new
tokens.

Bytes counted per step: the parameters a step multiplies with (every one except the embedding
table, of which a step reads only B rows; a tied head counts it once), 2 x the Mamba-3 state
(read + write: h, k, v, angle), and each attention layer's keys and values over the mean
context of the run (prompt + new / 2, capped at a window). Activations are not counted (a few
KB per sequence and layer).

With ``profile_tokens`` every batch size also decodes that many more tokens under the torch
profiler (:mod:`hybridkit.profiling`): device time and kernel launches per token by category
(``DECODE_CATEGORIES``). Their sum against the measured step says how much of a step is kernels
at all and how much is the gaps between them, the question at batch 1, where a step is
hundreds of small kernels.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from hybridkit import profiling
from hybridkit.cache import InferenceCache, KVCache
from hybridkit.generation import DecodeRunner, Sampling
from hybridkit.kernels.config import changed_settings
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.layers.mamba3 import Mamba3
from hybridkit.model import HybridLM
from hybridkit.runtime import elapsed_s, timer_start
from hybridkit.summary import human_count


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the floor's denominator."""
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start = timer_start(device)
        dst.copy_(src)
        times.append(elapsed_s(device, start))
    return 2 * nbytes / statistics.median(times)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def step_bytes(model: HybridLM, runner: DecodeRunner, context: float) -> dict[str, float]:
    """Bytes one decode step must move, by kind, for the runner's batch and cache dtypes."""
    weights = sum(_nbytes(p) for name, p in model.named_parameters() if name != "embedding.weight")
    if model.spec.tie_embeddings:
        weights += _nbytes(model.embedding.weight)
    state = kv = 0.0
    for layer_state in runner.cache.layers.values():
        if isinstance(layer_state, Mamba3State):
            state += 2 * sum(_nbytes(t) for t in layer_state)
        elif isinstance(layer_state, KVCache):
            per_token = 2 * _nbytes(layer_state.k[:, :1])
            kv += per_token * min(context, layer_state.ring_size())
    return {"weights": float(weights), "mamba3_state": state, "kv": kv}


_MATMUL_NAMES = ("gemm", "gemv", "matmul", "cutlass", "xmma", "sm90_", "splitk", "skinny_linear")
_MATMUL_NAMES += ("aten::mm", "aten::addmm")

#: decode breakdown categories, matched in order against lower-cased kernel names
#: (attention first: FA4's CuTe kernels are named ``kernel_cutlass_kernel_flash_attn...``; the
#: CuTe step's name carries its module path, ``mamba3``; Inductor's fused kernels before the
#: copies, since their names list the ops they fused, ``_to_copy`` among them)
DECODE_CATEGORIES: profiling.Categories = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("mamba3 step", ("mamba3",)),
    ("element-wise (Inductor)", ("triton_poi", "triton_red", "triton_per")),
    ("norms", ("rms", "norm")),
    ("matmuls", _MATMUL_NAMES),
    ("sampling", ("topk", "sort", "argmax", "multinomial", "exponential", "cumsum")),
    ("copies and casts", ("copy", "cat", "index", "fill")),
    ("element-wise", ("elementwise", "reduce_kernel")),
)


@dataclass
class DecodeRow:
    """One batch size: measured speed, the floor and their ratio."""

    batch: int
    prompt: int
    new_tokens: int
    ms_per_step: float
    tokens_per_s: float
    floor_ms: float
    ratio_to_floor: float
    bytes_per_step: dict
    #: a prefill of the prompts after a first one (which compiled and tuned the kernels)
    prefill_ms: float
    setup_ms: float
    graph: bool
    #: with profiling: device ms and kernel launches per token by category
    profile_ms_per_token: dict = field(default_factory=dict)
    # the longest kernels of the profiled tokens (hybridkit.profiling.KernelProfile.top),
    # milliseconds and launches per token
    top_kernels_per_token: list = field(default_factory=list)
    kernels_per_token: dict = field(default_factory=dict)
    #: the first prefill: Triton compilation and autotuning of the prompt's shapes included
    first_prefill_ms: float = 0.0


@dataclass
class LayerStepRow:
    """One Mamba-3 layer's decode step (``in_proj`` -> step -> ``out_proj``) at one batch."""

    layer: int
    batch: int
    ssm_dtype: str
    us_per_step: float
    floor_us: float
    ratio_to_floor: float
    graph: bool


@dataclass
class DecodeBench:
    device: str
    date: str
    versions: dict
    dtype: str
    ssm_dtype: str
    compiled: bool
    params: int
    copy_bandwidth_gbs: float
    rows: list[DecodeRow] = field(default_factory=list)
    drift: dict | None = None
    layer_rows: list[LayerStepRow] = field(default_factory=list)
    #: the kernel settings that differ from the defaults (``HYBRIDKIT_KERNELS`` form)
    kernels: str = "defaults"

    def to_dict(self) -> dict:
        return asdict(self)


def versions() -> dict[str, str]:
    """torch / triton / Python versions (triton absent on some CPU machines)."""
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def bench_batch(
    model: HybridLM,
    batch: int,
    *,
    prompt: int,
    new: int,
    bandwidth: float,
    ssm_dtype: torch.dtype | None = None,
    use_graph: bool | None = None,
    compile_step: bool = False,
    profile_tokens: int = 0,
) -> DecodeRow:
    """Prefill ``batch`` random prompts of ``prompt`` tokens, time ``new`` greedy steps (then
    profile ``profile_tokens`` more, untimed)."""
    device = model.embedding.weight.device
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.spec.vocab_size, (batch, prompt), generator=gen).to(device)
    t0 = time.perf_counter()
    extra = profile_tokens  # decoded after the timed tokens, under the profiler
    runner = DecodeRunner(
        model, batch, prompt + new + extra, new + extra, Sampling(temperature=0),
        ssm_dtype=ssm_dtype, use_graph=use_graph, compile_step=compile_step,
    )  # fmt: skip
    setup = time.perf_counter() - t0
    # twice: the first compiles and tunes the prefill's kernels for these shapes (seconds at a
    # new shape), the second is what a prompt of this size costs; prefill resets the cache
    start = timer_start(device)
    runner.prefill(ids)
    first_prefill = elapsed_s(device, start)
    start = timer_start(device)
    runner.prefill(ids)
    prefill = elapsed_s(device, start)
    start = timer_start(device)
    runner.decode(new)
    total = elapsed_s(device, start)
    nbytes = step_bytes(model, runner, prompt + new / 2)
    floor = sum(nbytes.values()) / bandwidth
    step = total / new
    prof = (
        profiling.profile_kernels(lambda: runner.decode(extra), device, DECODE_CATEGORIES)
        if extra
        else profiling.KernelProfile()
    )
    return DecodeRow(
        batch=batch,
        prompt=prompt,
        new_tokens=new,
        ms_per_step=step * 1e3,
        tokens_per_s=batch / step,
        floor_ms=floor * 1e3,
        ratio_to_floor=step / floor,
        bytes_per_step=nbytes,
        prefill_ms=prefill * 1e3,
        first_prefill_ms=first_prefill * 1e3,
        setup_ms=setup * 1e3,
        graph=runner.graph is not None,
        profile_ms_per_token={k: v / extra for k, v in prof.ms.items()},
        top_kernels_per_token=[
            {**k, "ms": k["ms"] / extra, "count": k["count"] / extra} for k in prof.top
        ],
        kernels_per_token={k: v / extra for k, v in prof.count.items()},
    )


def time_per_call(fn, device: torch.device, *, per_graph: int = 10, replays: int = 20) -> float:
    """Microseconds per ``fn()`` call, median over ``replays``.

    On a GPU ``per_graph`` calls are captured back to back in one CUDA graph and the graph is
    replayed (as the call runs inside a whole-model decode graph: no launch gaps from the
    host); elsewhere the calls run eagerly and are timed with the wall clock."""
    fn()  # compile and warm up outside any capture
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        graph.replay()
    times = []
    for _ in range(replays):
        start = timer_start(device)
        if device.type == "cuda":
            graph.replay()
        else:
            for _ in range(per_graph):
                fn()
        times.append(elapsed_s(device, start) * 1e6 / per_graph)
    return statistics.median(times)


def first_mamba3_layer(model: HybridLM):
    """The model's first Mamba-3 mixer (the layer ``--layer`` times), or None."""
    return next((m for m in model.modules() if isinstance(m, Mamba3)), None)


@torch.no_grad()
def layer_step_row(
    layer, batch: int, *, bandwidth: float, ssm_dtype: torch.dtype | None = None,
    per_graph: int = 10,
) -> LayerStepRow:  # fmt: skip
    """One layer's step on a random state and token: its time against the bytes it must move
    (the state read and written, ``in_proj`` / ``out_proj`` weights, the token, the projection
    and the step's output)."""
    weight = layer.in_proj.weight
    device, dtype = weight.device, weight.dtype
    state = layer.allocate_cache(batch, 1, dtype, device)
    gen = torch.Generator(device=device).manual_seed(batch)
    ssm = torch.randn(state.ssm.shape, generator=gen, device=device)
    state = state._replace(ssm=ssm.to(ssm_dtype or torch.float32))
    cache = InferenceCache(batch, 1, layers={layer.layer_idx: state})
    u = torch.randn(batch, 1, layer.in_proj.in_features, generator=gen, device=device).to(dtype)
    us = time_per_call(lambda: layer(u, cache=cache), device, per_graph=per_graph)
    nbytes = 2 * sum(_nbytes(t) for t in state) + _nbytes(u)
    nbytes += _nbytes(layer.in_proj.weight) + _nbytes(layer.out_proj.weight)
    # the projection the step reads and the (B, H * P) output it writes for out_proj
    nbytes += (
        batch * (layer.in_proj.out_features + layer.out_proj.in_features) * weight.element_size()
    )
    floor = nbytes / bandwidth * 1e6
    return LayerStepRow(
        layer=layer.layer_idx, batch=batch,
        ssm_dtype=str(state.ssm.dtype).removeprefix("torch."), us_per_step=us, floor_us=floor,
        ratio_to_floor=us / floor, graph=device.type == "cuda",
    )  # fmt: skip


@torch.no_grad()
def state_drift(model: HybridLM, *, prompt: int, tokens: int, seed: int = 0) -> dict:
    """How far a bf16 Mamba-3 state drifts from fp32 over ``tokens`` greedy steps.

    Both caches decode the *same* tokens (the fp32 run's greedy continuation, so errors do not
    compound through different choices); reported are the logits' relative error at the end and
    its maximum over the run, and the share of steps whose argmax agrees."""
    device = model.embedding.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (1, prompt), generator=gen).to(device)
    caches = [
        model.allocate_cache(1, prompt + tokens + 1, ssm_dtype=d) for d in (None, torch.bfloat16)
    ]
    logits = [model(ids, cache=c)[:, -1].float() for c in caches]
    worst, agree, err = 0.0, 0, 0.0
    for _ in range(tokens):
        nxt = logits[0].argmax(-1)
        logits = [model.step(nxt, c).float() for c in caches]
        err = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
        worst = max(worst, err)
        agree += int(torch.equal(logits[0].argmax(-1), logits[1].argmax(-1)))
    return {
        "tokens": tokens,
        "final_rel_err": err,
        "max_rel_err": worst,
        "argmax_agree": agree / max(tokens, 1),
    }


def bench_decode(
    model: HybridLM,
    *,
    batches: list[int],
    prompt: int,
    new: int,
    ssm_dtype: torch.dtype | None = None,
    drift_tokens: int = 0,
    use_graph: bool | None = None,
    compile_step: bool = False,
    layer_step: bool = False,
    profile_tokens: int = 0,
    on_row=None,
) -> DecodeBench:
    """Every batch size of ``batches`` (see the module docstring); ``on_row(result)`` after each
    one lets a caller write partial results. ``layer_step`` also times the first Mamba-3
    layer's step alone at every batch size (:func:`layer_step_row`)."""
    model.eval()
    device = model.embedding.weight.device
    bandwidth = copy_bandwidth(device)
    result = DecodeBench(
        device=device_name(device),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        versions=versions(),
        dtype=str(model.embedding.weight.dtype).removeprefix("torch."),
        ssm_dtype=str(ssm_dtype or torch.float32).removeprefix("torch."),
        compiled=compile_step,
        params=model.num_params(),
        copy_bandwidth_gbs=bandwidth / 1e9,
        kernels=changed_settings(),
    )
    for batch in batches:
        result.rows.append(
            bench_batch(
                model,
                batch,
                prompt=prompt,
                new=new,
                bandwidth=bandwidth,
                ssm_dtype=ssm_dtype,
                use_graph=use_graph,
                compile_step=compile_step,
                profile_tokens=profile_tokens,
            )  # fmt: skip
        )
        if on_row is not None:
            on_row(result)
    layer = first_mamba3_layer(model) if layer_step else None
    for batch in batches if layer is not None else ():
        result.layer_rows.append(
            layer_step_row(layer, batch, bandwidth=bandwidth, ssm_dtype=ssm_dtype)
        )
        if on_row is not None:
            on_row(result)
    if drift_tokens:
        result.drift = state_drift(model, prompt=prompt, tokens=drift_tokens)
    return result


def markdown(result: DecodeBench) -> str:
    """The report: one row per batch size, the floor's parts, the versions."""
    v = result.versions
    lines = [
        f"# Decoding throughput ({result.device}, {human_count(result.params)} parameters, "
        f"{result.dtype} weights, {result.ssm_dtype} Mamba-3 state"
        f"{', step compiled' if result.compiled else ''})",
        "",
        f"{result.date}; torch {v['torch']}, triton {v['triton']}, Python {v['python']}; "
        f"copy bandwidth measured {result.copy_bandwidth_gbs:,.0f} GB/s; kernel settings "
        f"{result.kernels}.",
        "",
        "| batch | prompt | new | tokens/s | ms per step | byte floor ms | x floor | weights MB "
        "| state MB | KV MB | prefill ms | graph |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        b = r.bytes_per_step
        lines.append(
            f"| {r.batch} | {r.prompt} | {r.new_tokens} | {r.tokens_per_s:,.0f} | "
            f"{r.ms_per_step:.3f} | {r.floor_ms:.3f} | {r.ratio_to_floor:.2f} | "
            f"{b['weights'] / 1e6:.0f} | {b['mamba3_state'] / 1e6:.1f} | {b['kv'] / 1e6:.1f} | "
            f"{r.prefill_ms:.1f} | {'yes' if r.graph else 'no'} |"
        )
    lines += (
        []
        if not result.rows
        else [
            "",
            "prefill ms: a second prefill of the same prompts; the first, which compiles and tunes "
            "the kernels for the prompt's shapes, took "
            + ", ".join(f"{r.first_prefill_ms:,.0f} ms at batch {r.batch}" for r in result.rows)
            + ".",
        ]
    )
    if result.drift:
        d = result.drift
        lines += [
            "",
            f"bf16 vs fp32 Mamba-3 state over {d['tokens']} greedy tokens (batch 1, same "
            f"tokens): logits relative error {d['final_rel_err']:.2e} at the end, "
            f"{d['max_rel_err']:.2e} at worst; argmax agrees on {d['argmax_agree']:.1%} of steps.",
        ]
    for r in result.rows:
        if not r.profile_ms_per_token:
            continue
        kernel_ms = sum(r.profile_ms_per_token.values())
        lines += [
            "",
            f"Batch {r.batch}, profiled (device time per token by kernel category; the step "
            f"measured above is {r.ms_per_step:.3f} ms, of which kernels {kernel_ms:.3f} ms, "
            f"{sum(r.kernels_per_token.values()):.0f} kernels):",
            "",
            "| category | ms per token | kernels per token | share of the step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {ms:.4f} | {r.kernels_per_token.get(name, 0):.1f} | "
            f"{ms / r.ms_per_step:.1%} |"
            for name, ms in r.profile_ms_per_token.items()
        ]
        gap = r.ms_per_step - kernel_ms
        lines.append(f"| between kernels | {gap:.4f} | | {gap / r.ms_per_step:.1%} |")
        if r.top_kernels_per_token:
            lines += ["", "Its longest kernels (ms and launches per token, share of the step):", ""]
            lines += profiling.top_kernels_table(r.top_kernels_per_token, r.ms_per_step)
        if "pdl=0" not in result.kernels.split(","):
            lines += [
                "",
                "With PDL (kernel setting `pdl`, on by default; used on Hopper and later) a "
                "kernel starts before its predecessor ends and its profiled duration includes "
                "the wait for it: these per-category times overlap, so read the kernel counts, "
                "not the times or shares (`HYBRIDKIT_KERNELS=pdl=0` for shares).",
            ]
    if result.layer_rows:
        first = result.layer_rows[0]
        lines += [
            "",
            f"One Mamba-3 layer's step (layer {first.layer}: `in_proj` -> step -> `out_proj`, "
            f"{'in a CUDA graph' if first.graph else 'eager'}):",
            "",
            "| batch | state | us per step | byte floor us | x floor |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.batch} | {r.ssm_dtype} | {r.us_per_step:.1f} | {r.floor_us:.1f} | "
            f"{r.ratio_to_floor:.2f} |"
            for r in result.layer_rows
        ]
    lines += [
        "",
        "Byte floor = (weights read once + Mamba-3 states read and written + KV read over the "
        "mean context) / copy bandwidth; see `hybridkit/decode_bench.py`.",
    ]
    return "\n".join(lines) + "\n"
