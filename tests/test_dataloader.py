"""GPTDataset and create_dataloader: window counts, contents, errors, batches, workers."""

import pytest
import torch

from shared import data
from shared.dataloader import GPTDataset, create_dataloader
from shared.tokenizer import get_gpt2_tokenizer


@pytest.mark.parametrize(
    ("n", "max_length", "stride"),
    [(5, 4, 1), (10, 4, 1), (10, 4, 4), (10, 4, 5), (11, 4, 3), (100, 7, 3), (257, 256, 128), (1000, 16, 16)],
)
def test_window_count_is_floor_of_remaining_tokens_over_stride_plus_one(n, max_length, stride):
    dataset = GPTDataset(list(range(n)), max_length, stride)
    assert len(dataset) == (n - max_length - 1) // stride + 1
    # Brute force: every start whose window (inputs plus one target) fits in the text.
    assert len(dataset) == len([start for start in range(0, n, stride) if start + max_length + 1 <= n])


def test_windows_are_slices_with_targets_shifted_by_one():
    dataset = GPTDataset(list(range(20)), max_length=4, stride=3)
    inputs, targets = dataset[2]
    assert inputs.tolist() == [6, 7, 8, 9]
    assert targets.tolist() == [7, 8, 9, 10]
    assert inputs.dtype == torch.long
    last_inputs, _ = dataset[-1]
    assert last_inputs.tolist() == dataset[len(dataset) - 1][0].tolist()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_stores_the_ids_once():
    dataset = GPTDataset(list(range(10_000)), max_length=256, stride=1)
    assert dataset.token_ids.numel() == 10_000
    assert dataset[5][0].untyped_storage().data_ptr() == dataset.token_ids.untyped_storage().data_ptr()


def test_short_text_error_says_how_many_tokens_it_has_and_needs():
    with pytest.raises(ValueError, match=r"has 4 tokens.*needs 5"):
        GPTDataset([1, 2, 3, 4], max_length=4, stride=1)


@pytest.mark.parametrize("stride", [0, -2])
def test_stride_below_one_is_an_error(stride):
    with pytest.raises(ValueError, match=f"stride must be at least 1, got {stride}"):
        GPTDataset(list(range(10)), max_length=4, stride=stride)


def test_max_length_below_one_is_an_error():
    with pytest.raises(ValueError, match="max_length must be at least 1, got 0"):
        GPTDataset(list(range(10)), max_length=0, stride=1)


def test_float_ids_are_refused_instead_of_truncated():
    with pytest.raises(ValueError, match="must be integers"):
        GPTDataset([1.0, 2.5, 3.0, 4.0, 5.0, 6.0], max_length=4, stride=1)


def test_negative_id_is_refused():
    with pytest.raises(ValueError, match="contain -1, outside the vocabulary"):
        GPTDataset([1, 2, -1, 4, 5, 6], max_length=4, stride=1)


def test_id_at_or_above_vocab_size_is_refused_when_vocab_size_is_given():
    GPTDataset([1, 2, 9, 4, 5, 6], max_length=4, stride=1)  # no vocab_size: any id >= 0 is fine
    with pytest.raises(ValueError, match=r"contain 10, outside the vocabulary \(ids run from 0 to 9\)"):
        GPTDataset([1, 2, 10, 4, 5, 6], max_length=4, stride=1, vocab_size=10)
    with pytest.raises(ValueError, match="contain 10, outside"):
        create_dataloader([1, 2, 10, 4, 5, 6], batch_size=1, max_length=4, stride=1, vocab_size=10)


def test_first_batch_of_the_verdict_is_the_books():
    loader = create_dataloader(data.load_the_verdict(), batch_size=1, max_length=4, stride=1, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
    assert targets.tolist() == [[367, 2885, 1464, 1807]]


def test_text_and_token_ids_give_the_same_batches():
    text = data.load_the_verdict()
    ids = get_gpt2_tokenizer().encode(text)
    from_text = create_dataloader(text, batch_size=8, max_length=4, stride=4, shuffle=False)
    from_ids = create_dataloader(torch.tensor(ids), batch_size=8, max_length=4, stride=4, shuffle=False)
    first_text, first_ids = next(iter(from_text)), next(iter(from_ids))
    assert torch.equal(first_text[0], first_ids[0]) and torch.equal(first_text[1], first_ids[1])


def test_batches_have_the_requested_shape_and_drop_last_drops_the_remainder():
    ids = list(range(103))  # (103 - 4 - 1) // 4 + 1 = 25 windows
    kept = list(create_dataloader(ids, batch_size=8, max_length=4, stride=4, drop_last=True))
    assert [inputs.shape for inputs, _ in kept] == [torch.Size([8, 4])] * 3
    every = list(create_dataloader(ids, batch_size=8, max_length=4, stride=4, drop_last=False, shuffle=False))
    assert [len(inputs) for inputs, _ in every] == [8, 8, 8, 1]


def test_shuffle_visits_every_window_once():
    torch.manual_seed(0)
    ids = list(range(50))  # windows start at 0, 4, ..., 44
    loader = create_dataloader(ids, batch_size=5, max_length=4, stride=4, shuffle=True, drop_last=False)
    starts = [int(row[0]) for inputs, _ in loader for row in inputs]
    assert sorted(starts) == list(range(0, 45, 4))
    assert starts != sorted(starts)


def test_too_few_windows_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"gives 2 windows.*batch_size=4.*drop_last=False"):
        create_dataloader(list(range(10)), batch_size=4, max_length=4, stride=4)


def test_loader_works_with_two_worker_processes():
    ids = list(range(200))
    loader = create_dataloader(ids, batch_size=4, max_length=8, stride=8, shuffle=False, num_workers=2)
    batches = list(loader)
    single = list(create_dataloader(ids, batch_size=4, max_length=8, stride=8, shuffle=False))
    assert len(batches) == len(single) == 6
    for (inputs, targets), (expected_inputs, expected_targets) in zip(batches, single, strict=True):
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)


def test_train_val_loaders_split_the_characters_and_keep_every_validation_window():
    from shared.dataloader import train_val_loaders

    text = " ".join(f"word{i}" for i in range(400))
    train, val = train_val_loaders(text, context_length=8, batch_size=3)
    split = int(0.9 * len(text))
    assert train.dataset.token_ids.tolist() == get_gpt2_tokenizer().encode(text[:split])
    assert val.dataset.token_ids.tolist() == get_gpt2_tokenizer().encode(text[split:])
    assert train.drop_last and not val.drop_last
    assert sum(len(x) for x, _ in val) == len(val.dataset)  # no validation window is dropped
    assert all(x.shape[1] == 8 for x, _ in train)
    with pytest.raises(ValueError, match="train_fraction"):
        train_val_loaders(text, context_length=8, train_fraction=1.0)
