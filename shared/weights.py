"""GPT-2 weights in Hugging Face's format: download, load into GPTModel, export back.

A checkpoint is a folder with ``config.json`` (GPT-2's hyper-parameters) and
``model.safetensors`` (the tensors). Two key layouts exist and both load:

- what ``GPT2LMHeadModel.save_pretrained`` writes today: ``transformer.h.0.attn.c_attn.weight``,
  ``transformer.wte.weight``, ... (plus ``lm_head.weight`` when the head is untied);
- the published files of openai-community/gpt2 (and -medium, -large, -xl): no ``transformer.``
  prefix, and older ones also carry the attention mask buffers ``h.N.attn.bias`` and
  ``h.N.attn.masked_bias``, which hold no learned values and are skipped.

GPT-2 implements its linear layers with ``Conv1D``, which stores the weight as (in, out): the
transpose of ``nn.Linear``'s (out, in). Those four matrices per block are transposed on the way
in and out.

Loading is safe and lean: safetensors never runs pickle, the model is built on the meta device
(no memory, no random init), and tensors are read one by one from the memory-mapped file, so
peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shared.data import data_dir
from shared.download import DownloadError, download, host_url
from shared.model import GPTConfig, GPTModel, build_on_meta, check_config, set_dropout
from shared.tokenizer import GPT2_EOT_ID, GPT2_VOCAB_SIZE
from shared.utils import CheckpointError, atomic_path, set_seed  # CheckpointError: re-exported

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # what save_pretrained writes for a sharded model

# Our preset names -> the Hugging Face repositories that publish the weights.
HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

# GPT-2 names -> ours, for everything outside the blocks ...
_TOP_LEVEL = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.weight",
    "ln_f.bias": "final_norm.bias",
}
# ... and inside block N (h.N.<key> -> trf_blocks.N.<value>).
_PER_BLOCK = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.c_attn.weight": "att.qkv.weight",
    "attn.c_attn.bias": "att.qkv.bias",
    "attn.c_proj.weight": "att.out_proj.weight",
    "attn.c_proj.bias": "att.out_proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "ff.fc.weight",
    "mlp.c_fc.bias": "ff.fc.bias",
    "mlp.c_proj.weight": "ff.proj.weight",
    "mlp.c_proj.bias": "ff.proj.bias",
}
# Conv1D weights, stored transposed relative to nn.Linear.
_CONV1D = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
# Non-learned buffers some published checkpoints carry.
_BUFFERS = {"attn.bias", "attn.masked_bias"}
_ACTIVATIONS = {"gelu_new", "gelu_pytorch_tanh"}  # both are the tanh approximation of GELU


class ShapeMismatchError(CheckpointError):
    """A tensor in the checkpoint has a different shape than the model's parameter."""


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def config_from_hf(hf: dict) -> GPTConfig:
    """Translate a GPT-2 ``config.json`` into our config dict (raise on what GPTModel cannot do)."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"a GPT-2 config is a JSON object, got {type(hf).__name__}.")
    missing = [key for key in ("vocab_size", "n_embd", "n_head", "n_layer") if key not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise CheckpointError(f"the GPT-2 config lacks {missing}.")
    emb_dim = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * emb_dim):
        raise CheckpointError(
            f"n_inner is {hf['n_inner']}, but GPTModel's feed-forward is 4 * n_embd = {4 * emb_dim}."
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise CheckpointError(
            f"activation_function {activation!r} is not supported; GPTModel uses {sorted(_ACTIVATIONS)}."
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"config sets {flag}=True, which GPTModel does not implement.")
    if hf.get("scale_attn_weights") is False:
        raise CheckpointError("config sets scale_attn_weights=False, which GPTModel does not implement.")
    return {
        "vocab_size": hf["vocab_size"],
        "context_length": hf.get("n_positions", hf.get("n_ctx")),
        "emb_dim": emb_dim,
        "n_heads": hf["n_head"],
        "n_layers": hf["n_layer"],
        "drop_rate": hf.get("resid_pdrop", 0.1),
        "qkv_bias": True,  # GPT-2's c_attn always has a bias
        "tie_weights": hf.get("tie_word_embeddings", True),
        "norm": "layernorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
    }


def config_to_hf(cfg: GPTConfig) -> dict:
    """Our config dict as a GPT-2 ``config.json`` that transformers' GPT2Config reads."""
    if cfg["norm"] != "layernorm":
        raise ValueError(
            f"GPT-2 uses LayerNorm; a model with norm={cfg['norm']!r} cannot be exported to its format."
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_ctx": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "layer_norm_epsilon": cfg["norm_eps"],
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg["tie_weights"],
        # GPT-2's <|endoftext|>, when the vocabulary is GPT-2's (a toy vocabulary has no such id).
        "bos_token_id": GPT2_EOT_ID if cfg["vocab_size"] > GPT2_EOT_ID else None,
        "eos_token_id": GPT2_EOT_ID if cfg["vocab_size"] > GPT2_EOT_ID else None,
    }


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------


def _our_name(hf_name: str) -> tuple[str | None, bool]:
    """(our parameter name or None for a skipped buffer, whether it is a transposed Conv1D weight)."""
    if hf_name.startswith("transformer."):
        hf_name = hf_name.removeprefix("transformer.")
    if hf_name == "lm_head.weight":
        return "out_head.weight", False
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name], False
    parts = hf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit():
        block, rest = parts[1], parts[2]
        if rest in _BUFFERS:
            return None, False
        if rest in _PER_BLOCK:
            return f"trf_blocks.{block}.{_PER_BLOCK[rest]}", rest in _CONV1D
    raise CheckpointError(
        f"unexpected tensor {hf_name!r} in the checkpoint: it has no place in a GPT-2 model."
    )


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch floating-point dtype; the names "float32", "float16", "bfloat16" work too."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(
                f"dtype {dtype!r} is not one of {list(_DTYPES)} (or a torch dtype such as torch.float16)."
            )
        return _DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch dtype or one of {list(_DTYPES)}, got {dtype!r}."
        )
    return dtype


def _read_config(config_path: Path) -> GPTConfig:
    """Our config from a checkpoint's config.json; a CheckpointError names the file when it is bad."""
    try:
        cfg = config_from_hf(json.loads(config_path.read_text(encoding="utf-8")))
        cfg = check_config(cfg)  # the type and range of every value
    except (UnicodeDecodeError, json.JSONDecodeError, CheckpointError, ValueError) as error:
        raise CheckpointError(
            f"{config_path} is not a usable GPT-2 config: {str(error).rstrip('.')}. Download it again, or write it with "
            "shared.weights.save_hf_gpt2 or GPT2LMHeadModel.save_pretrained."
        ) from error
    return cfg


def _check_checkpoint_files(folder: Path, config_path: Path, weights_path: Path) -> None:
    if not weights_path.is_file() and (folder / SHARD_INDEX_FILE).is_file():
        raise CheckpointError(
            f"{folder} holds a sharded checkpoint ({SHARD_INDEX_FILE} and several model-*.safetensors), "
            f"but load_hf_gpt2 reads one {WEIGHTS_FILE}. GPT-2 fits in one file: re-save it with "
            "GPT2LMHeadModel.from_pretrained(folder).save_pretrained(new_folder, max_shard_size='100GB')."
        )
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} not found: a GPT-2 checkpoint folder needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(see shared.weights.download_gpt2)."
            )


def _read_tensors(weights_path: Path, expected: dict, device, dtype) -> dict[str, torch.Tensor]:
    """Our name -> tensor for every tensor in the file, transposed and converted as needed."""
    state = {}
    with safe_open(weights_path, framework="pt", device=str(device)) as f:
        for hf_name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            name, transposed = _our_name(hf_name)
            if name is None:
                continue
            tensor = f.get_tensor(hf_name)
            if transposed:
                tensor = tensor.t()
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {hf_name!r} (our {name!r}) for this config.")
            if tuple(tensor.shape) != expected[name]:
                raise ShapeMismatchError(
                    f"tensor {hf_name!r} has shape {tuple(f.get_slice(hf_name).get_shape())} in the checkpoint, "
                    f"but {name!r} needs {expected[name]}"
                    + (
                        " (before transposing Conv1D: " + str(expected[name][::-1]) + ")"
                        if transposed
                        else ""
                    )
                    + "; check that config.json belongs to this model.safetensors."
                )
            if dtype is not None:
                tensor = tensor.to(dtype)
            state[name] = tensor.contiguous()
    return state


def load_hf_gpt2(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> GPTModel:
    """Load a GPT-2 checkpoint folder (``config.json`` + ``model.safetensors``) into a GPTModel.

    Returns the model in eval mode, its weights read straight onto ``device`` (default: the CPU,
    where PyTorch makes tensors; the model is built from the file, so there is no model to take
    a device from). ``dtype`` converts the weights (default: as stored); it is a
    torch dtype or one of the names "float32", "float16", "bfloat16".
    Raises :class:`ShapeMismatchError` naming the tensor and both shapes when the file does not
    fit its own config, and :class:`CheckpointError` for missing or unexpected tensors, a
    damaged or truncated file, an invalid config.json, or a sharded checkpoint.
    """
    dtype = _as_dtype(dtype)
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    _check_checkpoint_files(folder, config_path, weights_path)
    cfg = _read_config(config_path)

    # Shapes without storage: nothing is allocated or randomly initialised here.
    model = build_on_meta(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}

    try:
        state = _read_tensors(weights_path, expected, device if device is not None else "cpu", dtype)
    except SafetensorError as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({error}); it may be truncated or "
            "an HTML page saved under that name. Delete it and download it again."
        ) from error
    if cfg["tie_weights"]:
        # A tied checkpoint stores only wte; the head is the same tensor.
        if "out_head.weight" in state:
            state["tok_emb.weight"] = state["out_head.weight"] = state.get(
                "tok_emb.weight", state["out_head.weight"]
            )
        elif "tok_emb.weight" in state:
            state["out_head.weight"] = state["tok_emb.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}."
        )

    model.load_state_dict(state, assign=True)
    if cfg["tie_weights"]:
        model.out_head.weight = model.tok_emb.weight  # assign=True replaced both; share them again
    return model.eval()


# ---------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------


def save_hf_gpt2(model: GPTModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a GPT-2 checkpoint folder that ``GPT2LMHeadModel.from_pretrained`` loads.

    Keys use the layout of ``save_pretrained`` (``transformer.``-prefixed). A model built
    without query/key/value biases is written with zero biases, which computes the same thing.
    """
    cfg = model.cfg
    hf_config = config_to_hf(cfg)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    ours = model.state_dict()
    hf_names = {}
    for name in _TOP_LEVEL:
        hf_names[_TOP_LEVEL[name]] = ("transformer." + name, False)
    for i in range(cfg["n_layers"]):
        for rest, mine in _PER_BLOCK.items():
            hf_names[f"trf_blocks.{i}.{mine}"] = (f"transformer.h.{i}.{rest}", rest in _CONV1D)
    if not cfg["tie_weights"]:
        hf_names["out_head.weight"] = ("lm_head.weight", False)

    tensors = {}
    for mine, (hf_name, transposed) in hf_names.items():
        if mine in ours:
            tensor = ours[mine]
        elif mine.endswith("att.qkv.bias"):
            tensor = torch.zeros(3 * cfg["emb_dim"], dtype=ours["tok_emb.weight"].dtype)
        else:  # pragma: no cover - every other name exists by construction
            raise KeyError(mine)
        tensor = tensor.detach().to("cpu")
        tensors[hf_name] = (tensor.t() if transposed else tensor).contiguous()

    # Each file is written under a temporary name and renamed, so a crash never leaves a
    # half-written file that a later load would trip over.
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------


def download_gpt2(
    size: str = "gpt2-small", dest: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Download OpenAI's GPT-2 weights (``config.json`` + ``model.safetensors``) and return the folder.

    Files come from the Hugging Face hub (``LLMS_HF_BASE_URL`` or ``HF_ENDPOINT`` point it at a
    mirror) into ``<data dir>/<size>/`` unless ``dest`` is given; files already there are kept.
    Sizes: gpt2-small (~500 MB), gpt2-medium (~1.5 GB), gpt2-large (~3 GB), gpt2-xl (~6 GB).
    """
    if size not in HF_REPOS:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {list(HF_REPOS)}.")
    folder = Path(dest) if dest is not None else data_dir() / size
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        url = host_url("huggingface", f"{HF_REPOS[size]}/resolve/main/{file}")
        download(url, folder / file, progress=progress)
    return folder


# ---------------------------------------------------------------------------------------
# The model to finetune (ch06, ch07): GPT-2, or a stand-in when its weights cannot be had
# ---------------------------------------------------------------------------------------

# GPT-2's vocabulary and layout, but tiny and randomly initialised: it knows no English at all.
STANDIN_CONFIG = {
    "vocab_size": GPT2_VOCAB_SIZE,
    "context_length": 256,
    "emb_dim": 64,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


class BaseModel(NamedTuple):
    """The model to finetune, a line that says which one it is, and whether it was pretrained."""

    model: GPTModel
    description: str
    pretrained: bool


def load_gpt2_or_standin(
    size: str,
    *,
    pretrained: bool = True,
    model_dir=None,
    standin_config: GPTConfig | None = None,
    seed: int | None = None,
) -> BaseModel:
    """The model to finetune, with dropout off as in the book's finetuning (see :class:`BaseModel`).

    - ``model_dir``: a GPT-2 checkpoint folder (``config.json`` + ``model.safetensors``);
    - ``pretrained=True``: OpenAI's GPT-2 of ``size``, downloaded once into the data directory.
      When that fails (offline, a firewall), the stand-in instead, with a printed line and a
      description that say so, rather than an error;
    - ``pretrained=False`` (quick mode): the stand-in, ``standin_config`` (default
      :data:`STANDIN_CONFIG`), drawn after ``set_seed(seed)`` when a seed is given.
    """
    if model_dir is not None:
        return BaseModel(set_dropout(load_hf_gpt2(model_dir), 0.0), f"GPT-2 checkpoint from {model_dir}", True)
    reason = "quick mode"
    if pretrained:
        try:
            model = load_hf_gpt2(download_gpt2(size))
            return BaseModel(set_dropout(model, 0.0), f"OpenAI's pretrained {size}", True)
        except (DownloadError, OSError) as error:
            first_line = str(error).splitlines()[0]
            print(f"Could not get {size} ({first_line}); using the tiny random stand-in model instead.")
            reason = f"{size} weights unavailable"
    cfg = standin_config or STANDIN_CONFIG
    if seed is not None:
        set_seed(seed)
    description = (
        f"a TINY RANDOMLY INITIALISED stand-in ({cfg['n_layers']} layers, {cfg['emb_dim']} dims), "
        f"not GPT-2 ({reason}): it knows no English"
    )
    return BaseModel(GPTModel(cfg), description, False)
