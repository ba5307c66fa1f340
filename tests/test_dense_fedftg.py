"""DENSE and FedFTG: DENSE talks once (round 0 uploads, nothing down) and its distillation brings the
student close to the ensemble of the uploads; FedFTG's class shares are each class's split over the
clients, its fine-tuning moves the global model toward the class-level ensemble, and with no fine-tuning
steps FedFTG is FedAvg. Bad inputs fail before training, naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hetpfl.algorithms.datafree import agreement, frozen_copies
from hetpfl.algorithms.fedftg import LabelledGenerator, class_level_teacher, class_shares
from hetpfl.clienthost import ClientHost
from hetpfl.configuration import ConfigError
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.learn import distillation_kl
from hetpfl.simulator import InProcessTransport

CONFIGS = Path(__file__).parent / "configs" / "alg"


def config(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def accuracy_fields(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if "acc" in k} for row in rows(out)]


def samples(generator: torch.nn.Module, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        stream = torch.Generator().manual_seed(seed)
        return generator.eval().sample(n, stream, labels) if labels is not None else generator.eval().sample(n, stream)


# --- DENSE ----------------------------------------------------------------------------------------

def test_dense_uploads_once_and_sends_nothing_down(tmp_path):
    run_experiment(config("dense"), tmp_path)
    records = rows(tmp_path)
    assert records[0]["bytes_up"] > 0 and records[0]["bytes_down"] == 0
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in records[1:])
    assert records[-1]["server"]["pool_size"] == (2 + 3 * 1) * 32  # a pooled batch per epoch: 2 in round 0, 1 later


def test_dense_distillation_brings_the_student_to_the_ensemble():
    run = prepare(config("dense", "algorithm.epochs=0")).run
    server, host = run.make_server(), ClientHost(run)
    comm = RoundComm(run, InProcessTransport(host), 0, Ledger(run.num_clients))
    server.round(0, list(range(run.num_clients)), comm)
    teacher, student = server.teacher(), server.global_model
    probe = torch.as_tensor(run.data.global_test.x[:300])
    before = agreement(teacher, student, probe)
    server.config = dataclasses.replace(server.config, kd_steps=40, generator_steps=10)
    for _ in range(3):
        server.epoch()
    after = agreement(teacher, student, probe)
    assert after > before + 0.2, (before, after)  # on real test images, not the generated ones


# --- FedFTG ---------------------------------------------------------------------------------------

def test_class_shares_split_each_class_over_the_clients():
    counts = np.array([[10, 0, 0], [30, 5, 0]])
    shares = class_shares(counts)
    assert np.allclose(shares[:, 0], [0.25, 0.75]) and np.allclose(shares[:, 1], [0.0, 1.0])
    assert np.allclose(shares[:, 2], [0.5, 0.5])  # nobody holds class 2: uniform
    assert np.allclose(shares.sum(0), 1.0)


def test_sample_label_teacher_weights_each_sample_by_its_label():
    torch.manual_seed(0)
    members = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    counts = np.array([[1, 0, 2], [3, 4, 2]])

    class Fixed(torch.nn.Module):
        num_classes = 3

        def draw_latent(self, n, stream):
            return torch.randn(n, 4, generator=stream)

        def forward(self, z, y):
            return z

    source = LabelledGenerator(Fixed())
    teacher = class_level_teacher(members, counts, "sample_label", source)
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    x = source(z, y)
    shares = class_shares(counts)
    expected = torch.stack([sum(float(shares[k, y[i]]) * members[k](x[i]) for k in range(2)) for i in range(5)])
    assert torch.allclose(teacher(x), expected, atol=1e-6)


def test_fedftg_fine_tuning_moves_the_global_model_to_the_ensemble():
    run = prepare(config("fedftg", "algorithm.steps=0")).run
    server, host = run.make_server(), ClientHost(run)
    clients = list(range(run.num_clients))
    comm = RoundComm(run, InProcessTransport(host), 0, Ledger(run.num_clients))
    replies = {}

    class Keep:  # the round's Comm, keeping the replies
        def ask(self, stage, messages):
            replies.update(comm.ask(stage, messages))
            return replies

    server.round(0, clients, Keep())
    counts = np.stack([replies[k].arrays["class_counts"] for k in sorted(replies)])
    teacher = class_level_teacher(frozen_copies(server.global_model, [dict(replies[k].arrays) for k in sorted(replies)]),
                                  counts, "logit_class", LabelledGenerator(server.generator))
    labels = torch.arange(run.data.num_classes).repeat(20)

    def gap() -> float:
        x = samples(server.generator, len(labels), 1, labels)
        with torch.no_grad():
            return float(distillation_kl(server.global_model.eval()(x), teacher(x), 1.0).mean())

    server.config = dataclasses.replace(server.config, steps=15, ensemble_weights="logit_class")
    before = gap()
    measures = server.fine_tune(1, replies)
    after = gap()
    assert set(measures) == {"generator_loss", "kd_loss"}
    assert after < 0.5 * before, (before, after)


def test_fedftg_without_fine_tuning_is_fedavg(tmp_path):
    run_experiment(config("fedftg", "rounds=2", "algorithm.steps=0"), tmp_path / "ftg")
    run_experiment(config("fedftg", "rounds=2", "algorithm=fedavg"), tmp_path / "fedavg")
    assert accuracy_fields(tmp_path / "ftg") == accuracy_fields(tmp_path / "fedavg")
    assert "global_test_acc" in accuracy_fields(tmp_path / "ftg")[-1]


# --- bad inputs fail before training, naming the key ------------------------------------------------

@pytest.mark.parametrize("name,overrides,key", [
    ("dense", ["algorithm.epochs=-1"], "algorithm.epochs"),
    ("dense", ["algorithm.temperature=0"], "algorithm.temperature"),
    ("dense", ["algorithm.kd_data=memory"], "algorithm.kd_data"),
    ("dense", ["algorithm.adversarial_weight=0", "algorithm.bn_weight=0", "algorithm.ce_weight=0"],
     "algorithm.adversarial_weight"),
    ("dense", ["algorithm.student_arch=no_such_net"], "algorithm.student_arch"),
    ("dense", ["algorithm.student_init=average", "models.clients=[cnn_small, mlp]"], "algorithm.student_init"),
    ("dense", ["data.dataset=gaussian", "algorithm.generator_arch=dcgan_generator"], "algorithm.generator_arch"),
    ("fedftg", ["algorithm.steps=-1"], "algorithm.steps"),
    ("fedftg", ["algorithm.ensemble_weights=median"], "algorithm.ensemble_weights"),
    ("fedftg", ["algorithm.ce_weight=0", "algorithm.adversarial_weight=0", "algorithm.diversity_weight=0"],
     "algorithm.ce_weight"),
    ("fedftg", ["models.clients=[cnn_small, mlp]"], "models.clients"),
])
def test_bad_inputs_fail_before_training_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare(config(name, *overrides))


@pytest.mark.parametrize("fixed", [True, False])
def test_fixed_codes_let_an_unconditional_generator_meet_random_targets(fixed):
    """DENSE's synthesis: with one batch of codes learned alongside G, CE on random targets can be met;
    with fresh codes each step it cannot (G does not see the target)."""
    from hetpfl.learn import OptimOptions, train_generator_against
    from hetpfl.models import build_model

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 4))
    with torch.no_grad():  # class c: feature c high (every class reachable inside the generator's range)
        teacher[0].weight.copy_(4 * torch.eye(4, 6)), teacher[0].bias.zero_()
    student = torch.nn.Sequential(torch.nn.Linear(6, 4))
    generator = build_model("mlp_generator", (6,), 4, latent_dim=4, ngf=8)
    before = [p.detach().clone() for p in generator.parameters()]
    result = train_generator_against(generator, teacher, student, steps=150, batch_size=16,
                                     optim=OptimOptions(lr=1e-2), stream=torch.Generator().manual_seed(1),
                                     adversarial_weight=0.0, ce_weight=1.0, fixed_codes=fixed)
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters()))
    if fixed:
        z, y = result["codes"]
        with torch.no_grad():
            hit = (teacher(generator.train()(z)).argmax(-1) == y).float().mean().item()
        assert z.shape == (16, 4) and y.shape == (16,) and hit > 0.9, hit
        assert result["loss"] < 0.5
    else:
        assert "codes" not in result and result["loss"] > 0.8  # near log 4: the targets are noise to G
