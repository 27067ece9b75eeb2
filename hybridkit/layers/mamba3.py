"""The Mamba-3 mixer (SISO or MIMO) exactly as ``docs/mamba3.md`` section 1 describes it.

Data flow: ``in_proj`` -> split [z | x | B | C | dd_dt | dd_A | trap | angles] -> scalar gates
(dt, A, lambda) -> BCNorm on B and C -> SSM core (biases, data-dependent rotation, trapezoid
recurrence, D skip; in :mod:`hybridkit.kernels.mamba3.ops`) -> output norm / SiLU(z) gate / MIMO
down-projection -> ``out_proj``.

Two ablation switches change the math for studies: ``rope: false`` removes the data-dependent
rotation (a real-valued SSM; the angle columns disappear from ``in_proj``) and ``trapezoid:
false`` uses exponential-Euler (lambda = 1, Mamba-2 style; the trap columns disappear).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from hybridkit.cache import InferenceCache
from hybridkit.kernels.config import current_config, fold_norm_weight_enabled
from hybridkit.kernels.mamba3 import ops
from hybridkit.kernels.mamba3.gates import heavy_tail, scalar_gates  # noqa: F401 (re-export)
from hybridkit.kernels.mamba3.output import mimo_output, plan_mimo_output, tile
from hybridkit.kernels.mamba3.state import Mamba3State
from hybridkit.kernels.mamba3.step import StepInputs, StepWeights, gated_output
from hybridkit.kernels.norm import projection_dtype
from hybridkit.layers.base import Layer, LayerSpec
from hybridkit.layers.linear import Linear
from hybridkit.layers.norm import GatedRMSNorm, RMSNorm
from hybridkit.registry import register_layer

OutprojNorm = Literal["none", "grouped_pregate", "pregate", "postgate", "grouped_postgate"]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    Autograd assembles ``in_proj``'s output gradient with one ``cat`` of the split's pieces.
    The gradients of the per-head gate columns (dt, and trap) come back from the scan in its
    (B, H, L) layout, transposed views in (B, L, H). CUDA's ``cat`` takes its vectorized
    kernel only when every input is contiguous (and each row piece a multiple of 16 bytes), so
    one such piece sent the whole ``cat``, some 290 MB per layer at 4 x 4,096 tokens, down the
    strided one (0.21 ms a layer on an H100, ``benchmarks/results/train_norms_h100.md``).
    Copying the small pieces first (1 MB each at that size) keeps every input contiguous.
    Eager only: under ``torch.compile`` Inductor writes the ``cat`` itself."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 (autograd's signature)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad.contiguous()


def _no_decay(p: nn.Parameter) -> nn.Parameter:
    p._no_weight_decay = True  # read by the optimizer builder
    return p


class Mamba3(Layer):
    """Mamba-3 mixer; ``mimo_rank == 1`` is SISO (interleaved rotary pairs), R > 1 is MIMO."""

    residual_out_names = ("out_proj",)
    accepts_pending_norm = True  # forward reads u's shape / dtype and projects it once

    def __init__(self, spec: Mamba3Spec, *, d_model: int, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.d_inner = spec.d_inner(d_model)
        self.headdim, self.d_state = spec.headdim, spec.d_state
        self.nheads = self.d_inner // spec.headdim
        self.ngroups, self.rank = spec.ngroups, spec.mimo_rank
        self.n_angles = spec.n_angles()
        self.pairing = "interleaved" if self.rank == 1 else "halves"
        h, n, g, r = self.nheads, self.d_state, self.ngroups, self.rank
        n_trap = h if spec.trapezoid else 0
        self.split_sizes = [
            self.d_inner,
            self.d_inner,
            n * g * r,
            n * g * r,
            h,
            h,
            n_trap,
            self.n_angles,
        ]
        self.in_proj = Linear(d_model, sum(self.split_sizes), bias=False)

        # dt_bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max], floored
        # (docs/mamba3.md 1.9).
        u = torch.rand(h)
        dt0 = torch.exp(u * (math.log(spec.dt_max) - math.log(spec.dt_min)) + math.log(spec.dt_min))
        dt0 = dt0.clamp(min=spec.dt_init_floor)
        self.dt_bias = _no_decay(nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0))))
        self.B_bias = _no_decay(nn.Parameter(torch.ones(h, r, n)))
        self.C_bias = _no_decay(nn.Parameter(torch.ones(h, r, n)))
        self.B_norm = RMSNorm(n, eps=spec.norm_eps)
        self.C_norm = RMSNorm(n, eps=spec.norm_eps)
        if r > 1:
            self.mimo_x = nn.Parameter(torch.full((h, r, spec.headdim), 1.0 / r))
            self.mimo_z = nn.Parameter(torch.ones(h, r, spec.headdim))
            self.mimo_o = nn.Parameter(torch.full((h, r, spec.headdim), 1.0 / r))
        else:
            self.mimo_x = self.mimo_z = self.mimo_o = None
        self.D = _no_decay(nn.Parameter(torch.ones(h)))
        norm = spec.outproj_norm
        if norm == "none":
            self.norm = None
        else:
            group = spec.headdim if norm.startswith("grouped") else self.d_inner
            self.norm = GatedRMSNorm(
                self.d_inner, group, norm_before_gate=norm.endswith("pregate"), eps=spec.norm_eps
            )
        self.out_proj = Linear(self.d_inner, d_model, bias=False)

    # ------------------------------------------------------------------------------------------
    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        h, p, n = self.nheads, self.headdim, self.d_state
        return {
            "angle": (batch, h, self.n_angles),
            "ssm": (batch, h, p, n),
            "k": (batch, self.rank, h, n),
            "v": (batch, h, p),
        }

    def allocate_cache(
        self, batch: int, max_seqlen: int, dtype: torch.dtype, device: torch.device | None
    ) -> Mamba3State:
        return Mamba3State.zeros(
            batch,
            self.nheads,
            self.headdim,
            self.d_state,
            self.n_angles,
            self.rank,
            dtype=dtype,
            device=device,
        )

    def backends(
        self, device: torch.device | str, dtype: torch.dtype, length: int
    ) -> dict[str, str]:
        """The backend for a call of ``length`` tokens, as the dispatch point decides: the
        decode step for one token (with a cache), else the scan."""
        if length == 1:
            plan = ops.plan_step(self.spec.backend, device=device, dtype=dtype, rank=self.rank)
            shown = plan.describe()
            split = current_config().step_split
            if plan.backend == "triton" and split > 1:
                shown += f" (step_split={split}: {split} programs per head, then a finish launch)"
            return {"mamba3 step": shown}
        plan = ops.plan_scan(
            self.spec.backend,
            device=device,
            dtype=dtype,
            length=length,
            rank=self.rank,
            d_state=self.d_state,
            headdim=self.headdim,
            chunk_size=self.spec.chunk_size,
            pairing=self.pairing,
            has_mimo_x=self.mimo_x is not None,
        )
        shown = {"mamba3 scan": plan.describe()}
        if self.mimo_o is not None:
            opts = self._mimo_output_options()
            chosen, why = plan_mimo_output(
                opts["backend"], device=device, dtype=dtype, rank=self.rank,
                group_size=opts["group_size"],
            )  # fmt: skip
            shown["mamba3 MIMO output"] = f"{chosen} ({why})" if why else chosen
        return shown

    def gates(self, dd_dt: torch.Tensor, dd_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dt = softplus(dd_dt + dt_bias) and A*dt, in float32 (float64 for a float64 model)."""
        return scalar_gates(dd_dt, dd_a, self.dt_bias, self.spec.a_activation, self.spec.a_floor)

    def forward(
        self,
        u: torch.Tensor,
        *,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, length, _ = u.shape
        h, p, n, g, r = self.nheads, self.headdim, self.d_state, self.ngroups, self.rank
        state = None
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("packed sequences (cu_seqlens) cannot be combined with a cache")
            state = cache.layers.get(self.layer_idx)
        proj = self.in_proj(u)
        if state is not None and length == 1:
            return self.out_proj(self._step(proj[:, 0], state).reshape(b, 1, h * p))
        z, x, bk, cq, dd_dt, dd_a, trap, ang = proj.split(self.split_sizes, dim=-1)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            dd_dt, dd_a, trap, ang = (_ContiguousGrad.apply(t) for t in (dd_dt, dd_a, trap, ang))
        z, x = z.reshape(b, length, h, p), x.reshape(b, length, h, p)
        k = self.B_norm(bk.reshape(b, length, r, g, n))
        q = self.C_norm(cq.reshape(b, length, r, g, n))
        dt, adt = self.gates(dd_dt, dd_a)
        dt, adt = dt.transpose(1, 2), adt.transpose(1, 2)
        trap = trap.transpose(1, 2) if self.spec.trapezoid else None
        angles = ang[:, :, None, :].expand(b, length, h, self.n_angles) if self.n_angles else None
        y, final = ops.mamba3_scan(
            q,
            k,
            x,
            adt,
            dt,
            trap,
            self.C_bias,
            self.B_bias,
            angles,
            self.D,
            self.mimo_x,
            pairing=self.pairing,
            initial_state=state,
            cu_seqlens=cu_seqlens,
            chunk_size=self.spec.chunk_size,
            backend=self.spec.backend,
            return_state=cache is not None,
        )
        if cache is not None:
            if state is None:
                cache.layers[self.layer_idx] = Mamba3State(
                    final.angle, final.ssm, final.k.to(u.dtype), final.v.to(u.dtype)
                )
            else:  # in place: the cache's tensors stay the ones a captured decode graph reads
                for dst, src in zip(state, final, strict=True):
                    dst.copy_(src)
        return self.project_out(y, z, u.dtype)

    def project_out(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``out_proj`` of :meth:`output` (y (B, L, R, H, P), z (B, L, H, P)), in ``dtype``.

        Under the kernel setting ``fold_norm_weight``, where a SISO layer's gated norm runs as
        the torch formula (``torch.compile``, CPU), the norm's weight scales ``out_proj``'s
        columns instead of the activations, ``W (w * o) = (W diag(w)) o``: autograd then forms
        the weight's gradient from the two (d_model, d_inner) matrices rather than by a
        reduction over every token, which Inductor ran as an extra pass over y, z and the
        gradient (``docs/kernels.md``, "Norms")."""
        norm, proj = self.norm, self.out_proj
        # the dtype out_proj computes in (under autocast not ``dtype``): the output is stored
        # in it once instead of in float32 and cast again (``projection_dtype``)
        dtype = projection_dtype(y, dtype)
        fold = (
            self.mimo_o is None
            and norm is not None
            and fold_norm_weight_enabled()
            and norm.runs_formula(y)
        )
        if not fold:
            return proj(self.output(y, z, dtype))
        b, length, _, h, p = y.shape
        o = norm.unweighted(y.reshape(b, length, h * p), z.reshape(b, length, h * p))  # R is 1
        weight = proj.weight * norm.weight.to(proj.weight.dtype)
        return F.linear(o.to(dtype), weight, proj.bias)

    def step_weights(self) -> StepWeights:
        """This layer's parameters and options as the decode step reads them."""
        return StepWeights(
            dt_bias=self.dt_bias,
            B_bias=self.B_bias,
            C_bias=self.C_bias,
            B_norm=self.B_norm.weight,
            C_norm=self.C_norm.weight,
            D=self.D,
            mimo_x=self.mimo_x,
            mimo_z=self.mimo_z,
            mimo_o=self.mimo_o,
            a_activation=self.spec.a_activation,
            a_floor=self.spec.a_floor,
            norm_eps=self.spec.norm_eps,
            pairing=self.pairing,
            out_norm=self.norm.weight if self._kernel_norm() else None,
            out_norm_mode=self.spec.outproj_norm if self._kernel_norm() else "none",
        )

    def _kernel_norm(self) -> bool:
        """Whether the decode step applies the output norm itself (a per-head one)."""
        return self.norm is not None and self.spec.outproj_norm.startswith("grouped")

    def _step(self, proj: torch.Tensor, state: Mamba3State) -> torch.Tensor:
        """One token per sequence, ``proj`` (B, width) from ``in_proj`` -> (B, H, P) gated.

        The split stays a set of views (no copies, no dtype changes) and the fused step updates
        ``state`` in place and applies the gate and a per-head output norm; only a norm over
        the whole inner width adds torch ops after it."""
        b, h, p, n, g, r = (
            proj.shape[0],
            self.nheads,
            self.headdim,
            self.d_state,
            self.ngroups,
            self.rank,
        )
        z, x, bk, cq, dd_dt, dd_a, trap, ang = proj.split(self.split_sizes, dim=-1)
        z = z.view(b, h, p)
        gated = self.norm is None or self._kernel_norm()
        inputs = StepInputs(
            x=x.view(b, h, p),
            z=z if gated else None,
            bk=bk.view(b, r, g, n),
            cq=cq.view(b, r, g, n),
            dd_dt=dd_dt,
            dd_a=dd_a,
            trap=trap if self.spec.trapezoid else None,
            angles=ang if self.n_angles else None,
        )
        out = ops.mamba3_step(inputs, state, self.step_weights(), backend=self.spec.backend)
        if gated:
            return out
        return self.output(out[:, None], z[:, None]).to(proj.dtype)[:, 0]

    def output(
        self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Gate / norm / MIMO down-projection: y (B, L, R, H, P), z (B, L, H, P) -> (B, L, H*P),
        in ``dtype`` (default: as computed, float32 for the norm).

        MIMO goes through its own dispatch point (one fused kernel pair on CUDA); SISO is the
        plain gate or the gated norm (which stores ``dtype`` itself)."""
        b, length, r, h, p = y.shape
        if self.mimo_o is not None:
            out = mimo_output(
                y,
                z,
                self.mimo_z,
                self.mimo_o,
                None if self.norm is None else self.norm.weight,
                **self._mimo_output_options(),
            )
        elif self.norm is None:
            out = gated_output(y, z, None, None).reshape(b, length, h * p)
        else:
            # R is 1: a view of y (indexing y[:, :, 0] instead made autograd zero-fill a
            # buffer of y's size and copy the gradient into it, per layer and step)
            y2, z2 = y.reshape(b, length, h * p), z.reshape(b, length, h * p)
            return self.norm(y2, z2, dtype)
        return out if dtype is None else out.to(dtype)

    def _mimo_output_options(self) -> dict:
        """Norm mode, group, eps and backend of :func:`~hybridkit.kernels.mamba3.output.
        mimo_output` for this layer (the scan's ``reference`` / ``chunked`` settings, which ask
        for no kernels, give its torch path; ``triton`` its kernels where they fit)."""
        norm = self.norm
        group = self.headdim if norm is None else norm.group_size  # no norm: tiles of a head
        backend = {"reference": "torch", "chunked": "torch"}.get(self.spec.backend, "auto")
        if self.spec.backend == "triton":  # the kernels where they fit this layer, else torch
            backend = "triton" if tile(self.rank, group) is not None else "torch"
        return dict(
            group_size=group,
            eps=self.spec.norm_eps if norm is None else norm.eps,
            mode="none" if norm is None else ("pregate" if norm.norm_before_gate else "postgate"),
            backend=backend,
        )


#: bound of the rate-like options (``a_floor``, ``dt_*``): far above any that trains (a step's
#: decay exp(-A dt) is 0 in float32 long before), and below float32's overflow, where they
#: failed as a RuntimeError at the first float32 conversion instead of a recipe error
MAX_RATE = 1e4


@register_layer(Mamba3)
class Mamba3Spec(LayerSpec):
    """Mamba-3 mixer options; defaults are the paper's (docs/mamba3.md 1.1)."""

    kind: Literal["mamba3"] = "mamba3"
    d_state: int = Field(default=128, gt=0, le=4096, description="N, the state size per head")
    headdim: int = Field(default=64, gt=0, le=4096, description="P, the value head dim")
    expand: float = Field(default=2.0, gt=0, le=64, description="d_inner = int(expand * d_model)")
    ngroups: int = Field(default=1, gt=0, le=4096, description="G, number of B/C groups (GQA-like)")
    mimo_rank: int = Field(default=1, le=64, description="R; 1 = SISO, > 1 = MIMO")
    rope_fraction: float = Field(default=0.5, description="share of d_state rotated (0.5 or 1)")
    rope: bool = Field(default=True, description="data-dependent rotation; false = real-valued SSM")
    trapezoid: bool = Field(
        default=True, description="exp-trapezoidal; false = exp-Euler (Mamba-2)"
    )
    outproj_norm: OutprojNorm = "none"
    a_activation: Literal["heavy_tail", "softplus"] = "heavy_tail"
    a_floor: float = Field(default=1e-4, gt=0, le=MAX_RATE)
    dt_min: float = Field(default=1e-3, gt=0, le=MAX_RATE)
    dt_max: float = Field(default=0.1, gt=0, le=MAX_RATE)
    dt_init_floor: float = Field(default=1e-4, gt=0, le=MAX_RATE)
    norm_eps: float = Field(default=1e-5, gt=0, le=1.0)
    chunk_size: int = Field(
        default=64, gt=0, le=4096, description="chunk length of the prefill scan"
    )
    backend: str = "auto"

    @field_validator("mimo_rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"mimo_rank must be >= 1 (1 = SISO), got {value}")
        return value

    @field_validator("rope_fraction")
    @classmethod
    def _rope_fraction(cls, value: float) -> float:
        if value not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1, got {value}")
        return value

    @field_validator("chunk_size")
    @classmethod
    def _pow2(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(
                f"chunk_size must be a power of two (e.g. 16, 32, 64, 128), got {value}"
            )
        return value

    @field_validator("d_state")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"d_state must be even (rotation works on pairs), got {value}")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in ops.BACKENDS:
            raise ValueError(f"unknown backend {value!r}; allowed: {', '.join(ops.BACKENDS)}")
        return value

    def d_inner(self, d_model: int) -> int:
        return int(self.expand * d_model)

    def n_angles(self) -> int:
        """S, the rotary angles per token (docs/mamba3.md 1.1); 0 when the rotation is off."""
        if not self.rope:
            return 0
        s0 = int(self.d_state * self.rope_fraction)
        return (s0 - s0 % 2) // 2

    def check(self, d_model: int) -> list[tuple[str, str]]:
        problems = []
        d_inner = self.d_inner(d_model)
        if d_inner < self.headdim:  # 0 heads passes the check below and builds an empty layer
            problems.append(
                (
                    "expand",
                    f"d_inner = int(expand * d_model) = int({self.expand} * {d_model}) = "
                    f"{d_inner} is below headdim {self.headdim}, which leaves no head; "
                    f"allowed: expand >= headdim / d_model = {self.headdim / d_model:g} "
                    "(or a smaller headdim)",
                )
            )
            return problems
        if d_inner % self.headdim:
            problems.append(
                (
                    "headdim",
                    f"d_inner = int(expand * d_model) = {d_inner} is not a multiple of "
                    f"headdim {self.headdim}; allowed: divisors of {d_inner}",
                )
            )
            return problems
        nheads = d_inner // self.headdim
        if nheads % self.ngroups:
            problems.append(
                (
                    "ngroups",
                    f"{nheads} heads are not a multiple of ngroups {self.ngroups}; "
                    f"allowed: divisors of {nheads}",
                )
            )
        if self.rope and self.n_angles() == 0:
            problems.append(("d_state", f"d_state {self.d_state} leaves no rotary pair; use >= 4"))
        if self.dt_min > self.dt_max:
            problems.append(("dt_min", f"dt_min {self.dt_min} exceeds dt_max {self.dt_max}"))
        if self.backend == "triton":
            problems += self._triton_problems()
        return problems

    def _triton_problems(self) -> list[tuple[str, str]]:
        """What ``backend: triton`` (the kernels, no fallback) cannot run, found when the recipe
        is read rather than as a kernel error at the first forward; ``auto`` would fall back."""
        from hybridkit.kernels.mamba3.chunkscan.scan import TRITON_RANKS, chunk_height_reason

        hint = "; or backend auto, which falls back to torch where the kernels cannot run"
        if self.mimo_rank not in TRITON_RANKS:
            return [("mimo_rank", f"backend triton runs ranks {list(TRITON_RANKS)}{hint}")]
        problems = []
        why = chunk_height_reason(self.chunk_size, self.mimo_rank)
        if why is not None:
            problems.append(("chunk_size", f"backend triton: {why}{hint}"))
        for key, value in (("d_state", self.d_state), ("headdim", self.headdim)):
            if value < 4 or value & (value - 1):
                why = (
                    f"backend triton needs a power of two >= 4 (>= 32 where it runs on a GPU), "
                    f"got {value}"
                )
                problems.append((key, why + hint))
        return problems

    def summary(self, d_model: int | None = None) -> str:
        parts = [f"N={self.d_state}", f"P={self.headdim}"]
        parts.append("SISO" if self.mimo_rank == 1 else f"MIMO R={self.mimo_rank}")
        if self.ngroups != 1:
            parts.append(f"G={self.ngroups}")
        if self.outproj_norm != "none":
            parts.append(f"norm={self.outproj_norm}")
        if not self.rope:
            parts.append("rope=off")
        if not self.trapezoid:
            parts.append("trapezoid=off")
        return " ".join(parts)
