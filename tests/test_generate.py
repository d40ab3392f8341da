"""generate(): greedy/sampled decoding, the KV cache's exactness, the context window, eos."""

import pytest
import torch

from shared.generate import beam_search, generate, generate_text_simple, next_token, sequence_logprob
from shared.model import GPTModel

TINY = {
    "vocab_size": 101,
    "context_length": 17,
    "emb_dim": 30,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": True,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return GPTModel(TINY).eval()


def prompt(batch, tokens, seed=0):
    return torch.randint(
        0, TINY["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_cache_gives_the_same_tokens_as_recomputing(model, batch):
    idx = prompt(batch, 4)
    cached = generate(model, idx, max_new_tokens=10, use_cache=True)
    recomputed = generate(model, idx, max_new_tokens=10, use_cache=False)
    assert cached.shape == (batch, 14)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :4], idx)


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_logits_match_full_recompute_at_every_step(model, batch):
    idx = prompt(batch, 3)
    cache = model.new_cache()
    with torch.no_grad():
        step_logits = model(idx, cache=cache)[:, -1]
        for _ in range(12):
            full_logits = model(idx)[:, -1]
            torch.testing.assert_close(step_logits, full_logits, atol=1e-5, rtol=0)
            next_id = step_logits.argmax(-1, keepdim=True)
            idx = torch.cat((idx, next_id), dim=1)
            step_logits = model(next_id, cache=cache)[:, -1]


@pytest.mark.parametrize("prompt_len", [16, 17, 25])
@pytest.mark.parametrize("batch", [1, 2])
def test_cache_matches_recompute_at_and_over_the_context_limit(model, prompt_len, batch):
    # 16: the cache fills up mid-way and must hand over to the sliding window;
    # 17: the prompt fills the context exactly; 25: the prompt is longer and gets cropped.
    idx = prompt(batch, prompt_len)
    cached = generate(model, idx, max_new_tokens=6, use_cache=True)
    recomputed = generate(model, idx, max_new_tokens=6, use_cache=False)
    assert cached.shape == (batch, prompt_len + 6)
    assert torch.equal(cached, recomputed)


def test_smaller_context_length_crops_the_window(model):
    idx = prompt(1, 12)
    out = generate(model, idx, max_new_tokens=5, context_length=6)
    assert torch.equal(out, generate(model, idx, max_new_tokens=5, context_length=6, use_cache=False))
    assert torch.equal(out, generate_text_simple(model, idx, max_new_tokens=5, context_length=6))


def test_generate_text_simple_agrees_with_generate(model):
    idx = prompt(2, 5)
    simple = generate_text_simple(model, idx, max_new_tokens=15, context_length=TINY["context_length"])
    assert torch.equal(simple, generate(model, idx, max_new_tokens=15, use_cache=False))
    assert torch.equal(simple, generate(model, idx, max_new_tokens=15))


def test_eos_stops_a_single_row_and_is_kept(model):
    idx = prompt(1, 4)
    free = generate(model, idx, max_new_tokens=8)
    eos = int(free[0, 6])  # the third generated token
    first = int((free[0, 4:] == eos).nonzero()[0]) + 4
    out = generate(model, idx, max_new_tokens=8, eos_id=eos)
    assert torch.equal(out, free[:, : first + 1])
    assert out[0, -1] == eos


def test_eos_with_a_batch_pads_finished_rows_and_stops_when_all_finish(model):
    idx = prompt(2, 4, seed=3)
    free = generate(model, idx, max_new_tokens=10)
    eos = int(free[0, 5])  # row 0 emits it as its second new token
    out = generate(model, idx, max_new_tokens=10, eos_id=eos)
    for row in range(2):
        hits = (free[row, 4:] == eos).nonzero()
        end = int(hits[0]) + 4 if len(hits) else free.shape[1] - 1
        # up to and including its first eos, a row is what it would have been without eos_id ...
        assert torch.equal(out[row, : end + 1], free[row, : end + 1])
        # ... and everything after is eos
        assert (out[row, end + 1 :] == eos).all()
    rows_finished = [(out[row, 4:] == eos).any() for row in range(2)]
    assert out.shape[1] == 14 or all(rows_finished)
    if all(rows_finished):  # stopped at the step where the last row finished
        last_end = max(int((free[row, 4:] == eos).nonzero()[0]) + 4 for row in range(2))
        assert out.shape[1] == last_end + 1


def test_zero_new_tokens_returns_the_prompt(model):
    idx = prompt(2, 3)
    assert torch.equal(generate(model, idx, max_new_tokens=0), idx)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    idx = prompt(2, 4)
    greedy = generate(model, idx, max_new_tokens=8)
    torch.manual_seed(0)
    assert torch.equal(generate(model, idx, max_new_tokens=8, temperature=1.5, top_k=1), greedy)
    assert torch.equal(generate(model, idx, max_new_tokens=8, temperature=1.5, top_p=1e-6), greedy)


def test_sampling_is_reproducible_with_a_seed_and_cache_independent(model):
    idx = prompt(2, 4)
    torch.manual_seed(42)
    a = generate(model, idx, max_new_tokens=10, temperature=1.0, top_k=20)
    torch.manual_seed(42)
    b = generate(model, idx, max_new_tokens=10, temperature=1.0, top_k=20, use_cache=False)
    assert torch.equal(a, b)


def test_top_k_and_top_p_only_ever_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    torch.manual_seed(0)
    assert set(next_token(logits, temperature=1.0, top_k=3).flatten().tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(next_token(logits, temperature=1.0, top_p=0.8).flatten().tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"context_length": 18}, "context_length"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"eos_id": 101}, "eos_id must be a token id from 0 to 100"),
        ({"eos_id": -1}, "eos_id must be a token id from 0 to 100"),
    ],
)
def test_bad_arguments_raise_value_errors(model, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, prompt(1, 3), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"temperature": 1.0, "top_k": 0}, "top_k must be an integer >= 1"),
        ({"temperature": 1.0, "top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 1.0, "top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_next_token_validates_like_generate(kwargs, message):
    logits = torch.randn(2, TINY["vocab_size"])
    with pytest.raises(ValueError, match=message):
        next_token(logits, **kwargs)


def test_greedy_output_matches_transformers_generate():
    transformers = pytest.importorskip("transformers")
    from shared.weights import load_hf_gpt2

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=30, n_layer=2, n_head=3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf_gpt2(folder)
    idx = prompt(2, 5)
    expected = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert torch.equal(generate(ours, idx, max_new_tokens=12), expected)


# ---------------------------------------------------------------------------------------
# Sampling settings that must change nothing, and batched filtering
# ---------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy_whatever_top_k_and_top_p(model):
    idx = prompt(2, 4)
    greedy = generate_text_simple(model, idx, max_new_tokens=8, context_length=TINY["context_length"])
    assert torch.equal(generate(model, idx, max_new_tokens=8, temperature=0.0, top_k=5, top_p=0.5), greedy)


def test_top_k_at_least_the_vocabulary_and_top_p_one_change_nothing():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    for kwargs in ({"top_k": 11}, {"top_k": 50}, {"top_p": 1.0}, {"top_k": 11, "top_p": 1.0}):
        torch.manual_seed(5)
        filtered = next_token(logits, temperature=0.7, **kwargs)
        torch.manual_seed(5)
        plain = next_token(logits, temperature=0.7)
        assert torch.equal(filtered, plain), kwargs


def test_top_k_and_top_p_filter_each_row_of_a_batch_on_its_own():
    # Row 0 prefers tokens 0-2, row 1 tokens 3-5: each row must sample only its own best tokens.
    row0 = torch.tensor([5.0, 4.5, 4.0, 0.0, 0.0, 0.0])
    logits = torch.stack([row0, row0.roll(3)]).repeat(300, 1)
    torch.manual_seed(0)
    picked = next_token(logits, temperature=1.0, top_k=3).view(300, 2)
    assert set(picked[:, 0].tolist()) <= {0, 1, 2} and set(picked[:, 1].tolist()) <= {3, 4, 5}
    picked = next_token(logits, temperature=1.0, top_p=0.5).view(300, 2)
    assert set(picked[:, 0].tolist()) <= {0, 1} and set(picked[:, 1].tolist()) <= {3, 4}


# ---------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_width_one_is_greedy(model, use_cache):
    idx = prompt(1, 4)
    greedy = generate(model, idx, max_new_tokens=20)  # 24 tokens: also crosses the context of 17
    assert torch.equal(beam_search(model, idx, max_new_tokens=20, beam_width=1, use_cache=use_cache), greedy)


def test_beam_search_with_cache_equals_without(model):
    idx = prompt(1, 5, seed=2)
    cached = beam_search(model, idx, max_new_tokens=15, beam_width=4)
    assert torch.equal(cached, beam_search(model, idx, max_new_tokens=15, beam_width=4, use_cache=False))
    assert cached.shape == (1, 20) and torch.equal(cached[:, :5], idx)


def test_beam_search_matches_an_exhaustive_search_for_two_tokens(model):
    # With a beam as wide as the vocabulary nothing is pruned in two steps: the result is the
    # best of all vocab**2 continuations.
    idx = prompt(1, 3, seed=4)
    vocab = TINY["vocab_size"]
    with torch.no_grad():
        first = model(idx)[0, -1].log_softmax(-1)  # (vocab,)
        grown = torch.cat((idx.repeat(vocab, 1), torch.arange(vocab).unsqueeze(1)), dim=1)
        second = model(grown)[:, -1].log_softmax(-1)  # (vocab, vocab)
    total = first.unsqueeze(1) + second
    best = int(total.flatten().argmax())
    out = beam_search(model, idx, max_new_tokens=2, beam_width=vocab)
    assert out[0, 3:].tolist() == [best // vocab, best % vocab]


def test_beam_search_usually_beats_greedy_on_log_probability(model):
    wins = 0
    for seed in range(5):
        idx = prompt(1, 4, seed=seed)
        greedy = generate(model, idx, max_new_tokens=10)
        beam = beam_search(model, idx, max_new_tokens=10, beam_width=5)
        greedy_lp, beam_lp = sequence_logprob(model, torch.cat((greedy, beam)), prompt_length=4)
        wins += bool(beam_lp >= greedy_lp - 1e-5)
    assert wins >= 4  # not guaranteed in general, but on these fixed seeds beam search does at least as well


def test_sequence_logprob_sums_the_log_probabilities_of_the_new_tokens(model):
    ids = prompt(1, 8)
    with torch.no_grad():
        expected = sum(float(model(ids[:, :i])[0, -1].log_softmax(-1)[ids[0, i]]) for i in range(3, 8))
    assert float(sequence_logprob(model, ids, prompt_length=3)[0]) == pytest.approx(expected, abs=1e-4)


def test_beam_search_stops_when_every_beam_has_finished(model):
    idx = prompt(1, 4)
    greedy = generate(model, idx, max_new_tokens=8)
    eos = int(greedy[0, 6])
    # Width 1: exactly greedy with eos, ending on the eos token.
    assert torch.equal(
        beam_search(model, idx, 8, beam_width=1, eos_id=eos), generate(model, idx, 8, eos_id=eos)
    )
    out = beam_search(model, idx, 8, beam_width=3, eos_id=eos)
    assert out.shape[1] <= 12
    assert out.shape[1] == 12 or out[0, -1] == eos
    assert eos not in out[0, 4:-1].tolist()  # an eos can only be the last token


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_width": 0}, "beam_width"),
        ({"idx": prompt(2, 3)}, "one prompt"),
        ({"context_length": 18}, "context_length"),
    ],
)
def test_beam_search_bad_arguments_raise_value_errors(model, kwargs, message):
    kwargs = {"idx": prompt(1, 3), "max_new_tokens": 2, "beam_width": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        beam_search(model, **kwargs)


@pytest.mark.parametrize("search", ["generate", "beam_search"])
def test_a_prompt_id_outside_the_vocabulary_is_named_before_decoding(model, search):
    import shared.generate as generation

    bad = torch.tensor([[1, model.cfg["vocab_size"]]])
    with pytest.raises(ValueError, match="prompt token ids contain"):
        if search == "generate":
            generation.generate(model, bad, max_new_tokens=2)
        else:
            generation.beam_search(model, bad, max_new_tokens=2, beam_width=2)
