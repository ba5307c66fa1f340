"""Teachers made of several models: Mosaic's meta model over class-wise experts.

* :class:`MetaModel` (registry name ``moe_meta``): a small Transformer that reads the experts'
  logit vectors — one token per expert — and returns class logits. Mosaic's official code: each
  expert's C logits are expanded by a per-expert linear layer to ``d_model`` (C² for 10 classes),
  go through ``nn.Transformer`` (1 encoder + 1 decoder layer, ``nhead`` heads, dropout 0.2, source
  = target = the expert tokens), are summed over tokens and mapped to C logits.
* :class:`MixtureTeacher`: experts + a meta model as one ``nn.Module``, so ``predict_proba`` and the
  distillation routines use it like any classifier. On inputs it runs every expert whole; on
  penultimate features (Mosaic's prototypes) only their heads (:meth:`from_features`).

A mixture is assembled from registry modules when needed; what a server saves are its parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MetaModel", "MixtureTeacher"]


class MetaModel(nn.Module):
    """Class logits from ``num_experts`` expert logit vectors ``(B, num_experts, num_classes)``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_experts: int | None = None,
                 d_model: int | None = None, nhead: int | None = None, dropout: float = 0.2,
                 arch: str = "moe_meta") -> None:
        super().__init__()
        self.num_experts = int(num_experts if num_experts is not None else num_classes)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        nhead = int(nhead if nhead is not None else num_classes)
        d_model = int(d_model if d_model is not None else num_classes * num_classes)
        if self.num_experts < 1 or d_model < 1 or nhead < 1 or d_model % nhead:
            raise ValueError(f"{arch}: needs num_experts >= 1 and d_model ({d_model}) divisible by nhead ({nhead})")
        # one expansion per expert: its logits become its token (the code's per-expert Linear C -> d)
        self.expand = nn.Parameter(torch.empty(self.num_experts, num_classes, d_model))
        self.expand_bias = nn.Parameter(torch.zeros(self.num_experts, d_model))
        nn.init.xavier_uniform_(self.expand.view(-1, d_model))
        self.transformer = nn.Transformer(d_model=d_model, nhead=nhead, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=2 * d_model, dropout=dropout, batch_first=True)
        self.out = nn.Linear(d_model, num_classes)
        self.arch = arch

    def example_inputs(self, batch: int = 1) -> tuple[Tensor]:
        """What the meta model reads (for FLOP counts): expert logits, not the dataset's inputs."""
        return (torch.zeros(batch, self.num_experts, self.num_classes),)

    def forward(self, expert_logits: Tensor) -> Tensor:
        if expert_logits.dim() != 3 or expert_logits.shape[1:] != (self.num_experts, self.num_classes):
            raise ValueError(f"MetaModel expects (B, {self.num_experts}, {self.num_classes}) expert logits, "
                             f"got {tuple(expert_logits.shape)}")
        tokens = torch.einsum("bec,ecd->bed", expert_logits, self.expand) + self.expand_bias
        return self.out(self.transformer(tokens, tokens).sum(dim=1))


class MixtureTeacher(nn.Module):
    """``meta(stack(expert_k(x)))``: a mixture of experts as one classifier."""

    def __init__(self, experts: Sequence[nn.Module], meta: MetaModel) -> None:
        super().__init__()
        if len(experts) != meta.num_experts:
            raise ValueError(f"{len(experts)} experts for a meta model built for {meta.num_experts}")
        self.experts = nn.ModuleList(experts)
        self.meta = meta

    def expert_logits(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.meta(self.expert_logits(x))

    def from_features(self, features: Tensor) -> Tensor:
        """The teacher's logits for penultimate features: each expert's head only, then the meta model."""
        return self.meta(torch.stack([expert.head(features) for expert in self.experts], dim=1))
