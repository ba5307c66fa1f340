"""Teachers made of several models: Mosaic's meta model over class-wise experts.

* :class:`MetaModel` (registry name ``moe_meta``): a small Transformer that reads the experts'
  logit vectors — one token per expert — and returns class logits. Mosaic's official code: each
  expert's C logits are expanded by one linear layer shared by all experts (``fc_expand``, applied
  to the (C, C) block) to ``d_model`` (C² for 10 classes), go through ``nn.Transformer`` (1 encoder
  + 1 decoder layer, ``nhead`` heads, dropout 0.2, torch's default feed-forward width 2048, source =
  target = the expert tokens, no positional encoding), are summed over tokens and mapped to C
  logits. With a shared expansion and no positions the meta model is a function of the *set* of
  expert predictions; ``expansion="per_expert"`` gives each expert its own layer (its identity).
* :class:`MixtureTeacher`: experts + a meta model as one ``nn.Module``, so ``predict_proba`` and the
  distillation routines use it like any classifier. On inputs it runs every expert whole; on
  penultimate features (Mosaic's prototypes) only their heads (:meth:`from_features`).

A mixture is assembled from registry modules when needed; what a server saves are its parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["META_EXPANSIONS", "MetaModel", "MixtureTeacher"]

META_EXPANSIONS = ("shared", "per_expert")  # MetaModel's token expansion (the code: shared)


class MetaModel(nn.Module):
    """Class logits from ``num_experts`` expert logit vectors ``(B, num_experts, num_classes)``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_experts: int | None = None,
                 d_model: int | None = None, nhead: int | None = None, dropout: float = 0.2,
                 dim_feedforward: int = 2048, expansion: str = "shared", arch: str = "moe_meta") -> None:
        super().__init__()
        self.num_experts = int(num_experts if num_experts is not None else num_classes)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        nhead = int(nhead if nhead is not None else num_classes)
        d_model = int(d_model if d_model is not None else num_classes * num_classes)
        if self.num_experts < 1 or d_model < 1 or nhead < 1 or d_model % nhead:
            raise ValueError(f"{arch}: needs num_experts >= 1 and d_model ({d_model}) divisible by nhead ({nhead})")
        if expansion not in META_EXPANSIONS:
            raise ValueError(f"{arch}: expansion={expansion!r} (allowed: {', '.join(META_EXPANSIONS)})")
        # each expert's logits become its token: one Linear C -> d for all (the code) or one per expert
        self.expansion = expansion
        self.expand = (nn.Linear(num_classes, d_model) if expansion == "shared"
                       else nn.ModuleList(nn.Linear(num_classes, d_model) for _ in range(self.num_experts)))
        self.transformer = nn.Transformer(d_model=d_model, nhead=nhead, num_encoder_layers=1, num_decoder_layers=1,
                                          dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True)
        self.out = nn.Linear(d_model, num_classes)
        self.arch = arch

    def example_inputs(self, batch: int = 1) -> tuple[Tensor]:
        """What the meta model reads (for FLOP counts): expert logits, not the dataset's inputs."""
        return (torch.zeros(batch, self.num_experts, self.num_classes),)

    def forward(self, expert_logits: Tensor) -> Tensor:
        if expert_logits.dim() != 3 or expert_logits.shape[1:] != (self.num_experts, self.num_classes):
            raise ValueError(f"MetaModel expects (B, {self.num_experts}, {self.num_classes}) expert logits, "
                             f"got {tuple(expert_logits.shape)}")
        if self.expansion == "shared":
            tokens = self.expand(expert_logits)
        else:
            tokens = torch.stack([layer(expert_logits[:, e]) for e, layer in enumerate(self.expand)], dim=1)
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
