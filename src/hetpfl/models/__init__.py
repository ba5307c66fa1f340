"""Model architectures for heterogeneous clients (plain PyTorch; no FL or data logic here).

Every model is a :class:`HetModel`: ``features(x) -> (B, feature_dim)`` and a linear ``head``, with
``forward(x) == head(features(x))``. Build models by name with :func:`build_model`. The same registry
builds the generators and discriminators of :mod:`.generative` (``AUXILIARY_ARCHITECTURES``).
"""

from .base import INPUT_KINDS
from .generative import Discriminator, Generator
from .teachers import META_EXPANSIONS, MetaModel, MixtureTeacher
from .lora import GATES, LoRALinear, adapter_state, add_lora, load_adapter_state, lora_layers, trainable_parameters
from .vlm import VisionLanguageModel, greedy_answer
from .registry import (
    ARCHITECTURE_KINDS,
    ARCHITECTURES,
    BUILT_FROM,
    AUXILIARY_ARCHITECTURES,
    VLM_ARCHITECTURES,
    ArchSpec,
    HetModel,
    ModuleSpec,
    available_architectures,
    build_model,
    build_module,
    generator_spec,
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
    "GATES",
    "LoRALinear",
    "adapter_state",
    "add_lora",
    "load_adapter_state",
    "lora_layers",
    "trainable_parameters",
    "VisionLanguageModel",
    "greedy_answer",
    "META_EXPANSIONS",
    "MetaModel",
    "MixtureTeacher",
    "WIDTH_MODES",
    "SubIndex",
    "channel_indices",
    "extract_submodel",
    "insert_submodel",
    "model_arrays",
    "submodel_index",
    "submodel_shapes",
    "ARCHITECTURES",
    "ARCHITECTURE_KINDS",
    "BUILT_FROM",
    "Discriminator",
    "AUXILIARY_ARCHITECTURES",
    "VLM_ARCHITECTURES",
    "Generator",
    "INPUT_KINDS",
    "ArchSpec",
    "HetModel",
    "ModuleSpec",
    "available_architectures",
    "build_model",
    "build_module",
    "generator_spec",
    "count_flops",
    "count_parameters",
    "model_summary",
    "supports_width",
    "width_architectures",
]
