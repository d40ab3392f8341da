"""shared.exercises: every check passes the solution and fails plausible wrong answers with its hint.

RIGHT holds, per exercise id, answers computed the way the solutions notebooks compute them (or
a short correct implementation); WRONG holds wrong answers a learner could plausibly give, each
with a fragment of the hint the check must print for it.
"""

import functools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from shared import lora
from shared.attention import MultiHeadAttention
from shared.checkpoint import load_checkpoint
from shared.classification import prepare_spam_splits, read_split
from shared.data import load_sms_spam, load_the_verdict
from shared.dataloader import create_dataloader
from shared.exercises import EXERCISES, INPUTS, TOY_LOGITS, TOY_WORDS, WORDS, check
from shared.instruction import InstructionDataset, format_prompt
from shared.model import GPT_CONFIGS, GPTModel, build_on_meta, count_parameters
from shared.tokenizer import (
    END_OF_TEXT,
    UNKNOWN,
    SimpleTokenizerV2,
    build_vocab,
    get_gpt2_tokenizer,
    simple_split,
)
from shared.train import lr_at, train_model

GPT_CONFIG_124M = GPT_CONFIGS["gpt2-small"]
SENTENCE = "The verdict was a sensation, and Gisburn's pictures sold at once."


@functools.cache
def tokenizer():
    return get_gpt2_tokenizer()


def outcome(exercise_id, answer, capsys):
    passed = check(exercise_id, answer)
    return passed, capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Right answers, computed as the solutions do
# ---------------------------------------------------------------------------------------


def windows_answer(shared_2_2=0, window_count=None):
    answer = {}
    for max_length, stride in [(2, 2), (8, 2)]:
        loader = create_dataloader(
            load_the_verdict(), batch_size=4, max_length=max_length, stride=stride, shuffle=False
        )
        count = window_count(max_length, stride) if window_count else len(loader.dataset)
        answer[(max_length, stride)] = (
            count,
            max_length - stride if (max_length, stride) != (2, 2) else shared_2_2,
        )
    return answer


def hello_answer(**changes):
    spellings = ["Hello", " Hello", "hello", " hello", "HELLO"]
    ids = tokenizer().encode(load_the_verdict())
    answer = {
        "single_token": [s for s in spellings if len(tokenizer().encode(s)) == 1],
        "any_shared_id": False,
        "count_space_the": ids.count(262),
        "count_the": ids.count(1169),
    }
    return {**answer, **changes}


def unknown_answer(**changes):
    word_tokenizer = SimpleTokenizerV2(build_vocab(load_the_verdict(), special_tokens=[END_OF_TEXT, UNKNOWN]))
    ids = word_tokenizer.encode(SENTENCE)
    unknown_id = word_tokenizer.str_to_int[UNKNOWN]
    unknown = [t for t, i in zip(simple_split(SENTENCE), ids, strict=True) if i == unknown_id]
    return {"unknown": unknown, "decoded": word_tokenizer.decode(ids), **changes}


def padding_answer(pad_id=50256, invert=False, as_int=False):
    encoded = [tokenizer().encode(t) for t in ["Hello, world.", "Your journey starts with one step."]]
    longest = max(len(ids) for ids in encoded)
    batch = torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids in encoded])
    mask = torch.tensor([[True] * len(ids) + [False] * (longest - len(ids)) for ids in encoded])
    mask = ~mask if invert else mask
    return batch, mask.long() if as_int else mask


def counting_windows_answer(**changes):
    n = len(tokenizer().encode(load_the_verdict()))
    return {"windows": (n - 256 - 1) // 128 + 1, "batches_drop_last": 4, "batches_keep_last": 5, **changes}


class UnmaskedTwoHeads(nn.Module):
    """Two heads of one dimension each, every position attending to every other (no causal mask)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(3, 6), nn.Linear(2, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def attention_counts(out_proj_bias=True, times_heads=False):
    answer = {}
    for name, d, heads in [("small", 768, 12), ("xl", 1600, 25)]:
        for bias in (False, True):
            with torch.device("meta"):
                count = count_parameters(MultiHeadAttention(d, d, 1024, 0.0, heads, qkv_bias=bias))
            count -= 0 if out_proj_bias else d
            count = count * heads if times_heads else count
            answer[f"{name}_qkv_bias" if bias else name] = count
    return answer


def mask_change_answer(change_first=False, unmasked_zero=False):
    torch.manual_seed(123)
    causal = MultiHeadAttention(d_in=3, d_out=4, context_length=6, dropout=0.0, num_heads=2).eval()
    batch = torch.stack((INPUTS, INPUTS))
    changed = batch.clone()
    changed[:, 0 if change_first else -1] = torch.tensor([0.9, -0.4, 0.2])
    with torch.no_grad():
        before, after = causal(batch), causal(changed)
    return {
        "earlier_with_mask": (after[:, :-1] - before[:, :-1]).abs().max().item(),
        "last_with_mask": (after[:, -1] - before[:, -1]).abs().max().item(),
        "earlier_without_mask": 0.0 if unmasked_zero else 0.034,
    }


def most_attended(vectors, normalise):
    if normalise:
        vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    return [WORDS[j] for j in torch.softmax(vectors @ vectors.T, dim=-1).argmax(dim=-1)]


def length_answer(stretch=True, normalise=True):
    stretched = INPUTS.clone()
    stretched[3] *= 3 if stretch else 1
    return {"dot": most_attended(stretched, False), "cosine": most_attended(stretched, normalise)}


def block_counts(ff_bias=True, qkv_bias=False):
    block = build_on_meta({**GPT_CONFIG_124M, "qkv_bias": qkv_bias}).trf_blocks[0]
    d = GPT_CONFIG_124M["emb_dim"]
    return {
        "feed_forward": count_parameters(block.ff) - (0 if ff_bias else 5 * d),
        "attention": count_parameters(block.att),
    }


def larger_models_answer(context_256=False, tied_count=False):
    sizes = {"gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
    answer = {}
    for name, (emb_dim, n_layers, n_heads) in sizes.items():
        cfg = {
            **GPT_CONFIG_124M,
            "emb_dim": emb_dim,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "context_length": 256 if context_256 else GPT_CONFIG_124M["context_length"],
        }
        counted = cfg if not tied_count else {**cfg, "tie_weights": True}
        answer[name] = (cfg, count_parameters(build_on_meta(counted)))
    return answer


def build_with_dropouts(cfg, emb, attention, shortcut, swap=False, skip_attention=False):
    model = GPTModel(cfg)
    model.drop_emb.p = emb
    for block in model.trf_blocks:
        if not skip_attention:
            block.att.dropout = shortcut if swap else attention
        block.drop_shortcut.p = attention if swap else shortcut
    return model


def kv_cache_bytes(cfg, num_tokens, keys_and_values=2, per_head=False):
    width = cfg["emb_dim"] * (cfg["n_heads"] if per_head else 1)
    return keys_and_values * cfg["n_layers"] * num_tokens * width * 4


def head_shares(of_blocks=False, scale=1.0):
    shares = {}
    for name, cfg in GPT_CONFIGS.items():
        d, vocab = cfg["emb_dim"], cfg["vocab_size"]
        blocks, head = cfg["n_layers"] * (24 * d**2 + 2 * 1024 * d), 2 * d * vocab
        shares[name] = scale * head / (blocks if of_blocks else blocks + head)
    return shares


def nucleus_size(logits, top_p, include_crossing=True, sort=True):
    probs = logits.softmax(-1)
    probs = torch.sort(probs, descending=True).values if sort else probs
    mass_before = probs.cumsum(-1) - (probs if include_crossing else 0)
    return int((mass_before < top_p).sum())


def train_one_more_epoch(
    model, optimizer, checkpoint_path, train_loader, val_loader, device, more=1, optimizer_too=True
):
    state = load_checkpoint(checkpoint_path, model, optimizer if optimizer_too else None)
    done = state["history"]
    return train_model(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        num_epochs=done.epoch * (more == 1) + more,
        eval_freq=5,
        eval_iter=1,
        progress=False,
        history=done,
    )


def repeated_trigram_share(ids, distinct=False, unique_based=False):
    trigrams = list(zip(ids, ids[1:], ids[2:], strict=False))
    counts = Counter(trigrams)
    if unique_based:
        return 1 - len(counts) / len(trigrams)
    repeated = [t for t in (counts if distinct else trigrams) if counts[t] > 1]
    return len(repeated) / len(trigrams)


def oversampled(leak=False, oversample=True, num_ham=1000):
    frame = load_sms_spam()
    paths = prepare_spam_splits()
    held_out = set(pd.concat([read_split(paths["validation"]), read_split(paths["test"])])["Text"])
    pool = frame if leak else frame[~frame["Text"].isin(held_out)]
    ham, spam = pool[pool["Label"] == "ham"], pool[pool["Label"] == "spam"]
    ham_part = ham.sample(num_ham, random_state=123)
    spam_part = spam.sample(num_ham, replace=True, random_state=123) if oversample else spam
    return pd.concat([ham_part, spam_part]).sample(frac=1, random_state=123).reset_index(drop=True)


def sgd_answer(sign=-1.0, lr=0.1):
    x, y = torch.tensor([0.5, -1.5]), torch.tensor(1.0)
    w = torch.tensor([0.8, 0.3], requires_grad=True)
    b = torch.tensor(0.1, requires_grad=True)
    F.binary_cross_entropy(torch.sigmoid(x @ w + b), y).backward()
    with torch.no_grad():
        w += sign * lr * w.grad
        b += sign * lr * b.grad
        loss_after = F.binary_cross_entropy(torch.sigmoid(x @ w + b), y).item()
    return {"w": w.tolist(), "b": b.item(), "loss_after": loss_after}


def shapes_answer(**changes):
    a = torch.arange(24).reshape(2, 3, 4)
    answer = {
        "a.transpose(1, 2)": tuple(a.transpose(1, 2).shape),
        "a @ a.transpose(1, 2)": tuple((a @ a.transpose(1, 2)).shape),
        "a.sum(dim=1)": tuple(a.sum(dim=1).shape),
        "a.reshape(-1, 4)": tuple(a.reshape(-1, 4).shape),
        "a[:, 0]": tuple(a[:, 0].shape),
        "a[..., :1]": tuple(a[..., :1].shape),
        "a.unsqueeze(1)": tuple(a.unsqueeze(1).shape),
        "a + torch.ones(4)": tuple((a + torch.ones(4)).shape),
        "a + torch.ones(3, 1)": tuple((a + torch.ones(3, 1)).shape),
        "fails": ["a.transpose(1, 2).view(-1)", "a + torch.ones(3)"],
    }
    return {**answer, **changes}


def sampler_answer(**changes):
    answer = {}
    for drop_last in (False, True):
        shares = [
            list(DistributedSampler(range(16), num_replicas=3, rank=r, drop_last=drop_last)) for r in range(3)
        ]
        drawn = [i for share in shares for i in share]
        if drop_last:
            answer["per_process_drop_last"] = len(shares[0])
            answer["left_out_drop_last"] = 16 - len(set(drawn))
        else:
            answer["per_process"] = len(shares[0])
            answer["repeated"] = len(drawn) - len(set(drawn))
    return {**answer, **changes}


def lr_with_floor(
    step, *, peak_lr, warmup_steps, decay_steps, floor_fraction, start=None, end=None, total=None
):
    floor = floor_fraction * peak_lr
    return lr_at(
        step,
        peak_lr=peak_lr,
        total_steps=total or decay_steps,
        warmup_steps=warmup_steps,
        initial_lr=floor if start is None else start,
        min_lr=floor if end is None else end,
    )


def warmup_answer(drop_last=True, steps_for=lambda b: 27 * 2 / b):
    text = load_the_verdict()
    answer = {}
    for batch_size in (4, 8, 16):
        loader = create_dataloader(
            text[: int(0.9 * len(text))],
            batch_size=batch_size,
            max_length=256,
            stride=256,
            drop_last=drop_last,
        )
        steps = steps_for(batch_size)
        answer[batch_size] = (steps, steps / (15 * len(loader)))
    return answer


def phase_two(initial_lr=1e-5, peak_lr=5e-4, linear=False):
    if linear:
        return [
            1e-5 + (5e-4 - 1e-5) * s / 10 if s < 10 else 5e-4 - (5e-4 - 1e-5) * (s - 10) / 90
            for s in range(100)
        ]
    return [
        lr_at(s, peak_lr=peak_lr, total_steps=100, warmup_steps=10, initial_lr=initial_lr, min_lr=1e-5)
        for s in range(100)
    ]


def tokens_saved(entry, count=lambda text: len(tokenizer().encode(text)), flip=False):
    saved = count(format_prompt(entry, "alpaca")) - count(format_prompt(entry, "phi3"))
    return -saved if flip else saved


def share_in_loss(entries, end_of_text=1, complement=False):
    dataset = InstructionDataset(entries, tokenizer())
    kept = sum(len(e.token_ids) - 1 + end_of_text - (e.prompt_length - 1) for e in dataset)
    total = sum(len(e.token_ids) - 1 + end_of_text for e in dataset)
    return 1 - kept / total if complement else kept / total


def share_kept(entries, max_length, by_examples=False, complement=False):
    lengths = [len(e.token_ids) + 1 for e in InstructionDataset(entries, tokenizer())]  # + the end-of-text
    if by_examples:
        return sum(n <= max_length for n in lengths) / len(lengths)
    kept = sum(min(n, max_length) for n in lengths) / sum(lengths)
    return 1 - kept if complement else kept


def freeze_all_but_last(model, num_blocks, first=False, final_norm=True):
    model.requires_grad_(False)
    for block in model.trf_blocks[:num_blocks] if first else model.trf_blocks[-num_blocks:]:
        block.requires_grad_(True)
    model.final_norm.requires_grad_(final_norm)
    model.out_head.requires_grad_(True)
    return model


class Int8Linear(nn.Module):
    """A frozen linear layer kept as integers with one scale per output row (the exercise's base layer)."""

    def __init__(self, linear, use_scale=True, keep_float=False, dtype=torch.int8):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("weight_q", torch.round(weight / scale).to(dtype))
        self.register_buffer("scale", scale if use_scale else torch.ones_like(scale))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.float_copy = linear if keep_float else None
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return F.linear(x, self.weight_q.to(x.dtype) * self.scale, self.bias)


class Int8WithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha, b_random=False, **options):
        super().__init__()
        self.base = Int8Linear(linear, **options)
        self.lora = lora.LoRALayer(linear.in_features, linear.out_features, rank, alpha)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if b_random:
            nn.init.normal_(self.lora.B)

    def forward(self, x):
        return self.base(x) + self.lora(x)


def quantize_with_lora(model, rank, alpha, freeze=True, **options):
    if freeze:
        model.requires_grad_(False)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8WithLoRA(module, rank, alpha, **options))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt_blocks_train_head(model, targets=("attention", "feed_forward"), unfreeze_head_after=True):
    if not unfreeze_head_after:
        model.out_head.requires_grad_(True)  # undone: apply_lora freezes the whole model
    lora.apply_lora(model, 16, 16, targets=list(targets) if targets else None)
    if unfreeze_head_after:
        model.out_head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# The appendix's stand-in classifier: 2 blocks of 64 dims and a 2-class head. Per rank, the adapters on
# every linear layer hold sum(d_in + d_out) = 2 x (256 + 128 + 320 + 320) + 66 parameters.
STANDIN_PER_RANK = 2 * (256 + 128 + 320 + 320) + 66
STANDIN_D_IN_PER_RANK = 2 * (64 + 64 + 64 + 256) + 64
GPT2_SMALL_PER_RANK = 2_371_616 // 16  # the appendix's count at rank 16


def rank_sweep(per_rank=STANDIN_PER_RANK, accuracy_scale=1.0):
    accuracies = {1: 0.8333, 16: 0.83, 64: 0.84}
    return {rank: (rank * per_rank, accuracy * accuracy_scale) for rank, accuracy in accuracies.items()}


def placements(attention=13_344, best=None):
    answer = {"attention": (attention, 0.8133), "feed_forward": (21_536, 0.79), "every_layer": (33_824, 0.83)}
    return {**answer, "best": best or max(answer, key=lambda key: answer[key][1] / answer[key][0])}


def alpha_answer(scale=lambda alpha: alpha / 16, lr=lambda s: 1e-3 * s):
    return {
        "scale": {alpha: scale(alpha) for alpha in (1, 16, 256)},
        "lr_at_scale_1": {alpha: lr(alpha / 16) for alpha in (1, 256)},
    }


RIGHT = {
    "ch02.1": [windows_answer],
    "ch02.2": [hello_answer],
    "ch02.3": [unknown_answer],
    "ch02.4": [padding_answer],
    "ch02.5": [counting_windows_answer],
    "ch03.1": [lambda: {"holds_without_mask": True, "holds_with_causal_mask": False}],
    "ch03.2": [
        lambda: {
            "module": MultiHeadAttention(d_in=3, d_out=2, context_length=6, dropout=0.0, num_heads=2),
            "head_dim": 1,
        }
    ],
    "ch03.3": [attention_counts],
    "ch03.4": [mask_change_answer],
    "ch03.5": [length_answer],
    "ch04.1": [block_counts],
    "ch04.2": [larger_models_answer],
    "ch04.3": [lambda: build_with_dropouts],
    "ch04.4": [lambda: kv_cache_bytes],
    "ch04.5": [head_shares],
    "ch05.1": [
        lambda: [
            dict(temperature=0.0, top_k=50),
            dict(temperature=1.5, top_k=1),
            dict(temperature=1.0, top_p=1e-6),
        ]
    ],
    "ch05.2": [
        lambda: {t: torch.softmax(TOY_LOGITS / t, dim=0)[TOY_WORDS.index("piano")].item() for t in (1.0, 3.0)}
    ],
    "ch05.3": [lambda: nucleus_size],
    "ch05.4": [lambda: train_one_more_epoch],
    "ch05.5": [lambda: repeated_trigram_share],
    "ch05.6": [lambda: {"gpt2-small": (3.7547, 3.5596), "gpt2-medium": (3.4, 3.3)}],
    "ch05.7": [lambda: {1e-4: 10.801, 4e-4: 10.665, 1e-3: 10.425}],
    "ch05.8": [lambda: {"gpt2": 0.020, "pytorch": 1.000}],
    "ch06.1": [
        lambda: {"trainable_blocks": 2, "trainable_parameters": 14_178_818},
        lambda: {"trainable_blocks": 0, "trainable_parameters": 130},
    ],
    "ch06.2": [lambda: {"last": 0.9667, "first": 0.7667, "first_no_mask": 0.9467}],
    "ch06.3": [lambda: {"dynamic": 0.9667, "padded_last_token": 0.9667, "padded_last_position": 0.9633}],
    "ch06.4": [oversampled],
    "ch06.5": [lambda: lambda two: (two[:, 1] - two[:, 0]).unsqueeze(-1)],
    "ch07.1": [lambda: tokens_saved],
    "ch07.2": [lambda: share_in_loss],
    "ch07.3": [lambda: freeze_all_but_last],
    "ch07.4": [lambda: share_kept],
    "ch07.5": [lambda: {"llama3": 52.5, "phi3": 61.0}],
    "appendix_A.1": [shapes_answer],
    "appendix_A.2": [lambda: {"per_layer": [90, 620, 42], "total": 752}],
    "appendix_A.3": [sgd_answer],
    "appendix_A.4": [
        lambda: {"size": 2048, "cpu_seconds": 0.808, "gpu_seconds": None},
        lambda: {"size": 2048, "cpu_seconds": 0.808, "gpu_seconds": 0.0021},
    ],
    "appendix_A.5": [sampler_answer],
    "appendix_D.1": [lambda: lr_with_floor],
    "appendix_D.2": [lambda: {"by_norm": 1.0, "by_value": 0.558}],
    "appendix_D.3": [warmup_answer, lambda: warmup_answer(steps_for=lambda b: math.ceil(27 * 2 / b))],
    "appendix_D.4": [phase_two],
    "appendix_E.1": [rank_sweep, lambda: rank_sweep(per_rank=GPT2_SMALL_PER_RANK)],
    "appendix_E.2": [placements, lambda: {**placements(), "attention": (13_344 - 16 * 66, 0.8133)}],
    "appendix_E.3": [alpha_answer],
    "appendix_E.4": [lambda: quantize_with_lora],
    "appendix_E.5": [lambda: adapt_blocks_train_head],
}

# (exercise id, a wrong answer, a fragment of the hint it must get)
WRONG = [
    ("ch02.1", lambda: windows_answer(shared_2_2=1), "window i covers"),
    ("ch02.1", lambda: windows_answer(window_count=lambda m, s: 5145 // s), "max_length + 1 tokens"),
    (
        "ch02.2",
        lambda: hello_answer(single_token=["Hello", " Hello", "hello", " hello", "HELLO"]),
        "one id means one token",
    ),
    ("ch02.2", lambda: hello_answer(count_space_the=6, count_the=162), "keeps that space in front"),
    ("ch02.3", lambda: unknown_answer(unknown=["verdict"]), "not its title"),
    ("ch02.3", lambda: unknown_answer(decoded=SENTENCE), "comes back as <|unk|>"),
    ("ch02.4", lambda: padding_answer(pad_id=0), "end-of-text id"),
    ("ch02.4", lambda: padding_answer(invert=True), "True where a position holds a real token"),
    ("ch02.4", lambda: padding_answer(as_int=True), "True/False"),
    ("ch02.5", lambda: counting_windows_answer(windows=38), "needs max_length + 1 tokens"),
    ("ch02.5", lambda: counting_windows_answer(batches_drop_last=5), "throws away an incomplete last batch"),
    (
        "ch03.1",
        lambda: {"holds_without_mask": True, "holds_with_causal_mask": True},
        "sees only the words before it",
    ),
    (
        "ch03.1",
        lambda: {"holds_without_mask": False, "holds_with_causal_mask": False},
        "in the same new order",
    ),
    (
        "ch03.2",
        lambda: {"module": MultiHeadAttention(3, 4, 6, 0.0, 2), "head_dim": 2},
        "width of the whole output",
    ),
    ("ch03.2", lambda: {"module": UnmaskedTwoHeads(), "head_dim": 1}, "build it causal"),
    ("ch03.2", lambda: {"module": MultiHeadAttention(3, 2, 6, 0.0, 2), "head_dim": 2}, "d_out / num_heads"),
    (
        "ch03.3",
        lambda: attention_counts(out_proj_bias=False),
        "the output projection has d x d weights and d biases",
    ),
    ("ch03.3", lambda: attention_counts(times_heads=True), "number of heads does not change"),
    ("ch03.4", lambda: mask_change_answer(change_first=True), "change only the last token"),
    ("ch03.4", lambda: mask_change_answer(unmasked_zero=True), "without the mask every position"),
    ("ch03.5", lambda: length_answer(stretch=False), "three times as long"),
    ("ch03.5", lambda: length_answer(normalise=False), "cosine ignores length"),
    ("ch04.1", lambda: block_counts(ff_bias=False), "each with a bias"),
    ("ch04.1", lambda: block_counts(qkv_bias=True), "qkv_bias=False"),
    (
        "ch04.2",
        lambda: larger_models_answer(context_256=True),
        "the width, the depth and the number of heads",
    ),
    ("ch04.2", lambda: larger_models_answer(tied_count=True), "a separate matrix"),
    ("ch04.3", lambda: functools.partial(build_with_dropouts, swap=True), "each of the three places"),
    (
        "ch04.3",
        lambda: functools.partial(build_with_dropouts, skip_attention=True),
        "each of the three places",
    ),
    ("ch04.4", lambda: functools.partial(kv_cache_bytes, keys_and_values=1), "a key and a value"),
    ("ch04.4", lambda: functools.partial(kv_cache_bytes, per_head=True), "all heads together"),
    ("ch04.5", lambda: head_shares(of_blocks=True), "the whole forward pass"),
    ("ch04.5", lambda: head_shares(scale=100), "between 0 and 1"),
    ("ch05.1", lambda: [dict(temperature=0.0), dict(temperature=0.5)], "only one token can be chosen"),
    ("ch05.1", lambda: [dict(temperature=0.0, top_k=50)], "temperature 0 is one way"),
    (
        "ch05.2",
        lambda: {t: torch.softmax(TOY_LOGITS * t, dim=0)[6].item() for t in (1.0, 3.0)},
        "divide the logits",
    ),
    ("ch05.2", lambda: {1.0: 1.3, 3.0: 37.4}, "not a count"),
    ("ch05.3", lambda: functools.partial(nucleus_size, include_crossing=False), "makes the sum reach top_p"),
    ("ch05.3", lambda: functools.partial(nucleus_size, sort=False), "sort the probabilities"),
    ("ch05.4", lambda: functools.partial(train_one_more_epoch, more=0), "num_epochs counts all epochs"),
    ("ch05.4", lambda: functools.partial(train_one_more_epoch, optimizer_too=False), "optimizer moments"),
    ("ch05.5", lambda: functools.partial(repeated_trigram_share, distinct=True), "count every position"),
    ("ch05.5", lambda: functools.partial(repeated_trigram_share, unique_based=True), "count every position"),
    ("ch05.6", lambda: {"gpt2-small": (3.7547, 3.5596), "gpt2-medium": (3.9, 3.7)}, "355M model"),
    ("ch05.6", lambda: {"gpt2-small": (42.7, 35.2), "gpt2-medium": (30.1, 28.9)}, "calc_loss_loader"),
    ("ch05.7", lambda: {1e-4: 10.8, 4e-4: 10.8, 1e-3: 10.8}, "fresh model"),
    ("ch05.7", lambda: {1e-4: 49000.0, 4e-4: 42000.0, 1e-3: 33000.0}, "not a perplexity"),
    ("ch05.8", lambda: {"gpt2": 1.0, "pytorch": 0.02}, "N(0, 0.02)"),
    ("ch05.8", lambda: {"gpt2": 0.0004, "pytorch": 1.0}, "not the variance"),
    (
        "ch06.1",
        lambda: {"trainable_blocks": 2, "trainable_parameters": 2 * 7_087_872},
        "the final norm and the new 2-output head",
    ),
    (
        "ch06.1",
        lambda: {"trainable_blocks": 2, "trainable_parameters": 14_178_818 + 768 * 50257},
        "not the old vocabulary head",
    ),
    ("ch06.2", lambda: {"last": 0.9667, "first": 0.9700, "first_no_mask": 0.98}, "attends only to itself"),
    ("ch06.2", lambda: {"last": 96.67, "first": 76.67, "first_no_mask": 94.67}, "not percentages"),
    (
        "ch06.3",
        lambda: {"dynamic": 0.9667, "padded_last_token": 0.7833, "padded_last_position": 0.7833},
        "pooling='last'",
    ),
    (
        "ch06.3",
        lambda: {"dynamic": 96.67, "padded_last_token": 96.67, "padded_last_position": 96.33},
        "not percentages",
    ),
    ("ch06.4", lambda: oversampled(leak=True), "set the validation and test messages aside"),
    ("ch06.4", lambda: oversampled(oversample=False), "with replacement"),
    ("ch06.4", lambda: oversampled(oversample=False, num_ham=477), "keep more ham"),
    ("ch06.5", lambda: lambda two: (two[:, 0] - two[:, 1]).unsqueeze(-1), "which difference"),
    ("ch06.5", lambda: lambda two: 2 * (two[:, 1] - two[:, 0]).unsqueeze(-1), "the whole difference"),
    ("ch07.1", lambda: functools.partial(tokens_saved, count=len), "not characters"),
    ("ch07.1", lambda: functools.partial(tokens_saved, flip=True), "in both styles"),
    ("ch07.2", lambda: functools.partial(share_in_loss, end_of_text=0), "end-of-text target still counts"),
    ("ch07.2", lambda: functools.partial(share_in_loss, complement=True), "not -100"),
    ("ch07.3", lambda: functools.partial(freeze_all_but_last, first=True), "LAST blocks"),
    ("ch07.3", lambda: functools.partial(freeze_all_but_last, final_norm=False), "the final norm"),
    ("ch07.4", lambda: functools.partial(share_kept, by_examples=True), "count tokens, not examples"),
    ("ch07.4", lambda: functools.partial(share_kept, complement=True), "survive the cut"),
    ("ch07.5", lambda: {"llama3": 52.5}, "two different judge models"),
    ("ch07.5", lambda: {"llama3": 525, "phi3": 610}, "from 0 to 100"),
    ("appendix_A.1", lambda: shapes_answer(**{"a[:, 0]": (2, 1, 4)}), "an integer index removes"),
    ("appendix_A.1", lambda: shapes_answer(fails=["a.view(4, -1)", "a + torch.ones(3)"]), "contiguous"),
    ("appendix_A.2", lambda: {"per_layer": [60, 600, 40], "total": 700}, "one bias per output"),
    ("appendix_A.2", lambda: {"per_layer": [90, 0, 620, 0, 42], "total": 752}, "ReLU has none"),
    ("appendix_A.3", lambda: sgd_answer(sign=+1.0), "against the gradient"),
    ("appendix_A.3", lambda: sgd_answer(lr=1.0), "lr times the gradient"),
    ("appendix_A.4", lambda: {"size": 2048, "cpu_seconds": 0.808, "gpu_seconds": 4e-6}, "synchronize"),
    ("appendix_A.4", lambda: {"size": 2048, "cpu_seconds": 808.1, "gpu_seconds": None}, "give seconds"),
    ("appendix_A.5", lambda: sampler_answer(per_process=5), "rounds 16 / 3 up"),
    ("appendix_A.5", lambda: sampler_answer(left_out_drop_last=0), "16 minus"),
    ("appendix_D.1", lambda: functools.partial(lr_with_floor, start=0.0), "not from 0"),
    ("appendix_D.1", lambda: functools.partial(lr_with_floor, end=0.0), "to the floor"),
    ("appendix_D.1", lambda: functools.partial(lr_with_floor, total=300), "to the floor"),
    ("appendix_D.2", lambda: {"by_norm": 1.0, "by_value": 1.0}, "really caps"),
    ("appendix_D.2", lambda: {"by_norm": 0.38, "by_value": 0.558}, "compare directions"),
    ("appendix_D.3", lambda: warmup_answer(steps_for=lambda b: 27 * b / 2), "fewer steps"),
    ("appendix_D.3", lambda: warmup_answer(drop_last=False), "incomplete batch is dropped"),
    ("appendix_D.4", lambda: phase_two(initial_lr=0.0), "starts where the first ended"),
    ("appendix_D.4", lambda: phase_two(peak_lr=1e-3), "new peak, 5e-4"),
    ("appendix_D.4", lambda: phase_two(linear=True), "half a cosine"),
    ("appendix_E.1", lambda: rank_sweep(per_rank=STANDIN_D_IN_PER_RANK), "not r x d"),
    ("appendix_E.1", lambda: rank_sweep(per_rank=STANDIN_PER_RANK + 2 * 2 * 64), "one fused layer"),
    ("appendix_E.1", lambda: rank_sweep(accuracy_scale=100), "not percentages"),
    ("appendix_E.2", lambda: placements(best="every_layer"), "divide each accuracy"),
    ("appendix_E.2", lambda: placements(attention=13_344 + 16 * 2 * 2 * 64), "one fused layer"),
    ("appendix_E.3", lambda: alpha_answer(scale=lambda alpha: alpha), "alpha / r"),
    ("appendix_E.3", lambda: alpha_answer(lr=lambda s: 1e-3 * s**2), "Adam divides each gradient"),
    ("appendix_E.3", lambda: alpha_answer(lr=lambda s: 1e-3 / s), "acts like a larger learning rate"),
    ("appendix_E.4", lambda: functools.partial(quantize_with_lora, b_random=True), "B starts at zero"),
    ("appendix_E.4", lambda: functools.partial(quantize_with_lora, use_scale=False), "multiply by the scale"),
    ("appendix_E.4", lambda: functools.partial(quantize_with_lora, keep_float=True), "no float copy"),
    ("appendix_E.4", lambda: functools.partial(quantize_with_lora, dtype=torch.float16), "as int8"),
    ("appendix_E.4", lambda: functools.partial(quantize_with_lora, freeze=False), "freeze the whole model"),
    ("appendix_E.5", lambda: functools.partial(adapt_blocks_train_head, targets=None), "parameters twice"),
    (
        "appendix_E.5",
        lambda: functools.partial(adapt_blocks_train_head, unfreeze_head_after=False),
        "trainable after it",
    ),
]

RIGHT_CASES = [(exercise_id, make) for exercise_id, makers in RIGHT.items() for make in makers]


@pytest.mark.parametrize("exercise_id, make", RIGHT_CASES, ids=[c[0] for c in RIGHT_CASES])
def test_the_solution_passes(exercise_id, make, capsys):
    passed, out = outcome(exercise_id, make(), capsys)
    assert passed and out.startswith("✓"), out


@pytest.mark.parametrize("exercise_id, make, hint", WRONG, ids=[f"{c[0]}-{c[2][:30]}" for c in WRONG])
def test_a_wrong_answer_fails_with_its_hint(exercise_id, make, hint, capsys):
    passed, out = outcome(exercise_id, make(), capsys)
    assert not passed and out.startswith("✗") and hint in out, out


def test_every_check_has_a_solution_and_two_wrong_answers():
    wrong_counts = Counter(exercise_id for exercise_id, _, _ in WRONG)
    assert set(RIGHT) == set(EXERCISES)
    assert all(wrong_counts[exercise_id] >= 2 for exercise_id in EXERCISES), wrong_counts


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
def test_a_placeholder_is_not_answered_yet(exercise_id, capsys):
    for placeholder in [..., {"windows": ...}, [..., 1]]:
        passed, out = outcome(exercise_id, placeholder, capsys)
        assert not passed and "not answered yet" in out


def stub(*args, **kwargs):
    raise NotImplementedError


@pytest.mark.parametrize(
    "exercise_id",
    [
        "ch04.3",
        "ch04.4",
        "ch05.3",
        "ch05.4",
        "ch05.5",
        "ch06.5",
        "ch07.1",
        "ch07.2",
        "ch07.3",
        "ch07.4",
        "appendix_D.1",
        "appendix_E.4",
        "appendix_E.5",
    ],
)
def test_a_function_stub_is_not_answered_yet(exercise_id, capsys):
    passed, out = outcome(exercise_id, stub, capsys)
    assert not passed and "not answered yet" in out


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
def test_an_answer_of_the_wrong_type_fails_without_raising(exercise_id, capsys):
    for answer in [42, "text", None, {}]:
        passed, out = outcome(exercise_id, answer, capsys)
        assert not passed and out.startswith("✗") and "Hint:" in out, out


def test_an_unknown_id_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="ch02.1"):
        check("ch99.1", 1)


def test_a_check_leaves_the_learners_random_state_alone(capsys):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check("ch05.1", [dict(temperature=0.0), dict(temperature=1.0, top_k=1)])
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------
# The notebooks: tools/add_exercise_checks.py and what it leaves behind
# ---------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import add_exercise_checks as tool  # noqa: E402  (the tool lives in tools/, not in a package)
from exercise_cells import PLACEHOLDERS, SOLUTION_CHECKS  # noqa: E402

# Set to True once tools/add_exercise_checks.py --write has run on the repository's notebooks.
EXERCISE_CHECKS_INSERTED = True
CHAPTER_NOTEBOOKS = sorted(
    p
    for p in ROOT.glob("*/*.ipynb")
    if p.stem == p.parent.name and re.fullmatch(r"ch\d\d|appendix_[A-Z]", p.stem)
)


def test_every_check_has_a_placeholder_and_a_solution_cell():
    assert set(PLACEHOLDERS) == set(SOLUTION_CHECKS) == set(EXERCISES)


@pytest.mark.parametrize("exercise_id", sorted(PLACEHOLDERS))
def test_an_untouched_placeholder_runs_and_is_not_answered_yet(exercise_id, capsys):
    namespace = {"torch": torch}
    exec(PLACEHOLDERS[exercise_id], namespace)
    passed, out = outcome(exercise_id, namespace[tool.answer_name(exercise_id)], capsys)
    assert not passed and "not answered yet" in out, out


def notebook_with(*markdown: str) -> dict:
    cells = [
        {"cell_type": "code", "source": ["banner()"], "outputs": [], "execution_count": 1, "metadata": {}}
    ]
    return {
        "cells": cells + [{"cell_type": "markdown", "source": [text], "metadata": {}} for text in markdown]
    }


EXERCISES_CELL = """## Summary

The chapter in short.

## Exercises

Solutions: [the notebook](x.ipynb).

1. **Other windows.** Build data loaders
   over *The Verdict*.
2. **Something else.** A question no check was written for.

## Further reading

- a paper"""


def test_the_tool_splits_the_exercises_and_a_second_run_changes_nothing():
    notebook = notebook_with(EXERCISES_CELL)
    ids = tool.checkable("ch02", tool.exercise_titles(notebook))
    assert ids == {1: "ch02.1"}
    report = tool.add_to_main(notebook, "ch02", ids)
    assert any("no check for ch02.2" in line for line in report)
    sources = [tool.source(c) for c in notebook["cells"]]
    assert sources[1] == "## Summary\n\nThe chapter in short."
    assert sources[2].startswith("## Exercises\n\nSolutions:") and sources[3] == tool.IMPORT
    assert sources[4] == "### Exercise 1: Other windows\n\nBuild data loaders\nover *The Verdict*."
    assert sources[5] == PLACEHOLDERS["ch02.1"].strip() and sources[6] == 'check("ch02.1", answer);'
    assert (
        sources[7].startswith("### Exercise 2: Something else")
        and sources[8] == "## Further reading\n\n- a paper"
    )
    before = json.dumps(notebook)
    assert tool.add_to_main(notebook, "ch02", tool.checkable("ch02", tool.exercise_titles(notebook))) == []
    assert json.dumps(notebook) == before


def test_the_tool_puts_the_check_after_the_solutions_last_code_cell_once():
    notebook = notebook_with("## Exercise 1: other windows", "## Exercise 2: something else")
    notebook["cells"].insert(2, {"cell_type": "code", "source": ["x = 1"], "outputs": [], "metadata": {}})
    notebook["cells"].insert(3, {"cell_type": "markdown", "source": ["Because."], "metadata": {}})
    assert tool.add_to_solutions(notebook, {1: "ch02.1"}) == ["check cell for ch02.1"]
    sources = [tool.source(c) for c in notebook["cells"]]
    solution_check = SOLUTION_CHECKS["ch02.1"].strip().replace(
        'check("ch02.1", windows_and_overlap);',
        'assert check("ch02.1", windows_and_overlap), "the solution fails its check"',
    )
    assert sources[3] == f"{tool.IMPORT}\n\n{solution_check}" and sources[4] == "Because."
    assert sources[3] != f"{tool.IMPORT}\n\n{SOLUTION_CHECKS['ch02.1'].strip()}"  # a failing solution must fail the run
    assert tool.add_to_solutions(notebook, {1: "ch02.1"}) == []


def exercise_sections(path: Path) -> dict[int, list[str]]:
    """{exercise number: the code cells after its text, up to the next exercise}; -1 holds an unsplit list."""
    sections, current = {}, None
    for notebook_cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        text = tool.source(notebook_cell)
        if notebook_cell["cell_type"] == "markdown":
            found = re.search(r"^#+\s*Exercise\s+(?:\d+\.)?(\d+)\b", text, re.M)
            current = int(found.group(1)) if found else (None if re.search(r"^#+\s", text, re.M) else current)
            if found:
                sections[current] = []
            if (
                any(tool.EXERCISES_HEADING.match(line) for line in text.splitlines())
                and tool.split_exercises(text)[2]
            ):
                sections[-1] = []
        elif current is not None:
            sections[current].append(text)
    return sections


@pytest.mark.skipif(
    not EXERCISE_CHECKS_INSERTED, reason="on once tools/add_exercise_checks.py --write has run"
)
@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=[p.name for p in CHAPTER_NOTEBOOKS])
def test_every_exercise_in_a_chapter_notebook_has_a_check_cell(path):
    sections = exercise_sections(path)
    assert -1 not in sections, "the exercises are still one list: run tools/add_exercise_checks.py --write"
    assert sections, "no exercises found"
    for number, code in sections.items():
        exercise_id = f"{path.stem}.{number}"
        assert exercise_id in EXERCISES, f"no check is written for {exercise_id} (shared/exercises.py)"
        assert any(f'check("{exercise_id}"' in text for text in code), f"{exercise_id} has no check cell"
    solutions = json.loads(path.with_name(f"{path.stem}-solutions.ipynb").read_text(encoding="utf-8"))[
        "cells"
    ]
    solution_code = "\n".join(tool.source(c) for c in solutions if c["cell_type"] == "code")
    missing = [number for number in sections if f'check("{path.stem}.{number}"' not in solution_code]
    assert not missing, f"the solutions notebook does not check exercises {missing}"
