"""shared.weights against transformers' GPT-2: load, export, both key layouts, errors, download."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.model import GPTModel
from shared.weights import (
    CheckpointError,
    ShapeMismatchError,
    download_gpt2,
    load_hf_gpt2,
    save_hf_gpt2,
)

transformers = pytest.importorskip("transformers")

# Odd sizes: nothing a power of two; n_positions shorter than the inputs' natural limit.
HF_SIZES = {"vocab_size": 97, "n_positions": 23, "n_embd": 36, "n_layer": 3, "n_head": 3}


def random_hf_model(tie=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**HF_SIZES, tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch():
    return torch.randint(
        0, HF_SIZES["vocab_size"], (2, HF_SIZES["n_positions"]), generator=torch.Generator().manual_seed(7)
    )


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)


def read_tensors(path):
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def rewrite(folder, dest, tensors):
    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path):
    model = random_hf_model(tie=request.param)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


def test_loaded_model_matches_transformers_logits(hf_checkpoint):
    hf, folder = hf_checkpoint
    ours = load_hf_gpt2(folder)
    idx = batch()
    assert (our_logits(ours, idx) - hf_logits(hf, idx)).abs().max() < 1e-4
    assert not ours.training
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert (ours.out_head.weight is ours.tok_emb.weight) == hf.config.tie_word_embeddings


def test_exported_model_loads_in_transformers_with_the_same_logits(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint
    ours = load_hf_gpt2(folder)
    save_hf_gpt2(ours, tmp_path / "export")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = batch()
    assert (hf_logits(back, idx) - our_logits(ours, idx)).abs().max() < 1e-4
    assert back.config.tie_word_embeddings == ours.cfg["tie_weights"]


def test_published_layout_without_prefix_and_with_mask_buffers_loads(tmp_path):
    hf = random_hf_model()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    n = HF_SIZES["n_positions"]
    published = {}
    for key, tensor in read_tensors(folder).items():
        published[key.removeprefix("transformer.")] = tensor
    for layer in range(HF_SIZES["n_layer"]):
        published[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        published[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "wte.weight" in published and "h.0.attn.c_attn.weight" in published
    ours = load_hf_gpt2(rewrite(folder, tmp_path / "published", published))
    idx = batch()
    assert (our_logits(ours, idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_model_without_qkv_bias_exports_zero_biases_and_same_logits(tmp_path):
    torch.manual_seed(3)
    ours = GPTModel(
        {
            "vocab_size": 97,
            "context_length": 23,
            "emb_dim": 36,
            "n_heads": 3,
            "n_layers": 2,
            "drop_rate": 0.0,
            "qkv_bias": False,
        }
    ).eval()
    save_hf_gpt2(ours, tmp_path / "export")
    tensors = read_tensors(tmp_path / "export")
    assert torch.count_nonzero(tensors["transformer.h.0.attn.c_attn.bias"]) == 0
    assert "lm_head.weight" in tensors  # untied head is written
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = batch()
    assert (hf_logits(back, idx) - our_logits(ours, idx)).abs().max() < 1e-4


def test_conv1d_weights_are_transposed_on_load(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(tmp_path / "hf")
    conv = hf.transformer.h[1].mlp.c_fc.weight  # (in, out) = (36, 144)
    assert conv.shape == (36, 144)
    assert torch.equal(ours.trf_blocks[1].ff.fc.weight, conv.t())


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    tensors = read_tensors(tmp_path / "hf")
    tensors["transformer.wpe.weight"] = torch.zeros(22, 36)  # one position short
    broken = rewrite(tmp_path / "hf", tmp_path / "broken", tensors)
    with pytest.raises(ShapeMismatchError, match=r"wpe\.weight.*\(22, 36\).*\(23, 36\)"):
        load_hf_gpt2(broken)


def test_missing_and_unexpected_tensors_raise_checkpoint_errors(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    tensors = read_tensors(tmp_path / "hf")
    without = {k: v for k, v in tensors.items() if k != "transformer.h.2.ln_2.bias"}
    with pytest.raises(CheckpointError, match=r"trf_blocks\.2\.norm2\.bias"):
        load_hf_gpt2(rewrite(tmp_path / "hf", tmp_path / "missing", without))
    extra = {**tensors, "transformer.h.0.attn.rotary.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="rotary"):
        load_hf_gpt2(rewrite(tmp_path / "hf", tmp_path / "extra", extra))


def test_folder_without_safetensors_is_refused_with_what_is_needed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(random_hf_model().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read: pickled weights are never loaded")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_gpt2(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"<html><body>Sign in to the hotel Wi-Fi</body></html>", "truncated"],
    ids=["empty", "html-page", "truncated"],
)
def test_damaged_safetensors_file_is_named_with_what_to_do(tmp_path, content):
    folder = tmp_path / "hf"
    random_hf_model().save_pretrained(folder)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2] if content == "truncated" else content)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors is not a readable safetensors file.*download it again"
    ):
        load_hf_gpt2(folder)


@pytest.mark.parametrize(
    ("config_text", "problem"),
    [
        ('{"n_embd": 36, ', "Expecting"),
        ("[1, 2]", "is a JSON object"),
        (
            json.dumps({**HF_SIZES, "n_head": None, "model_type": "gpt2"}),
            "n_heads must be a positive integer",
        ),
        (json.dumps({k: v for k, v in HF_SIZES.items() if k != "n_layer"}), r"lacks \['n_layer'\]"),
        (json.dumps({k: v for k, v in HF_SIZES.items() if k != "n_positions"}), r"lacks \['n_positions'\]"),
    ],
    ids=["truncated", "not-an-object", "bad-value", "missing-key", "no-positions"],
)
def test_invalid_or_incomplete_config_json_is_named(tmp_path, config_text, problem):
    folder = tmp_path / "hf"
    random_hf_model().save_pretrained(folder)
    (folder / "config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match=r"config.json is not a usable GPT-2 config") as caught:
        load_hf_gpt2(folder)
    assert re.search(problem, str(caught.value)), str(caught.value)


def test_sharded_checkpoint_says_how_to_make_one_file(tmp_path):
    random_hf_model().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    with pytest.raises(CheckpointError, match=r"sharded checkpoint.*max_shard_size"):
        load_hf_gpt2(tmp_path / "sharded")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("torch.float32", torch.float32)],
)
def test_dtype_can_be_given_by_name(tmp_path, name, dtype):
    random_hf_model().save_pretrained(tmp_path / "hf")
    assert {p.dtype for p in load_hf_gpt2(tmp_path / "hf", dtype=name).parameters()} == {dtype}


@pytest.mark.parametrize("dtype", ["half-precision", "int8", torch.int8])
def test_unknown_or_integer_dtype_is_refused(tmp_path, dtype):
    random_hf_model().save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="dtype"):
        load_hf_gpt2(tmp_path / "hf", dtype=dtype)


def test_rmsnorm_model_cannot_be_exported(tmp_path):
    cfg = {
        "vocab_size": 11,
        "context_length": 5,
        "emb_dim": 6,
        "n_heads": 2,
        "n_layers": 1,
        "drop_rate": 0.0,
        "qkv_bias": True,
    }
    with pytest.raises(ValueError, match="rmsnorm"):
        save_hf_gpt2(GPTModel({**cfg, "norm": "rmsnorm"}), tmp_path / "x")


def test_download_gpt2_fetches_through_the_hf_base_url_override(tmp_path, monkeypatch, serve_folder):
    # A local HTTP server plays the hub, serving a tiny checkpoint at the hub's paths.
    mirror = tmp_path / "mirror"
    repo = mirror / "openai-community" / "gpt2" / "resolve" / "main"
    hf = random_hf_model()
    hf.save_pretrained(repo)
    monkeypatch.setenv("LLMS_HF_BASE_URL", serve_folder(mirror))
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path / "data"))
    folder = download_gpt2("gpt2-small", progress=False)
    assert folder == tmp_path / "data" / "gpt2-small"
    ours = load_hf_gpt2(folder)
    idx = batch()
    assert (our_logits(ours, idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_download_gpt2_rejects_unknown_sizes():
    with pytest.raises(ValueError, match="gpt2-tiny"):
        download_gpt2("gpt2-tiny")


def test_loaded_model_trains_without_touching_the_checkpoint_file(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    ours = load_hf_gpt2(tmp_path / "hf").train()
    weight_before = ours.trf_blocks[0].att.qkv.weight.detach().clone()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    ours(batch()).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(ours.trf_blocks[0].att.qkv.weight, weight_before)
    assert ours.out_head.weight is ours.tok_emb.weight  # still tied after the step
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before


def test_published_gpt2_config_translates_to_the_small_preset_with_bias_and_tying():
    from shared.model import GPT_CONFIGS
    from shared.weights import config_from_hf

    # The fields of openai-community/gpt2's config.json that matter (others are ignored).
    published = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "resid_pdrop": 0.1,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    }
    expected = {
        **GPT_CONFIGS["gpt2-small"],
        "qkv_bias": True,
        "tie_weights": True,
        "norm": "layernorm",
        "norm_eps": 1e-5,
    }
    assert config_from_hf(published) == expected


def test_config_with_an_unsupported_activation_is_refused():
    from shared.weights import config_from_hf

    config = random_hf_model().config.to_dict()
    with pytest.raises(CheckpointError, match="relu"):
        config_from_hf({**config, "activation_function": "relu"})


def test_dtype_argument_converts_the_loaded_weights(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    logits = our_logits(ours, batch()).float()
    assert (logits - hf_logits(hf, batch())).abs().max() < 0.1
