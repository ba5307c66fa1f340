"""Model architectures for heterogeneous clients (plain PyTorch; no FL or data logic here).

Every model is a :class:`HetModel`: ``features(x) -> (B, feature_dim)`` and a linear ``head``, with
``forward(x) == head(features(x))``. Build models by name with :func:`build_model`.
"""

from .base import INPUT_KINDS
from .registry import (
    ARCHITECTURES,
    BUILT_FROM,
    ArchSpec,
    HetModel,
    ModuleSpec,
    available_architectures,
    build_model,
    build_module,
    count_flops,
    count_parameters,
    model_summary,
)

__all__ = [
    "ARCHITECTURES",
    "BUILT_FROM",
    "INPUT_KINDS",
    "ArchSpec",
    "HetModel",
    "ModuleSpec",
    "available_architectures",
    "build_model",
    "build_module",
    "count_flops",
    "count_parameters",
    "model_summary",
]
