"""HetVQA: images, tasks, vocabulary, examples, scenarios, the replay memory, the answer loss and
scoring, and cached backbone pretraining. Only scikit-learn's digits are read (no real data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetpfl.configuration import FieldError
from hetpfl.data import hetvqa as hv
from hetpfl.data.hetvqa.images import apply_domain
from hetpfl.learn.vlm import answer_loss, example_batches, memory_batches, mixed_answer_loss, score_answers
from hetpfl.learn.loop import Objective, optimize
from hetpfl.learn.options import OptimOptions
from hetpfl.models import VLM_ARCHITECTURES, build_model


@pytest.fixture(scope="module")
def pool() -> hv.ImagePool:
    return hv.load_image_pool(("digits",))


@pytest.fixture(scope="module")
def vocab() -> hv.Vocabulary:
    return hv.vocabulary()


def examples(pool, vocab, name, n=40, split="train"):
    spec, subset = hv.parse_task(name)
    return hv.build_examples(pool, vocab, spec, subset, split, n)


def labels_of(pool, ex, split="train"):
    source = getattr(pool, split)[ex.spec.source]
    return np.where(ex.images >= 0, source.labels[np.maximum(ex.images, 0)], -1)


def answers_of(vocab, ex):
    return [" ".join(vocab.decode(row[p:])) for row, p in zip(ex.text, ex.prompt_len)]


# --- tasks and words -----------------------------------------------------------------------------

def test_at_least_twenty_tasks_in_five_families_and_a_fixed_vocabulary(vocab):
    assert len(hv.TASKS) >= 20
    assert {t.family for t in hv.TASKS.values()} == set(hv.FAMILIES) and len(hv.FAMILIES) == 5
    assert hv.vocabulary().itos == vocab.itos and vocab.pad_id == 0
    for spec in hv.TASKS.values():
        for q in spec.template.questions:
            assert vocab.unk_id not in vocab.encode(q), q
        for a in spec.answers():
            assert vocab.unk_id not in vocab.encode(a), a
    row, p, a = vocab.row("is the digit even or odd ?", "even", hv.TEXT_LENGTH)
    assert vocab.itos[row[0]] == "<bos>" and vocab.itos[row[p - 1]] == "<answer>"
    assert vocab.decode(row[p:]) == ["even"] and a == 2 and vocab.itos[row[p + 1]] == "<eos>"
    with pytest.raises(ValueError, match="needs .* tokens"):
        vocab.row("what is shown in the image ?" * 3, "even", hv.TEXT_LENGTH)


def test_scores():
    assert hv.exact_match(["ankle", "boot"], ["ankle", "boot"]) == 1.0
    assert hv.exact_match(["boot"], ["ankle", "boot"]) == 0.0
    assert hv.token_f1(["boot"], ["ankle", "boot"]) == pytest.approx(2 / 3)
    assert hv.token_f1(["cat"], ["dog"]) == 0.0


@pytest.mark.parametrize("text, match", [
    ("recognise_mnist/0", "unknown task 'recognise_mnist'"),
    ("recognize_mnist@blur/0", "unknown domain 'blur'"),
    ("recognize_mnist/x", "non-negative integer"),
])
def test_parse_task_rejects_bad_names(text, match):
    with pytest.raises(ValueError, match=match):
        hv.parse_task(text)


def test_parse_task_reads_domain_and_subset():
    spec, subset = hv.parse_task("odd_cifar10@noise/2")
    assert (spec.template.name, spec.source, spec.domain, subset, spec.name) == (
        "odd", "cifar10", "noise", 2, "odd_cifar10@noise")


# --- examples -------------------------------------------------------------------------------------

def test_examples_are_deterministic_and_subsets_use_disjoint_images(pool, vocab):
    a, b = examples(pool, vocab, "same_digits/0"), examples(pool, vocab, "same_digits/0")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.text, b.text)
    other = examples(pool, vocab, "same_digits/1", n=200)
    first = examples(pool, vocab, "same_digits/0", n=200)
    used0, used1 = set(first.images[first.images >= 0]), set(other.images[other.images >= 0])
    assert used0 and used1 and not used0 & used1
    subsets = pool.train["digits"].subsets
    assert sum(len(s) for s in subsets) == len(pool.train["digits"].labels)
    assert len(set(np.concatenate(subsets))) == len(pool.train["digits"].labels)


def test_answers_follow_from_the_images(pool, vocab):
    ex = examples(pool, vocab, "recognize_digits/0")
    assert answers_of(vocab, ex) == [str(c) for c in labels_of(pool, ex)[:, 0]]
    ex = examples(pool, vocab, "parity_digits/1")
    assert answers_of(vocab, ex) == ["even" if c % 2 == 0 else "odd" for c in labels_of(pool, ex)[:, 0]]
    ex = examples(pool, vocab, "sum_digits/2")
    lab = labels_of(pool, ex)
    assert answers_of(vocab, ex) == [str(x + y) for x, y, _ in lab] and (lab[:, 2] == -1).all()
    ex = examples(pool, vocab, "same_digits/0")
    lab = labels_of(pool, ex)
    got = answers_of(vocab, ex)
    assert got == ["yes" if x == y else "no" for x, y, _ in lab] and 0 < got.count("yes") < len(got)
    ex = examples(pool, vocab, "odd_digits/3")
    for (x, y, z), answer in zip(labels_of(pool, ex), answers_of(vocab, ex)):
        odd = {"first": 0, "second": 1, "third": 2}[answer]
        trio = [x, y, z]
        rest = [c for k, c in enumerate(trio) if k != odd]
        assert rest[0] == rest[1] != trio[odd]


def test_batches_mask_empty_slots_and_apply_the_domain(pool, vocab):
    clean = examples(pool, vocab, "recognize_digits/0")
    rows = np.arange(5)
    batch = hv.make_batch(pool, clean, rows)
    assert batch.images.shape == (5, hv.MAX_IMAGES, *hv.IMAGE_SHAPE)
    assert batch.image_mask[:, 0].all() and not batch.image_mask[:, 1:].any()
    assert batch.images[:, 1:].abs().sum() == 0 and 0 <= batch.images.min() and batch.images.max() <= 1
    spec, subset = hv.parse_task("recognize_digits@invert/0")
    inverted_ex = hv.build_examples(pool, vocab, spec, subset, "train", 40)
    raw = torch.from_numpy(pool.train["digits"].images[inverted_ex.images[rows, 0]]).float() / 255
    assert torch.allclose(hv.make_batch(pool, inverted_ex, rows).images[:, 0], 1 - raw)
    spec, _ = hv.parse_task("recognize_digits@noise/0")
    noisy_ex = hv.build_examples(pool, vocab, spec, 0, "train", 40)
    assert torch.equal(hv.make_batch(pool, noisy_ex, rows).images, hv.make_batch(pool, noisy_ex, rows).images)
    assert not torch.allclose(hv.make_batch(pool, noisy_ex, rows).images[:, 0], batch.images[:, 0])
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(apply_domain(x, "rotate"), torch.rot90(x, 1, dims=(-2, -1)))
    with pytest.raises(ValueError, match="unknown domain"):
        apply_domain(x, "blur")


def test_build_examples_rejects_a_missing_source_or_subset(pool, vocab):
    spec, _ = hv.parse_task("recognize_mnist/0")
    with pytest.raises(ValueError, match="needs source 'mnist'"):
        hv.build_examples(pool, vocab, spec, 0, "train", 5)
    spec, _ = hv.parse_task("recognize_digits/0")
    with pytest.raises(ValueError, match="subset 9"):
        hv.build_examples(pool, vocab, spec, 9, "train", 5)


# --- scenarios --------------------------------------------------------------------------------------

def scenario_tree(**changes):
    tree = {"name": "t", "mode": "dynamic", "rounds_per_task": 2, "clients": [
        {"model": "vlm_llama_s", "tasks": ["recognize_digits/0", "same_digits/0"]},
        {"model": "vlm_gpt_s", "tasks": ["parity_digits/1", "sum_digits/1"]},
    ], "unseen": {"new_type": ["odd_digits/2"], "new_domain": ["recognize_digits@rotate/2"]}}
    tree.update(changes)
    return tree


@pytest.mark.parametrize("change, key", [
    ({"clients": [{"model": "vlm_llama_s", "tasks": ["recognize_digit/0"]}]},
     r"clients\[0\]\.tasks\[0\]='recognize_digit/0': unknown task 'recognize_digit'; tasks: recognize_mnist, "),
    ({"clients": [{"model": "vlm_llama_x", "tasks": ["recognize_digits/0"]}]}, r"clients\[0\]\.model"),
    ({"clients": [{"model": "vlm_llama_s", "tasks": ["recognize_digits/0"]},
                  {"model": "vlm_llama_s", "tasks": ["recognize_digits/1", "sum_digits/1"]}]}, r"clients\[1\]\.tasks"),
    ({"clients": [{"model": "vlm_llama_s", "tasks": ["recognize_digits/4"]}]}, "pretraining"),
    ({"clients": [{"model": "vlm_llama_s", "tasks": ["recognize_digits"]}]}, "name a subset"),
    ({"clients": [{"model": "vlm_llama_s", "tasks": ["sum_digits/0", "sum_digits/0"]}]}, "twice"),
    ({"rounds_per_task": 0}, "rounds_per_task"),
    ({"mode": "continual"}, "mode"),
    ({"round": 3}, "unknown key"),
    ({"clients": []}, "clients"),
    ({"unseen": {"new_type": ["same_digits/0"]}}, "not unseen"),
])
def test_scenario_errors_name_the_field(change, key):
    with pytest.raises(FieldError, match=key):
        hv.parse_scenario(scenario_tree(**change), VLM_ARCHITECTURES)


def test_scenario_files_load_and_bad_files_fail_clearly(tmp_path):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario_tree()))
    scenario = hv.load_scenario(path, VLM_ARCHITECTURES)
    assert scenario.num_rounds == 4 and scenario.task_names[:2] == ("recognize_digits/0", "same_digits/0")
    path.write_text("clients: [")
    with pytest.raises(FieldError, match="not valid YAML"):
        hv.load_scenario(path, VLM_ARCHITECTURES)
    with pytest.raises(FieldError, match="cannot be read"):
        hv.load_scenario(tmp_path / "missing.yaml", VLM_ARCHITECTURES)


def test_dynamic_schedule_switches_together_and_feeds_each_example_once():
    scenario = hv.parse_scenario(scenario_tree(rounds_per_task=3), VLM_ARCHITECTURES)
    sizes = {t: 10 for t in scenario.task_names}
    for client, plan in enumerate(scenario.clients):
        got: dict[str, list[int]] = {}
        for r in range(scenario.num_rounds):
            arrivals = scenario.arrivals(client, r, sizes)
            assert [t for t, _ in arrivals] == [plan.tasks[r // 3]]
            for task, idx in arrivals:
                got.setdefault(task, []).extend(idx.tolist())
        assert all(sorted(v) == list(range(10)) for v in got.values())
    with pytest.raises(ValueError, match="outside"):
        scenario.arrivals(0, 6, sizes)


def test_static_schedule_pools_the_tasks_over_all_rounds():
    scenario = hv.parse_scenario(scenario_tree(mode="static", rounds_per_task=3), VLM_ARCHITECTURES)
    sizes = {t: 12 for t in scenario.task_names}
    got: dict[str, list[int]] = {}
    tasks_per_round = []
    for r in range(scenario.num_rounds):
        arrivals = scenario.arrivals(0, r, sizes)
        tasks_per_round.append({t for t, _ in arrivals})
        for task, idx in arrivals:
            got.setdefault(task, []).extend(idx.tolist())
    assert set(got) == set(scenario.clients[0].tasks) and all(sorted(v) == list(range(12)) for v in got.values())
    assert sum(len(t) > 1 for t in tasks_per_round) >= 3  # rounds mix the tasks: no shift


def test_replay_memory_favours_rarely_used_examples():
    memory = hv.ReplayMemory()
    memory.add("a", np.arange(20))
    rng = np.random.default_rng(0)
    for _ in range(10):
        memory.sample(4, rng)
    memory.add("b", np.arange(4))
    drawn = memory.sample(4, rng)
    assert sum(t == "b" for t, _ in drawn) >= 3  # the new task's unused examples come first
    assert len(set(drawn)) == 4
    state = memory.state_dict()
    copy = hv.ReplayMemory()
    copy.load_state_dict(state)
    assert copy.keys == memory.keys and np.array_equal(copy.counts, memory.counts)
    with pytest.raises(ValueError, match="empty"):
        hv.ReplayMemory().sample(2, rng)


# --- loss, learning and scoring -----------------------------------------------------------------

def test_answer_loss_scores_only_the_answer(pool, vocab):
    torch.manual_seed(0)
    model = build_model("vlm_llama_s", hv.IMAGE_SHAPE, len(vocab))
    ex = examples(pool, vocab, "recognize_digits/0")
    batch = hv.make_batch(pool, ex, np.arange(6))
    logits = model(batch.images, batch.image_mask, batch.text)
    manual = []
    for i in range(6):
        p, a = int(batch.prompt_len[i]), int(batch.answer_len[i])
        manual.append(torch.nn.functional.cross_entropy(logits[i, p - 1:p - 1 + a], batch.text[i, p:p + a],
                                                        reduction="none"))
    assert torch.allclose(answer_loss(model, batch), torch.cat(manual).mean(), atol=1e-6)
    assert torch.allclose(mixed_answer_loss(model, [batch]), answer_loss(model, batch))


def test_a_small_model_learns_a_task_and_scores_it(pool, vocab):
    torch.manual_seed(0)
    model = build_model("vlm_llama_s", hv.IMAGE_SHAPE, len(vocab))
    train = examples(pool, vocab, "parity_digits/0", n=400)
    test = examples(pool, vocab, "parity_digits/0", n=100, split="test")
    before = score_answers(model, pool, test, vocab)
    optimize(Objective(lambda b: answer_loss(model, b), model, OptimOptions(lr=5e-4, max_grad_norm=1.0),
                       train=(model,)), example_batches(pool, [train], 32, np.random.default_rng(0)), steps=100)
    after = score_answers(model, pool, test, vocab)
    assert before["exact_match"] < 0.2  # an untrained model does not even write "even"/"odd"
    assert after["exact_match"] > 0.75 and after["token_f1"] >= after["exact_match"]


def test_memory_batches_group_examples_by_task(pool, vocab):
    sets = {"recognize_digits/0": examples(pool, vocab, "recognize_digits/0"),
            "sum_digits/0": examples(pool, vocab, "sum_digits/0")}
    memory = hv.ReplayMemory()
    for name, ex in sets.items():
        memory.add(name, np.arange(len(ex)))
    step = next(memory_batches(pool, sets, memory, 8, np.random.default_rng(1)))
    assert sum(b.text.shape[0] for b in step) == 8 and 1 <= len(step) <= 2


# --- pretrained backbones ------------------------------------------------------------------------

def test_pretraining_is_cached_by_checksum(pool, tmp_path, monkeypatch):
    from hetpfl import backbones

    monkeypatch.setenv("HETPFL_BACKBONE_DIR", str(tmp_path))
    recipe = backbones.PretrainRecipe(steps=20, batch_size=8, examples_per_source=64, sources=("digits",))
    seen = []
    first = backbones.pretrained_backbone("vlm_gpt_s", recipe, pool=pool, progress=lambda s, n, loss: seen.append(s))
    assert seen == [10, 20]
    path = backbones.backbone_path("vlm_gpt_s", recipe)
    assert path.exists() and [c["path"] for c in backbones.cached_backbones()] == [str(path)]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached backbone was trained again")

    monkeypatch.setattr(backbones, "optimize", no_training)
    again = backbones.pretrained_backbone("vlm_gpt_s", recipe, pool=pool)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert again.pretraining["checksum"] == first.pretraining["checksum"]
    assert backbones.backbone_path("vlm_gpt_s", recipe, seed=1) != path
    assert backbones.backbone_path("vlm_gpt_s", backbones.PretrainRecipe(steps=21, sources=("digits",))) != path
    with pytest.raises(ValueError, match="steps must be a positive int"):
        backbones.PretrainRecipe(steps=0)
    with pytest.raises(ValueError, match="not a vision-language model"):
        backbones.pretrained_backbone("cnn_small", recipe, pool=pool)


def test_shipped_scenarios_load_with_related_and_unrelated_clients():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "hetvqa").glob("*.yaml"))
    assert {f.stem for f in files} >= {"homo_dynamic", "homo_static", "sizes_dynamic", "families_dynamic"}
    for path in files:
        scenario = hv.load_scenario(path, VLM_ARCHITECTURES)
        assert len(scenario.clients) == 10 and scenario.num_rounds == 20
        sources = [{hv.parse_task(t)[0].source for t in c.tasks} for c in scenario.clients]
        # clients 0 and 1 share a source (related); clients 0 and 7 share none (unrelated)
        assert sources[0] & sources[1] and not sources[0] & sources[7]
        assert scenario.unseen["new_type"] and scenario.unseen["new_domain"]


def test_a_registry_module_starts_from_a_cached_backbone_with_adapters(pool, tmp_path, monkeypatch):
    from hetpfl import backbones
    from hetpfl.models import LoRALinear, ModuleSpec, build_module

    monkeypatch.setenv("HETPFL_BACKBONE_DIR", str(tmp_path))
    recipe = backbones.PretrainRecipe(steps=10, batch_size=4, examples_per_source=16, sources=("digits",))
    base = backbones.pretrained_backbone("vlm_llama_s", recipe, pool=pool)
    checksum = base.pretraining["checksum"]
    spec = ModuleSpec.of("vlm_llama_s", pretrained=checksum, lora_rank=4, lora_dual=True)
    torch.manual_seed(5)
    client = build_module(spec, hv.IMAGE_SHAPE, len(hv.vocabulary()))
    layers = [m for m in client.modules() if isinstance(m, LoRALinear)]
    assert layers and all(torch.equal(m.base.weight, base.get_submodule(n).weight)
                          for n, m in client.named_modules() if isinstance(m, LoRALinear))
    assert torch.equal(client.vision.convs[0].weight, base.vision.convs[0].weight)
    assert all(("adapters.local" in n) == p.requires_grad for n, p in client.named_parameters() if "beta" not in n)
    with pytest.raises(ValueError, match="no pretrained backbone"):
        build_module(ModuleSpec.of("vlm_llama_s", pretrained="0" * 16), hv.IMAGE_SHAPE, len(hv.vocabulary()))
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        build_module(ModuleSpec.of("vlm_llama_s", lora_rank=-1), hv.IMAGE_SHAPE, len(hv.vocabulary()))
    with pytest.raises(ValueError, match="not an architecture option"):
        backbones.pretrained_backbone("vlm_llama_s", recipe, pool=pool, lora_rank=4)


def test_pretrain_command_caches_and_data_info_lists_the_weights(tmp_path, monkeypatch, capsys):
    import json

    from hetpfl.cli import main

    monkeypatch.setenv("HETPFL_BACKBONE_DIR", str(tmp_path))
    args = ["pretrain", "vlm_gpt_s", "--steps", "10", "--batch-size", "4", "--sources", "digits"]
    assert main(args) == 0
    assert "pretraining mix" in capsys.readouterr().err
    assert main(args) == 0
    assert "cached at" in capsys.readouterr().err
    assert main(["pretrain", "vlm_gpt_x"]) == 2
    assert "'vlm_gpt_x' is not a vision-language model" in capsys.readouterr().err
    assert main(["pretrain", "vlm_gpt_s", "--steps", "0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err
    main(["data", "info", "hetvqa"])
    info = json.loads(capsys.readouterr().out)
    assert info["tasks"] == len(hv.TASKS) and info["backbone_dir"] == str(tmp_path)
    [backbone] = info["pretrained_backbones"]
    assert backbone["arch"] == "vlm_gpt_s" and backbone["path"].startswith(str(tmp_path))
