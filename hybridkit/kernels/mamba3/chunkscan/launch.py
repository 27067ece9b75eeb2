"""How the SISO kernels are launched: tuned launch options, chunk-slot plans, argument layout.

Nothing here reads the environment at import: launch options come from
:func:`hybridkit.kernels.config.current_config` at every launch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hybridkit.compat import interpreting
from hybridkit.kernels.config import current_config
from hybridkit.kernels.mamba3.chunkscan import backward as bwd_kernels
from hybridkit.kernels.mamba3.chunkscan import forward as fwd_kernels

# A launch candidate: warps, (warps, register cap per thread) or (warps, cap or None, stages).
Candidate = int | tuple[int, int] | tuple[int, int | None, int]


class TunedKernel:
    """A Triton kernel whose launch options (warps, optional register cap) are chosen once per
    specialisation by timing each candidate, when ``autotune`` is on.

    ``triton.autotune`` does the same, but its wrapper costs ~75 us of host time per launch (it
    rebuilds a dict of all ~50 arguments on every call), a quarter of a batch-1 forward, which
    is host-bound. Here a launch after the first one for a key costs a tuple and a dict lookup.
    The key is the constexpr flags named in ``keys`` plus the dtypes of the tensor arguments
    (never batch or length). Candidates are timed on the first launch for a key, never during
    CUDA graph capture (there the default runs and nothing is cached). Only for kernels that
    write fresh outputs: each candidate runs several times.

    The register cap matters because occupancy moves in steps: a 4-warp program at 169-255
    registers per thread leaves room for two per SM, at <= 168 for three, so a cap that costs a
    few spilled bytes can win. With ``autotune`` off the kernel runs ``default``, the candidate
    measured fastest at the benchmark shape (``docs/kernels.md``).
    """

    def __init__(
        self, fn, keys: list[str], candidates: tuple[Candidate, ...], default: Candidate
    ) -> None:
        self.fn, self.keys = fn, tuple(keys)
        self.candidates = tuple(_as_triple(c) for c in candidates)
        self.default = _as_triple(default)
        self.best: dict[tuple, dict] = {}

    def __getitem__(self, grid) -> Callable[..., object]:
        def launch(*args, **kw):
            return self.fn[grid](*args, **self._options(grid, args, kw), **kw)

        return launch

    def _options(self, grid, args, kw) -> dict:
        if interpreting():
            return dict(num_warps=1, num_stages=1)
        if not current_config().tunes:
            return launch_options(*self.default)
        key = tuple(kw[k] for k in self.keys)
        key += tuple(a.dtype for a in args if isinstance(a, Tensor))
        best = self.best.get(key)
        if best is not None:  # the common case: one lookup per launch, nothing else
            return best
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return launch_options(*self.default)  # no timing runs inside a graph capture
        times: dict[tuple, float] = {}
        failure: Exception | None = None
        for c in self.candidates:
            try:
                times[c] = _median_ms(lambda c=c: self.fn[grid](*args, **launch_options(*c), **kw))
            except _LAUNCH_ERRORS as err:  # e.g. too much shared memory for 3 stages: skip it
                failure = err
        if not times:
            raise RuntimeError(f"{self.fn}: no launch candidate compiled") from failure
        self.best[key] = launch_options(*min(times, key=times.get))
        return self.best[key]


def _launch_errors() -> tuple[type[Exception], ...]:
    """What a launch candidate may fail with and still leave the others worth timing: the
    compiler running out of shared memory or registers, a PTX or compile error."""
    import triton.runtime.errors as runtime
    from triton.compiler.errors import CompilationError

    # PTXASError is not in every Triton we support
    found = (getattr(runtime, n, None) for n in ("OutOfResources", "PTXASError"))
    return (*(e for e in found if e is not None), CompilationError)


_LAUNCH_ERRORS = _launch_errors()


def _as_triple(candidate: Candidate) -> tuple[int, int | None, int]:
    if not isinstance(candidate, tuple):
        return candidate, None, 1
    return candidate if len(candidate) == 3 else (*candidate, 1)


def _median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def launch_options(warps: int, maxnreg: int | None = None, stages: int = 1) -> dict:
    """Triton launch keywords. The chunk kernels have no loop, so software pipelining
    (``num_stages``) has nothing to overlap there: 1 unless a candidate says otherwise."""
    opts = dict(num_warps=1 if interpreting() else warps, num_stages=1)
    if not interpreting():
        opts["num_stages"] = stages
        if maxnreg:
            opts["maxnreg"] = maxnreg
    return opts


def backward_chunk_options(kernel: str) -> dict:
    """Launch options of the backward chunk kernels, ``kernel`` "qk" (the q and k kernels) or
    "x": a fixed warp count (``bwd_x_warps`` for the x kernel when set, else ``bwd_warps``) and
    an optional register cap (``bwd_maxnreg``). Four warps beat eight for SISO: both fill the
    255 registers, and two 4-warp programs per SM overlap each other's load latency."""
    cfg = current_config()
    if kernel == "x":
        return launch_options(cfg.bwd_x_warps or cfg.bwd_warps, cfg.bwd_maxnreg)
    if kernel == "qk":
        return launch_options(cfg.bwd_warps, cfg.bwd_maxnreg)
    raise ValueError(f"kernel {kernel!r}: allowed 'qk' or 'x'")


def qk_heads_per_program(heads_per_group: int) -> int:
    """Heads each program of the q and k backward kernels sums (``qk_heads``, as far as it
    divides the heads per group: a program's heads must share their group's q / k)."""
    return math.gcd(current_config().qk_heads, heads_per_group)


_GATE_FLAGS = ["C", "P", "N2", "NA", "HAS_TRAP", "HAS_ANG", "VARLEN", "FAST", "R", "HALVES"]
FWD_STATE = TunedKernel(
    fwd_kernels._fwd_state_kernel, _GATE_FLAGS, (4, (4, 168), (4, 128), 8, 16), (4, 128)
)
FWD_OUT = TunedKernel(
    fwd_kernels._fwd_out_kernel,
    ["C", "P", "N2", "NA", "HAS_ANG", "VARLEN", "FAST", "HAS_D", "R", "HALVES"],
    (4, (4, 168), 8),
    (4, 168),
)
BWD_DSTATE = TunedKernel(
    bwd_kernels._bwd_dstate_kernel, _GATE_FLAGS, (4, (4, 168), 8, 16), (4, 168)
)


class ChunkPlan:
    """Chunk slots of a call: ``B * ceil(L / C)`` in order, or per packed sequence.

    Packed calls get two small int64 tables on the device: per chunk slot (sequence, first
    token, end token, sequence end) and per sequence (first slot, chunk count)."""

    def __init__(self, B: int, L: int, C: int, cu: Tensor | None, device) -> None:
        self.varlen = cu is not None
        self.chunk_table = self.seq_table = None
        if cu is None:
            self.nseq = B
            self.chunks_per_seq = -(-L // C)
            self.nchunks = B * self.chunks_per_seq
            return
        bounds = [int(b) for b in cu.tolist()]
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        self.nseq, self.chunks_per_seq = len(lengths), 1
        chunks, seqs = [], []
        for i, (start, n) in enumerate(zip(bounds[:-1], lengths, strict=True)):
            nc = -(-n // C)
            seqs.append([len(chunks), nc])
            chunks += [
                [i, start + c * C, min(start + (c + 1) * C, start + n), start + n]
                for c in range(nc)
            ]
        self.nchunks = len(chunks)

        def table(rows, width):
            return torch.tensor(rows or [[0] * width], dtype=torch.int64).to(device)

        self.chunk_table, self.seq_table = table(chunks, 4), table(seqs, 2)

    def row_tiles(self, H: int, N: int, P: int, device) -> int:
        """Row tiles of the element-wise passes: enough programs to fill the GPU, each still
        moving >= 512 state elements per chunk."""
        sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 2
        )
        nt = 1
        while nt < P and self.nseq * H * nt < 4 * sms and (P // (2 * nt)) * N >= 512:
            nt *= 2
        return nt


def state_slots(B: int, L: int, C: int, nseq: int, varlen: bool) -> int:
    """Slots of the per-chunk state buffer. Packed calls use the static bound ``L // C + nseq``
    (each sequence wastes at most one partial chunk), so the size never depends on the data
    and the fake implementation can compute it."""
    return (L // C + nseq) if varlen else B * (-(-L // C))


def strides(t: Tensor | None, dims=(0, 1, 2)) -> tuple[int, ...]:
    """Strides of ``t`` along ``dims``; zeros for an absent optional input."""
    return (0,) * len(dims) if t is None else tuple(t.stride(d) for d in dims)


def angles_tokens_last(angles: Tensor | None) -> tuple[Tensor | None, tuple[int, int, int]]:
    """The (B, L, H, S) angles with tokens contiguous, and their (batch, pair, head) strides.

    The kernels scan the angles over the tokens of a chunk; Triton scans cheaply only along a
    tile's contiguous axis. Angles shared by all heads (stride 0, as the layer passes them)
    become one (B, S, L) copy (L * S elements per sequence, tiny next to q / k / v)."""
    if angles is None:
        return None, (0, 0, 0)
    if angles.shape[2] == 1 or angles.stride(2) == 0:
        t = angles[:, :, 0].transpose(1, 2).contiguous()  # (B, S, L)
        return t, (t.stride(0), t.stride(1), 0)
    t = angles.permute(0, 2, 3, 1).contiguous()  # (B, H, S, L)
    return t, (t.stride(0), t.stride(2), t.stride(1))


def angle_width(N2: int, S: int) -> int:
    """NA, the width of the kernels' angle tiles: the rotated pairs rounded up to N2 / 2 or N2
    (rope_fraction 0.5 rotates half the pairs; the angle pipeline then skips the other half)."""
    return N2 // 2 if N2 >= 2 and S <= N2 // 2 else N2
