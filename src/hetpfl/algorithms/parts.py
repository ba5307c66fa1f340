"""Pieces shared by the weight-sharing methods built on FedAvg (no ``SPEC``: not a method).

* a registry model's **body** and **head** (``HetModel``: ``forward(x) == head(body(x))``): by
  submodule for parameters (``model.head``), by the ``head.`` prefix for state-dict names, so one
  rule selects what trains and what travels (FedRep, FedBABU);
* a **proximal pull** towards received weights, (c/2)·||θ − a||² (FedProx's term, Ditto's
  regularizer), skipped entirely when its coefficient is 0 so that c = 0 trains exactly as
  without it (same floating-point operations, same records).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..learn import proximal, select_parameters

HEAD_PREFIX = "head."  # HetModel's classifier: every registry model names it ``head``


def is_head(name: str) -> bool:
    """A state-dict or parameter name of the head (``head.weight``, ``head.bias``)."""
    return name.startswith(HEAD_PREFIX)


def is_body(name: str) -> bool:
    """A state-dict or parameter name of the body (everything but the head, buffers included)."""
    return not is_head(name)


def body_only(model: nn.Module) -> Callable[[str], bool]:
    """The ``shared`` rule of methods that share the body only (FedRep, FedBABU)."""
    return is_body


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``model.head``, in ``named_parameters`` order."""
    return select_parameters(model, where=is_head)


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of everything but ``model.head``, in ``named_parameters`` order."""
    return select_parameters(model, where=is_body)


def proximal_pull(model: nn.Module, coefficient: float,
                  anchors: Iterable[torch.Tensor] | None = None) -> Callable[[], torch.Tensor] | None:
    """The penalty ``(coefficient/2)·Σ||p − a||²`` over ``model``'s parameters, for
    ``train_locally(penalty=...)``.

    ``anchors``: the fixed point, paired with ``model.parameters()`` (default: ``model``'s own
    parameters as they are now, i.e. the weights it just received); copied here, so training
    either side afterwards does not move them. Returns None when ``coefficient`` is 0: no term is
    added at all."""
    if coefficient == 0:
        return None
    params = list(model.parameters())
    fixed = [a.detach().clone() for a in (params if anchors is None else anchors)]
    if len(fixed) != len(params) or any(a.shape != p.shape for a, p in zip(fixed, params)):
        raise ValueError("proximal_pull: the anchors do not match the model's parameters")
    return lambda: proximal(params, fixed, coefficient)
