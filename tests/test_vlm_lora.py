"""Small vision-language backbones (models/vlm.py) and LoRA adapters (models/lora.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetpfl.models import (
    VLM_ARCHITECTURES,
    LoRALinear,
    adapter_state,
    add_lora,
    available_architectures,
    build_model,
    count_flops,
    count_parameters,
    greedy_answer,
    load_adapter_state,
    lora_layers,
    trainable_parameters,
)
from hetpfl.models.vlm import VLM_SIZES, RMSNorm

IMAGE = (3, 16, 16)
VOCAB = 40


def tiny(name: str = "vlm_llama_s", seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, IMAGE, VOCAB, **{"max_images": 2, "max_text_len": 8, **options})


def batch(b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 2, *IMAGE, generator=g)
    mask = torch.tensor([[True, True], [True, False], [True, True]])[:b]
    tokens = torch.randint(0, VOCAB, (b, 8), generator=g)
    return images, mask, tokens


# --- backbones --------------------------------------------------------------------------------

def test_vlm_registry_families_sizes_and_costs():
    assert available_architectures("vlm") == list(VLM_ARCHITECTURES)
    assert {spec.family for spec in VLM_ARCHITECTURES.values()} == {"vlm_llama", "vlm_gpt"}
    for family in ("llama", "gpt"):
        params = [count_parameters(tiny(f"vlm_{family}_{s}").language) for s in VLM_SIZES]
        flops = [count_flops(tiny(f"vlm_{family}_{s}"), IMAGE) for s in VLM_SIZES]
        assert params == sorted(params) and len(set(params)) == 3
        assert flops == sorted(flops) and len(set(flops)) == 3
    widths = [VLM_SIZES[s].width for s in VLM_SIZES]
    depths = [VLM_SIZES[s].depth for s in VLM_SIZES]
    assert len(set(widths)) == 3 and len(set(depths)) == 3
    llama, gpt = tiny("vlm_llama_m"), tiny("vlm_gpt_m")
    assert len(llama.language.blocks) == VLM_SIZES["m"].depth and llama.language.width == VLM_SIZES["m"].width
    # the block designs differ: RMSNorm + SwiGLU + rotary vs LayerNorm + GELU + learned positions
    assert any(isinstance(m, RMSNorm) for m in llama.modules()) and llama.language.positions is None
    assert not any(isinstance(m, RMSNorm) for m in gpt.modules()) and gpt.language.positions is not None
    assert hasattr(llama.language.blocks[0].mlp, "gate_proj") and hasattr(gpt.language.blocks[0].mlp, "fc_in")


def test_vlm_flops_follow_the_registry_convention():
    """2 x MACs of every conv and linear layer, for one sample with every image slot filled."""
    model = tiny("vlm_gpt_s")
    m, w, text = model.max_images, model.language.width, model.max_text_len
    seq = model.image_tokens + text
    # three stride-2 convs on 16x16: 8x8, 4x4, 2x2 outputs (then the pool to the 2x2 grid)
    convs = m * (64 * 32 * 3 * 9 + 16 * 64 * 32 * 9 + 4 * 64 * 64 * 9)
    projector = model.image_tokens * (64 * w + w * w)
    blocks = VLM_SIZES["s"].depth * seq * (4 * w * w + 2 * w * 4 * w)  # q, k, v, o; fc_in, fc_out
    head = text * w * VOCAB  # the next-token logits at the text positions only
    assert count_flops(model, IMAGE) == 2 * (convs + projector + blocks + head)


def test_vlm_weights_are_deterministic_by_seed():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("name", ["vlm_llama_s", "vlm_gpt_s"])
def test_vlm_is_causal_and_ignores_empty_image_slots(name):
    model = tiny(name).eval()
    images, mask, tokens = batch()
    logits = model(images, mask, tokens)
    assert logits.shape == (3, 8, VOCAB)
    later = tokens.clone()
    later[:, 5:] = (later[:, 5:] + 1) % VOCAB
    assert torch.allclose(model(images, mask, later)[:, :5], logits[:, :5], atol=1e-5)
    assert not torch.allclose(model(images, mask, later)[:, 5:], logits[:, 5:], atol=1e-5)
    # sample 1 has an empty second slot: what lies there cannot matter; sample 0's second image does
    other = images.clone()
    other[:, 1] = torch.rand_like(other[:, 1])
    changed = model(other, mask, tokens)
    assert torch.allclose(changed[1], logits[1], atol=1e-5)
    assert not torch.allclose(changed[0], logits[0], atol=1e-5)


def test_vlm_rejects_wrong_shapes_and_options():
    model = tiny()
    images, mask, tokens = batch()
    with pytest.raises(ValueError, match="images must be"):
        model(images[:, :, :1], mask, tokens)
    with pytest.raises(ValueError, match="tokens must be"):
        model(images, mask, torch.zeros(3, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_images must be a positive int"):
        tiny(max_images=0)
    with pytest.raises(ValueError, match="takes no option 'size'"):
        build_model("vlm_llama_s", IMAGE, VOCAB, size="m")


def test_greedy_answer_matches_step_by_step_argmax_and_ignores_padding():
    model = tiny().eval()
    images, mask, tokens = batch()
    lengths = torch.tensor([3, 4, 2])
    prompt = tokens.clone()
    for i, n in enumerate(lengths):
        prompt[i, n:] = 0
    answer = greedy_answer(model, images, mask, prompt, lengths, max_new_tokens=3, eos_id=VOCAB - 1)
    for i, n in enumerate(lengths.tolist()):
        row = prompt[i:i + 1].clone()
        for step in range(3):
            nxt = int(model(images[i:i + 1], mask[i:i + 1], row)[0, n + step - 1].argmax())
            if answer[i, :step].eq(VOCAB - 1).any():
                break
            assert int(answer[i, step]) == nxt
            row[0, n + step] = nxt
    padded = prompt.clone()
    padded[:, 6:] = 7  # different padding after the room the answer needs
    assert torch.equal(greedy_answer(model, images, mask, padded, lengths, 3, VOCAB - 1)[:, :2], answer[:, :2])
    with pytest.raises(ValueError, match="no room"):
        greedy_answer(model, images, mask, prompt, lengths, max_new_tokens=6, eos_id=VOCAB - 1)


def test_decoding_encodes_the_images_once_and_gives_the_same_answers():
    from hetpfl.models.vlm import reuse_visual_tokens

    model = tiny().eval()
    images, mask, tokens = batch()
    lengths = torch.tensor([3, 4, 2])
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        plain = [model(images, mask, tokens) for _ in range(2)]
        assert len(calls) == 2
        with reuse_visual_tokens(model):
            with reuse_visual_tokens(model):  # re-entrant: the outer memo survives
                reused = [model(images, mask, tokens) for _ in range(2)]
            reused.append(model(images, mask, tokens))
            model(images.clone(), mask, tokens)  # another images tensor is encoded again
        assert len(calls) == 4 and model._visual_memo is None
    assert all(torch.equal(r, plain[0]) for r in reused + plain)
    calls.clear()
    answer = greedy_answer(model, images, mask, tokens, lengths, max_new_tokens=3, eos_id=VOCAB - 1)
    assert len(calls) == 1  # one encoding for every step
    with torch.no_grad():  # the teacher-forced pass over prompt + answer is decoding's first step
        first = model(images, mask, tokens)
    assert torch.equal(greedy_answer(model, images, mask, tokens, lengths, 3, VOCAB - 1, first_logits=first), answer)


# --- LoRA ---------------------------------------------------------------------------------------

def test_lora_adapts_every_language_linear_and_starts_at_the_base_model():
    model = tiny("vlm_llama_s").eval()
    images, mask, tokens = batch()
    before = model(images, mask, tokens)
    names = add_lora(model, rank=4, alpha=8)
    language_linears = [n for n, m in tiny("vlm_llama_s").named_modules()
                        if isinstance(m, nn.Linear) and n.startswith("language.") and "lm_head" not in n]
    assert names == language_linears and len(names) == 7 * VLM_SIZES["s"].depth
    assert torch.allclose(model(images, mask, tokens), before)  # B = 0 at start
    trainable = trainable_parameters(model)
    assert sum(p.numel() for p in trainable) == sum(4 * (m.in_features + m.out_features)
                                                    for m in lora_layers(model).values())
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_lora_training_changes_only_the_local_adapter():
    model = tiny("vlm_gpt_s")
    add_lora(model, rank=4, alpha=8, dual=True, gate="scalar")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.local." not in k and "beta" not in k}
    local = adapter_state(model, "local")
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    images, mask, tokens = batch()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images, mask, tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(adapter_state(model, "local")[k], v) for k, v in local.items())
    assert float(next(iter(adapter_state(model, "gate").values()))) != 0.0  # the gate learned too


def test_adapter_state_round_trip_and_byte_count():
    model = tiny("vlm_llama_s")
    add_lora(model, rank=2, alpha=4, dual=True)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["local"].lora_B)
    sent = adapter_state(model, "local")
    nbytes = sum(v.numel() * v.element_size() for v in sent.values())
    expected = sum(2 * (m.in_features + m.out_features) * 4 for m in lora_layers(model).values())
    assert nbytes == expected and nbytes < count_parameters(model) * 4 / 10
    receiver = tiny("vlm_llama_s", seed=9)
    add_lora(receiver, rank=2, alpha=4, dual=True)
    load_adapter_state(receiver, sent, "global")  # a client's local adapter becomes another's global one
    got = adapter_state(receiver, "global")
    assert all(torch.equal(got[k], v) for k, v in sent.items())
    with pytest.raises(ValueError, match="does not match"):
        load_adapter_state(receiver, {k: v for k, v in list(sent.items())[1:]}, "global")
    bad = dict(sent)
    key = next(iter(bad))
    bad[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(receiver, bad, "local")
    single = tiny()
    add_lora(single, rank=2, alpha=4)
    with pytest.raises(ValueError, match="no 'global' adapter"):
        adapter_state(single, "global")


@pytest.mark.parametrize("gate", ["scalar", "input"])
def test_dual_gate_mixes_global_and_local(gate):
    model = tiny()
    add_lora(model, rank=2, alpha=4, dual=True, gate=gate)
    model.eval()
    images, mask, tokens = batch()
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["local"].lora_B)
    load_adapter_state(model, adapter_state(model, "local"), "global")
    # global == local: any gate value gives the single-adapter output
    single = tiny()
    add_lora(single, rank=2, alpha=4)
    load_adapter_state(single, adapter_state(model, "local"), "local")
    assert torch.allclose(model(images, mask, tokens), single.eval()(images, mask, tokens), atol=1e-5)
    layer = next(iter(lora_layers(model).values()))
    x = torch.randn(3, 5, layer.in_features)
    assert torch.allclose(layer.gate(x), torch.tensor(0.5))  # initialised at sigma(0)
    if gate == "input":
        with torch.no_grad():
            layer.w_gate.fill_(1.0)
        beta = layer.gate(x)
        assert beta.shape == (3, 1, 1) and not torch.allclose(beta[0], beta[1])


def test_add_lora_rejects_bad_settings():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        add_lora(tiny(), rank=0)
    with pytest.raises(ValueError, match="gate 'moe'"):
        add_lora(tiny(), gate="moe")
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="dropout"):
        add_lora(tiny(), dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        add_lora(tiny(), alpha=0)


def test_lora_linear_keeps_the_base_layer_frozen_and_visible():
    base = nn.Linear(3, 2)
    layer = LoRALinear(base, rank=1, alpha=1.0)
    assert layer.weight is base.weight and (layer.in_features, layer.out_features) == (3, 2)
    assert not base.weight.requires_grad and layer.adapters["local"].lora_A.requires_grad


# --- Hugging Face models (the `hf` extra): a tiny random config, no download -----------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_attaches_to_transformers_models(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    ids = torch.randint(0, 48, (2, 7))
    base = model(input_ids=ids).logits
    names = add_lora(model, rank=4, alpha=8, scope="model", dual=True)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert "lm_head" not in " ".join(names)
    assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-5)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    assert not torch.allclose(model(input_ids=ids).logits, base, atol=1e-5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "adapters" not in n and "beta" not in n)
