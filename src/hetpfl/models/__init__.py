"""Model architectures for heterogeneous clients (plain PyTorch; no FL or data logic here).

Every model is a :class:`HetModel`: ``features(x) -> (B, feature_dim)`` and a linear ``head``, with
``forward(x) == head(features(x))``. Build models by name with :func:`build_model`.
"""

from .registry import (
    ARCHITECTURES,
    ArchSpec,
    HetModel,
    available_architectures,
    build_model,
    count_flops,
    count_parameters,
    model_summary,
)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HetModel",
    "available_architectures",
    "build_model",
    "count_flops",
    "count_parameters",
    "model_summary",
]
