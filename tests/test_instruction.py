"""shared.instruction: prompt formats, collate, batched generation, metrics, the ch07 scripts."""

import json
import math

import pytest
import torch
from scripts import load_script

from shared.generate import generate
from shared.instruction import (
    IGNORE_INDEX,
    InstructionDataset,
    TokenizedExample,
    collate_fn,
    exact_match,
    format_input,
    format_prompt,
    generate_batch_ids,
    generate_responses,
    response_perplexity,
    rouge_l,
    split_entries,
)
from shared.model import GPTModel
from shared.tokenizer import GPT2_EOT_ID, GPT2_VOCAB_SIZE, get_gpt2_tokenizer
from shared.weights import load_gpt2_or_standin


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return get_gpt2_tokenizer()


ENTRY_WITH_INPUT = {
    "instruction": "Convert to passive voice.",
    "input": "The cat ate the fish.",
    "output": "The fish was eaten by the cat.",
}
ENTRY_WITHOUT_INPUT = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}

# ---------------------------------------------------------------------------------------
# Prompt formats
# ---------------------------------------------------------------------------------------


def test_alpaca_format_has_an_input_section_only_when_there_is_input():
    preamble = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert format_input(ENTRY_WITH_INPUT) == (
        f"{preamble}\n\n### Instruction:\nConvert to passive voice.\n\n### Input:\nThe cat ate the fish."
    )
    assert format_input(ENTRY_WITHOUT_INPUT) == f"{preamble}\n\n### Instruction:\nName a primary colour."
    assert format_prompt(ENTRY_WITHOUT_INPUT).endswith("colour.\n\n### Response:\n")


def test_phi3_format_with_and_without_input():
    assert (
        format_input(ENTRY_WITH_INPUT, "phi3") == "<|user|>\nConvert to passive voice.\nThe cat ate the fish."
    )
    assert format_input(ENTRY_WITHOUT_INPUT, "phi3") == "<|user|>\nName a primary colour."
    assert format_prompt(ENTRY_WITHOUT_INPUT, "phi3") == "<|user|>\nName a primary colour.\n<|assistant|>\n"


def test_format_input_matches_the_books_alpaca_template():
    book = pytest.importorskip("llms_from_scratch.ch07")
    for entry in (ENTRY_WITH_INPUT, ENTRY_WITHOUT_INPUT):
        assert format_input(entry) == book.format_input(entry)


def test_unknown_style_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="alpaca"):
        format_input(ENTRY_WITH_INPUT, "chatml")


def test_split_gives_the_books_935_110_55():
    train, test, val = split_entries([{"i": i} for i in range(1100)])
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0]["i"] == 0 and test[0]["i"] == 935 and val[0]["i"] == 1045


# ---------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------

X = IGNORE_INDEX


def test_collate_pads_shifts_and_ignores_padding_after_the_first_end_of_text():
    inputs, targets = collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, X, X, X], [8, 9, 50256, X, X]]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_truncates_inputs_and_targets_to_the_allowed_length():
    inputs, targets = collate_fn([[0, 1, 2, 3, 4], [5, 6]], context_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, X]]


def test_collate_custom_pad_and_ignore_values():
    inputs, targets = collate_fn([[3, 4, 5], [6]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[3, 4, 5], [6, 0, 0]]
    assert targets.tolist() == [[4, 5, 0], [0, -1, -1]]


def test_collate_masks_the_instruction_only_when_asked():
    batch = [TokenizedExample([10, 11, 12, 20, 21], prompt_length=3), TokenizedExample([13, 14, 22], 2)]
    _, unmasked = collate_fn(batch)
    assert unmasked.tolist() == [[11, 12, 20, 21, 50256], [14, 22, 50256, X, X]]
    inputs, masked = collate_fn(batch, mask_instructions=True)
    # Targets that are prompt tokens (11, 12 and 14) are hidden; the responses and end-of-text stay.
    assert masked.tolist() == [[X, X, 20, 21, 50256], [X, 22, 50256, X, X]]
    assert inputs.tolist() == [[10, 11, 12, 20, 21], [13, 14, 22, 50256, 50256]]


def test_collate_refuses_a_batch_whose_every_target_is_cut_off_by_the_context():
    # The prompts are longer than the context: no response token is left to learn, the loss would be NaN.
    batch = [
        TokenizedExample(list(range(10, 20)), prompt_length=8),
        TokenizedExample([1, 2, 3, 4, 5, 6, 7], 6),
    ]
    with pytest.raises(ValueError, match="every target .* context_length=5"):
        collate_fn(batch, context_length=5, mask_instructions=True)
    inputs, _ = collate_fn(batch, context_length=5)  # without masking the prompt tokens still teach
    assert inputs.shape == (2, 5)


def test_collate_warns_when_some_rows_keep_no_target():
    batch = [TokenizedExample(list(range(10, 20)), prompt_length=8), TokenizedExample([1, 2, 3], 1)]
    with pytest.warns(UserWarning, match="1 of 2 rows"):
        _, targets = collate_fn(batch, context_length=5, mask_instructions=True)
    assert (targets[0] == X).all() and (targets[1] != X).any()


def test_collate_refuses_masking_without_prompt_lengths_and_empty_input():
    with pytest.raises(ValueError, match="TokenizedExample"):
        collate_fn([[1, 2]], mask_instructions=True)
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])
    with pytest.raises(ValueError, match="item 1"):
        collate_fn([[1], []])


def test_collate_equals_the_books_custom_collate_fn(gpt2_tokenizer):
    book = pytest.importorskip("llms_from_scratch.ch07")
    entries = [ENTRY_WITH_INPUT, ENTRY_WITHOUT_INPUT, {**ENTRY_WITHOUT_INPUT, "output": "A long answer " * 5}]
    ours = InstructionDataset(entries, gpt2_tokenizer)
    theirs = book.InstructionDataset(entries, gpt2_tokenizer)
    assert [ex.token_ids for ex in ours] == [theirs[i] for i in range(len(theirs))]
    for max_length in (None, 20):
        expected = book.custom_collate_fn([theirs[i] for i in range(3)], allowed_max_length=max_length)
        got = collate_fn(list(ours), context_length=max_length)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_dataset_records_where_the_prompt_ends(gpt2_tokenizer):
    dataset = InstructionDataset([ENTRY_WITH_INPUT], gpt2_tokenizer, style="phi3")
    example = dataset[0]
    prompt = gpt2_tokenizer.decode(example.token_ids[: example.prompt_length])
    assert prompt == format_prompt(ENTRY_WITH_INPUT, "phi3")
    assert gpt2_tokenizer.decode(example.token_ids[example.prompt_length :]) == ENTRY_WITH_INPUT["output"]


# ---------------------------------------------------------------------------------------
# Batched generation
# ---------------------------------------------------------------------------------------


def tiny_model(vocab_size=GPT2_VOCAB_SIZE, context_length=64, seed=0):
    torch.manual_seed(seed)
    cfg = {
        "vocab_size": vocab_size,
        "context_length": context_length,
        "emb_dim": 32,
        "n_heads": 4,
        "n_layers": 2,
        "drop_rate": 0.1,
        "qkv_bias": True,
    }
    return GPTModel(cfg).eval()


def one_at_a_time(model, prompt_ids, max_new_tokens, eos_id):
    """The reference: shared.generate.generate on each prompt alone, cut at eos."""
    results = []
    for ids in prompt_ids:
        out = generate(model, torch.tensor([ids]), max_new_tokens, eos_id=eos_id)[0, len(ids) :].tolist()
        results.append(out[: out.index(eos_id)] if eos_id is not None and eos_id in out else out)
    return results


PROMPTS = [[5, 9, 2], [7, 1, 8, 3, 3, 4, 10, 2, 6], [4], [11, 12, 13, 14, 15, 16]]


def test_left_padded_batch_equals_one_at_a_time_greedy_token_for_token():
    model = tiny_model(vocab_size=20)
    batched = generate_batch_ids(model, PROMPTS, max_new_tokens=12, eos_id=None)
    assert batched == one_at_a_time(model, PROMPTS, 12, eos_id=None)
    assert all(len(row) == 12 for row in batched)


def test_each_row_stops_at_its_own_end_of_text():
    model = tiny_model(vocab_size=20)
    free = generate_batch_ids(model, PROMPTS, max_new_tokens=12, eos_id=None)
    eos = free[1][4]  # a token row 1 produces at step 5: rows stop wherever they produce it
    batched = generate_batch_ids(model, PROMPTS, max_new_tokens=12, eos_id=eos)
    assert batched == one_at_a_time(model, PROMPTS, 12, eos_id=eos)
    assert len(batched[1]) <= 4 and eos not in sum(batched, [])
    assert len({len(row) for row in batched}) > 1, "rows should end at different lengths"


def test_padded_forward_matches_unpadded_logits():
    model = tiny_model(vocab_size=20)
    short, long = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7, 8, 9, 10]])
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1), long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        torch.testing.assert_close(padded[0, 2:], model(short)[0])
        torch.testing.assert_close(padded[1], model(long)[0])


def test_without_a_mask_attention_stays_on_the_mask_free_causal_kernel(monkeypatch):
    import shared.attention

    calls = []
    real_sdpa = shared.attention.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask") is not None))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(shared.attention.F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny_model(vocab_size=20)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        assert calls and all(causal and not mask for causal, mask in calls)
        calls.clear()
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
        assert calls and all(mask for _, mask in calls)


def test_generate_responses_equals_one_at_a_time_text_in_prompt_order(gpt2_tokenizer):
    model = tiny_model()
    model.train()  # generate_responses must switch dropout off itself and restore the mode
    prompts = [format_prompt(e) for e in (ENTRY_WITH_INPUT, ENTRY_WITHOUT_INPUT)] + [
        "Hi",
        "One two three four",
    ]
    responses = generate_responses(model, gpt2_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert model.training
    model.eval()
    ids = [gpt2_tokenizer.encode(p) for p in prompts]
    expected = [gpt2_tokenizer.decode(row).strip() for row in one_at_a_time(model, ids, 6, GPT2_EOT_ID)]
    assert responses == expected


def test_generate_responses_refuses_a_prompt_longer_than_the_context(gpt2_tokenizer):
    model = tiny_model(context_length=8)
    with pytest.raises(ValueError, match="prompt 1 has"):
        generate_responses(model, gpt2_tokenizer, ["Hi", "word " * 20], max_new_tokens=2)
    with pytest.raises(TypeError, match="list"):
        generate_responses(model, gpt2_tokenizer, "Hi", max_new_tokens=2)


def test_generation_stops_when_the_padded_batch_fills_the_context():
    model = tiny_model(vocab_size=20, context_length=10)
    rows = generate_batch_ids(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], max_new_tokens=50, eos_id=None)
    assert [len(r) for r in rows] == [4, 4]


# ---------------------------------------------------------------------------------------
# Offline metrics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        # LCS "the cat the mat" = 4; P = 4/6, R = 4/5 -> F1 = 2 * (2/3) * (4/5) / (2/3 + 4/5) = 8/11
        ("the cat sat on the mat", "the cat ate the mat", 8 / 11),
        # LCS "police killed the gunman" = 4 of 4 and 4 of 5... reordered words do not count twice
        (
            "police killed the gunman",
            "the gunman was killed by police",
            2 * (2 / 4) * (2 / 6) / (2 / 4 + 2 / 6),
        ),
        ("Red.", "red", 1.0),  # case and punctuation do not matter
        ("blue", "red", 0.0),
        ("", "red", 0.0),
        ("red", "", 0.0),
        ("", "", 0.0),
        ("...", "red", 0.0),  # no words at all
    ],
)
def test_rouge_l_on_hand_checked_pairs(candidate, reference, expected):
    assert rouge_l(candidate, reference) == pytest.approx(expected)


def test_exact_match_ignores_case_spacing_and_final_punctuation():
    assert exact_match("  The  answer is 4.", "the answer is 4")
    assert not exact_match("The answer is 5", "the answer is 4")


def test_response_perplexity_counts_only_response_tokens(gpt2_tokenizer):
    model = tiny_model()
    dataset = InstructionDataset([ENTRY_WITH_INPUT, ENTRY_WITHOUT_INPUT], gpt2_tokenizer)
    ppl = response_perplexity(model, dataset, batch_size=1)
    # Token-weighted: the same value whatever the batch size.
    assert ppl == pytest.approx(response_perplexity(model, dataset, batch_size=2), rel=1e-5)

    # By hand, one unpadded example at a time: the log-probability of every token from the
    # first response token to the end-of-text token that follows the response.
    end_of_text = gpt2_tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"})[0]
    response_nll, all_nll, response_count, all_count = 0.0, 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for example in dataset:
            ids = torch.tensor(list(example.token_ids) + [end_of_text])
            log_probs = torch.log_softmax(model(ids[None, :-1])[0], dim=-1)
            nll = -log_probs.gather(1, ids[1:, None])[:, 0]  # nll[t] scores token t + 1
            response_nll += nll[example.prompt_length - 1 :].sum().item()
            response_count += len(ids) - example.prompt_length
            all_nll += nll.sum().item()
            all_count += len(nll)
    assert ppl == pytest.approx(math.exp(response_nll / response_count), rel=1e-4)
    assert ppl != pytest.approx(math.exp(all_nll / all_count), rel=1e-4)  # the prompt really is left out


def test_response_perplexity_refuses_when_every_response_token_is_cut_off(gpt2_tokenizer):
    dataset = InstructionDataset([ENTRY_WITH_INPUT, ENTRY_WITHOUT_INPUT], gpt2_tokenizer)
    model = tiny_model(context_length=8)  # shorter than every prompt
    with pytest.raises(ValueError, match="no response token fits"):
        response_perplexity(model, dataset)


# ---------------------------------------------------------------------------------------
# Finetuning and the scripts
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_finetuning_lowers_the_validation_loss(gpt2_tokenizer):
    import functools

    from torch.utils.data import DataLoader

    from shared.instruction import SMALL_MODEL_CONFIG, SMALL_MODEL_LR
    from shared.train import calc_loss_loader, make_optimizer, train_model

    entries = [ENTRY_WITH_INPUT, ENTRY_WITHOUT_INPUT] * 8
    model, _, pretrained = load_gpt2_or_standin(
        "gpt2-medium", pretrained=False, standin_config=SMALL_MODEL_CONFIG, seed=123
    )
    assert not pretrained
    collate = functools.partial(collate_fn, context_length=64)
    train_loader = DataLoader(
        InstructionDataset(entries, gpt2_tokenizer), batch_size=4, shuffle=True, collate_fn=collate
    )
    val_loader = DataLoader(InstructionDataset(entries[:2], gpt2_tokenizer), batch_size=2, collate_fn=collate)
    before = calc_loss_loader(val_loader, model, "cpu")
    optimizer = make_optimizer(model, lr=SMALL_MODEL_LR, weight_decay=0.1)
    history = train_model(
        model, train_loader, val_loader, optimizer, "cpu", 1, eval_freq=2, eval_iter=1, progress=False
    )
    after = calc_loss_loader(val_loader, model, "cpu")
    assert after < before - 0.5, (before, after)
    assert history.val_losses[-1] < history.val_losses[0]


def test_the_ch07_base_model_falls_back_to_the_labelled_tiny_model_when_gpt2_cannot_be_downloaded(
    monkeypatch, capsys
):
    import shared.weights
    from shared.download import DownloadError
    from shared.instruction import SMALL_MODEL_CONFIG

    def offline(*args, **kwargs):
        raise DownloadError("Could not download model.safetensors. Tried: ... (offline)")

    monkeypatch.setattr(shared.weights, "download_gpt2", offline)
    model, description, pretrained = load_gpt2_or_standin("gpt2-medium", standin_config=SMALL_MODEL_CONFIG)
    assert not pretrained and "TINY" in description
    assert model.cfg["emb_dim"] == SMALL_MODEL_CONFIG["emb_dim"]
    assert "Could not get gpt2-medium" in capsys.readouterr().out


def test_the_ch07_base_model_from_a_local_checkpoint_has_dropout_off(tmp_path):
    from shared.weights import save_hf_gpt2

    original = tiny_model(vocab_size=20)
    save_hf_gpt2(original, tmp_path / "ckpt")
    model, description, pretrained = load_gpt2_or_standin("gpt2-medium", model_dir=tmp_path / "ckpt")
    assert pretrained and "ckpt" in description
    assert model.cfg["drop_rate"] == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), original(ids))


@pytest.mark.slow
def test_finetune_script_quick_run_writes_model_responses_and_report(tmp_path, monkeypatch):
    from shared.weights import load_hf_gpt2

    finetune = load_script("ch07", "finetune_instructions")
    monkeypatch.setattr(finetune, "QUICK_SIZES", {"train": 16, "val": 8, "test": 3, "max_new_tokens": 4})
    report = finetune.main(["--quick", "--epochs", "1", "--eval-iter", "1", "--out-dir", str(tmp_path)])
    assert report["val_loss_after"] < report["val_loss_before"]
    assert "TINY" in report["model"] and report["settings"]["lr"] == 1e-3
    responses = json.loads((tmp_path / "test-responses.json").read_text())
    assert len(responses) == 3 and all(isinstance(e["model_response"], str) for e in responses)
    assert load_hf_gpt2(tmp_path / "model").cfg["emb_dim"] == 64
    assert json.loads((tmp_path / "finetune-report.json").read_text())["train_seconds"] > 0


def test_finetune_script_refuses_a_batch_larger_than_the_training_data(tmp_path, monkeypatch, capsys):
    finetune = load_script("ch07", "finetune_instructions")
    monkeypatch.setattr(finetune, "QUICK_SIZES", {"train": 16, "val": 8, "test": 3, "max_new_tokens": 4})
    with pytest.raises(SystemExit, match="--batch-size 2000 is larger than the 16 training entries"):
        finetune.main(["--quick", "--batch-size", "2000", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing written: no model, no report


@pytest.mark.parametrize("flag", ["--context-length", "--batch-size", "--epochs"])
def test_finetune_script_refuses_a_size_below_one(flag, capsys):
    finetune = load_script("ch07", "finetune_instructions")
    with pytest.raises(SystemExit) as caught:
        finetune.parse_args([flag, "0"])
    assert caught.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


def test_an_entry_that_writes_endoftext_is_tokenised_as_plain_text(gpt2_tokenizer):
    entry = {**ENTRY_WITH_INPUT, "output": "Documents end with <|endoftext|> in GPT-2's data."}
    example = InstructionDataset([entry], gpt2_tokenizer)[0]
    assert GPT2_EOT_ID not in example.token_ids  # not the special token: the characters themselves
    assert gpt2_tokenizer.decode(list(example.token_ids)).endswith(entry["output"])
