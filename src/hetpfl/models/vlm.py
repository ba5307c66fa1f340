"""Small vision-language models: a frozen-able image encoder whose tokens, followed by the question's
tokens, feed a decoder-only language model that writes the answer (the LLaVA layout at CPU scale).

Two block families differ in design, as Llama and GPT-2 do:

* ``"llama"``: RMSNorm, SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``), rotary positions,
  no biases;
* ``"gpt"``: LayerNorm, GELU MLP (``fc_in``, ``fc_out``), learned absolute positions, biases.

Within a family the sizes differ in width and depth (:data:`VLM_SIZES`). The language model is
``model.language`` (what LoRA adapts, :func:`hetpfl.models.lora.add_lora`); the image encoder
``model.vision`` and the ``projector`` into the language model's width are what LLaVA-style
fine-tuning keeps frozen.

A sample is up to ``max_images`` images of one shape ``(C, H, W)`` (``image_mask`` says which slots
are filled) and a right-padded row of ``max_text_len`` token ids. Each image becomes
``image_grid ** 2`` tokens, placed before the text; the text attends causally to everything before
it except empty image slots. ``forward`` returns next-token logits at the text positions only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VLM_FAMILIES", "VLM_SIZES", "VLMSize", "VisionLanguageModel", "backbone_dir", "backbone_file", "pq_basis_file",
           "greedy_answer", "reuse_visual_tokens"]

#: Block designs: name -> (norm, MLP, positions) as described in the module docstring.
VLM_FAMILIES = ("llama", "gpt")


@dataclass(frozen=True)
class VLMSize:
    """Width (model dimension), depth (blocks) and attention heads of one language model size."""

    width: int
    depth: int
    heads: int


#: The sizes of every family: small, medium, large differ in both width and depth (head size 32).
VLM_SIZES: dict[str, VLMSize] = {"s": VLMSize(64, 2, 2), "m": VLMSize(128, 4, 4), "l": VLMSize(192, 6, 6)}


def backbone_dir() -> Path:
    """Where pretrained backbones are cached: ``$HETPFL_BACKBONE_DIR``, else ``~/.cache/hetpfl/backbones``
    (written by :mod:`hetpfl.backbones`; read here, so a registry module can start from one)."""
    return Path(os.environ.get("HETPFL_BACKBONE_DIR") or "~/.cache/hetpfl/backbones").expanduser()


def pq_basis_file(arch: str, checksum: str) -> Path:
    """The cache file of ``arch``'s aligned PQ-LoRA bases named by ``checksum`` (FedMosaic's alignment)."""
    return backbone_dir() / f"pqbasis-{arch}-{checksum}.pt"


def backbone_file(arch: str, checksum: str) -> Path:
    """The cache file of ``arch`` pretrained as ``checksum`` names (``<arch>-<checksum>.pt``)."""
    return backbone_dir() / f"{arch}-{checksum}.pt"


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (Llama's norm; no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding on (B, heads, S, head_dim) with the half-split convention."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears."""

    def __init__(self, width: int, heads: int, bias: bool, rotary: bool) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention: width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.rotary = heads, width // heads, rotary
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.o_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, s, w = x.shape
        q, k, v = (proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.rotary and rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, w))


class SwiGLU(nn.Module):
    """Llama's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, hidden ≈ 8/3 width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        hidden = 16 * math.ceil(8 * width / 3 / 16)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """GPT-2's MLP: ``fc_out(gelu(fc_in(x)))``, hidden 4 width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, family: str, width: int, heads: int) -> None:
        super().__init__()
        llama = family == "llama"
        norm = (lambda: RMSNorm(width)) if llama else (lambda: nn.LayerNorm(width))
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn = Attention(width, heads, bias=not llama, rotary=llama)
        self.mlp = SwiGLU(width) if llama else GeluMLP(width)

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), mask, rope)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """Decoder-only language model over embeddings: token embedding, blocks, final norm, ``lm_head``."""

    def __init__(self, family: str, size: VLMSize, vocab_size: int, max_positions: int) -> None:
        super().__init__()
        self.family, self.width = family, size.width
        self.embed_tokens = nn.Embedding(vocab_size, size.width)
        self.positions = nn.Embedding(max_positions, size.width) if family == "gpt" else None
        self.blocks = nn.ModuleList(Block(family, size.width, size.heads) for _ in range(size.depth))
        self.norm = RMSNorm(size.width) if family == "llama" else nn.LayerNorm(size.width)
        self.lm_head = nn.Linear(size.width, vocab_size, bias=False)
        head_dim = size.width // size.heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # (S, head_dim / 2) tables, not parameters: derived from the shape, so not saved either
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, embeds: Tensor, key_mask: Tensor) -> Tensor:
        """Hidden states (B, S, width) of ``embeds`` (B, S, width); ``key_mask`` (B, S) bool says
        which positions may be attended to (causally; a position always sees itself)."""
        s = embeds.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=embeds.device).tril()
        mask = (causal & key_mask[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=embeds.device)
        x = embeds
        if self.positions is not None:
            x = x + self.positions.weight[:s]
        rope = (self.rope_cos[:s], self.rope_sin[:s]) if self.family == "llama" else None
        for block in self.blocks:
            x = block(x, mask, rope)
        return self.norm(x)


class VisionEncoder(nn.Module):
    """Three stride-2 3x3 convs (32, 64, ``dim`` channels; GroupNorm + GELU), an average pool to a
    ``grid x grid`` map, and a LayerNorm: ``grid ** 2`` tokens of width ``dim`` per image. (Without
    the norms, default-initialised convs give tokens that barely differ between images, and the
    language model learns to ignore them.)"""

    def __init__(self, in_channels: int, dim: int, grid: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 32), (32, 64), (64, dim)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.convs = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(self.convs(images).flatten(2).transpose(1, 2))  # (N, grid*grid, dim)


class VisionLanguageModel(nn.Module):
    """Images + question tokens -> next-token logits at the text positions (module docstring).

    Built by the registry (``vlm_<family>_<size>``): ``input_shape`` is one image's ``(C, H, W)``
    and ``num_classes`` the vocabulary size. ``pretrained``: the checksum of a cached pretrained
    backbone (:func:`backbone_file`; ``hetpfl pretrain`` writes them) to start from. ``lora_rank`` > 0
    then adapts the language model (:func:`hetpfl.models.lora.add_lora` with ``lora_alpha``,
    ``lora_dropout``, ``lora_dual``, ``lora_gate``; ``lora_pq_blocks`` = N_B > 0 makes every linear
    of the last block of each of N_B depth blocks a PQ-LoRA layer), so a client's module slot can
    name "this pretrained backbone with these adapters" as one registry spec.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, family: str = "llama", size: str = "s",
                 max_images: int = 3, max_text_len: int = 32, image_grid: int = 2, vision_dim: int = 64,
                 pretrained: str | None = None, lora_rank: int = 0, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.0, lora_dual: bool = False, lora_gate: str = "scalar",
                 lora_pq_blocks: int = 0, lora_pq_basis: str | None = None, arch: str = "vlm") -> None:
        super().__init__()
        if family not in VLM_FAMILIES:
            raise ValueError(f"{arch}: family {family!r} is not one of {', '.join(VLM_FAMILIES)}")
        if size not in VLM_SIZES:
            raise ValueError(f"{arch}: size {size!r} is not one of {', '.join(VLM_SIZES)}")
        for name, value in (("max_images", max_images), ("max_text_len", max_text_len),
                            ("image_grid", image_grid), ("vision_dim", vision_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arch}: {name} must be a positive int, got {value!r}")
        self.arch, self.family, self.size = arch, family, VLM_SIZES[size]
        self.input_shape, self.vocab_size = tuple(input_shape), int(num_classes)
        self.max_images, self.max_text_len, self.image_grid = max_images, max_text_len, image_grid
        self.image_tokens = max_images * image_grid ** 2
        self._visual_memo: list[Tensor] | None = None  # [images, their tokens] inside reuse_visual_tokens
        self.vision = VisionEncoder(self.input_shape[0], vision_dim, image_grid)
        self.projector = nn.Sequential(nn.Linear(vision_dim, self.size.width), nn.GELU(),
                                       nn.Linear(self.size.width, self.size.width))
        self.language = LanguageModel(family, self.size, self.vocab_size, self.image_tokens + max_text_len)
        # LoRA adapts the language model only, as LLaVA fine-tuning does (hetpfl.models.lora)
        self.lora_scope = "language"
        self.lora_exclude = ("lm_head",)
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"{arch}: lora_rank must be an int >= 0 (0: no adapters), got {lora_rank!r}")
        if pretrained is not None:
            self._load_pretrained(backbone_file(arch, pretrained))
        if lora_rank:
            from .lora import add_lora  # noqa: PLC0415  (lora reads this module's scope attributes)

            pq = None
            if lora_pq_blocks:
                from .lora import lora_layers, target_layers  # noqa: PLC0415

                try:
                    targets = target_layers(self.size.depth, lora_pq_blocks)
                except ValueError as err:
                    raise ValueError(f"{arch}: lora_pq_blocks: {err}") from None

                def pq(name: str) -> bool:  # every linear of a target block
                    return name.startswith("blocks.") and int(name.split(".")[1]) in targets

            add_lora(self, lora_rank, lora_alpha, lora_dropout, dual=lora_dual, gate=lora_gate, pq=pq)
            if pq is not None:
                for name, layer in lora_layers(self).items():
                    if layer.is_pq:
                        layer.block = targets.index(int(name.split(".")[2]))
                if lora_pq_basis is not None:
                    self._load_pq_basis(pq_basis_file(arch, lora_pq_basis))

    def _load_pretrained(self, path: Path) -> None:
        if not path.exists():
            raise ValueError(f"{self.arch}: no pretrained backbone at {path} (run `hetpfl pretrain {self.arch}` "
                             f"with the same recipe and seed, or set HETPFL_BACKBONE_DIR)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_state_dict(saved["weights"])
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{self.arch}: {path} does not hold this model's weights ({err})") from None

    def _load_pq_basis(self, path: Path) -> None:
        from .lora import set_pq_bases  # noqa: PLC0415

        if not path.exists():
            raise ValueError(f"{self.arch}: no aligned PQ-LoRA basis at {path} (FedMosaic's weight alignment writes it "
                             f"when a run is prepared)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        set_pq_bases(self, {name: (ab["A"], ab["B"]) for name, ab in saved["bases"].items()})

    def example_inputs(self, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """One forward pass's arguments (for FLOP counts): every image slot filled, a full text row."""
        return (torch.zeros(batch, self.max_images, *self.input_shape),
                torch.ones(batch, self.max_images, dtype=torch.bool),
                torch.zeros(batch, self.max_text_len, dtype=torch.long))

    def forward(self, images: Tensor, image_mask: Tensor, tokens: Tensor) -> Tensor:
        """``images`` (B, M, C, H, W) float, ``image_mask`` (B, M) bool, ``tokens`` (B, L) int64
        with M <= max_images, L <= max_text_len -> logits (B, L, vocab) predicting the next token."""
        if images.dim() != 5 or tuple(images.shape[2:]) != self.input_shape or images.shape[1] > self.max_images:
            raise ValueError(f"{self.arch}: images must be (B, <= {self.max_images}, *{self.input_shape}), "
                             f"got {tuple(images.shape)}")
        b = images.shape[0]
        if tokens.dim() != 2 or tokens.shape[0] != b or tokens.shape[1] > self.max_text_len:
            raise ValueError(f"{self.arch}: tokens must be (B={b}, <= {self.max_text_len}), got {tuple(tokens.shape)}")
        visual = self._visual_tokens(images)
        text = self.language.embed_tokens(tokens)
        key_mask = torch.cat((image_mask.bool().repeat_interleave(self.image_grid ** 2, dim=1),
                              torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)), dim=1)
        hidden = self.language(torch.cat((visual, text), dim=1), key_mask)
        return self.language.lm_head(hidden[:, visual.shape[1]:])

    def _visual_tokens(self, images: Tensor) -> Tensor:
        """(B, M * g * g, width): the projected image tokens, computed once per ``images`` tensor
        inside :func:`reuse_visual_tokens`."""
        memo = self._visual_memo
        if memo and memo[0] is images:
            return memo[1]
        visual = self.projector(self.vision(images.flatten(0, 1)))  # (B*M, g*g, width)
        visual = visual.reshape(images.shape[0], -1, self.size.width)
        if memo is not None:
            memo[:] = [images, visual]
        return visual


@contextmanager
def reuse_visual_tokens(model: nn.Module) -> Iterator[None]:
    """Within: every :class:`VisionLanguageModel` inside ``model`` (wrappers included) encodes one
    ``images`` tensor once and reuses its tokens while it is passed again, as greedy decoding does at
    every step. For inference only: the weights must not change inside (no gradient flows to a
    reused result). Re-entrant."""
    fresh = [m for m in model.modules() if isinstance(m, VisionLanguageModel) and m._visual_memo is None]
    for m in fresh:
        m._visual_memo = []
    try:
        yield
    finally:
        for m in fresh:
            m._visual_memo = None


@torch.no_grad()
def greedy_answer(model: nn.Module, images: Tensor, image_mask: Tensor, prompt: Tensor, prompt_lengths: Tensor,
                  max_new_tokens: int, eos_id: int, first_logits: Tensor | None = None) -> Tensor:
    """Greedy decoding after right-padded prompts: (B, max_new_tokens) answer token ids, ``eos_id``
    from the first end-of-answer on. ``prompt`` (B, L) holds each prompt in its first
    ``prompt_lengths[i]`` positions; ``L`` must leave room for the new tokens. ``first_logits``:
    ``model``'s logits on ``prompt`` as given, when the caller has them (a teacher-forced pass whose
    rows continue with the reference answer: causal attention leaves the logits at each prompt's
    end as decoding would see them)."""
    b = prompt.shape[0]
    rows = torch.arange(b, device=prompt.device)
    tokens, lengths = prompt.clone(), prompt_lengths.clone().long()
    if int(lengths.max()) + max_new_tokens > tokens.shape[1]:
        raise ValueError(f"greedy_answer: prompts of up to {int(lengths.max())} tokens leave no room for "
                         f"{max_new_tokens} new ones in {tokens.shape[1]} positions")
    answer = torch.full((b, max_new_tokens), eos_id, dtype=torch.long, device=prompt.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    with reuse_visual_tokens(model):
        for step in range(max_new_tokens):
            # right padding + causal attention: what follows each prompt cannot change its logits
            logits = first_logits if step == 0 and first_logits is not None else model(images, image_mask, tokens)
            next_token = logits[rows, lengths - 1].argmax(-1)
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            answer[:, step] = next_token
            tokens[rows, lengths] = next_token
            lengths += 1
            done |= next_token == eos_id
            if bool(done.all()):
                break
    return answer
