"""Tests for shared.attention: causal multi-head self-attention and its key/value cache.

Oracles: a softmax(QK^T / sqrt(d_head) + mask) V written out by hand below,
torch.nn.MultiheadAttention, and (when installed) Hugging Face's GPT2Attention.
"""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from shared.attention import KVCache, MultiHeadAttention

REPO_ROOT = Path(__file__).resolve().parent.parent
TOL = {"atol": 1e-5, "rtol": 1e-5}

# (d_in, d_out, num_heads): square and non-square projections, one to many heads.
SHAPES = [(12, 12, 1), (12, 12, 3), (12, 12, 4), (8, 12, 2), (7, 12, 6), (16, 12, 12)]


def make_attention(d_in=12, d_out=12, num_heads=3, context_length=8, dropout=0.0, qkv_bias=True, seed=0):
    torch.manual_seed(seed)
    return MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=qkv_bias)


def set_mode(module: nn.Module, mode: str) -> nn.Module:
    return module.train(mode == "train")


def reference_attention(
    mha: MultiHeadAttention, x: torch.Tensor, causal: bool = True, real_keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention spelled out step by step with mha's weights (causal unless told not;
    ``real_keys`` (batch, tokens) hides the padded keys)."""
    batch, tokens, _ = x.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    w_q, w_k, w_v = mha.qkv.weight.chunk(3, dim=0)
    b_q, b_k, b_v = mha.qkv.bias.chunk(3) if mha.qkv.bias is not None else (0.0, 0.0, 0.0)

    def split_heads(t):  # (batch, tokens, d_out) -> (batch, heads, tokens, head_dim)
        return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)

    q = split_heads(x @ w_q.T + b_q)
    k = split_heads(x @ w_k.T + b_k)
    v = split_heads(x @ w_v.T + b_v)
    hidden = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), diagonal=1) & causal
    if real_keys is not None:
        hidden = hidden | ~real_keys[:, None, None, :]
    mask = torch.zeros(hidden.shape).masked_fill(hidden, float("-inf"))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim) + mask, dim=-1)
    context = (weights @ v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return context @ mha.out_proj.weight.T + mha.out_proj.bias


def torch_peer(mha: MultiHeadAttention) -> tuple[nn.MultiheadAttention, bool]:
    """nn.MultiheadAttention holding mha's weights; returns it and whether to pre-project queries.

    nn.MultiheadAttention needs its query input to have embed_dim (= d_out) features; only keys
    and values may have another width (kdim, vdim). So when d_in == d_out the fused qkv weight is
    its in_proj_weight as is. When d_in != d_out, the query projection is applied before the call
    and the peer's own query projection is the identity; keys, values, head split, scaling,
    masking, softmax and output projection all remain nn.MultiheadAttention's.
    """
    d_out, d_in = mha.d_out, mha.qkv.in_features
    same_width = d_in == d_out
    peer = nn.MultiheadAttention(
        d_out, mha.num_heads, dropout=0.0, bias=True, batch_first=True,
        kdim=None if same_width else d_in, vdim=None if same_width else d_in,
    )  # fmt: skip
    w_q, w_k, w_v = mha.qkv.weight.chunk(3, dim=0)
    qkv_bias = mha.qkv.bias if mha.qkv.bias is not None else torch.zeros(3 * d_out)
    with torch.no_grad():
        if same_width:
            peer.in_proj_weight.copy_(mha.qkv.weight)
            peer.in_proj_bias.copy_(qkv_bias)
        else:
            peer.q_proj_weight.copy_(torch.eye(d_out))
            peer.k_proj_weight.copy_(w_k)
            peer.v_proj_weight.copy_(w_v)
            peer.in_proj_bias.copy_(torch.cat([torch.zeros(d_out), qkv_bias[d_out:]]))
        peer.out_proj.weight.copy_(mha.out_proj.weight)
        peer.out_proj.bias.copy_(mha.out_proj.bias)
    return peer, not same_width


def run_torch_peer(mha: MultiHeadAttention, x: torch.Tensor, mode: str) -> torch.Tensor:
    peer, preproject_query = torch_peer(mha)
    set_mode(peer, mode)
    query = x
    if preproject_query:
        w_q = mha.qkv.weight[: mha.d_out]
        b_q = mha.qkv.bias[: mha.d_out] if mha.qkv.bias is not None else 0.0
        query = x @ w_q.T + b_q
    tokens = x.shape[1]
    future = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), diagonal=1)  # True = hidden
    out, _ = peer(query, x, x, attn_mask=future, need_weights=False)
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize(("d_in", "d_out", "num_heads"), SHAPES)
def test_matches_hand_written_softmax_reference(d_in, d_out, num_heads, qkv_bias, mode):
    mha = set_mode(make_attention(d_in, d_out, num_heads, qkv_bias=qkv_bias), mode)
    x = torch.randn(3, 6, d_in)  # batch of 3, 6 tokens in a context of 8
    torch.testing.assert_close(mha(x), reference_attention(mha, x), **TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize(("d_in", "d_out", "num_heads"), SHAPES)
def test_matches_torch_multihead_attention_with_copied_weights(d_in, d_out, num_heads, qkv_bias, mode):
    mha = set_mode(make_attention(d_in, d_out, num_heads, qkv_bias=qkv_bias), mode)
    x = torch.randn(3, 6, d_in)
    torch.testing.assert_close(mha(x), run_torch_peer(mha, x, mode), **TOL)
    if mode == "eval":  # without autograd, nn.MultiheadAttention may take its inference fast path
        with torch.no_grad():
            torch.testing.assert_close(mha(x), run_torch_peer(mha, x, mode), **TOL)


def test_matches_hand_written_reference_for_random_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True, database=None)
    @hypothesis.given(
        batch=st.integers(1, 3),
        tokens=st.integers(1, 9),
        extra_context=st.integers(0, 3),
        d_in=st.integers(1, 10),
        num_heads=st.integers(1, 4),
        head_dim=st.integers(1, 5),
        qkv_bias=st.booleans(),
    )
    def check(batch, tokens, extra_context, d_in, num_heads, head_dim, qkv_bias):
        mha = make_attention(
            d_in, num_heads * head_dim, num_heads, context_length=tokens + extra_context, qkv_bias=qkv_bias
        ).eval()
        x = torch.randn(batch, tokens, d_in)
        torch.testing.assert_close(mha(x), reference_attention(mha, x), **TOL)

    check()


def test_matches_hugging_face_gpt2_attention_with_its_weights_mapped_by_name():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=12, n_head=3, n_positions=8, attn_pdrop=0.0, resid_pdrop=0.0)
    gpt2 = GPT2Attention(config, layer_idx=0).eval()
    mha = make_attention(12, 12, 3, context_length=8).eval()
    # GPT-2 stores its Conv1D weights as (in, out): the transpose is the only change needed.
    with torch.no_grad():
        mha.qkv.weight.copy_(gpt2.c_attn.weight.T)
        mha.qkv.bias.copy_(gpt2.c_attn.bias)
        mha.out_proj.weight.copy_(gpt2.c_proj.weight.T)
        mha.out_proj.bias.copy_(gpt2.c_proj.bias)
    x = torch.randn(2, 5, 12)
    causal = torch.full((5, 5), float("-inf")).triu(1)[None, None]  # explicit, not left to the library
    torch.testing.assert_close(mha(x), gpt2(x, attention_mask=causal)[0], **TOL)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_without_the_causal_mask_every_token_attends_to_every_real_token(mode):
    mha = set_mode(make_attention(), mode)  # dropout 0: train mode must give the same numbers
    x = torch.randn(3, 6, 12)
    torch.testing.assert_close(mha(x, causal=False), reference_attention(mha, x, causal=False), **TOL)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = reference_attention(mha, x, causal=False, real_keys=real)
    torch.testing.assert_close(mha(x, key_padding_mask=real, causal=False), expected, **TOL)


def test_without_the_causal_mask_a_row_of_padding_only_stays_finite():
    mha = make_attention().eval()
    out = mha(torch.randn(2, 4, 12), key_padding_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), causal=False)
    assert torch.isfinite(out).all()


def test_without_the_causal_mask_a_cache_is_refused():
    mha = make_attention()
    with pytest.raises(ValueError, match="causal=False .* no cache"):
        mha(torch.randn(1, 3, 12), cache=KVCache(), causal=False)


def test_full_context_and_single_token_inputs_work():
    mha = make_attention(context_length=8).eval()
    for tokens in (1, 8):
        x = torch.randn(2, tokens, 12)
        out = mha(x)
        assert out.shape == (2, tokens, 12)
        torch.testing.assert_close(out, reference_attention(mha, x), **TOL)


def test_each_sequence_in_a_batch_is_attended_independently():
    mha = make_attention().eval()
    x = torch.randn(4, 6, 12)
    one_by_one = torch.cat([mha(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(mha(x), one_by_one, **TOL)


@pytest.mark.parametrize("changed", [0, 2, 5])
def test_changing_a_future_token_leaves_earlier_outputs_unchanged(changed):
    mha = make_attention().eval()
    x = torch.randn(2, 6, 12)
    x_changed = x.clone()
    x_changed[:, changed] += 10.0 * torch.randn(2, 12)
    before, after = mha(x), mha(x_changed)
    torch.testing.assert_close(after[:, :changed], before[:, :changed], atol=1e-6, rtol=0)
    # ...while the changed position itself and every later one do see the change.
    assert (after[:, changed:] - before[:, changed:]).abs().amax(dim=-1).gt(1e-3).all()


def test_no_output_depends_on_a_later_input():
    mha = make_attention()
    x = torch.randn(1, 6, 12)
    # d out[i] / d x[j] for all i, j: zero exactly when j > i.
    jacobian = torch.autograd.functional.jacobian(lambda inp: mha(inp), x)[0, :, :, 0]
    depends = jacobian.abs().sum(dim=(1, 3)) > 0  # (output position, input position)
    assert torch.equal(depends, torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_gradients_reach_every_parameter(qkv_bias):
    mha = make_attention(d_in=8, d_out=12, num_heads=3, dropout=0.1, qkv_bias=qkv_bias).train()
    mha(torch.randn(2, 6, 8)).square().sum().backward()
    names = {name for name, _ in mha.named_parameters()}
    assert names == {"qkv.weight", "out_proj.weight", "out_proj.bias"} | ({"qkv.bias"} if qkv_bias else set())
    for name, param in mha.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


def test_dropout_acts_in_training_only():
    mha = make_attention(dropout=0.5)
    x = torch.randn(2, 6, 12)
    mha.eval()
    torch.testing.assert_close(mha(x), reference_attention(mha, x), **TOL)
    mha.train()
    torch.manual_seed(1)
    first = mha(x)
    torch.manual_seed(2)
    second = mha(x)
    assert not torch.allclose(first, second)


def test_gpt2_small_sized_layer_has_the_expected_parameter_count():
    mha = MultiHeadAttention(768, 768, context_length=1024, dropout=0.0, num_heads=12, qkv_bias=False)
    assert sum(p.numel() for p in mha.parameters()) == 2_360_064  # 3*768*768 + 768*768 + 768
    assert mha.qkv.weight.shape == (3 * 768, 768)


def test_indivisible_head_count_error_names_both_numbers():
    with pytest.raises(ValueError, match=r"d_out \(10\).*num_heads \(4\)"):
        MultiHeadAttention(8, 10, context_length=8, dropout=0.0, num_heads=4)


def test_too_long_input_error_names_the_context_length():
    mha = make_attention(context_length=8)
    with pytest.raises(ValueError, match=r"9 tokens exceed the context length of 8"):
        mha(torch.randn(1, 9, 12))


@pytest.mark.parametrize("shape", [(6, 12), (1, 6, 7), (2, 1, 6, 12)])
def test_input_of_the_wrong_shape_gets_a_clear_error(shape):
    mha = make_attention(context_length=8)  # d_in 12
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, tokens, 12\), got"):
        mha(torch.randn(*shape))


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 2, 2], [1, 4, 1, 1], [7]])
@pytest.mark.parametrize("num_heads", [1, 3])
def test_cached_chunked_forward_equals_one_full_forward(chunks, num_heads):
    mha = make_attention(d_in=8, d_out=12, num_heads=num_heads).eval()
    x = torch.randn(2, sum(chunks), 8)
    cache = KVCache()
    outputs, start = [], 0
    for size in chunks:
        outputs.append(mha(x[:, start : start + size], cache=cache))
        start += size
        assert len(cache) == start
    torch.testing.assert_close(torch.cat(outputs, dim=1), mha(x), **TOL)
    assert cache.keys.shape == cache.values.shape == (2, num_heads, 7, 12 // num_heads)


@pytest.mark.parametrize("max_tokens", [None, 9])
@pytest.mark.parametrize("chunks", [[1] * 9, [3, 1, 1, 4], [2, 5, 1, 1], [9]])
def test_cache_written_in_place_equals_concatenation_across_its_growth(chunks, max_tokens):
    cache = KVCache(max_tokens=max_tokens)
    keys = torch.randn(2, 3, sum(chunks), 4)
    values = torch.randn(2, 3, sum(chunks), 4)
    concatenated_keys = concatenated_values = None  # the cache as ch04 first writes it, with torch.cat
    start = 0
    for size in chunks:  # a first chunk of 1 leaves room for 2 tokens: the buffers grow several times
        new_keys, new_values = keys[:, :, start : start + size], values[:, :, start : start + size]
        got_keys, got_values = cache.append(new_keys, new_values)
        if concatenated_keys is None:
            concatenated_keys, concatenated_values = new_keys, new_values
        else:
            concatenated_keys = torch.cat((concatenated_keys, new_keys), dim=2)
            concatenated_values = torch.cat((concatenated_values, new_values), dim=2)
        start += size
        assert len(cache) == start
        assert torch.equal(got_keys, concatenated_keys) and torch.equal(got_values, concatenated_values)
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)


@pytest.mark.parametrize("replaced_tokens", [1, 3, 6])  # fewer, as many and more than the cache held
def test_cache_appends_after_its_tensors_were_replaced(replaced_tokens):
    # beam search reorders the cached rows, the server merges batches and cuts padding columns
    cache = KVCache()
    cache.append(torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4))  # leaves room for 6 tokens
    keys, values = torch.randn(2, 3, replaced_tokens + 2, 4), torch.randn(2, 3, replaced_tokens + 2, 4)
    cache.replace(keys[:, :, :replaced_tokens].flip(0), values[:, :, :replaced_tokens].flip(0))
    assert len(cache) == replaced_tokens
    cache.append(keys[:, :, replaced_tokens:], values[:, :, replaced_tokens:])
    assert len(cache) == replaced_tokens + 2
    flipped_first = torch.cat((keys[:, :, :replaced_tokens].flip(0), keys[:, :, replaced_tokens:]), dim=2)
    assert torch.equal(cache.keys, flipped_first)
    flipped_first = torch.cat((values[:, :, :replaced_tokens].flip(0), values[:, :, replaced_tokens:]), dim=2)
    assert torch.equal(cache.values, flipped_first)


def test_cache_refuses_more_tokens_than_its_max_tokens():
    cache = KVCache(max_tokens=6)
    cache.append(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match=r"at most 6 tokens .* 7 would not fit"):
        cache.append(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    assert len(cache) == 5


def test_cache_refuses_to_grow_past_the_context_length():
    mha = make_attention(context_length=8).eval()
    cache = KVCache()
    mha(torch.randn(1, 6, 12), cache=cache)
    with pytest.raises(ValueError, match=r"9 tokens exceed the context length of 8"):
        mha(torch.randn(1, 3, 12), cache=cache)
