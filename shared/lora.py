"""LoRA, low-rank adaptation (Hu et al. 2021), the final form built in appendix E.

Instead of updating a frozen linear layer's weight W (out x in), train a low-rank update
ΔW = (A·B)ᵀ · alpha/rank with A (in x rank) and B (rank x out), rank ≪ in, out. B starts at
zero, so a freshly adapted model gives exactly the outputs of the model it wraps.

- :class:`LoRALayer`: the update ``x -> x·A·B · alpha/rank``;
- :class:`LinearWithLoRA`: a frozen ``nn.Linear`` plus its update, which can be merged into
  the weight (no extra work per forward pass) and unmerged again;
- :func:`apply_lora`: swap the chosen linear layers of a model for LoRA versions and freeze
  everything else; :func:`merge_lora`, :func:`unmerge_lora`, :func:`remove_lora` (back to plain
  ``nn.Linear`` layers, so the model saves in the ordinary checkpoint format);
- :func:`lora_state_dict` / :func:`load_lora_state_dict`: an adapter saved apart from the
  (much larger) base model.

The scale is alpha/rank as in Hu et al. and Hugging Face PEFT (the book's code multiplies by
alpha alone). A is drawn as an ``nn.Linear(in, rank)`` weight would be (as in Microsoft's loralib
and PEFT). Every function validates its whole input before it changes the model, so a bad call
leaves the model as it was.
"""

from __future__ import annotations

import fnmatch
import math
import numbers

import torch
from torch import nn

# Names for groups of GPTModel's linear layers; any other target is a name pattern.
KINDS = {
    "attention": ("att.qkv", "att.out_proj"),
    "feed_forward": ("ff.fc", "ff.proj"),
    "head": ("out_head",),
}


def _check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer (e.g. 8 or 16), got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(
            f"LoRA alpha must be a positive number (the update is scaled by alpha/rank; alpha=rank "
            f"gives scale 1), got {alpha!r}."
        )


class LoRALayer(nn.Module):
    """The low-rank update on its own: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, device=None, dtype=None):
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.rank, self.alpha = int(rank), float(alpha)
        self.A = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rank, out_features, device=device, dtype=dtype))
        # Uniform in +-1/sqrt(in_features), nn.Linear's default for an in -> rank layer. (On the
        # (in, rank) tensor itself, kaiming_uniform_ would read rank as the fan-in.)
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.A, -bound, bound)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """The update as a matrix shaped like ``nn.Linear.weight``: (out_features, in_features)."""
        return (self.A @ self.B).T * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A @ self.B) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.A.shape[0]}, out={self.B.shape[1]}, rank={self.rank}, alpha={self.alpha:g}"


class LinearWithLoRA(nn.Module):
    """A linear layer plus a LoRA update: ``linear(x) + lora(x)``, or ``linear(x)`` once merged."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearWithLoRA wraps an nn.Linear, got {type(linear).__name__}.")
        self.linear = linear
        weight = linear.weight
        self.lora = LoRALayer(
            linear.in_features, linear.out_features, rank, alpha, device=weight.device, dtype=weight.dtype
        )
        self.merged = False

    # Code that reads a layer's sizes (attention checks its input width) works on either kind.
    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the update is inside linear.weight already
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    @torch.no_grad()
    def merge(self) -> None:
        self.linear.weight += self.lora.delta_weight().to(self.linear.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.linear.weight -= self.lora.delta_weight().to(self.linear.weight.dtype)
        self.merged = False


# ---------------------------------------------------------------------------------------
# Choosing the layers
# ---------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    """Whether the module name, or a dotted tail of it, matches the pattern ("qkv", "att.*", "trf_blocks.11.*")."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one name (a head tied to the embedding)."""
    seen, tied = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (tied if id(param) in seen else seen).add(id(param))
    return tied


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """Module name -> LinearWithLoRA, for every adapted layer of ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LinearWithLoRA)}


def _select_linears(model: nn.Module, targets) -> list[str]:
    """Names of the linear layers ``targets`` picks (all untied ones for None); raise on a bad target."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    tied = _tied_parameters(model)
    if targets is None:
        return [name for name, m in linears.items() if id(m.weight) not in tied]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be None or non-empty names/patterns (strings), got {targets!r}.")
    chosen = []
    for target in targets:
        patterns = KINDS.get(target, (target,))
        found = [name for name in linears if any(_matches(name, p) for p in patterns)]
        if not found:
            raise ValueError(
                f"LoRA target {target!r} matches no linear layer. Use one of the kinds {list(KINDS)}, "
                f"or a name pattern matching layers such as {list(linears)[:4]}."
            )
        chosen += [name for name in found if name not in chosen]
    for name in chosen:
        if id(linears[name].weight) in tied:
            raise ValueError(
                f"{name!r} shares its weight with another layer (a head tied to the token embedding): "
                "merging an adapter into it would change the embedding too. Leave it out of targets."
            )
    return chosen


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=None) -> int:
    """Swap linear layers of ``model`` for LoRA versions in place, freeze everything else.

    ``targets``: None for every linear layer (except a head tied to the embedding), or names:
    the kinds ``"attention"``, ``"feed_forward"``, ``"head"``, or patterns matched against each
    layer's name or a dotted tail of it (``"qkv"``, ``"ff.*"``, ``"trf_blocks.11.*"``).
    Returns the number of trainable parameters (the adapters' A and B).
    """
    _check_rank_alpha(rank, alpha)
    if lora_layers(model):
        raise ValueError(
            f"the model already has {len(lora_layers(model))} LoRA layers: apply_lora once per model "
            "(to change rank or targets, start again from the base model)."
        )
    chosen = _select_linears(model, targets)
    if not chosen:
        raise ValueError("the model has no linear layer that LoRA could adapt.")
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LinearWithLoRA(getattr(parent, child), rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------


def _adapted(model: nn.Module, merged: bool, action: str, fix: str) -> list[LinearWithLoRA]:
    """The model's LoRA layers, after checking none of them is already in the ``merged`` state."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError(f"cannot {action}: the model has no LoRA layers (call apply_lora first).")
    if any(layer.merged == merged for layer in layers):
        state = "merged" if merged else "unmerged"
        raise ValueError(f"cannot {action}: the adapters are already {state}; {fix}.")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its frozen weight (W += ΔW); forward passes then skip the adapters.

    The adapters are kept, so :func:`unmerge_lora` can take the update out again.
    """
    for layer in _adapted(model, True, "merge", "merging twice would add the update twice"):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged update out of its weight again (W -= ΔW, equal to W up to rounding)."""
    for layer in _adapted(model, False, "unmerge", "merge_lora first"):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every merged LoRA layer by its plain ``nn.Linear`` (which holds W + ΔW).

    The model then has the layout and state-dict names of an ordinary model, so the usual
    savers (``save_classifier``, ``save_hf_gpt2``) write it. The adapters must be merged first.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("cannot remove LoRA: the model has no LoRA layers.")
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:
        raise ValueError(
            f"{len(unmerged)} LoRA layers (e.g. {unmerged[0]!r}) are not merged: removing them would "
            "throw the trained update away. Call merge_lora first."
        )
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.linear)
    return model


# ---------------------------------------------------------------------------------------
# Saving an adapter apart from the base model
# ---------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: ``<layer>.lora.A``, ``.lora.B`` and ``.lora.alpha`` (a 0-d tensor) per layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers, so there is no adapter to save.")
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora.A"] = layer.lora.A.detach().clone()
        state[f"{name}.lora.B"] = layer.lora.B.detach().clone()
        state[f"{name}.lora.alpha"] = torch.tensor(layer.lora.alpha)
    return state


def _check_adapter(layers: dict[str, LinearWithLoRA], state: dict) -> None:
    """Raise ValueError unless ``state`` is an adapter for exactly these layers, ranks and alphas."""
    expected = {f"{name}.lora.{part}" for name in layers for part in ("A", "B", "alpha")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"this adapter was saved for another model or other targets: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}. apply_lora with the targets it was trained with first."
        )
    for name, layer in layers.items():
        for part in ("A", "B"):
            saved, ours = state[f"{name}.lora.{part}"], getattr(layer.lora, part)
            if saved.shape != ours.shape:
                raise ValueError(
                    f"{name}.lora.{part} has shape {tuple(saved.shape)}, the model's {tuple(ours.shape)}: "
                    f"the adapter has rank {state[f'{name}.lora.A'].shape[-1]}, the model's LoRA rank "
                    f"{layer.lora.rank} (or the layer sizes differ: another model)."
                )
        saved_alpha = float(state[f"{name}.lora.alpha"])
        if saved_alpha != layer.lora.alpha:
            raise ValueError(
                f"{name}: the adapter was trained with alpha={saved_alpha:g}, the model's LoRA layers "
                f"have alpha={layer.lora.alpha:g}; apply_lora with alpha={saved_alpha:g}."
            )


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a saved adapter (from :func:`lora_state_dict`) into a model prepared with the same
    :func:`apply_lora` call; the model must not be merged. Checked completely before anything is copied."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA layers: call apply_lora with the adapter's rank and alpha first."
        )
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's adapters are merged; call unmerge_lora before loading another adapter.")
    _check_adapter(layers, state)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora.A.copy_(state[f"{name}.lora.A"])
            layer.lora.B.copy_(state[f"{name}.lora.B"])
    return model
