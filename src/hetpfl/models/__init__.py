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
    supports_width,
    width_architectures,
)
from .width import (
    WIDTH_MODES,
    SubIndex,
    channel_indices,
    extract_submodel,
    insert_submodel,
    model_arrays,
    submodel_index,
    submodel_shapes,
)

__all__ = [
    "WIDTH_MODES",
    "SubIndex",
    "channel_indices",
    "extract_submodel",
    "insert_submodel",
    "model_arrays",
    "submodel_index",
    "submodel_shapes",
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
    "supports_width",
    "width_architectures",
]
