"""FedMosaic's one-time weight alignment of the PQ-LoRA bases across architectures.

P and Q have the same shape at every width, but they only mean the same thing in two models if the
frozen bases around them agree: A (r × d_in) should project the two models' inputs of a paired
layer to corresponding r-dimensional codes, and B (d_out × r) should send a code to corresponding
output changes. Before federation, on the server's generic examples (never a client's), for every
architecture other than the pivot (the proxy, the run's smallest) and every PQ layer that has a
pivot partner (same block, same linear name):

* **A** is trained so that the model's codes match the pivot's on the same inputs:
  minimize mean ||A_L h_L − A_p h_p||² + 0.5 × mean over i ≠ j of cos(a_i, a_j)² (the rows of A,
  the r directions) — the paper's loss, Adam for ``alignment_steps`` steps from the seeded draw;
* **B** (the paper uses CCA; we do this instead, and say why): the least-squares map M from the
  pivot's outputs of the layer to the model's (y_L ≈ M y_p, ridge 1e-3) carries the pivot's update
  B_p u to M B_p u, so B_L is the orthonormal matrix nearest to M B_p (its polar factor U Vᵀ). CCA
  would give each pair of models its own pair of bases, moving the pivot's B with every partner;
  the map keeps the pivot's basis fixed, so every model aligns to one reference.

Everything is deterministic (examples, seeds, full-batch steps), and the result is cached beside the
backbones by a checksum of what produced it, so every party of a federation rebuilds or reads the
same bases (``lora_pq_basis`` in the client's module spec).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.hetvqa import make_batch
from ..models import ModuleSpec
from ..models.lora import lora_layers
from ..models.vlm import pq_basis_file

ALIGNMENT_VERSION = 1
MAX_ROWS = 4096  # activation rows (token positions) the alignment fits on


def _paired_key(name: str, layer: nn.Module) -> tuple[int, str]:
    return layer.block, name.split(".blocks.", 1)[1].split(".", 1)[1]


@torch.no_grad()
def _activations(model: nn.Module, batches: list) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
    """Inputs and (base) outputs of every PQ layer on ``batches``, rows = token positions."""
    seen: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}
    hooks = []
    for name, layer in lora_layers(model).items():
        if layer.is_pq:
            key = _paired_key(name, layer)
            hooks.append(layer.register_forward_hook(
                lambda m, inputs, out, key=key: seen.setdefault(key, []).append(
                    (inputs[0].reshape(-1, inputs[0].shape[-1]), m.base(inputs[0]).reshape(-1, m.out_features)))))
    model.eval()
    try:
        for batch in batches:
            model(batch.images, batch.image_mask, batch.text)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for key, parts in seen.items():
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        rows = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[0])[:MAX_ROWS])
        out[key] = (x[rows], y[rows])
    return out


def _orthogonality(a: Tensor) -> Tensor:
    unit = F.normalize(a, dim=1)
    cos = unit @ unit.T
    r = a.shape[0]
    return ((cos - torch.eye(r)) ** 2).sum() / max(1, r * (r - 1))


def align_layer(x_model: Tensor, y_model: Tensor, a_model: Tensor, x_pivot: Tensor, y_pivot: Tensor, a_pivot: Tensor,
                b_pivot: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor, float, float]:
    """The aligned (A, B) of one layer of the model against its pivot partner (module docstring), and
    the code-matching MSE relative to the pivot codes' mean square before and after."""
    target = x_pivot @ a_pivot.T
    scale = (target**2).mean().clamp_min(1e-12)
    before = float(((x_model @ a_model.T - target) ** 2).mean() / scale)
    a = a_model.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([a], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x_model @ a.T - target) ** 2).mean() + 0.5 * _orthogonality(a)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        relative = float(((x_model @ a.T - target) ** 2).mean() / scale)
        gram = y_pivot.T @ y_pivot + 1e-3 * torch.eye(y_pivot.shape[1])
        m_t = torch.linalg.solve(gram, y_pivot.T @ y_model)  # (d_p, d_L): y_L ≈ y_p m_t
        u, _, vh = torch.linalg.svd(m_t.T @ b_pivot, full_matrices=False)
        return a.detach(), (u @ vh).contiguous(), before, relative


def align_pq_bases(run: Any, pivot: str, num_blocks: int, examples: int, steps: int, lr: float) -> dict[str, Any]:
    """Align every non-pivot architecture of ``run`` to ``pivot`` (cached), and name the result in
    ``run.data.backbone_options[arch]["lora_pq_basis"]``. Returns per architecture the mean relative
    code-matching error of its aligned layers before (the seeded draw) and after, and their number."""
    data = run.data
    archs = sorted(set(run.client_archs) - {pivot})
    if not archs:
        return {}
    pool, sets = data.server_examples(examples)
    batches = [make_batch(pool, s, np.arange(len(s))) for s in sets]

    def build(arch: str) -> nn.Module:
        options = {k: v for k, v in data.backbone_options[arch].items() if k != "lora_pq_basis"}
        return run.new_module(ModuleSpec.of(arch, **options, lora_pq_blocks=num_blocks), "alignment", arch)

    pivot_model = build(pivot)
    pivot_layers = {_paired_key(n, layer): layer for n, layer in lora_layers(pivot_model).items() if layer.is_pq}
    pivot_acts = _activations(pivot_model, batches)
    report = {}
    for arch in archs:
        what = {"pivot": pivot, "pivot_backbone": data.backbone_options[pivot]["pretrained"], "arch": arch,
                "backbone": data.backbone_options[arch]["pretrained"], "rank": data.backbone_options[arch]["lora_rank"],
                "num_blocks": num_blocks, "examples": examples, "steps": steps, "lr": lr, "version": ALIGNMENT_VERSION,
                "sources": list(pool.sources)}
        checksum = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        path = pq_basis_file(arch, checksum)
        if not path.exists():
            model = build(arch)
            acts = _activations(model, batches)
            bases, errors, initial = {}, [], []
            for name, layer in lora_layers(model).items():
                key = _paired_key(name, layer) if layer.is_pq else None
                if key is None or key not in pivot_layers:
                    continue  # no partner (a family's own MLP linear): its seeded basis stays
                (xm, ym), (xp, yp) = acts[key], pivot_acts[key]
                partner = pivot_layers[key].basis
                a, b, before, error = align_layer(xm, ym, layer.basis.A, xp, yp, partner.A, partner.B, steps, lr)
                bases[name] = {"A": a, "B": b}
                errors.append(error)
                initial.append(before)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"meta": {**what, "relative_error": float(np.mean(errors)) if errors else None,
                                 "relative_error_before": float(np.mean(initial)) if initial else None,
                                 "layers": len(bases)}, "bases": bases}, tmp)
            os.replace(tmp, path)
        meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
        data.backbone_options[arch]["lora_pq_basis"] = checksum
        report[arch] = {"relative_error_before": meta["relative_error_before"], "relative_error": meta["relative_error"],
                        "layers": meta["layers"]}
    return report
