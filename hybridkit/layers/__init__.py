"""Layers. Importing this package registers the built-in layer kinds."""

from hybridkit.layers.attention import Attention, AttentionSpec
from hybridkit.layers.base import Layer, LayerSpec
from hybridkit.layers.mamba3 import Mamba3, Mamba3Spec
from hybridkit.layers.mlp import MLPSpec, SwiGLU
from hybridkit.layers.norm import GatedRMSNorm, RMSNorm

__all__ = [
    "Attention",
    "AttentionSpec",
    "GatedRMSNorm",
    "Layer",
    "LayerSpec",
    "MLPSpec",
    "Mamba3",
    "Mamba3Spec",
    "RMSNorm",
    "SwiGLU",
]
