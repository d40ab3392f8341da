"""Finetuning a GPT model as a text classifier, the final form built in ch06.

The recipe, piece by piece:

- data: a class-balanced subset of a labelled table, split 70/10/20 into train, validation
  and test CSV files (:func:`balanced_subset`, :func:`random_split`, :func:`prepare_spam_splits`);
- :class:`SpamDataset`: each message tokenised once and truncated to a maximum length; padding
  is left to the collate function, so a batch can be padded to its own longest message
  (:func:`collate_classification`, :func:`create_classification_loader`);
- model surgery (:func:`make_classifier`): the vocabulary head is swapped for a small linear
  layer with one output per class, everything is frozen except the last few blocks, the final
  norm and the new head, and the model remembers which position it reads;
- the reading position (:func:`classifier_logits`): the last real token (the only one that has
  attended to the whole message under the causal mask), the first token, the mean over the real
  tokens, or the final position whatever it holds (the book's ``[:, -1]``); optionally the causal
  mask is dropped for this pass and padding is masked instead;
- the loss and accuracy (:func:`classification_loss` plugs into ``shared.train.train_model``);
- :func:`classify_text` for new messages, :func:`save_classifier` / :func:`load_classifier`.

Padding uses GPT-2's ``<|endoftext|>`` id. Messages are encoded as plain text (special-token
strings inside a message become ordinary tokens), so the pad id never occurs inside a message
and the real tokens of a right-padded row are exactly those up to its last non-pad token.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared.data import DATA_DIR_ENV_VAR, data_dir, load_sms_spam
from shared.model import GPTModel
from shared.tokenizer import GPT2_EOT_ID, encode_text
from shared.utils import atomic_path, eval_mode, write_json

LABELS = ("ham", "spam")  # class id -> name: 0 is ham, 1 is spam
PAD_TOKEN_ID = GPT2_EOT_ID  # GPT-2's <|endoftext|>
POOLINGS = ("last", "first", "mean", "last_position")
SPLIT_NAMES = ("train", "validation", "test")
SPLITS_FOLDER = "sms-spam-splits"
CLASSIFIER_CONFIG_FILE = "classifier.json"
CLASSIFIER_WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------
# Data: balance, split, save
# ---------------------------------------------------------------------------------------


def balanced_subset(frame, seed: int = 123, label_column: str = "Label"):
    """Undersample every class to the size of the smallest one (rows of the smallest are all kept).

    Classes come out in sorted label order, each sampled with ``random_state=seed``.
    """
    import pandas as pd

    if label_column not in frame.columns:
        raise ValueError(f"the table has no column {label_column!r}; its columns are {list(frame.columns)}.")
    counts = frame[label_column].value_counts()
    if len(counts) < 2:
        raise ValueError(f"balancing needs at least two classes, the table has {dict(counts)}.")
    smallest = int(counts.min())
    parts = []
    for label in sorted(counts.index):
        rows = frame[frame[label_column] == label]
        parts.append(rows if len(rows) == smallest else rows.sample(smallest, random_state=seed))
    return pd.concat(parts)


def random_split(frame, train_frac: float = 0.7, validation_frac: float = 0.1, seed: int = 123):
    """Shuffle the rows (``random_state=seed``) and cut them into train, validation and test tables.

    The train and validation sizes are rounded down; test gets the rest.
    """
    if not (0 < train_frac < 1 and 0 <= validation_frac < 1 and train_frac + validation_frac < 1):
        raise ValueError(
            f"train_frac={train_frac} and validation_frac={validation_frac} must be fractions that leave "
            "room for a test split (their sum below 1)."
        )
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    validation_end = train_end + int(len(shuffled) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def label_ids(labels) -> list[int]:
    """Labels as class ids: "ham"/"spam" (any case) or 0/1 already."""
    ids = []
    for row, label in enumerate(labels):
        if isinstance(label, str) and label.strip().lower() in LABELS:
            ids.append(LABELS.index(label.strip().lower()))
        elif str(label).strip() in ("0", "1"):
            ids.append(int(str(label).strip()))
        else:
            raise ValueError(f"row {row}: label {label!r} is neither one of {LABELS} nor a class id 0/1.")
    return ids


def prepare_spam_splits(folder: str | os.PathLike | None = None, seed: int = 123) -> dict[str, Path]:
    """Balance the SMS Spam Collection (747 ham, 747 spam), split it 70/10/20 and save three CSVs.

    The files (``train.csv``, ``validation.csv``, ``test.csv``, columns ``Label`` as 0/1 and
    ``Text``) go to ``folder`` (default: ``<data dir>/sms-spam-splits``). Returns their paths.
    """
    folder = Path(folder) if folder is not None else data_dir() / SPLITS_FOLDER
    balanced = balanced_subset(load_sms_spam(), seed=seed)
    balanced = balanced.assign(Label=label_ids(balanced["Label"]))
    paths = {}
    for name, split in zip(SPLIT_NAMES, random_split(balanced, 0.7, 0.1, seed=seed), strict=True):
        paths[name] = folder / f"{name}.csv"
        try:
            with atomic_path(paths[name]) as tmp:
                split.to_csv(tmp, index=False)
        except PermissionError as error:
            raise PermissionError(
                f"{error} The splits are written into the data folder: set {DATA_DIR_ENV_VAR} to a folder "
                "you can write to, or pass another folder."
            ) from None
    return paths


def read_split(path: str | os.PathLike):
    """A split CSV as a DataFrame (a message that reads "NA" stays text, not a missing value)."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype={"Text": str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; write the splits again with prepare_spam_splits().") from None


# ---------------------------------------------------------------------------------------
# Dataset and batches
# ---------------------------------------------------------------------------------------


class SpamDataset(Dataset):
    """Labelled messages as token ids, truncated to ``context_length`` tokens and left unpadded.

    ``data`` is a CSV path or a DataFrame with columns ``Label`` (ham/spam or 0/1) and ``Text``.
    Items are ``(token ids, label)`` tensors of varying length; a collate function pads them.
    """

    def __init__(self, data, tokenizer, context_length: int | None = None):
        frame = read_split(data) if isinstance(data, (str, os.PathLike)) else data
        missing = {"Label", "Text"} - set(frame.columns)
        if missing:
            raise ValueError(f"the table lacks the columns {sorted(missing)}; it needs Label and Text.")
        if context_length is not None and context_length < 1:
            raise ValueError(f"context_length must be at least 1 token, got {context_length}.")
        self.labels = label_ids(frame["Label"])
        self.encoded_texts = [encode_text(tokenizer, str(text)) for text in frame["Text"]]
        for row, ids in enumerate(self.encoded_texts):
            if not ids:
                raise ValueError(f"row {row} has an empty message; drop it before building the dataset.")
        if context_length is not None:
            self.encoded_texts = [ids[:context_length] for ids in self.encoded_texts]
        self.context_length = context_length

    @property
    def longest(self) -> int:
        """Length of the longest (truncated) message in tokens."""
        return max(len(ids) for ids in self.encoded_texts)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.encoded_texts[index]), torch.tensor(self.labels[index])


def pad_batch(sequences, pad_token_id: int = PAD_TOKEN_ID, pad_to: int | None = None) -> torch.Tensor:
    """Right-pad token id sequences into one (batch, length) tensor.

    ``length`` is the longest sequence's (dynamic padding) or ``pad_to`` when given.
    """
    sequences = [torch.as_tensor(seq, dtype=torch.long) for seq in sequences]
    if not sequences:
        raise ValueError("cannot pad an empty batch.")
    longest = max(len(seq) for seq in sequences)
    length = longest if pad_to is None else pad_to
    if longest > length:
        raise ValueError(
            f"a sequence has {longest} tokens, more than pad_to={pad_to}; truncate the dataset "
            "(SpamDataset(context_length=...)) to at most pad_to tokens."
        )
    batch = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = seq
    return batch


def collate_classification(batch, pad_token_id: int = PAD_TOKEN_ID, pad_to: int | None = None):
    """(token ids, label) items -> (input ids (batch, length), labels (batch,)), right-padded."""
    sequences, labels = zip(*batch, strict=True)
    return pad_batch(sequences, pad_token_id, pad_to), torch.stack(labels)


def create_classification_loader(
    dataset: SpamDataset,
    batch_size: int = 8,
    shuffle: bool = False,
    drop_last: bool = False,
    pad_to: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader of (input ids, labels): each batch padded to its longest message, or to ``pad_to``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} examples, fewer than batch_size={batch_size}, so "
            "drop_last=True would leave no batch; lower the batch size or pass drop_last=False."
        )
    collate = functools.partial(collate_classification, pad_token_id=pad_token_id, pad_to=pad_to)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
    )


# ---------------------------------------------------------------------------------------
# Model surgery
# ---------------------------------------------------------------------------------------

DEFAULT_SETTINGS = {"num_classes": 2, "pooling": "last", "causal": True, "pad_token_id": PAD_TOKEN_ID}


def make_classifier(
    model: GPTModel,
    num_classes: int = 2,
    trainable_blocks: int | str = 1,
    pooling: str = "last",
    causal: bool = True,
    pad_token_id: int = PAD_TOKEN_ID,
) -> GPTModel:
    """Turn a GPTModel into a classifier in place and return it.

    - The vocabulary head becomes ``nn.Linear(emb_dim, num_classes)`` (``num_classes=1``: one
      logit for a sigmoid and binary cross-entropy).
    - Only the last ``trainable_blocks`` transformer blocks, the final norm (when any block
      trains) and the new head keep ``requires_grad``;
      ``trainable_blocks="all"`` trains every parameter, embeddings included.
    - ``pooling`` is the position the prediction is read from: "last" real token, "first" token,
      "mean" over real tokens, or "last_position" (the final column, pad or not: the book's read);
      ``causal=False`` drops the causal mask for the classification pass (padding is masked).
    These settings are kept in ``model.classification``.
    """
    n_layers = len(model.trf_blocks)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if trainable_blocks != "all" and not (
        isinstance(trainable_blocks, int) and 0 <= trainable_blocks <= n_layers
    ):
        raise ValueError(
            f"trainable_blocks must be 'all' or an int from 0 to {n_layers}, got {trainable_blocks!r}."
        )

    model.requires_grad_(trainable_blocks == "all")
    reference = model.tok_emb.weight
    # A new head, on the model's device and dtype (its init is nn.Linear's default).
    model.out_head = nn.Linear(model.tok_emb.embedding_dim, num_classes).to(reference.device, reference.dtype)
    if trainable_blocks != "all":
        for block in list(model.trf_blocks)[n_layers - trainable_blocks :]:
            block.requires_grad_(True)
        model.final_norm.requires_grad_(trainable_blocks > 0)
    model.classification = {
        "num_classes": num_classes,
        "pooling": pooling,
        "causal": causal,
        "pad_token_id": pad_token_id,
        "trainable_blocks": trainable_blocks,
    }
    return model


def classifier_settings(model: nn.Module) -> dict:
    """The model's reading settings; a model whose head was swapped by hand gets the defaults."""
    settings = {**DEFAULT_SETTINGS, **getattr(model, "classification", {})}
    settings["num_classes"] = model.out_head.out_features
    return settings


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters); a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------
# Which position to read
# ---------------------------------------------------------------------------------------


def last_real_token_index(input_ids: torch.Tensor, pad_token_id: int = PAD_TOKEN_ID) -> torch.Tensor:
    """For right-padded rows (batch, length): the index of each row's last non-pad token, shape (batch,)."""
    is_real = input_ids != pad_token_id
    if not bool(is_real.any(dim=1).all()):
        raise ValueError("a row holds only pad tokens: every message needs at least one real token.")
    # The first real token met when reading each row backwards.
    from_end = is_real.flip(1).int().argmax(dim=1)
    return input_ids.shape[1] - 1 - from_end


def real_token_mask(input_ids: torch.Tensor, pad_token_id: int = PAD_TOKEN_ID) -> torch.Tensor:
    """(batch, length) bool: True up to and including each row's last real token."""
    last = last_real_token_index(input_ids, pad_token_id)
    return torch.arange(input_ids.shape[1], device=input_ids.device) <= last[:, None]


def pool_positions(
    per_position: torch.Tensor, input_ids: torch.Tensor, pooling: str, pad_token_id: int = PAD_TOKEN_ID
) -> torch.Tensor:
    """Read one vector per row from (batch, length, dim) outputs, as ``pooling`` says."""
    if pooling == "last":
        rows = torch.arange(per_position.shape[0], device=per_position.device)
        return per_position[rows, last_real_token_index(input_ids, pad_token_id)]
    if pooling == "first":
        return per_position[:, 0]
    if pooling == "last_position":
        return per_position[:, -1]
    if pooling == "mean":
        mask = real_token_mask(input_ids, pad_token_id).unsqueeze(-1).to(per_position.dtype)
        return (per_position * mask).sum(1) / mask.sum(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


def classifier_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Class logits (batch, num_classes) of right-padded token ids, read where the model's settings say.

    The head is linear, so reading a position (or averaging) before or after it gives the same result.
    """
    settings = classifier_settings(model)
    if settings["causal"]:
        per_position = model(input_ids)
    else:  # every token attends to every real token (LLM2Vec's idea); padding is masked as keys
        real = real_token_mask(input_ids, settings["pad_token_id"])
        per_position = model(input_ids, attention_mask=real, causal=False)
    return pool_positions(per_position, input_ids, settings["pooling"], settings["pad_token_id"])


# ---------------------------------------------------------------------------------------
# Loss and accuracy
# ---------------------------------------------------------------------------------------


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes; with one output, binary cross-entropy on its sigmoid."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def predict_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class ids: the largest logit, or for one output whether it is positive (sigmoid > 0.5)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) > 0).long()
    return logits.argmax(dim=-1)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose predicted class equals the label."""
    return (predict_from_logits(logits) == labels).float().mean().item()


def classification_loss(input_batch, target_batch, model, device) -> torch.Tensor:
    """A ``loss_fn`` for ``shared.train.train_model``: the loss at the position the model reads."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    return loss_from_logits(classifier_logits(model, input_batch), target_batch)


def calc_accuracy_loader(data_loader, model, device=None, num_batches: int | None = None) -> float:
    """Accuracy over the first ``num_batches`` batches (all when None), in eval mode without gradients.

    The batches go to ``device`` (default: where the model is)."""
    if len(data_loader) == 0:
        raise ValueError(
            "the data loader has no batches (an empty split, or drop_last with too few examples)."
        )
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    device = device if device is not None else next(model.parameters()).device
    correct, seen = torch.zeros((), device=device), 0
    with eval_mode(model), torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            target_batch = target_batch.to(device)
            predicted = predict_from_logits(classifier_logits(model, input_batch.to(device)))
            correct += (predicted == target_batch).sum()
            seen += len(target_batch)
    return correct.item() / seen


def accuracy_callback(loaders: dict, device=None, num_batches: int | None = None):
    """An ``epoch_end`` callback for ``train_model``: ``{"<name>_acc": accuracy}`` for each loader."""

    def epoch_end(epoch: int, model: nn.Module) -> dict:
        return {
            f"{name}_acc": calc_accuracy_loader(loader, model, device, num_batches)
            for name, loader in loaders.items()
        }

    return epoch_end


# ---------------------------------------------------------------------------------------
# New messages
# ---------------------------------------------------------------------------------------


def classify_text(text, model, tokenizer, device=None, context_length: int | None = None):
    """Classify one message (-> "spam" or "ham") or a list of them (-> a list, one batch).

    Text longer than the model's context length (its position-embedding table, not its
    embedding width) or than ``context_length`` is truncated to its first tokens. ``device=None``:
    where the model is.
    """
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not texts:
        raise ValueError("classify_text got an empty list; pass a string or a list of strings.")
    for i, item in enumerate(texts):
        if not isinstance(item, str):
            raise TypeError(f"text {i} is a {type(item).__name__}; classify_text takes strings.")
        if not item.strip():
            raise ValueError(f"text {i} is empty; there is nothing to classify.")
    settings = classifier_settings(model)
    if settings["num_classes"] != len(LABELS) and settings["num_classes"] != 1:
        raise ValueError(
            f"the model's head has {settings['num_classes']} outputs; classify_text needs a spam/ham "
            "head with 2 outputs (or 1 for a sigmoid). Call make_classifier(model) first."
        )
    model_context = model.pos_emb.weight.shape[0]  # positions the model has embeddings for
    limit = model_context if context_length is None else min(context_length, model_context)
    if limit < 1:
        raise ValueError(f"context_length must be at least 1 token, got {context_length}.")
    device = device if device is not None else next(model.parameters()).device
    input_ids = pad_batch([encode_text(tokenizer, t)[:limit] for t in texts], settings["pad_token_id"])

    with eval_mode(model), torch.no_grad():
        predicted = predict_from_logits(classifier_logits(model, input_ids.to(device))).tolist()
    names = [LABELS[p] for p in predicted]
    return names[0] if single else names


# ---------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------


def save_classifier(model: GPTModel, folder: str | os.PathLike) -> Path:
    """Write ``classifier.json`` (GPT config + reading settings) and ``model.safetensors`` to ``folder``."""
    folder = Path(folder)
    settings = classifier_settings(model)
    config = {"gpt_config": model.cfg, "classification": settings}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(folder / CLASSIFIER_WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_json(folder / CLASSIFIER_CONFIG_FILE, config)
    return folder


_SETTING_KEYS = ("num_classes", "pooling", "causal", "pad_token_id")


def _read_classifier_config(path: Path) -> tuple[dict, dict]:
    """(the whole config, its classification settings) from ``classifier.json``, checked."""
    fix = "save the classifier again with save_classifier."
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(config, dict) or not {"gpt_config", "classification"} <= set(config):
        raise ValueError(f"{path} lacks the keys 'gpt_config' and 'classification'; {fix}")
    settings = config["classification"]
    missing = [key for key in _SETTING_KEYS if key not in settings]
    if missing:
        raise ValueError(f"{path} lacks the classification settings {missing}; {fix}")
    return config, settings


def _read_weights(path: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=str(device) if device is not None else "cpu")
    except SafetensorError as error:
        raise ValueError(
            f"{path} cannot be read as safetensors (truncated or damaged: {error}); save the classifier again."
        ) from None


def load_classifier(folder: str | os.PathLike, device: str | torch.device | None = None) -> GPTModel:
    """The classifier :func:`save_classifier` wrote, in eval mode, with its trainable flags restored.

    The weights are read onto ``device`` (default: the CPU, where PyTorch makes tensors).
    """
    folder = Path(folder)
    for needed in (CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise FileNotFoundError(
                f"{folder / needed} not found: save the classifier with save_classifier first."
            )
    config, settings = _read_classifier_config(folder / CLASSIFIER_CONFIG_FILE)
    with torch.device("meta"):
        model = GPTModel(config["gpt_config"])
    make_classifier(
        model,
        num_classes=settings["num_classes"],
        trainable_blocks=settings.get("trainable_blocks", 1),
        pooling=settings["pooling"],
        causal=settings["causal"],
        pad_token_id=settings["pad_token_id"],
    )
    state = _read_weights(folder / CLASSIFIER_WEIGHTS_FILE, device)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{folder / CLASSIFIER_WEIGHTS_FILE} does not fit its config: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}."
        )
    model.load_state_dict(state, assign=True)
    return model.eval()
