"""ch06: the spam classifier's data, model surgery, reading positions, loss, inference and training."""

import pandas as pd
import pytest
import torch
from scripts import load_script
from writes import deny_writes_under

from shared import classification as cls
from shared.model import GPT_CONFIGS, GPTModel, build_on_meta
from shared.tokenizer import GPT2_VOCAB_SIZE, get_gpt2_tokenizer
from shared.weights import STANDIN_CONFIG, load_gpt2_or_standin, save_hf_gpt2

TINY = {
    "vocab_size": GPT2_VOCAB_SIZE,
    "context_length": 32,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}
PAD = cls.PAD_TOKEN_ID


@pytest.fixture(scope="module")
def tokenizer():
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return cls.prepare_spam_splits(tmp_path_factory.mktemp("splits"))


def tiny_classifier(seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls.make_classifier(GPTModel(TINY), **kwargs).eval()


# --- data -------------------------------------------------------------------------------


def test_balanced_split_sizes_and_class_counts(splits):
    frames = {name: cls.read_split(path) for name, path in splits.items()}
    assert {name: len(f) for name, f in frames.items()} == {"train": 1045, "validation": 149, "test": 300}
    spam = {name: int(f["Label"].sum()) for name, f in frames.items()}
    assert sum(spam.values()) == 747  # every spam message, and as many ham
    assert sum(len(f) for f in frames.values()) == 2 * 747
    assert set(pd.concat(frames.values())["Label"]) == {0, 1}


def test_split_holds_the_same_messages_as_the_books(splits):
    book = pytest.importorskip("llms_from_scratch.ch06")
    from shared.data import load_sms_spam

    balanced = book.create_balanced_dataset(load_sms_spam())
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    for ours, theirs in zip(splits.values(), book.random_split(balanced, 0.7, 0.1), strict=True):
        ours = cls.read_split(ours)
        assert list(ours["Text"]) == list(theirs["Text"])
        assert list(ours["Label"]) == list(theirs["Label"])


def test_balanced_subset_refuses_a_single_class():
    with pytest.raises(ValueError, match="two classes"):
        cls.balanced_subset(pd.DataFrame({"Label": ["ham"] * 3, "Text": ["a", "b", "c"]}))


def test_labels_accept_names_and_ids_and_refuse_others():
    assert cls.label_ids(["ham", "SPAM", 0, "1"]) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="row 1"):
        cls.label_ids(["ham", "eggs"])


def test_dataset_truncates_and_keeps_messages_unpadded(tokenizer):
    frame = pd.DataFrame({"Label": ["spam", "ham"], "Text": ["win " * 50, "see you at 5"]})
    dataset = cls.SpamDataset(frame, tokenizer, context_length=10)
    ids, label = dataset[0]
    assert ids.tolist() == tokenizer.encode("win " * 50)[:10] and label.item() == 1
    assert len(dataset[1][0]) == len(tokenizer.encode("see you at 5"))
    assert dataset.longest == 10


def test_dataset_treats_special_token_text_as_plain_text(tokenizer):
    frame = pd.DataFrame({"Label": ["ham"], "Text": ["bye <|endoftext|>"]})
    assert PAD not in cls.SpamDataset(frame, tokenizer)[0][0].tolist()


def test_dataset_refuses_an_empty_message(tokenizer):
    with pytest.raises(ValueError, match="row 1 has an empty message"):
        cls.SpamDataset(pd.DataFrame({"Label": [0, 1], "Text": ["hi", ""]}), tokenizer)


def test_dynamic_padding_pads_each_batch_to_its_longest_message():
    batch = [(torch.tensor([1, 2, 3]), torch.tensor(0)), (torch.tensor([4]), torch.tensor(1))]
    inputs, labels = cls.collate_classification(batch)
    assert inputs.tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert labels.tolist() == [0, 1]
    fixed, _ = cls.collate_classification(batch, pad_to=5)
    assert fixed.tolist() == [[1, 2, 3, PAD, PAD], [4, PAD, PAD, PAD, PAD]]
    with pytest.raises(ValueError, match="more than pad_to=2"):
        cls.collate_classification(batch, pad_to=2)


def test_loader_batches_are_no_longer_than_their_longest_message(splits, tokenizer):
    dataset = cls.SpamDataset(splits["validation"], tokenizer)
    lengths = [len(ids) for ids in dataset.encoded_texts]
    loader = cls.create_classification_loader(dataset, batch_size=8)
    for i, (inputs, _) in enumerate(loader):
        assert inputs.shape[1] == max(lengths[8 * i : 8 * i + 8])


# --- reading positions ------------------------------------------------------------------


def test_last_real_token_index_with_right_padding():
    batch = torch.tensor([[5, 6, 7, PAD, PAD], [8, PAD, PAD, PAD, PAD], [1, 2, 3, 4, 5]])
    assert cls.last_real_token_index(batch).tolist() == [2, 0, 4]
    assert cls.real_token_mask(batch).sum(1).tolist() == [3, 1, 5]
    with pytest.raises(ValueError, match="only pad tokens"):
        cls.last_real_token_index(torch.full((1, 3), PAD))


def test_pooling_reads_the_intended_vectors():
    ids = torch.tensor([[5, 6, PAD], [7, 8, 9]])
    states = torch.arange(2 * 3 * 1, dtype=torch.float).view(2, 3, 1)  # value = row * 3 + position
    assert cls.pool_positions(states, ids, "last").flatten().tolist() == [1, 5]
    assert cls.pool_positions(states, ids, "first").flatten().tolist() == [0, 3]
    assert cls.pool_positions(states, ids, "last_position").flatten().tolist() == [2, 5]
    assert cls.pool_positions(states, ids, "mean").flatten().tolist() == [0.5, 4.0]


@pytest.mark.parametrize("pooling,causal", [("last", True), ("mean", True), ("last", False), ("mean", False)])
def test_padding_does_not_change_the_prediction(pooling, causal):
    model = tiny_classifier(pooling=pooling, causal=causal)
    ids = torch.tensor([[11, 12, 13, 14]])
    padded = torch.tensor([[11, 12, 13, 14, PAD, PAD, PAD]])
    torch.testing.assert_close(cls.classifier_logits(model, ids), cls.classifier_logits(model, padded))


def test_reading_the_final_position_is_changed_by_padding():
    model = tiny_classifier(pooling="last_position")
    a = cls.classifier_logits(model, torch.tensor([[11, 12, 13, 14]]))
    b = cls.classifier_logits(model, torch.tensor([[11, 12, 13, 14, PAD, PAD]]))
    assert not torch.allclose(a, b)


def test_without_the_causal_mask_early_tokens_see_later_ones():
    causal, bidirectional = tiny_classifier(pooling="first"), tiny_classifier(pooling="first", causal=False)
    x, y = torch.tensor([[11, 12, 13]]), torch.tensor([[11, 99, 98]])
    # The first token sees only itself under the causal mask ...
    torch.testing.assert_close(cls.classifier_logits(causal, x), cls.classifier_logits(causal, y))
    # ... and every token without it.
    assert not torch.allclose(
        cls.classifier_logits(bidirectional, x), cls.classifier_logits(bidirectional, y)
    )


def _bidirectional_forward_by_hand(model, input_ids):
    """The forward pass written out block by block: attention over every real token of the row."""
    key_is_real = cls.real_token_mask(input_ids, PAD)
    x = model.tok_emb(input_ids) + model.pos_emb(torch.arange(input_ids.shape[1]))
    for block in model.trf_blocks:
        att, h = block.att, block.norm1(x)
        batch, tokens, _ = h.shape
        q, k, v = att.qkv(h).view(batch, tokens, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / att.head_dim**0.5
        scores = scores.masked_fill(~key_is_real[:, None, None, :], float("-inf"))
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        x = x + att.out_proj(context)
        x = x + block.ff(block.norm2(x))
    return model.out_head(model.final_norm(x))


@pytest.mark.parametrize("pooling", cls.POOLINGS)
def test_bidirectional_classifier_equals_the_forward_pass_by_hand(pooling):
    model = tiny_classifier(pooling=pooling, causal=False).eval()
    ids = torch.tensor([[11, 12, 13, 14, 15], [21, 22, PAD, PAD, PAD], [31, 32, 33, PAD, PAD]])
    expected = cls.pool_positions(_bidirectional_forward_by_hand(model, ids), ids, pooling, PAD)
    torch.testing.assert_close(cls.classifier_logits(model, ids), expected)


def test_bidirectional_forward_equals_the_model_with_the_mask_on_a_one_token_input():
    model = tiny_classifier(causal=False)
    ids = torch.tensor([[42], [43]])
    torch.testing.assert_close(cls.classifier_logits(model, ids), tiny_classifier()(ids)[:, -1])


# --- model surgery ----------------------------------------------------------------------


def test_freezing_gpt2_small_leaves_the_last_block_final_norm_and_head_trainable():
    cfg = {**GPT_CONFIGS["gpt2-small"], "qkv_bias": True, "tie_weights": True}  # as loaded from OpenAI
    model = cls.make_classifier(build_on_meta(cfg))
    d = 768
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    final_norm, head = 2 * d, d * 2 + 2
    trainable, total = cls.count_trainable(model)
    assert trainable == block + final_norm + head == 7_090_946
    embeddings = 50257 * d + 1024 * d
    assert total == embeddings + 12 * block + final_norm + head
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        n for n, _ in model.named_parameters() if n.startswith(("trf_blocks.11.", "final_norm.", "out_head."))
    }
    assert tuple(model.out_head.weight.shape) == (2, d)


@pytest.mark.parametrize(
    "blocks,expected_prefixes",
    [
        (0, ("out_head.",)),
        (2, ("out_head.", "final_norm.", "trf_blocks.0.", "trf_blocks.1.")),
        ("all", ("",)),
    ],
)
def test_trainable_blocks_choose_exactly_those_parameters(blocks, expected_prefixes):
    model = cls.make_classifier(build_on_meta(TINY), trainable_blocks=blocks)
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith(expected_prefixes), name


def test_make_classifier_refuses_bad_settings():
    with pytest.raises(ValueError, match="pooling"):
        cls.make_classifier(build_on_meta(TINY), pooling="max")
    with pytest.raises(ValueError, match="trainable_blocks"):
        cls.make_classifier(build_on_meta(TINY), trainable_blocks=3)


# --- loss and accuracy ------------------------------------------------------------------


def test_accuracy_and_loss_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.5, 0.2]])
    labels = torch.tensor([0, 1, 1, 1])
    assert cls.accuracy_from_logits(logits, labels) == 0.5
    # cross-entropy by hand: mean of -log softmax at the label
    by_hand = -torch.log_softmax(logits, dim=-1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(cls.loss_from_logits(logits, labels), by_hand)
    assert cls.loss_from_logits(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(
        0.693147, abs=1e-6
    )


def test_one_output_with_bce_decides_like_two_outputs_with_softmax():
    # Two logits (a, b) and one logit b - a give the same probabilities: softmax = sigmoid(b - a).
    two = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-2.0, 1.5], [0.0, 0.0001]])
    one = (two[:, 1] - two[:, 0]).unsqueeze(-1)
    labels = torch.tensor([0, 1, 1, 0])
    assert cls.predict_from_logits(one).tolist() == cls.predict_from_logits(two).tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(cls.loss_from_logits(one, labels), cls.loss_from_logits(two, labels))


# --- new messages -----------------------------------------------------------------------


def test_classify_text_truncates_a_5000_token_message_to_the_context(tokenizer, monkeypatch):
    model = tiny_classifier()
    text = "you won a prize" + " you won a prize" * 1249
    assert len(tokenizer.encode(text)) == 5000
    seen = []
    original = cls.classifier_logits
    monkeypatch.setattr(cls, "classifier_logits", lambda m, ids: seen.append(ids) or original(m, ids))
    assert cls.classify_text(text, model, tokenizer) in {"spam", "ham"}
    # Truncated to the 32 positions of the context, not to the embedding width (16).
    assert seen[-1].tolist() == [tokenizer.encode(text)[: TINY["context_length"]]]
    cls.classify_text(text, model, tokenizer, context_length=5)
    assert seen[-1].shape == (1, 5)


def test_classify_text_handles_non_ascii_and_batches(tokenizer):
    model = tiny_classifier()
    texts = ["Gewinne jetzt 1000€! Antworte JA", "今晚见 🙂", "see you at 5"]
    batch = cls.classify_text(texts, model, tokenizer)
    assert batch == [cls.classify_text(t, model, tokenizer) for t in texts]
    assert set(batch) <= {"spam", "ham"}


def test_classify_text_refuses_empty_input(tokenizer):
    model = tiny_classifier()
    with pytest.raises(ValueError, match="empty"):
        cls.classify_text("", model, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        cls.classify_text(["ok", "   "], model, tokenizer)
    with pytest.raises(ValueError, match="empty list"):
        cls.classify_text([], model, tokenizer)


def test_classify_text_accepts_a_head_swapped_by_hand(tokenizer):
    torch.manual_seed(0)
    model = GPTModel(TINY)
    model.out_head = torch.nn.Linear(TINY["emb_dim"], 2)  # as the book does it
    assert cls.classify_text("hello there", model, tokenizer) in {"spam", "ham"}


def test_save_and_load_give_the_same_classifier(tmp_path, tokenizer):
    model = tiny_classifier(pooling="mean", trainable_blocks=1)
    cls.save_classifier(model, tmp_path / "clf")
    loaded = cls.load_classifier(tmp_path / "clf")
    ids = torch.tensor([[11, 12, 13, PAD]])
    torch.testing.assert_close(cls.classifier_logits(loaded, ids), cls.classifier_logits(model, ids))
    assert loaded.classification == model.classification
    assert cls.count_trainable(loaded) == cls.count_trainable(model)
    with pytest.raises(FileNotFoundError, match="save_classifier"):
        cls.load_classifier(tmp_path / "missing")


# --- training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_training_beats_chance_by_far_on_the_test_split(splits, tokenizer):
    """One epoch of the small random GPT on the balanced split. Seen: about 96% test accuracy."""
    from shared.train import TrainSettings, make_optimizer, train_model

    torch.manual_seed(123)
    data = {
        name: cls.SpamDataset(path, tokenizer, context_length=STANDIN_CONFIG["context_length"])
        for name, path in splits.items()
    }
    train_loader = cls.create_classification_loader(data["train"], 8, shuffle=True, drop_last=True)
    val_loader = cls.create_classification_loader(data["validation"], 8)
    test_loader = cls.create_classification_loader(data["test"], 8)
    model = cls.make_classifier(GPTModel(STANDIN_CONFIG), trainable_blocks="all")
    before = cls.calc_accuracy_loader(test_loader, model, "cpu")
    history = train_model(
        model,
        train_loader,
        val_loader,
        make_optimizer(model, 1e-3, 0.1),
        "cpu",
        num_epochs=1,
        eval_freq=50,
        eval_iter=5,
        settings=TrainSettings(
            loss_fn=cls.classification_loss, epoch_end=cls.accuracy_callback({"val": val_loader}, "cpu")
        ),
        progress=False,
    )
    after = cls.calc_accuracy_loader(test_loader, model, "cpu")
    assert cls.calc_accuracy_loader(test_loader, model) == after  # no device: where the model is
    assert 0.3 < before < 0.7  # an untrained head is at chance on a balanced split
    print(f"test accuracy before {before:.4f}, after one epoch {after:.4f}")
    assert after >= 0.85, after  # chance is 0.5; a pipeline that reads the wrong thing stays near it
    assert history.epoch_metrics[0]["val_acc"] >= 0.85
    assert history.train_losses[-1] < history.train_losses[0]


@pytest.mark.slow
def test_finetune_script_runs_end_to_end_and_saves_a_loadable_classifier(tmp_path, tokenizer):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "ch06" / "finetune_classifier.py"
    spec = importlib.util.spec_from_file_location("finetune_classifier", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "run"
    report = module.main(["--quick", "--epochs", "1", "--context-length", "48", "--out-dir", str(out)])
    assert report["pretrained"] is False and "RANDOMLY INITIALISED" in report["model"]
    assert json.loads((out / "report.json").read_text())["accuracy"] == report["accuracy"]
    assert set(report["accuracy"]) == {"train", "validation", "test"}
    assert len(report["epoch_metrics"]) == 1
    loaded = cls.load_classifier(out)
    assert set(cls.classify_text(["Free prize! Call now", "see you"], loaded, tokenizer)) <= {"spam", "ham"}
    assert report["accuracy"]["test"] > 0.75, report["accuracy"]  # chance is 0.5


def test_load_gpt2_or_standin_uses_gpt2_weights_when_present_and_falls_back_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LLMS_HF_BASE_URL", "http://127.0.0.1:9")  # nothing listens: offline
    model, description, pretrained = load_gpt2_or_standin("gpt2-small")
    assert not pretrained and "RANDOMLY INITIALISED" in description and "unavailable" in description
    assert model.cfg == GPTModel(STANDIN_CONFIG).cfg

    # A checkpoint in the data directory (here a tiny one in GPT-2's format) is used as is.
    torch.manual_seed(0)
    save_hf_gpt2(GPTModel({**TINY, "drop_rate": 0.1, "tie_weights": True}), tmp_path / "gpt2-small")
    model, description, pretrained = load_gpt2_or_standin("gpt2-small")
    assert pretrained and description == "OpenAI's pretrained gpt2-small"
    assert model.cfg["emb_dim"] == TINY["emb_dim"] and model.cfg["drop_rate"] == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(block.att.dropout == 0.0 for block in model.trf_blocks)


# --- bad input to the scripts and the files ---------------------------------------------


def test_finetune_script_refuses_a_context_length_below_one_and_an_unknown_trainable_blocks(capsys):
    script = load_script("ch06", "finetune_classifier")
    for argv, message in [
        (["--context-length", "0"], "--context-length must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--trainable-blocks", "banana"], "'banana' is neither 'all' nor a number of blocks (0, 1, 2, ...)"),
        (["--trainable-blocks", "-1"], "neither 'all' nor a number of blocks"),
    ]:
        with pytest.raises(SystemExit) as caught:
            script.parse_args(argv)
        assert caught.value.code == 2 and message in capsys.readouterr().err
    assert script.parse_args(["--trainable-blocks", "all"]).trainable_blocks == "all"
    assert script.parse_args(["--trainable-blocks", "2"]).trainable_blocks == 2


def test_saving_a_classifier_under_a_file_names_the_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'taken'} is a file"):
        cls.save_classifier(tiny_classifier(), tmp_path / "taken" / "clf")


def test_saving_a_classifier_into_a_read_only_folder_says_so(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    deny_writes_under(monkeypatch, folder)
    with pytest.raises(PermissionError, match=f"no permission to write in {folder}; choose a folder"):
        cls.save_classifier(tiny_classifier(), folder)


def test_loading_a_classifier_with_an_empty_config_names_the_file_and_the_missing_keys(tmp_path):
    cls.save_classifier(tiny_classifier(), tmp_path)
    (tmp_path / "classifier.json").write_text("{}")
    with pytest.raises(ValueError, match=r"classifier.json lacks .*gpt_config.*save_classifier"):
        cls.load_classifier(tmp_path)
    (tmp_path / "classifier.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"classifier.json is not valid JSON"):
        cls.load_classifier(tmp_path)


def test_loading_a_truncated_classifier_names_the_weights_file(tmp_path):
    cls.save_classifier(tiny_classifier(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights} cannot be read .*save the classifier again"):
        cls.load_classifier(tmp_path)


def test_reading_an_empty_split_names_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(ValueError, match="train.csv is empty.*prepare_spam_splits"):
        cls.read_split(tmp_path / "train.csv")


def test_spam_splits_in_a_read_only_data_folder_say_how_to_fix_it(tmp_path, monkeypatch):
    deny_writes_under(monkeypatch, tmp_path)
    with pytest.raises(PermissionError, match="LLMS_DATA_DIR"):
        cls.prepare_spam_splits(tmp_path / "splits")


# --- ch06/experiments.py: which variants, and where the table goes -----------------------


@pytest.fixture
def experiments(monkeypatch, tmp_path):
    """The experiments script with a fake finetune (instant) and its folders in tmp_path."""
    from scripts import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "ch06"))
    module = load_script("ch06", "experiments")
    settings = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.1, "batch_size": 8, "seed": 123}
    report = {
        "accuracy": {"train": 1.0, "validation": 0.9, "test": 0.8},
        "trainable_parameters": 10,
        "train_seconds": 0.1,
        "model": "fake",
        "device": "cpu",
        "settings": settings,
    }
    monkeypatch.setattr(module, "finetune", lambda args: (None, report))
    monkeypatch.setattr(module, "HERE", tmp_path)  # runs/ and results/ go here
    return module


def committed_table(results):
    results.mkdir()
    (results / "experiments-quick.md").write_text("the committed 12-variant table")
    return results / "experiments-quick.md"


def test_experiments_refuse_unknown_names_and_an_empty_only_list(experiments, capsys):
    for argv, message in [
        (["--only", "baseline "], "unknown variant 'baseline '; the variants are: baseline, first token"),
        (["--only"], "expected at least one argument"),
    ]:
        with pytest.raises(SystemExit) as caught:
            experiments.main(["--quick", *argv])
        assert caught.value.code == 2 and message in capsys.readouterr().err


def test_a_partial_experiment_run_goes_to_a_run_folder_not_over_the_committed_table(experiments, tmp_path):
    table = committed_table(tmp_path / "results")
    rows = experiments.main(["--quick", "--only", "head only"])
    assert [row["variant"] for row in rows] == ["head only"]
    assert table.read_text() == "the committed 12-variant table"
    (run,) = (tmp_path / "runs" / "experiments").iterdir()
    assert (run / "experiments-quick-partial.md").is_file()  # named so: not the whole table


@pytest.mark.slow
def test_refreshing_the_committed_table_needs_its_flag_and_every_variant(experiments, tmp_path, capsys):
    table = committed_table(tmp_path / "results")
    for argv, message in [
        (["--out-dir", str(tmp_path / "results")], "pass --refresh-results"),
        (["--refresh-results", "--only", "head only"], "--refresh-results runs every variant"),
    ]:
        with pytest.raises(SystemExit):
            experiments.main(["--quick", *argv])
        assert message in capsys.readouterr().err
    assert table.read_text() == "the committed 12-variant table"
    rows = experiments.main(["--quick", "--refresh-results"])
    assert len(rows) == 12 and "| head only |" in table.read_text()


@pytest.mark.slow
def test_finetune_script_with_an_out_dir_under_a_file_exits_1_with_one_line_before_training(tmp_path):
    import os
    import subprocess
    import sys

    from scripts import REPO_ROOT

    (tmp_path / "taken").write_text("a file")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(REPO_ROOT / "ch06" / "finetune_classifier.py"), "--quick"]
    done = subprocess.run(
        [*command, "--out-dir", str(tmp_path / "taken" / "run")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"error: cannot use the folder {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file, "
        "not a folder; choose another path or move that file away."
    )
    assert "model:" not in done.stdout  # refused before the model was even built


def test_saving_a_classifier_on_a_full_disk_says_so(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raises when a write hits ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cls, "save_file", full_disk)
    with pytest.raises(
        OSError, match=f"the disk holding {tmp_path} is full: model.safetensors was not written"
    ):
        cls.save_classifier(tiny_classifier(), tmp_path)
    assert list(tmp_path.iterdir()) == []
