"""The fused Mamba-3 decode step (one token per sequence), between ``in_proj`` and the gate.

* :mod:`.weights`: :class:`StepInputs` (the token's projections) and :class:`StepWeights`
  (what the step needs from its layer);
* :mod:`.reference`: the torch definition (any device, float64), the CPU path and the ground
  truth of the kernel tests;
* :mod:`.triton_step`: the one-launch Triton kernel (CUDA; the CPU interpreter in tests).

Layers call :func:`hybridkit.kernels.mamba3.ops.mamba3_step`, which picks among these.
"""

from hybridkit.kernels.mamba3.step.reference import gated_output, mamba3_step_reference
from hybridkit.kernels.mamba3.step.weights import StepInputs, StepWeights

__all__ = ["StepInputs", "StepWeights", "gated_output", "mamba3_step_reference"]
