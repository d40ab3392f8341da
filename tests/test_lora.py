"""shared.lora: the adapters' maths, choosing layers, merging, saving, bad input, and parity with PEFT."""

import math

import pytest
import torch
from scripts import load_script
from torch import nn

from shared import classification as cls
from shared.lora import (
    LinearWithLoRA,
    LoRALayer,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from shared.model import GPTModel
from shared.weights import load_hf_gpt2, save_hf_gpt2

CFG = {
    "vocab_size": 61,
    "context_length": 12,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}
TIED = {**CFG, "tie_weights": True}


def tiny_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def tokens(vocab=CFG["vocab_size"], length=CFG["context_length"], seed=1):
    return torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model, seed=2):
    """B starts at zero; give every adapter non-zero values so that a mix-up cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.A.copy_(torch.randn(layer.lora.A.shape, generator=generator) * 0.2)
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=generator) * 0.2)


def snapshot(model):
    return {name: t.clone() for name, t in model.state_dict().items()}, [
        p.requires_grad for p in model.parameters()
    ]


def assert_unchanged(model, before):
    state, flags = before
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags


# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------


def test_lora_layer_is_x_times_a_times_b_scaled_by_alpha_over_rank():
    layer = LoRALayer(5, 7, rank=2, alpha=6)
    nn.init.normal_(layer.B)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), x @ layer.A @ layer.B * 3.0)
    torch.testing.assert_close(x @ layer.delta_weight().T, layer(x))
    assert layer.delta_weight().shape == (7, 5)  # like nn.Linear(5, 7).weight


def test_a_is_drawn_like_a_linear_layer_weight_and_b_starts_at_zero():
    torch.manual_seed(0)
    layer = LoRALayer(400, 3, rank=50, alpha=1)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= 1 / math.sqrt(400)
    assert layer.A.abs().max() > 0.9 / math.sqrt(400)  # uses the whole range, not 1/sqrt(rank)


def test_fresh_adapters_leave_the_outputs_unchanged():
    model = tiny_model()
    idx = tokens()
    with torch.no_grad():
        before = model(idx)
        apply_lora(model, rank=4, alpha=8)
        assert torch.equal(model(idx), before)


def test_apply_lora_freezes_everything_but_the_adapters_and_counts_them():
    model = tiny_model()
    trainable = apply_lora(model, rank=3, alpha=3)
    d = CFG["emb_dim"]
    per_block = 3 * (d + 3 * d) + 3 * (d + d) + 3 * (d + 4 * d) + 3 * (4 * d + d)
    head = 3 * (d + CFG["vocab_size"])
    assert trainable == CFG["n_layers"] * per_block + head
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora.A", "lora.B")) for n in names)


def test_adapters_take_the_wrapped_layers_dtype_and_device():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, rank=2, alpha=2, targets="qkv")
    layer = model.trf_blocks[0].att.qkv
    assert layer.lora.A.dtype == layer.lora.B.dtype == torch.bfloat16


def test_training_moves_only_the_adapters():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, targets="attention")
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = tokens()
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.count_nonzero(layer.lora.B) > 0 for layer in lora_layers(model).values())


# ---------------------------------------------------------------------------------------
# Choosing the layers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("attention", {"att.qkv", "att.out_proj"}),
        ("feed_forward", {"ff.fc", "ff.proj"}),
        ("proj", {"ff.proj"}),  # a name, not a substring: att.out_proj is not "proj"
        (["qkv", "head"], {"att.qkv", "out_head"}),
        ("att.*", {"att.qkv", "att.out_proj"}),
    ],
)
def test_targets_pick_kinds_and_name_patterns(targets, expected):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2, targets=targets)
    picked = {".".join(name.split(".")[-2:]) if "." in name else name for name in lora_layers(model)}
    assert picked == expected


def test_a_pattern_with_a_block_index_picks_that_block_only():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2, targets="trf_blocks.1.*")
    assert set(lora_layers(model)) == {
        f"trf_blocks.1.{n}" for n in ("att.qkv", "att.out_proj", "ff.fc", "ff.proj")
    }


def test_default_targets_skip_a_head_tied_to_the_embedding():
    model = tiny_model(TIED)
    apply_lora(model, rank=2, alpha=2)
    assert "out_head" not in lora_layers(model)
    assert len(lora_layers(model)) == 4 * CFG["n_layers"]


# ---------------------------------------------------------------------------------------
# Bad input: a clear error and the model as it was
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank, alpha, targets, message",
    [
        (0, 8, None, "rank must be a positive integer"),
        (-4, 8, None, "rank must be a positive integer"),
        (2.5, 8, None, "rank must be a positive integer"),
        (True, 8, None, "rank must be a positive integer"),
        (4, 0, None, "alpha must be a positive number"),
        (4, -1.0, None, "alpha must be a positive number"),
        (4, float("nan"), None, "alpha must be a positive number"),
        (4, 8, ["qkv", "nonexistent"], "'nonexistent' matches no linear layer"),
        (4, 8, "norm1", "matches no linear layer"),
        (4, 8, [], "targets must be None or non-empty"),
    ],
)
def test_bad_apply_lora_input_is_refused_before_anything_changes(rank, alpha, targets, message):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, rank, alpha, targets)
    assert_unchanged(model, before)


def test_targeting_a_tied_head_is_refused():
    model = tiny_model(TIED)
    before = snapshot(model)
    with pytest.raises(ValueError, match="'out_head' shares its weight"):
        apply_lora(model, 2, 2, targets=["qkv", "head"])
    assert_unchanged(model, before)


def test_applying_twice_is_refused_and_keeps_the_first_adapters():
    model = tiny_model()
    apply_lora(model, 2, 2)
    randomise_adapters(model)
    state = lora_state_dict(model)
    with pytest.raises(ValueError, match="already has 9 LoRA layers"):
        apply_lora(model, 4, 4)
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in state.items())


def test_merge_unmerge_and_remove_refuse_the_wrong_state():
    model = tiny_model()
    for action in (merge_lora, unmerge_lora, remove_lora):
        with pytest.raises(ValueError, match="no LoRA layers"):
            action(model)
    apply_lora(model, 2, 2)
    with pytest.raises(ValueError, match="already unmerged; merge_lora first"):
        unmerge_lora(model)
    with pytest.raises(ValueError, match="not merged: removing them would throw the trained update away"):
        remove_lora(model)
    merge_lora(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already merged; merging twice"):
        merge_lora(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------


def test_merged_model_gives_the_same_logits_and_unmerge_restores_the_weights():
    model = tiny_model()
    base = {n: p.clone() for n, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    idx = tokens()
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)
        assert all(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(idx), adapted, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(
            model.trf_blocks[0].att.qkv.linear.weight, base["trf_blocks.0.att.qkv.weight"]
        )
        unmerge_lora(model)
        torch.testing.assert_close(model(idx), adapted, rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.linear.weight, base[f"{name}.weight"], rtol=0, atol=1e-6)


def test_removed_model_is_an_ordinary_gpt_that_saves_and_loads_as_gpt2(tmp_path):
    model = tiny_model(TIED)
    plain_names = set(model.state_dict())
    apply_lora(model, rank=4, alpha=4)
    randomise_adapters(model)
    idx = tokens()
    with torch.no_grad():
        adapted = model(idx)
        remove_lora(merge_lora(model))
        assert set(model.state_dict()) == plain_names
        assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
        reloaded = load_hf_gpt2(save_hf_gpt2(model, tmp_path / "merged"))
        torch.testing.assert_close(reloaded(idx), adapted, rtol=1e-5, atol=1e-5)


def test_a_merged_lora_classifier_saves_and_loads_with_save_classifier(tmp_path):
    model = cls.make_classifier(tiny_model(), num_classes=2)
    apply_lora(model, rank=2, alpha=4)
    assert cls.classifier_settings(model)["num_classes"] == 2  # reads out_features through the wrapper
    randomise_adapters(model)
    idx = tokens()
    with torch.no_grad():
        adapted = cls.classifier_logits(model, idx)
        loaded = cls.load_classifier(cls.save_classifier(remove_lora(merge_lora(model)), tmp_path))
        torch.testing.assert_close(cls.classifier_logits(loaded, idx), adapted, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# An adapter saved apart from the base model
# ---------------------------------------------------------------------------------------


def test_an_adapter_saved_alone_restores_the_finetuned_model():
    model = tiny_model()
    apply_lora(model, rank=3, alpha=6, targets="attention")
    randomise_adapters(model)
    state = lora_state_dict(model)
    assert set(state) == {f"{n}.lora.{p}" for n in lora_layers(model) for p in ("A", "B", "alpha")}
    fresh = tiny_model()  # the same base weights
    apply_lora(fresh, rank=3, alpha=6, targets="attention")
    load_lora_state_dict(fresh, state)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


@pytest.mark.parametrize(
    "rank, alpha, targets, message",
    [
        (4, 6, "attention", "the adapter has rank 3, the model's LoRA rank 4"),
        (3, 3, "attention", "trained with alpha=6, the model's LoRA layers have alpha=3"),
        (3, 6, "feed_forward", "saved for another model or other targets"),
    ],
)
def test_loading_an_adapter_for_another_rank_alpha_or_layout_is_refused(rank, alpha, targets, message):
    model = tiny_model()
    apply_lora(model, rank=3, alpha=6, targets="attention")
    randomise_adapters(model)
    other = tiny_model()
    apply_lora(other, rank=rank, alpha=alpha, targets=targets)
    before = {k: v.clone() for k, v in lora_state_dict(other).items()}
    with pytest.raises(ValueError, match=message):
        load_lora_state_dict(other, lora_state_dict(model))
    assert all(torch.equal(lora_state_dict(other)[k], v) for k, v in before.items())


def test_loading_an_adapter_for_a_model_of_other_width_is_refused():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2)
    wider = tiny_model({**CFG, "emb_dim": 30})
    apply_lora(wider, rank=2, alpha=2)
    with pytest.raises(ValueError, match="has shape"):
        load_lora_state_dict(wider, lora_state_dict(model))


def test_loading_into_a_model_without_adapters_or_merged_is_refused():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2)
    state = lora_state_dict(model)
    with pytest.raises(ValueError, match="call apply_lora"):
        load_lora_state_dict(tiny_model(), state)
    merge_lora(model)
    with pytest.raises(ValueError, match="call unmerge_lora"):
        load_lora_state_dict(model, state)


# ---------------------------------------------------------------------------------------
# Parity with Hugging Face PEFT
# ---------------------------------------------------------------------------------------

# Odd sizes, as in test_weights: nothing a power of two.
HF_SIZES = {"vocab_size": 97, "n_positions": 23, "n_embd": 36, "n_layer": 3, "n_head": 3}
HF_TO_OURS = {
    "attn.c_attn": "att.qkv",
    "attn.c_proj": "att.out_proj",
    "mlp.c_fc": "ff.fc",
    "mlp.c_proj": "ff.proj",
}
RANK, ALPHA = 4, 12


def hf_and_ours(tmp_path, transformers):
    """A random GPT-2-shaped HF model (dropout off, non-trivial biases) and ours with the same weights."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**HF_SIZES, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_hf_gpt2(tmp_path / "hf")


def peft_adapters(peft_model):
    """Our layer name -> PEFT's LoRA layer, for every adapted Conv1D of the HF model."""
    found = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            block, kind = name.split(".h.")[1].split(".", 1)
            found[f"trf_blocks.{block}.{HF_TO_OURS[kind]}"] = module
    return found


@pytest.fixture
def both(tmp_path):
    """(PEFT model, our model, batch) with the same base weights and the same random adapters."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours(tmp_path, transformers)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"],
    )
    peft_model = peft.get_peft_model(hf, config)
    our_trainable = apply_lora(ours, RANK, ALPHA)  # default: every untied linear layer
    randomise_adapters(ours)
    adapters = peft_adapters(peft_model)
    assert set(adapters) == set(lora_layers(ours))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            # PEFT keeps A as a (rank, in) and B as an (out, rank) linear weight: ours transposed.
            adapters[name].lora_A["default"].weight.copy_(layer.lora.A.T)
            adapters[name].lora_B["default"].weight.copy_(layer.lora.B.T)
    idx = torch.randint(0, HF_SIZES["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(7))
    return peft_model, ours, our_trainable, adapters, idx


def test_logits_agree_with_peft(both):
    peft_model, ours, _, _, idx = both
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx), peft_model.eval()(idx).logits, rtol=0, atol=1e-5)


def test_trainable_parameter_counts_agree_with_peft(both):
    peft_model, _, our_trainable, _, _ = both
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert (
        our_trainable
        == trainable
        == HF_SIZES["n_layer"] * RANK * ((36 + 3 * 36) + (36 + 36) + (36 + 4 * 36) + (4 * 36 + 36))
    )


def test_one_optimizer_step_moves_the_adapters_as_peft_does(both):
    peft_model, ours, _, adapters, idx = both
    peft_model.train(), ours.train()
    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for model in (ours, peft_model)
    ]
    targets = idx.roll(-1, dims=1)
    nn.functional.cross_entropy(ours(idx).flatten(0, 1), targets.flatten()).backward()
    nn.functional.cross_entropy(peft_model(idx).logits.flatten(0, 1), targets.flatten()).backward()
    for optimizer in optimizers:
        optimizer.step()
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora.A.T, adapters[name].lora_A["default"].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.lora.B.T, adapters[name].lora_B["default"].weight, rtol=0, atol=1e-5)


def test_merged_outputs_agree_with_unmerged_in_both(both):
    peft_model, ours, _, _, idx = both
    with torch.no_grad():
        unmerged = ours.eval()(idx)
        peft_unmerged = peft_model.eval()(idx).logits
        merge_lora(ours)
        peft_model.merge_adapter()
        torch.testing.assert_close(ours(idx), unmerged, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_model(idx).logits, peft_unmerged, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(idx), peft_model(idx).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_classifier_script_trains_lora_adapters_and_saves_an_ordinary_classifier(tmp_path):
    finetune = load_script("ch06", "finetune_classifier")
    argv = ["--quick", "--epochs", "1", "--context-length", "48", "--out-dir", str(tmp_path)]
    report = finetune.main([*argv, "--lora-rank", "4", "--lora-alpha", "8"])
    assert report["settings"]["lora_rank"] == 4 and report["settings"]["lora_alpha"] == 8
    full = GPTModel(finetune.load_gpt2_or_standin("gpt2-small", pretrained=False).model.cfg)
    assert 0 < report["trainable_parameters"] < sum(p.numel() for p in full.parameters()) / 50
    loaded = cls.load_classifier(tmp_path)  # merged and unwrapped: plain linear layers again
    assert not any(isinstance(module, LinearWithLoRA) for module in loaded.modules())


@pytest.mark.slow
def test_instruction_script_trains_lora_adapters_and_saves_a_merged_gpt2(tmp_path, monkeypatch):
    finetune = load_script("ch07", "finetune_instructions")
    monkeypatch.setattr(finetune, "QUICK_SIZES", {"train": 16, "val": 8, "test": 2, "max_new_tokens": 4})
    argv = ["--quick", "--epochs", "1", "--eval-iter", "1", "--out-dir", str(tmp_path), "--lora-rank", "4"]
    report = finetune.main(argv)
    assert report["val_loss_after"] < report["val_loss_before"]
    assert load_hf_gpt2(tmp_path / "model").cfg["emb_dim"] == 64  # an ordinary GPT-2 checkpoint


@pytest.mark.parametrize("script", [("ch06", "finetune_classifier"), ("ch07", "finetune_instructions")])
def test_scripts_refuse_a_lora_alpha_without_a_rank(script, capsys):
    with pytest.raises(SystemExit) as caught:
        load_script(*script).parse_args(["--quick", "--lora-alpha", "16"])
    assert caught.value.code == 2 and "--lora-alpha needs --lora-rank" in capsys.readouterr().err
