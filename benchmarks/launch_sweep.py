"""What the kernel launch sweeps share (``benchmarks/mimo_output.py``, ``benchmarks/norm.py``).

A sweep sets a kernels module's launch constants (tile elements, warps, programs per SM), checks
the kernel's results against the torch formula at that launch and only then times it: on the
H100 the MIMO output's forward went from 1.25 to 0.158 ms by its launch alone
(``benchmarks/results/mimo_output_launch_h100.md``), and a launch that miscompiles must show as
wrong, not as fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

import torch

#: relative error (norm of the difference over the norm) above which a launch is wrong
TOLERANCE = 1e-2


def median_ms(fn: Callable[[], object]) -> float:
    """Median of ``triton.testing.do_bench`` (L2 cleared between runs), in ms."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The largest relative error over paired tensors (float32 norms)."""
    return max(
        ((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
        for g, w in zip(got, want, strict=True)
    )


def timed_if_right(
    results: Callable[[], Sequence[torch.Tensor]],
    reference: Sequence[torch.Tensor],
    work: Callable[[], object],
    *,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> float | str:
    """``work``'s time (``timer``, default :func:`median_ms`) when ``results()`` agrees with
    ``reference`` within ``TOLERANCE``, else the string ``"wrong (relative error E)"`` (kept in
    the JSON like a time)."""
    err = rel_err(results(), reference)
    if err >= TOLERANCE:
        return f"wrong (relative error {err:.2g})"
    return (timer or median_ms)(work)


@contextmanager
def launch(module: ModuleType, **settings: int) -> Iterator[None]:
    """Set ``module``'s launch constants for the block, restoring them afterwards."""
    saved = {name: getattr(module, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


#: the kernel modules whose launch constants ``--launch`` may set (``benchmarks/decode.py``,
#: ``benchmarks/train_throughput.py``), by the short name a spec uses
LAUNCH_MODULES = {
    "linear": "hybridkit.kernels.linear.triton_kernels",
    "norm": "hybridkit.kernels.norm.triton_kernels",
    "mimo_output": "hybridkit.kernels.mamba3.output.triton_kernels",
    "step": "hybridkit.kernels.mamba3.step.triton_step",
    "sampling": "hybridkit.kernels.sampling",
}


def set_launches(specs: Sequence[str]) -> dict[str, dict[str, int]]:
    """Set launch constants from ``--launch`` specs, ``MODULE:NAME=VALUE[,NAME=VALUE...]``
    (e.g. ``linear:GEMV_BLOCK_N=8,WARPS=4``: a former default timed against the current one in
    the same GPU call, each in its own process); returns what was set, for the report. A bad
    module, name or value is a ``SystemExit`` naming the allowed ones."""
    import importlib

    applied: dict[str, dict[str, int]] = {}
    for spec in specs:
        short, _, pairs = spec.partition(":")
        if short not in LAUNCH_MODULES:
            raise SystemExit(f"--launch {spec!r}: the module must be one of {list(LAUNCH_MODULES)}")
        module = importlib.import_module(LAUNCH_MODULES[short])
        allowed = sorted(
            n
            for n, v in vars(module).items()
            if n.isupper() and type(v) is int and n[0] != "_" and not n.startswith("MAX_")
        )
        for pair in filter(None, pairs.split(",")):
            name, _, value = pair.partition("=")
            if name not in allowed or not value.lstrip("-").isdigit():
                raise SystemExit(
                    f"--launch {spec!r}: {pair!r} must be NAME=INTEGER with NAME one of {allowed}"
                )
            setattr(module, name, int(value))
            applied.setdefault(short, {})[name] = int(value)
    return applied


def cell(v: object) -> str:
    """A report cell: a time to three decimals, anything else (a "wrong ..." note) as is."""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def sweep_line(record: dict, prefix: str, head: str) -> str:
    """One report line: every ``record`` entry whose key starts with ``prefix`` (the rest of the
    key names the launch: ``tile2048_w2`` -> ``2048 / 2``), after ``head``."""
    cells = [
        k[len(prefix) :].replace("tile", "").replace("_w", " / ").replace("_p", " / ")
        + ": "
        + cell(v)
        for k, v in record.items()
        if k.startswith(prefix)
    ]
    return head + ": " + ", ".join(cells)


def sweep_launches(
    rec: dict,
    module: ModuleType,
    fwd: Callable[[], torch.Tensor],
    fwd_reference: Sequence[torch.Tensor],
    fwd_bwd: Callable[[], Sequence[torch.Tensor]],
    grad_reference: Sequence[torch.Tensor],
    fwd_sweep: Sequence[tuple[int, int]],
    bwd_sweep: Sequence[tuple[int, int, int]],
) -> None:
    """Into ``rec``: ``ours_fwd_ms_tileE_wW`` for each forward (tile elements, warps) and
    ``ours_fb_ms_tileE_wW_pP`` for each backward (tile elements, warps, programs per SM) of
    ``module``'s ``FWD_*`` / ``BWD_*`` constants, the other direction at its default; each launch
    is checked against the references before it is timed."""
    for elements, warps in fwd_sweep:
        with launch(module, FWD_TILE_ELEMENTS=elements, FWD_WARPS=warps):
            key = f"ours_fwd_ms_tile{elements}_w{warps}"
            rec[key] = timed_if_right(lambda: (fwd(),), fwd_reference, fwd)
    for elements, warps, per_sm in bwd_sweep:
        knobs = dict(BWD_TILE_ELEMENTS=elements, BWD_WARPS=warps, BWD_PROGRAMS_PER_SM=per_sm)
        with launch(module, **knobs):
            key = f"ours_fb_ms_tile{elements}_w{warps}_p{per_sm}"
            rec[key] = timed_if_right(fwd_bwd, grad_reference, fwd_bwd)


def sweep_lines(record: dict) -> list[str]:
    """The report's two sweep lines (forward, forward + backward) for :func:`sweep_launches`."""
    head = "Ours at the first shape by launch (tile elements / warps{}), {} ms{}"
    fb_head = head.format(" / programs per SM", "forward + backward", " (forward at default)")
    return [
        "",
        sweep_line(record, "ours_fwd_ms_", head.format("", "forward", "")),
        "",
        sweep_line(record, "ours_fb_ms_", fb_head),
    ]


def measure_cases(
    cases: Sequence[tuple], measure: Callable[[int, tuple, float], dict]
) -> tuple[torch.device, float, list[dict]]:
    """(device, copy bandwidth measured now, one record per case): ``measure(i, case, bw)`` for
    each case, each record printed as it comes (a call cut short keeps what it printed), Dynamo
    reset between cases (each compiles its own Inductor variant)."""
    from hybridkit.decode_bench import copy_bandwidth

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    records = []
    for i, case in enumerate(cases):
        records.append(measure(i, case, bw))
        print(json.dumps(records[-1]), flush=True)
        torch._dynamo.reset()
    return dev, bw, records


def write_results(out: str | None, lines: list[str], env: dict, bw: float, rows: list) -> None:
    """Close the report with the run's environment, print it and, with ``out``, write
    ``out.md`` and ``out.json`` (bandwidth, environment, rows)."""
    lines = lines + [
        "",
        f"{env.get('device')}, measured {env.get('date')}, torch {env.get('torch')}, "
        f"Triton {env.get('triton')}, commit {env.get('git_commit')}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out + ".json", "w") as f:
            json.dump({"bandwidth_bytes_per_s": bw, "environment": env, "rows": rows}, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(text)
