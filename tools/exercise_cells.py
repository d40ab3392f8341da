"""The code cells that tools/add_exercise_checks.py puts into the notebooks, per exercise id.

PLACEHOLDERS: the learner's answer cell in the chapter notebook. It defines ``answer`` (or the
function the exercise asks for), left as ``...`` or as a body that raises NotImplementedError,
with a comment saying what to write. The check cell after it is ``check("<id>", <that name>);``.

SOLUTION_CHECKS: the cell after the solution in the solutions notebook. It hands the
solution's own values (or the solution's code as a function) to the check.
"""

PLACEHOLDERS = {
    "ch02.1": """
# For each (max_length, stride): (the number of windows, the input tokens two consecutive windows share).
answer = {(2, 2): (..., ...), (8, 2): (..., ...)}
""",
    "ch02.2": """
# The spellings that are one token each, whether any two spellings share an id, and how often the
# ids of " the" and of "the" occur among The Verdict's BPE ids.
answer = {"single_token": [...], "any_shared_id": ..., "count_space_the": ..., "count_the": ...}
""",
    "ch02.3": """
# The words that become <|unk|> (as simple_split cuts them), and the decoded sentence.
answer = {"unknown": [...], "decoded": ...}
""",
    "ch02.4": """
# (batch, mask): the padded ids, shape (2, longest), and a bool tensor of the same shape,
# True where a position holds a real token.
answer = (..., ...)
""",
    "ch02.5": """
# Your counts for max_length=256, stride=128, batch_size=8.
answer = {"windows": ..., "batches_drop_last": ..., "batches_keep_last": ...}
""",
    "ch03.1": """
# True or False: do the outputs follow any reordering of the words (outputs of the reordered
# sentence == the original outputs, reordered the same way)? Without a mask, and with the causal mask.
answer = {"holds_without_mask": ..., "holds_with_causal_mask": ...}
""",
    "ch03.2": """
# Your module with 2 heads and a 2-dimensional output, and how many dimensions each head gets.
answer = {"module": ..., "head_dim": ...}
""",
    "ch03.3": """
# Parameter counts of MultiHeadAttention: GPT-2 small (768 dims, 12 heads) and XL (1,600 dims, 25 heads),
# without and with qkv_bias.
answer = {"small": ..., "small_qkv_bias": ..., "xl": ..., "xl_qkv_bias": ...}
""",
    "ch03.4": """
# The largest absolute change of the outputs when only the last token changes: at the earlier
# positions and at the last one with the causal mask, and at the earlier positions without it.
answer = {"earlier_with_mask": ..., "last_with_mask": ..., "earlier_without_mask": ...}
""",
    "ch03.5": """
# For each query word in order (Your, journey, starts, with, one, step), the word it attends to most
# after "with" is stretched 3x: with dot products, and with cosine similarities.
answer = {"dot": [...], "cosine": [...]}
""",
    "ch04.1": """
# Parameter counts of one GPT-2-small block's feed-forward network and attention layer.
answer = {"feed_forward": ..., "attention": ...}
""",
    "ch04.2": """
# For each size: (its config, written as changes to GPT_CONFIG_124M, and its parameter count).
answer = {"gpt2-medium": (..., ...), "gpt2-large": (..., ...), "gpt2-xl": (..., ...)}
""",
    "ch04.3": """
def build_with_dropouts(cfg, emb, attention, shortcut):
    # Return a shared.model.GPTModel built from cfg whose embedding dropout, attention dropout and
    # shortcut dropout rates are emb, attention and shortcut.
    raise NotImplementedError
""",
    "ch04.4": """
def kv_cache_bytes(cfg, num_tokens):
    # Return the bytes the key/value cache of a model with config cfg takes for one sequence of
    # num_tokens tokens in float32.
    raise NotImplementedError
""",
    "ch04.5": """
# The output head's share of the forward FLOPs per token at 1,024 tokens, a fraction for each size.
answer = {"gpt2-small": ..., "gpt2-medium": ..., "gpt2-large": ..., "gpt2-xl": ...}
""",
    "ch05.1": """
# A list of generate() settings that always give the same text, e.g. [dict(temperature=...), ...].
answer = [...]
""",
    "ch05.2": """
# The exact probability of "piano" at each temperature (from the softmax, not from the samples).
answer = {1.0: ..., 3.0: ...}
""",
    "ch05.3": """
def nucleus_size(logits, top_p):
    # Return how many tokens top-p sampling allows for one row of logits (vocab,): the size of the
    # smallest set of the most likely tokens whose probability reaches top_p.
    raise NotImplementedError
""",
    "ch05.4": """
def train_one_more_epoch(model, optimizer, checkpoint_path, train_loader, val_loader, device):
    # Load the checkpoint into model and optimizer, train one more epoch with train_model and return
    # the history it gives back.
    raise NotImplementedError
""",
    "ch05.5": """
def repeated_trigram_share(ids):
    # Return the share of the 3-gram positions of the list `ids` whose 3-gram occurs more than once.
    raise NotImplementedError
""",
    "ch05.6": """
# (train loss, validation loss) on The Verdict for each model, with OpenAI's weights.
answer = {"gpt2-small": (..., ...), "gpt2-medium": (..., ...)}
""",
    "ch05.7": """
# The validation loss of each run, by learning rate.
answer = {1e-4: ..., 4e-4: ..., 1e-3: ...}
""",
    "ch05.8": """
# The standard deviation of the token embedding's weights with each initialisation.
answer = {"gpt2": ..., "pytorch": ...}
""",
    "ch06.1": """
# The trainable_blocks you used (2, the last two blocks) and how many parameters trained.
answer = {"trainable_blocks": ..., "trainable_parameters": ...}
""",
    "ch06.2": """
# Test accuracies (fractions, e.g. 0.95): last token, first token, first token with causal=False.
answer = {"last": ..., "first": ..., "first_no_mask": ...}
""",
    "ch06.3": """
# Test accuracies (fractions): dynamic padding, padded to the context reading the last real token,
# and padded to the context reading the final position.
answer = {"dynamic": ..., "padded_last_token": ..., "padded_last_position": ...}
""",
    "ch06.4": """
# Your oversampled training DataFrame (columns "Label" and "Text").
answer = ...
""",
    "ch06.5": """
def one_logit(two_logits):
    # Return the single logit, shape (n, 1), that makes the same decisions with a sigmoid as the
    # two logits (n, 2) [ham, spam] make with a softmax.
    raise NotImplementedError
""",
    "ch07.1": """
def prompt_tokens_saved(entry):
    # Return how many fewer GPT-2 tokens the entry's prompt takes in the Phi-3 style than in Alpaca's.
    raise NotImplementedError
""",
    "ch07.2": """
def share_in_loss(entries):
    # Return the fraction of the target tokens of these entries that the loss still counts when
    # the instructions are masked (out of those it counts without masking).
    raise NotImplementedError
""",
    "ch07.3": """
def freeze_all_but_last(model, num_blocks):
    # Make only the last num_blocks transformer blocks, the final norm and the output head
    # trainable; return the model.
    raise NotImplementedError
""",
    "ch07.4": """
def share_kept(entries, max_length):
    # Return the fraction of the training tokens of these entries that survive a cut at max_length.
    raise NotImplementedError
""",
    "ch07.5": """
# The average score of each judge model, e.g. {"llama3": ..., "phi3": ...}.
answer = {...: ...}
""",
    "appendix_A.1": """
# The shape of each result as a tuple, and the expressions that fail.
answer = {
    "a.transpose(1, 2)": ...,
    "a @ a.transpose(1, 2)": ...,
    "a.sum(dim=1)": ...,
    "a.reshape(-1, 4)": ...,
    "a[:, 0]": ...,
    "a[..., :1]": ...,
    "a.unsqueeze(1)": ...,
    "a + torch.ones(4)": ...,
    "a + torch.ones(3, 1)": ...,
    "fails": [...],
}
""",
    "appendix_A.2": """
# The parameters of each linear layer, in order, and of the whole network.
answer = {"per_layer": [..., ..., ...], "total": ...}
""",
    "appendix_A.3": """
# w and b after one SGD step with lr = 0.1, and the loss after the step.
answer = {"w": [..., ...], "b": ..., "loss_after": ...}
""",
    "appendix_A.4": """
# The matrix size you used and the seconds per product (gpu_seconds None without a GPU).
answer = {"size": ..., "cpu_seconds": ..., "gpu_seconds": ...}
""",
    "appendix_A.5": """
# 16 examples over 3 processes: indices per process and how many are drawn twice; with
# drop_last=True, indices per process and how many examples are left out.
answer = {"per_process": ..., "repeated": ..., "per_process_drop_last": ..., "left_out_drop_last": ...}
""",
    "appendix_D.1": """
def lr_with_floor(step, *, peak_lr, warmup_steps, decay_steps, floor_fraction):
    # Return the learning rate at `step`: warm-up from the floor (floor_fraction * peak_lr) to the
    # peak, cosine decay to the floor at decay_steps, the floor after that.
    raise NotImplementedError
""",
    "appendix_D.2": """
# The cosine similarity of each clipped gradient with the original one.
answer = {"by_norm": ..., "by_value": ...}
""",
    "appendix_D.3": """
# For each batch size: (warm-up steps, warm-up steps as a fraction of a 15-epoch run's steps).
answer = {4: (..., ...), 8: (..., ...), 16: (..., ...)}
""",
    "appendix_D.4": """
# The 100 learning rates of the second phase, one per step (list).
answer = [...]
""",
    "appendix_E.1": """
# For each rank (alpha = rank, LoRA on every linear layer): (trainable parameters, test accuracy
# as a fraction).
answer = {1: (..., ...), 16: (..., ...), 64: (..., ...)}
""",
    "appendix_E.2": """
# For each placement, all at one rank: (trainable parameters, test accuracy as a fraction), and
# "best": the key of the placement with the most test accuracy per trainable parameter.
answer = {"attention": (..., ...), "feed_forward": (..., ...), "every_layer": (..., ...), "best": ...}
""",
    "appendix_E.3": """
# At rank 16: the scale the update is multiplied by for each alpha, and, for alpha = 1 and 256 at
# learning rate 1e-3, the learning rate at scale 1 that acts the same with Adam (to first order).
answer = {"scale": {1: ..., 16: ..., 256: ...}, "lr_at_scale_1": {1: ..., 256: ...}}
""",
    "appendix_E.4": """
def quantize_with_lora(model, rank, alpha):
    # Replace every nn.Linear of model by a frozen int8 version (one scale per output row) with a
    # LoRA adapter on top; freeze everything else; return the number of trainable parameters.
    raise NotImplementedError
""",
    "appendix_E.5": """
def adapt_blocks_train_head(model):
    # Put LoRA adapters on the transformer blocks' linear layers, let the 2-class head train in
    # full, and return the number of trainable parameters.
    raise NotImplementedError
""",
}

SOLUTION_CHECKS = {
    "ch02.1": """
windows_and_overlap = {}
for max_length, stride in [(2, 2), (8, 2)]:
    dataloader = create_dataloader(raw_text, batch_size=4, max_length=max_length, stride=stride, shuffle=False)
    windows_and_overlap[(max_length, stride)] = (len(dataloader.dataset), max(max_length - stride, 0))
check("ch02.1", windows_and_overlap);
""",
    "ch02.2": """
spellings = ["Hello", " Hello", "hello", " hello", "HELLO"]
spelling_ids = {spelling: tokenizer.encode(spelling) for spelling in spellings}
all_ids = [token_id for ids in spelling_ids.values() for token_id in ids]
story_ids = tokenizer.encode(raw_text)
check("ch02.2", {
    "single_token": [spelling for spelling, ids in spelling_ids.items() if len(ids) == 1],
    "any_shared_id": len(set(all_ids)) < len(all_ids),
    "count_space_the": story_ids.count(tokenizer.encode(" the")[0]),
    "count_the": story_ids.count(tokenizer.encode("the")[0]),
});
""",
    "ch02.3": """
check("ch02.3", {"unknown": unknown, "decoded": word_tokenizer.decode(word_ids)});
""",
    "ch02.4": """
check("ch02.4", (batch, mask));
""",
    "ch02.5": """
batches = {
    drop_last: len(create_dataloader(raw_text, batch_size=8, max_length=256, stride=128, drop_last=drop_last))
    for drop_last in (True, False)
}
check("ch02.5", {"windows": windows, "batches_drop_last": batches[True], "batches_keep_last": batches[False]});
""",
    "ch03.1": """
torch.manual_seed(789)
plain = SelfAttentionV2(d_in=3, d_out=2)
torch.manual_seed(123)
one_head = MultiHeadAttention(d_in=3, d_out=2, context_length=6, dropout=0.0, num_heads=1).eval()
with torch.no_grad():
    holds_without_mask = torch.allclose(plain(inputs.flip(0)), plain(inputs).flip(0), atol=1e-6)
    holds_with_causal_mask = torch.allclose(one_head(batch.flip(1)), one_head(batch).flip(1), atol=1e-6)
check("ch03.1", {"holds_without_mask": holds_without_mask, "holds_with_causal_mask": holds_with_causal_mask});
""",
    "ch03.2": """
check("ch03.2", {"module": two_heads, "head_dim": two_heads.head_dim});
""",
    "ch03.3": """
check("ch03.3", {
    "small": expected(768, False), "small_qkv_bias": expected(768, True),
    "xl": expected(1600, False), "xl_qkv_bias": expected(1600, True),
});
""",
    "ch03.4": """
check("ch03.4", {"earlier_with_mask": earlier_moved, "last_with_mask": last_moved, "earlier_without_mask": moved.max().item()});
""",
    "ch03.5": """
check("ch03.5", {"dot": most_attended(stretched, False), "cosine": most_attended(stretched, True)});
""",
    "ch04.1": """
check("ch04.1", {"feed_forward": feed_forward, "attention": attention});
""",
    "ch04.2": """
configs = {name: {**GPT_CONFIG_124M, **changes} for name, changes in sizes.items()}
check("ch04.2", {name: (cfg, count_parameters(build_on_meta(cfg))) for name, cfg in configs.items()});
""",
    "ch04.3": """
check("ch04.3", build_with_dropouts);
""",
    "ch04.4": """
check("ch04.4", kv_cache_bytes);
""",
    "ch04.5": """
check("ch04.5", dict(zip(GPT_CONFIGS, shares, strict=True)));
""",
    "ch05.1": """
check("ch05.1", [dict(temperature=0.0, top_k=50), dict(temperature=1.5, top_k=1), dict(temperature=1.0, top_p=1e-6)]);
""",
    "ch05.2": """
check("ch05.2", {t: torch.softmax(toy_logits / t, dim=0)[piano].item() for t in (1.0, 3.0)});
""",
    "ch05.3": """
check("ch05.3", nucleus_size);
""",
    "ch05.4": """
def train_one_more_epoch(model, optimizer, checkpoint_path, train_loader, val_loader, device):
    # The solution above as a function, so that the check can run it on a tiny model of its own.
    done = load_checkpoint(checkpoint_path, model, optimizer)["history"]
    return train_model(model, train_loader, val_loader, optimizer, device, num_epochs=done.epoch + 1,
                       eval_freq=5, eval_iter=5, progress=False, history=done)


check("ch05.4", train_one_more_epoch);
""",
    "ch05.5": """
check("ch05.5", repeated_trigram_share);
""",
    "ch05.6": """
# The check needs both models' losses, so it runs only where the cell above can download them.
gpt2_losses = {}
for size in ("gpt2-small", "gpt2-medium") if TRY_DOWNLOAD else ():
    try:
        gpt2 = load_hf_gpt2(download_gpt2(size), device=device)
    except (DownloadError, OSError):
        break
    with torch.no_grad():
        gpt2_losses[size] = (calc_loss_loader(train_loader, gpt2, device), calc_loss_loader(val_loader, gpt2, device))
    del gpt2
if len(gpt2_losses) == 2:
    check("ch05.6", gpt2_losses)
else:
    print("ch05.6: without the download (quick mode, or no network) there are no losses to check here")
""",
    "ch05.7": """
validation_losses = {}
for lr in (1e-4, 4e-4, 1e-3):  # the runs above, keeping each run's last validation loss
    set_seed(123)
    small = GPTModel(small_cfg).to(device)
    optimizer_for_lr = make_optimizer(small, lr=lr, weight_decay=0.1)
    history_for_lr = train_model(small, train_loader, val_loader, optimizer_for_lr, device, num_epochs=1,
                                 eval_freq=5, eval_iter=5, progress=False)
    validation_losses[lr] = history_for_lr.val_losses[-1]
check("ch05.7", validation_losses);
""",
    "ch05.8": """
embedding_stds = {}
for scheme in ("gpt2", "pytorch"):
    set_seed(123)
    fresh = GPTModel(small_cfg)
    fresh.reset_parameters(scheme)
    embedding_stds[scheme] = fresh.tok_emb.weight.std().item()
check("ch05.8", embedding_stds);
""",
    "ch06.1": """
check("ch06.1", {"trainable_blocks": 2, "trainable_parameters": results["last two blocks"]["trainable"]});
""",
    "ch06.2": """
check("ch06.2", {
    "last": results["last token"]["test"],
    "first": results["first token"]["test"],
    "first_no_mask": results["first token, no causal mask"]["test"],
});
""",
    "ch06.3": """
check("ch06.3", {
    "dynamic": results["dynamic padding, last real token"]["test"],
    "padded_last_token": results[f"pad to {CONTEXT}, last real token"]["test"],
    "padded_last_position": results[f"pad to {CONTEXT}, final position"]["test"],
});
""",
    "ch06.4": """
check("ch06.4", oversampled);
""",
    "ch06.5": """
def one_logit(two_logits):
    # The single logit of the solution: the spam logit minus the ham logit.
    return (two_logits[:, 1] - two_logits[:, 0]).unsqueeze(-1)


check("ch06.5", one_logit);
""",
    "ch07.1": """
def prompt_tokens_saved(entry):
    alpaca = tokenizer.encode(instruction.format_prompt(entry, "alpaca"))
    return len(alpaca) - len(tokenizer.encode(instruction.format_prompt(entry, "phi3")))


check("ch07.1", prompt_tokens_saved);
""",
    "ch07.2": """
def share_in_loss(entries):
    # Targets the loss counts (not -100), each entry on its own so that no padding is counted.
    dataset = instruction.InstructionDataset(entries, tokenizer)
    counted = {
        mask: sum(int((instruction.collate_fn([example], mask_instructions=mask)[1] != -100).sum()) for example in dataset)
        for mask in (True, False)
    }
    return counted[True] / counted[False]


check("ch07.2", share_in_loss);
""",
    "ch07.3": """
def freeze_all_but_last(model, num_blocks):
    # The freezing in run() above, as a function.
    model.requires_grad_(False)
    for block in model.trf_blocks[-num_blocks:]:
        block.requires_grad_(True)
    model.final_norm.requires_grad_(True)
    model.out_head.requires_grad_(True)
    return model


check("ch07.3", freeze_all_but_last);
""",
    "ch07.4": """
def share_kept(entries, max_length):
    lengths = [len(example.token_ids) + 1 for example in instruction.InstructionDataset(entries, tokenizer)]
    return sum(min(n, max_length) for n in lengths) / sum(lengths)


check("ch07.4", share_kept);
""",
    "ch07.5": """
# With two judge servers running, put the averages the cell above printed here, e.g.
# {"llama3": 61.2, "phi3": 57.9}.
judge_averages = {}
if judge_averages:
    check("ch07.5", judge_averages)
else:
    print("ch07.5: without two judge servers there are no averages to check here")
""",
    "appendix_A.1": """
shapes = {expression: tuple(result.shape) for expression, result in results.items()}
check("appendix_A.1", {**shapes, "fails": ["a.transpose(1, 2).view(-1)", "a + torch.ones(3)"]});
""",
    "appendix_A.2": """
linear_layers = [layer for layer in model.layers if isinstance(layer, torch.nn.Linear)]
check("appendix_A.2", {"per_layer": [sum(p.numel() for p in layer.parameters()) for layer in linear_layers], "total": counted});
""",
    "appendix_A.3": """
check("appendix_A.3", {"w": w.tolist(), "b": b.item(), "loss_after": logistic_loss().item()});
""",
    "appendix_A.4": """
check("appendix_A.4", {"size": size, "cpu_seconds": cpu_median, "gpu_seconds": gpu_median if device.type != "cpu" else None});
""",
    "appendix_A.5": """
shares = {
    drop_last: [list(DistributedSampler(train_ds, num_replicas=3, rank=rank, seed=123, drop_last=drop_last)) for rank in range(3)]
    for drop_last in (False, True)
}
drawn = {drop_last: [index for share in parts for index in share] for drop_last, parts in shares.items()}
check("appendix_A.5", {
    "per_process": len(shares[False][0]),
    "repeated": len(drawn[False]) - len(set(drawn[False])),
    "per_process_drop_last": len(shares[True][0]),
    "left_out_drop_last": len(train_ds) - len(set(drawn[True])),
});
""",
    "appendix_D.1": """
check("appendix_D.1", lr_with_floor);
""",
    "appendix_D.2": """
check("appendix_D.2", {"by_norm": cosine(original, by_norm), "by_value": cosine(original, by_value)});
""",
    "appendix_D.3": """
steps_and_fractions = {}
for batch_size in (4, 8, 16):
    loader = create_dataloader(train_text, batch_size=batch_size, max_length=256, stride=256, drop_last=True)
    warmup_steps = warmup_tokens / (batch_size * 256)
    steps_and_fractions[batch_size] = (warmup_steps, warmup_steps / (15 * len(loader)))
check("appendix_D.3", steps_and_fractions);
""",
    "appendix_D.4": """
check("appendix_D.4", phase2);
""",
    "appendix_E.1": """
check("appendix_E.1", {rank: (by_rank[f"r={rank}"]["trainable"], by_rank[f"r={rank}"]["test"]) for rank in ranks});
""",
    "appendix_E.2": """
keys = {"attention": "attention + head", "feed_forward": "feed-forward + head", "every_layer": "every linear layer"}
placement_answer = {key: (by_placement[name]["trainable"], by_placement[name]["test"]) for key, name in keys.items()}
best = max(placement_answer, key=lambda key: placement_answer[key][1] / placement_answer[key][0])
check("appendix_E.2", {**placement_answer, "best": best});
""",
    "appendix_E.3": """
rank, lr = 16, 1e-3  # Adam: what matters is scale x learning rate
check("appendix_E.3", {"scale": {a: a / rank for a in (1, 16, 256)}, "lr_at_scale_1": {a: lr * a / rank for a in (1, 256)}});
""",
    "appendix_E.4": """
check("appendix_E.4", quantize_with_lora);
""",
    "appendix_E.5": """
check("appendix_E.5", adapt_blocks_train_head);
""",
}
