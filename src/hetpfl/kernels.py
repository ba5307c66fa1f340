"""Which CPU kernels a run's training steps use (``runtime.kernels``): ``fast`` or ``reference``.

``fast`` (the default) makes every step cheaper without changing what is computed:

* optimizers update all their parameters in one fused kernel (torch's ``_fused_adam_`` /
  ``_fused_sgd_``, as ``torch.optim.Adam/SGD(fused=True)`` run them; called directly by
  :mod:`hetpfl.learn.fused`, which spares a process torch's compiler-stack import) instead of one
  small operation per tensor (Adam's update was 8–16 % of a step);
* the convolutional classifiers (``cnn_*``, ``resnet_small``, ``mobilenet_small``, ``vgg_small``) on
  2-D images keep their weights channels-last, so oneDNN's convolutions and pooling skip the
  layout conversions of the NCHW path (1.2–2.3× per training step on 8×8 to 32×32 inputs, measured
  by ``benchmarks/speed.py``). Generators and discriminators stay NCHW: there it measured no faster.

Both sum in other orders than the per-tensor loop and the NCHW kernels, so a ``fast`` run's records
differ from a ``reference`` run's in the low bits, which training amplifies like any change of
processor; accuracy moves within seed noise (docs/performance.md). ``reference`` is the former
kernels, bit for bit: what the records in ``docs/records`` and ``tests/golden`` were made with.

The mode is a per-process setting, like torch's thread count: :func:`set_kernels` is called when a
run is prepared (the simulator, each worker it forks, and each Flower ClientApp prepare their run
from its config), and every module and optimizer built afterwards follows it.
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("fast", "reference")
CHANNELS_LAST_FAMILIES = frozenset({"cnn", "resnet", "mobilenet", "vgg"})  # measured faster channels-last

_mode = "fast"


def set_kernels(mode: str) -> None:
    global _mode
    if mode not in KERNELS:
        raise ValueError(f"runtime.kernels={mode!r} is not supported (allowed: {', '.join(KERNELS)})")
    _mode = mode


def current_kernels() -> str:
    return _mode


def fused_optimizers(params: list[torch.Tensor]) -> bool:
    """Whether an optimizer over ``params`` uses the fused kernels: when fast, and every parameter is a
    float32 CPU tensor (what the fused CPU kernels take); else torch's own per-tensor optimizers."""
    return _mode == "fast" and bool(params) and all(p.dtype == torch.float32 and p.device.type == "cpu"
                                                    for p in params)


def with_preferred_layout(model: nn.Module, family: str, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` channels-last when fast and it is a convolutional classifier on 2-D images."""
    if _mode == "fast" and family in CHANNELS_LAST_FAMILIES and len(input_shape) == 3:
        return model.to(memory_format=torch.channels_last)
    return model


__all__ = ["CHANNELS_LAST_FAMILIES", "KERNELS", "current_kernels", "fused_optimizers", "set_kernels",
           "with_preferred_layout"]
