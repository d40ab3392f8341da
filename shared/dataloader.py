"""Sliding windows of token ids for next-token prediction, and the DataLoader that batches them."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from shared.tokenizer import END_OF_TEXT, check_token_ids, get_gpt2_tokenizer


class GPTDataset(Dataset):
    """Input/target windows cut from one sequence of token ids.

    Window ``i`` starts at token ``i * stride``: the inputs are ``max_length`` tokens from there,
    the targets the same tokens shifted one to the right (each position's next token). So a
    window needs ``max_length + 1`` tokens and there are
    ``(len(token_ids) - max_length - 1) // stride + 1`` windows.

    Only the ids are stored, once, as one tensor; windows are sliced from it on access, so
    memory grows with the text, not with text x max_length / stride. The dataset holds no
    tokenizer, so it pickles cheaply into DataLoader worker processes.

    The ids must be integers (floats are refused, not rounded) and not negative; with
    ``vocab_size`` they must also be below it.
    """

    def __init__(self, token_ids, max_length: int, stride: int, *, vocab_size: int | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if stride < 1:
            raise ValueError(
                f"stride must be at least 1, got {stride}: it is how many tokens each window "
                "moves past the previous one (stride=max_length gives windows that do not overlap)"
            )
        ids = torch.as_tensor(token_ids)
        if ids.numel():  # an empty list becomes a float tensor; its length is refused below
            check_token_ids(ids, vocab_size)
        self.token_ids = ids.to(torch.long).flatten()
        self.max_length = max_length
        self.stride = stride
        if len(self.token_ids) < max_length + 1:
            raise ValueError(
                f"the text has {len(self.token_ids)} tokens, but a window of max_length={max_length} "
                f"needs {max_length + 1} (the inputs plus the targets shifted by one). "
                "Use a longer text or a smaller max_length."
            )

    def __len__(self) -> int:
        return (len(self.token_ids) - self.max_length - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"window {index} out of range for a dataset of {count} windows")
        start = (index % count) * self.stride
        window = self.token_ids[start : start + self.max_length + 1]
        return window[:-1], window[1:]


def create_dataloader(
    text_or_ids,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    vocab_size: int | None = None,
) -> DataLoader:
    """Batches of (inputs, targets), each of shape (batch_size, max_length).

    ``max_length`` is the window length, what the rest of the course calls ``context_length``;
    this function and :class:`GPTDataset` keep the book's ch02 name, which the ch02, ch05 and
    appendix D notebooks use.

    ``text_or_ids`` is raw text (tokenized here with GPT-2's tokenizer, ``<|endoftext|>``
    allowed as a document separator) or a sequence/tensor of token ids, checked against
    ``vocab_size`` when given (see :class:`GPTDataset`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(text_or_ids, str):
        token_ids = get_gpt2_tokenizer().encode(text_or_ids, allowed_special={END_OF_TEXT})
    else:
        token_ids = text_or_ids
    dataset = GPTDataset(token_ids, max_length, stride, vocab_size=vocab_size)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"the text gives {len(dataset)} windows (max_length={max_length}, stride={stride}), fewer "
            f"than batch_size={batch_size}, so drop_last=True would leave no batch at all. Lower the "
            "batch size, max_length or stride, or pass drop_last=False."
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers
    )


def train_val_loaders(
    text: str, context_length: int, batch_size: int = 2, train_fraction: float = 0.9
) -> tuple[DataLoader, DataLoader]:
    """ch05's split: the first ``train_fraction`` of the characters train, the rest validate.

    Both cut non-overlapping windows of ``context_length`` tokens (stride = context length). The
    training loader shuffles and drops an incomplete last batch; the validation loader keeps its
    order and every window (with ``drop_last`` a short validation text would have no batch).
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction}.")
    split = int(train_fraction * len(text))
    windows = {"batch_size": batch_size, "max_length": context_length, "stride": context_length}
    train_loader = create_dataloader(text[:split], shuffle=True, drop_last=True, **windows)
    val_loader = create_dataloader(text[split:], shuffle=False, drop_last=False, **windows)
    return train_loader, val_loader
