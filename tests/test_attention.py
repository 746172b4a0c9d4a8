"""Attention kernels against a naive masked softmax attention written from the definition."""

import math

import pytest
import torch
from devices import DEVICES

from r1kit.model import attention
from r1kit.model.attention import compressed_global_attention, fused_gqa_unsupported, global_attention, local_attention, sdpa


def naive(q, k, v, allowed):
    """softmax(q·kᵀ/√d + mask)·v with KV heads repeated for GQA; rows with nothing allowed give 0."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def positions(m, n):
    q = torch.arange(m)[:, None] + (n - m)
    return q, torch.arange(n)[None, :]


def rand_qkv(batch, heads, kv_heads, m, n, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, m, dim, generator=g),
        torch.randn(batch, kv_heads, n, dim, generator=g),
        torch.randn(batch, kv_heads, n, dim, generator=g),
    )


@pytest.mark.parametrize("m,n", [(1, 1), (7, 7), (1, 9), (5, 12), (64, 64)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_global_matches_naive(m, n, heads, kv_heads):
    q, k, v = rand_qkv(2, heads, kv_heads, m, n)
    qp, kp = positions(m, n)
    torch.testing.assert_close(global_attention(q, k, v), naive(q, k, v, kp <= qp), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expand", [False, True], ids=["enable_gqa", "repeated-kv"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (8, 8)])
def test_sdpa_gqa_both_ways(heads, kv_heads, masked, device, expand, monkeypatch):
    """``sdpa`` reads K/V head h // groups whether SDPA broadcasts the heads itself or they are
    repeated first (what CUDA gets where its fused kernels lack GQA); forced here on every device."""
    monkeypatch.setattr(attention, "fused_gqa_unsupported", lambda *_: expand)
    q, k, v = (t.to(device) for t in rand_qkv(2, heads, kv_heads, 5, 12))
    qp, kp = positions(5, 12)
    allowed = ((kp <= qp) & (qp - kp < 4)).to(device)  # a causal window: the mask matters
    out = sdpa(q, k, v, mask=allowed if masked else None)
    torch.testing.assert_close(out, naive(q, k, v, allowed if masked else torch.ones_like(allowed)), atol=1e-5, rtol=1e-5)


def test_which_inputs_get_repeated_kv():
    assert fused_gqa_unsupported("cuda", torch.float32, masked=False)  # flash takes no float32
    assert fused_gqa_unsupported("cuda", torch.bfloat16, masked=True)  # nor a mask
    assert not fused_gqa_unsupported("cuda", torch.bfloat16, masked=False)  # flash broadcasts the heads
    assert not fused_gqa_unsupported("cpu", torch.float32, masked=True)  # the CPU kernel takes both


@pytest.mark.parametrize("n", [1, 5, 16, 17, 63, 100, 333])
@pytest.mark.parametrize("window", [1, 3, 8, 16, 100, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (2, 1)])
def test_local_matches_naive_full_sequence(n, window, heads, kv_heads):
    q, k, v = rand_qkv(2, heads, kv_heads, n, n, seed=n * 31 + window)
    qp, kp = positions(n, n)
    allowed = (kp <= qp) & (qp - kp < window)
    torch.testing.assert_close(local_attention(q, k, v, window), naive(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,n,window", [(1, 40, 8), (3, 40, 8), (20, 40, 8), (33, 50, 4), (10, 10, 3), (250, 400, 100)])
def test_local_with_cached_prefix_matches_naive(m, n, window):
    """Queries for the last m positions over n keys (decode steps and chunked prefill over a cache)."""
    q, k, v = rand_qkv(1, 4, 2, m, n, seed=m + n)
    qp, kp = positions(m, n)
    allowed = (kp <= qp) & (qp - kp < window)
    torch.testing.assert_close(local_attention(q, k, v, window), naive(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_local_work_is_linear_in_length():
    """The blocked path never builds an (n, n) score matrix: the masks it passes are (w, 2w)."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], k.shape[-2]))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    q, k, v = rand_qkv(1, 2, 2, 512, 512)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        local_attention(q, k, v, 32)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    # the first window is one causal call; every other call scores fewer than 2w keys per query
    assert seen[0] == (32, 32) and all(kv < 2 * 32 for _, kv in seen[1:]) and len(seen) == 2


@pytest.mark.parametrize("m,n,block", [(40, 40, 8), (1, 41, 8), (9, 30, 4), (5, 5, 8)])
def test_compressed_global_matches_naive_over_pooled_blocks(m, n, block):
    q, k, v = rand_qkv(2, 4, 2, m, n, seed=block)
    blocks = n // block
    pk = k[:, :, : blocks * block].unflatten(2, (blocks, block)).mean(3)
    pv = v[:, :, : blocks * block].unflatten(2, (blocks, block)).mean(3)
    qp = torch.arange(m)[:, None] + (n - m)
    allowed = (torch.arange(1, blocks + 1)[None, :] * block - 1) <= qp
    expected = naive(q, pk, pv, allowed) if blocks else torch.zeros_like(q)
    torch.testing.assert_close(compressed_global_attention(q, k, v, block), expected, atol=1e-5, rtol=1e-5)
