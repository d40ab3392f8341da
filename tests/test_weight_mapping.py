"""The ch05 notebook's hand mapping of GPT-2 tensors onto GPTModel equals shared.weights.load_hf_gpt2.

The mapping below is written out name by name, as section 5.7 of the notebook does, independently
of the tables in shared/weights.py; checkpoints are small ones the test makes in GPT-2's format.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.model import GPTModel
from shared.weights import load_hf_gpt2, save_hf_gpt2

SMALL = {
    "vocab_size": 89,
    "context_length": 19,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def _model(tie: bool) -> GPTModel:
    torch.manual_seed(5)
    model = GPTModel({**SMALL, "tie_weights": tie})
    with torch.no_grad():  # non-zero biases and norms, so a mix-up cannot hide
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _read(folder):
    with safe_open(folder / "model.safetensors", framework="pt") as file:
        return {name.removeprefix("transformer."): file.get_tensor(name) for name in file.keys()}  # noqa: SIM118


def _by_hand(folder) -> GPTModel:
    tensors = _read(folder)
    hf = json.loads((folder / "config.json").read_text())
    cfg = {
        "vocab_size": hf["vocab_size"],
        "context_length": hf["n_positions"],
        "emb_dim": hf["n_embd"],
        "n_heads": hf["n_head"],
        "n_layers": hf["n_layer"],
        "drop_rate": 0.0,
        "qkv_bias": True,
        "tie_weights": hf["tie_word_embeddings"],
    }
    model = GPTModel(cfg)
    pairs = [
        (model.tok_emb.weight, tensors["wte.weight"]),
        (model.pos_emb.weight, tensors["wpe.weight"]),
        (model.final_norm.weight, tensors["ln_f.weight"]),
        (model.final_norm.bias, tensors["ln_f.bias"]),
    ]
    for i, block in enumerate(model.trf_blocks):
        p = f"h.{i}."
        pairs += [
            (block.norm1.weight, tensors[p + "ln_1.weight"]),
            (block.norm1.bias, tensors[p + "ln_1.bias"]),
            (block.att.qkv.weight, tensors[p + "attn.c_attn.weight"].T),  # Conv1D stores (in, out)
            (block.att.qkv.bias, tensors[p + "attn.c_attn.bias"]),
            (block.att.out_proj.weight, tensors[p + "attn.c_proj.weight"].T),
            (block.att.out_proj.bias, tensors[p + "attn.c_proj.bias"]),
            (block.norm2.weight, tensors[p + "ln_2.weight"]),
            (block.norm2.bias, tensors[p + "ln_2.bias"]),
            (block.ff.fc.weight, tensors[p + "mlp.c_fc.weight"].T),
            (block.ff.fc.bias, tensors[p + "mlp.c_fc.bias"]),
            (block.ff.proj.weight, tensors[p + "mlp.c_proj.weight"].T),
            (block.ff.proj.bias, tensors[p + "mlp.c_proj.bias"]),
        ]
    if "lm_head.weight" in tensors:
        pairs.append((model.out_head.weight, tensors["lm_head.weight"]))
    with torch.no_grad():
        for parameter, tensor in pairs:
            assert parameter.shape == tensor.shape
            parameter.copy_(tensor)
    return model.eval()


def _assert_same_model(a: GPTModel, b: GPTModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert (a.out_head.weight is a.tok_emb.weight) == (b.out_head.weight is b.tok_emb.weight)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hand_mapping_equals_load_hf_gpt2(tmp_path, tie):
    original = _model(tie)
    folder = save_hf_gpt2(original, tmp_path / "gpt2")
    by_hand, loaded = _by_hand(folder), load_hf_gpt2(folder)
    _assert_same_model(by_hand, loaded)
    _assert_same_model(loaded, original)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_hand(idx), original(idx))


def test_hand_mapping_on_the_published_layout_with_mask_buffers(tmp_path):
    # OpenAI's files: no "transformer." prefix, no lm_head (tied), and two non-learned buffers per block.
    folder = save_hf_gpt2(_model(tie=True), tmp_path / "saved")
    published = tmp_path / "published"
    published.mkdir()
    tensors = _read(folder)
    for i in range(SMALL["n_layers"]):
        n = SMALL["context_length"]
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, published / "model.safetensors", metadata={"format": "pt"})
    (published / "config.json").write_text((folder / "config.json").read_text())
    _assert_same_model(_by_hand(published), load_hf_gpt2(published))
