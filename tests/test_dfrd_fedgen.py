"""DFRD and FedGen: DFRD's EMA generator is the EMA of the trained one, its distillation brings the
global model closer to the ensemble, and with no server steps it is FedRolex (HeteroFL); FedGen's
generator goes down (never up), makes features of the head's input width, and with its client terms
weighted away FedGen is FedAvg. Bad inputs fail before training, naming the key."""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch

from hetpfl.algorithms.fedgen import GEN, feature_generator
from hetpfl.clienthost import ClientHost
from hetpfl.configuration import ConfigError
from hetpfl.engine import Ledger, RoundComm
from hetpfl.experiment import load_config, prepare, run_experiment
from hetpfl.learn import distillation_kl
from hetpfl.messages import Message
from hetpfl.simulator import InProcessTransport

CONFIGS = Path(__file__).parent / "configs" / "alg"


def config(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


class Spy:
    """A round's Comm over the in-process runtime that keeps what went down and what came up."""

    def __init__(self, run, host: ClientHost, rnd: int) -> None:
        self.comm = RoundComm(run, InProcessTransport(host), rnd, Ledger(run.num_clients))
        self.sent: dict = {}
        self.replies: dict = {}

    def ask(self, stage, messages):
        self.sent = dict(messages)
        self.replies = self.comm.ask(stage, messages)
        return self.replies


def first_round(name: str, *overrides: str):
    """A server after round 0 of ``name``'s contract config (every client), with the round's replies."""
    run = prepare(config(name, *overrides)).run
    server, host = run.make_server(), ClientHost(run)
    spy = Spy(run, host, 0)
    server.round(0, list(range(run.num_clients)), spy)
    return run, server, host, spy


def accuracy_fields(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "acc" in k} for row in rows]


def params(module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


# --- DFRD -----------------------------------------------------------------------------------------

def test_dfrd_ema_generator_is_the_ema_of_the_trained_one():
    run = prepare(config("dfrd", "algorithm.ema_decay=0.3")).run
    server, host = run.make_server(), ClientHost(run)
    before_ema = params(server.generator_ema)
    assert all(torch.equal(a, b) for a, b in zip(before_ema, params(server.generator)))  # G̃ starts as G
    server.round(0, list(range(run.num_clients)), Spy(run, host, 0))
    trained = dict(server.generator.state_dict())
    for (name, ema), old in zip(server.generator_ema.state_dict().items(), before_ema):
        new = trained[name]
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(ema, new)  # buffers are copied
        else:
            assert torch.allclose(ema, 0.3 * old + 0.7 * new, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(before_ema, params(server.generator)))  # G trained


def _agreement(teacher, student, samples) -> tuple[float, float]:
    """(share of samples on which both predict one class, mean KL(teacher ‖ student))."""
    student.eval()
    with torch.no_grad():
        t, s = teacher(samples), student(samples)
    return float((t.argmax(-1) == s.argmax(-1)).float().mean()), float(distillation_kl(s, t).mean())


def test_dfrd_distillation_raises_the_global_models_agreement_with_the_ensemble():
    run, server, _, spy = first_round("dfrd", "algorithm.generator_steps=30", "algorithm.distill_steps=0")
    counts = np.stack([r.arrays["label_counts"] for r in spy.replies.values()]).astype(np.float64)
    stream = torch.Generator().manual_seed(0)
    with torch.no_grad():
        parts = []
        for g in (server.generator, server.generator_ema):
            g.eval()
            y = torch.multinomial(torch.tensor(counts.sum(0)), 256, replacement=True, generator=stream)
            parts.append(g(g.draw_latent(256, stream), y))
        samples = torch.cat(parts)
    with ExitStack() as scalers:
        teacher = server.ensemble(spy.replies, counts, scalers)
        (same_before, kl_before) = _agreement(teacher, server.global_model, samples)
        server.config = dataclasses.replace(server.config, generator_steps=0, distill_steps=60)
        measures = server.distill(1, spy.replies)
        (same_after, kl_after) = _agreement(teacher, server.global_model, samples)
    assert set(measures) == {"distill_loss"}
    # on samples of G and G̃ (not the ones it was distilled on): far closer to the ensemble, no worse in argmax
    assert kl_after < 0.1 * kl_before and kl_before > 0.05, (kl_before, kl_after)
    assert same_after >= same_before


@pytest.mark.parametrize("window,method", [("rolling", "fedrolex"), ("leading", "heterofl")])
def test_dfrd_without_server_steps_is_fedrolex_or_heterofl(window, method, tmp_path):
    dfrd, other = tmp_path / "dfrd", tmp_path / method
    run_experiment(config("dfrd", "rounds=2", f"algorithm.window={window}", "algorithm.generator_steps=0",
                          "algorithm.distill_steps=0"), dfrd)
    run_experiment(config("dfrd", "rounds=2", f"algorithm={method}"), other)
    assert accuracy_fields(dfrd) == accuracy_fields(other)
    assert "global_test_acc" in accuracy_fields(dfrd)[-1]


# --- FedGen ---------------------------------------------------------------------------------------

def test_fedgen_generator_travels_down_and_not_up():
    run = prepare(config("fedgen")).run
    server, host = run.make_server(), ClientHost(run)
    clients = list(range(run.num_clients))
    spy = Spy(run, host, 0)
    server.round(0, clients, spy)
    assert not any(k.startswith(GEN) for m in spy.sent.values() for k in m.arrays)  # nothing trained yet
    generator = {k: np.array(v) for k, v in server.generator.items()}
    spy = Spy(run, host, 1)
    server.round(1, clients, spy)
    gen_bytes = sum(a.nbytes for a in generator.values())
    assert gen_bytes > 0
    for message in spy.sent.values():
        sent = {k[len(GEN):]: v for k, v in message.arrays.items() if k.startswith(GEN)}
        assert sent.keys() == generator.keys() and all(np.array_equal(sent[k], generator[k]) for k in sent)
        assert sum(a.nbytes for a in sent.values()) == gen_bytes
        assert np.isclose(message.arrays["label_probs"].sum(), 1.0)
    for reply in spy.replies.values():
        assert not any(k.startswith(GEN) for k in reply.arrays)
        assert set(reply.arrays) - {k for k in reply.arrays if k[:2] in ("w.", "b.")} == {"label_counts"}


def test_fedgen_ledger_counts_the_generator_down(tmp_path):
    run_experiment(config("fedgen", "rounds=2"), tmp_path / "fedgen")
    run_experiment(config("fedgen", "rounds=2", "algorithm=fedavg"), tmp_path / "fedavg")
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fedgen", "fedavg")}
    run = prepare(config("fedgen")).run
    classes = run.data.num_classes
    generator = {GEN + k: v for k, v in run.make_server().generator.items()}
    extra_down = Message({**generator, "label_probs": np.zeros(classes, np.float32)}).num_bytes
    extra_up = Message({"label_counts": np.zeros(classes, np.int64)}).num_bytes
    assert extra_down > sum(a.nbytes for a in generator.values()) > 10 * extra_up
    for rnd in (0, 1):
        g, a = rows["fedgen"][rnd], rows["fedavg"][rnd]
        asked = len(g["clients"])
        assert g["bytes_up"] - a["bytes_up"] == asked * extra_up  # only the class counts go up
        assert g["bytes_down"] - a["bytes_down"] == (0 if rnd == 0 else asked * extra_down)  # G from round 1 on


def test_fedgen_with_its_client_terms_weighted_away_is_fedavg(tmp_path):
    run_experiment(config("fedgen", "algorithm.generated_weight=0", "algorithm.latent_weight=0"), tmp_path / "zero")
    run_experiment(config("fedgen", "algorithm=fedavg"), tmp_path / "fedavg")
    run_experiment(config("fedgen"), tmp_path / "fedgen")
    assert accuracy_fields(tmp_path / "zero") == accuracy_fields(tmp_path / "fedavg")
    assert accuracy_fields(tmp_path / "fedgen") != accuracy_fields(tmp_path / "fedavg")  # the terms do act


@pytest.mark.parametrize("arch", ["cnn_small", "mlp", "resnet_small"])
def test_fedgen_generator_makes_features_of_the_heads_input_width(arch):
    run = prepare(config("fedgen", f"models.clients=[{arch}]")).run
    server = run.make_server()
    width = server.global_model.head.in_features
    generator = feature_generator(server.config, server.feature_dim, run.data.num_classes)
    generator.load_state_dict({k[2:]: torch.tensor(np.array(v)) for k, v in server.generator.items()})
    generator.eval()
    y = torch.arange(run.data.num_classes)
    with torch.no_grad():
        features = generator.sample(len(y), torch.Generator().manual_seed(0), y)
        logits = server.global_model.head(features)
    assert server.feature_dim == width and features.shape == (len(y), width)
    assert logits.shape == (len(y), run.data.num_classes)
    assert generator.output_range is None  # features are not bounded like pixels


# --- bad inputs fail before training, naming the key ------------------------------------------------

@pytest.mark.parametrize("name,overrides,key", [
    ("dfrd", ["algorithm.generator_steps=-1"], "algorithm.generator_steps"),
    ("dfrd", ["algorithm.distill_steps=-3"], "algorithm.distill_steps"),
    ("dfrd", ["algorithm.transfer_weight=-0.5"], "algorithm.transfer_weight"),
    ("dfrd", ["algorithm.ema_decay=1.5"], "algorithm.ema_decay"),
    ("dfrd", ["algorithm.fidelity_weight=0", "algorithm.transfer_weight=0", "algorithm.diversity_weight=0"],
     "algorithm.generator_steps"),
    ("dfrd", ["algorithm.generator_arch=mlp_discriminator"], "algorithm.generator_arch"),
    ("dfrd", ["data.dataset=gaussian", "algorithm.generator_arch=dcgan_generator"], "algorithm.generator_arch"),
    ("dfrd", ["models.clients=[mlp]"], "models.clients"),
    ("dfrd", ["models.clients=[cnn_small, resnet_small@0.5]"], "models.clients"),
    ("fedgen", ["algorithm.generator_steps=-1"], "algorithm.generator_steps"),
    ("fedgen", ["algorithm.generated_weight=-1"], "algorithm.generated_weight"),
    ("fedgen", ["algorithm.diversity_weight=-0.1"], "algorithm.diversity_weight"),
    ("fedgen", ["algorithm.latent_dim=0"], "algorithm.latent_dim"),
    ("fedgen", ["algorithm.generator_arch=dcgan_generator"], "algorithm.generator_arch"),
    ("fedgen", ["models.clients=[cnn_small, mlp]"], "models.clients"),
])
def test_bad_inputs_fail_before_training_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare(config(name, *overrides))
