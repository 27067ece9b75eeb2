"""Hypothesis-test plugin (not a library change): shift the A pre-activation by a constant
A_SHIFT (env var, default -4) in every Mamba-3 gate computation, i.e. a slow-decay
initialisation: with a_activation softplus, A = -softplus(dd_A - 4) ~ -0.018 at init instead of
-0.69. Patched at every place that imported scalar_gates, so forward and decode agree."""

import os

import hybridkit.kernels.mamba3.gates as g
import hybridkit.kernels.mamba3.step.reference as sr
import hybridkit.layers.mamba3 as lm

_orig = g.scalar_gates
SHIFT = float(os.environ.get("A_SHIFT", "-4"))


def shifted(dd_dt, dd_a, dt_bias, a_activation, a_floor):
    return _orig(dd_dt, dd_a + SHIFT, dt_bias, a_activation, a_floor)


lm.scalar_gates = shifted
sr.scalar_gates = shifted
try:
    import hybridkit.kernels.mamba3.step.cute_step as cs

    cs.scalar_gates = shifted
except Exception:  # the cute path needs a GPU toolchain
    pass
