"""GPTModel: shapes, configuration checks, parameter counts, caching, norms."""

import pytest
import torch

from shared.model import GPT_CONFIGS, GPTModel, build_on_meta, count_parameters, set_dropout

# Odd sizes on purpose: nothing is a power of two, emb_dim divides by the heads.
TINY = {
    "vocab_size": 101,
    "context_length": 19,
    "emb_dim": 30,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel({**TINY, **overrides}).eval()


# The counts ch04 quotes come from the book's config (qkv_bias=False); OpenAI's checkpoints
# have qkv biases (3 * emb_dim per layer more) and a tied head, which gives the 124,439,808 that
# Hugging Face reports for gpt2.
EXPECTED_COUNTS = {
    # name: (untied, tied, tied with qkv biases)
    "gpt2-small": (163_009_536, 124_412_160, 124_439_808),
    "gpt2-medium": (406_212_608, 354_749_440, 354_823_168),
    "gpt2-large": (838_220_800, 773_891_840, 774_030_080),
    "gpt2-xl": (1_637_792_000, 1_557_380_800, 1_557_611_200),
}


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_preset_parameter_counts_untied_tied_and_with_qkv_bias(name):
    untied, tied, tied_bias = EXPECTED_COUNTS[name]
    cfg = GPT_CONFIGS[name]
    assert count_parameters(build_on_meta(cfg)) == untied
    assert count_parameters(build_on_meta({**cfg, "tie_weights": True})) == tied
    assert count_parameters(build_on_meta({**cfg, "tie_weights": True, "qkv_bias": True})) == tied_bias


def test_parameter_count_equals_transformers_gpt2_for_the_same_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=101, n_positions=19, n_embd=30, n_layer=2, n_head=3)
    hf = transformers.GPT2LMHeadModel(config)
    ours = tiny_model(tie_weights=True)
    assert count_parameters(ours) == sum(p.numel() for p in hf.parameters())


def test_output_is_batch_tokens_vocab_logits():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (4, 7))
    assert model(idx).shape == (4, 7, TINY["vocab_size"])


def test_tied_head_shares_the_token_embedding_matrix():
    model = tiny_model(tie_weights=True)
    assert model.out_head.weight is model.tok_emb.weight
    assert count_parameters(model) == count_parameters(tiny_model()) - TINY["vocab_size"] * TINY["emb_dim"]


def test_missing_config_key_raises_a_value_error_naming_it():
    cfg = {k: v for k, v in TINY.items() if k != "n_heads"}
    with pytest.raises(ValueError, match="n_heads"):
        GPTModel(cfg)


def test_unknown_config_key_and_bad_norm_raise_value_errors():
    with pytest.raises(ValueError, match="emb_size"):
        GPTModel({**TINY, "emb_size": 30})
    with pytest.raises(ValueError, match="batchnorm"):
        GPTModel({**TINY, "norm": "batchnorm"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("emb_dim", "30"),
        ("emb_dim", 30.0),
        ("emb_dim", 0),
        ("emb_dim", -30),
        ("n_heads", 0),
        ("n_heads", -3),
        ("n_layers", 0),
        ("vocab_size", 0),
        ("vocab_size", -1),
        ("context_length", 0),
        ("norm_eps", 0),
        ("norm_eps", -1e-5),
        ("norm_eps", "1e-5"),
        ("drop_rate", -0.1),
        ("drop_rate", 1.0),
        ("drop_rate", "0.1"),
        ("qkv_bias", "true"),
        ("qkv_bias", 1),
        ("tie_weights", "false"),
        ("n_layers", True),
    ],
)
def test_config_value_of_wrong_type_or_range_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"GPT config: {key} must be"):
        GPTModel({**TINY, key: value})


def test_a_boolean_given_as_a_string_is_refused_with_a_hint_why():
    with pytest.raises(ValueError, match="non-empty string counts as true"):
        GPTModel({**TINY, "tie_weights": "false"})


def test_config_that_is_not_a_dict_is_refused():
    with pytest.raises(ValueError, match="a GPT config is a dict"):
        GPTModel(list(TINY.items()))


def test_emb_dim_not_divisible_by_heads_raises_with_both_numbers():
    with pytest.raises(ValueError, match=r"emb_dim \(31\).*n_heads \(3\)"):
        GPTModel({**TINY, "emb_dim": 31})


def test_input_longer_than_context_raises_a_value_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="20 tokens exceed the context length of 19"):
        model(torch.zeros(1, 20, dtype=torch.long))


def test_token_ids_without_a_batch_dimension_get_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(batch, tokens\), got \(5,\).*unsqueeze\(0\)"):
        tiny_model()(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize(("bad_id", "shown"), [(101, "101"), (10_000, "10000"), (-1, "-1")])
def test_token_id_outside_the_vocabulary_is_named(bad_id, shown):
    idx = torch.tensor([[1, 2, bad_id, 3]])
    with pytest.raises(ValueError, match=f"contain {shown}, outside the vocabulary.*0 to 100"):
        tiny_model()(idx)


def test_float_token_ids_are_refused_not_rounded():
    with pytest.raises(ValueError, match="must be integers, got a tensor of dtype torch.float32"):
        tiny_model()(torch.tensor([[1.0, 2.7]]))


def test_int32_token_ids_are_accepted():
    idx = torch.randint(0, TINY["vocab_size"], (2, 5))
    model = tiny_model()
    with torch.no_grad():
        assert torch.equal(model(idx.int()), model(idx))


def test_cached_forward_in_chunks_matches_one_full_forward():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 19))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        pieces = [
            model(idx[:, :5], cache=cache),
            model(idx[:, 5:6], cache=cache),
            model(idx[:, 6:], cache=cache),
        ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_cache_overflowing_the_context_raises():
    model = tiny_model()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 19, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="context length"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_rmsnorm_option_swaps_every_norm_and_runs():
    model = tiny_model(norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * TINY["n_layers"] + 1
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    logits = model(torch.randint(0, TINY["vocab_size"], (1, 5)))
    assert logits.shape == (1, 5, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_dropout_acts_in_training_mode_only():
    model = tiny_model(drop_rate=0.5)
    idx = torch.randint(0, TINY["vocab_size"], (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_every_parameter_gets_a_gradient():
    model = tiny_model().train()
    idx = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(idx).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_residual_projections_start_with_smaller_weights():
    model = GPTModel({**GPT_CONFIGS["gpt2-small"], "n_layers": 8, "vocab_size": 300, "context_length": 32})
    block = model.trf_blocks[0]
    assert block.att.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.ff.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.ff.fc.bias.abs().sum() == 0


def test_pytorch_init_scheme_gives_the_books_defaults():
    # The book's GPTModel never re-initialises, so its layers keep PyTorch's defaults.
    model = GPTModel({**GPT_CONFIGS["gpt2-small"], "n_layers": 2, "vocab_size": 3000, "context_length": 64})
    model.reset_parameters("pytorch")
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert model.pos_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    fc = model.trf_blocks[0].ff.fc
    bound = 1 / fc.in_features**0.5  # nn.Linear: uniform in +-1/sqrt(fan_in), weights and biases
    assert fc.weight.abs().max().item() <= bound and fc.bias.abs().max().item() <= bound
    assert fc.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    assert torch.equal(model.final_norm.weight, torch.ones(768))


def test_pytorch_init_keeps_a_tied_head_on_the_embedding_matrix():
    model = tiny_model(tie_weights=True)
    model.reset_parameters("pytorch")
    assert model.out_head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.1)


def test_unknown_init_scheme_is_refused():
    with pytest.raises(ValueError, match="gpt2"):
        tiny_model().reset_parameters("xavier")


def test_set_dropout_reaches_every_layer_and_the_config():
    model = tiny_model(drop_rate=0.3)
    assert set_dropout(model, 0.0) is model
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(block.att.dropout == 0.0 for block in model.trf_blocks)
    assert model.cfg["drop_rate"] == 0.0
    model.train()  # with every rate at 0, training mode is deterministic
    idx = torch.randint(0, TINY["vocab_size"], (2, 8))
    assert torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("rate", [1.0, -0.1, "0.1", True])
def test_set_dropout_refuses_a_rate_outside_zero_to_one(rate):
    with pytest.raises(ValueError, match="dropout rate"):
        set_dropout(tiny_model(), rate)


def test_range_check_can_be_skipped_but_the_dtype_check_cannot():
    from shared.tokenizer import check_token_ids

    check_token_ids(torch.tensor([[999]]), 10, check_range=False)  # what forward does off the CPU
    with pytest.raises(ValueError, match="integers"):
        check_token_ids(torch.tensor([[1.0]]), 10, check_range=False)


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    idx = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return idx, mask


@pytest.mark.parametrize("padded", [False, True])
def test_last_only_gives_the_full_forwards_last_row(padded):
    model = tiny_model()
    rows = [[5, 17, 3, 99, 42, 7], [8, 1, 2]] if padded else [[5, 17, 3, 99], [8, 1, 2, 64]]
    idx, mask = left_padded(rows)
    with torch.no_grad():
        full = model(idx, attention_mask=mask)
        last = model(idx, attention_mask=mask, last_only=True)
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)


def test_last_only_prefill_then_cached_steps_equal_the_full_forward():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        prefill = model(idx[:, :8], cache=cache, last_only=True)
        steps = [model(idx[:, i : i + 1], cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(prefill, full[:, 7:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], atol=1e-5, rtol=0)


def test_a_mask_without_padding_gives_the_same_logits_as_no_mask():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        with_mask = model(idx, attention_mask=torch.ones_like(idx))
        torch.testing.assert_close(with_mask, model(idx), atol=1e-5, rtol=0)


def test_the_models_cache_refuses_tokens_past_the_context_length():
    model = tiny_model()
    cache = model.new_cache()
    assert all(layer.max_tokens == TINY["context_length"] for layer in cache)
    keys = torch.zeros(1, TINY["n_heads"], TINY["context_length"] + 1, TINY["emb_dim"] // TINY["n_heads"])
    with pytest.raises(ValueError, match=r"at most 19 tokens \(the context length\)"):
        cache[0].append(keys, keys)
