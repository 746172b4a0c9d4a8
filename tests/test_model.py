"""Whole-model properties: cached decoding equals a full forward; the hybrid's gate limits."""

import math

import pytest
import torch

from r1kit.model import ContiguousKVCache, KVCacheView, R1kitForCausalLM
from r1kit.model.attention import sdpa, window_mask


def pin_gates(model, local: bool) -> list:
    """Pin every hybrid gate to 1 (local only) or 0 (global only) with forward hooks on the gate
    networks (sigmoid(±inf) is exactly 1 or 0); returns the hook handles."""
    value = math.inf if local else -math.inf
    return [layer.self_attn.gate.register_forward_hook(lambda module, args, out: torch.full_like(out, value))
            for layer in model.model.layers if layer.self_attn.kind == "hybrid"]

KINDS = ["global", "local", "hybrid", ["local", "hybrid"], ["global", "local"]]


@pytest.mark.parametrize("attention", KINDS, ids=str)
@pytest.mark.parametrize("ffn", ["dense", "topk"])
@pytest.mark.parametrize("hybrid_global", ["full", "compressed"])
def test_prefill_then_decode_equals_full_forward(tiny_config, attention, ffn, hybrid_global):
    cfg = tiny_config(attention=attention, ffn=ffn, hybrid_global=hybrid_global, hybrid_compress_block=3, qkv_bias=True)
    model = R1kitForCausalLM(cfg).eval()
    tokens = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        full = model(tokens, window=4)
        cache = ContiguousKVCache(cfg, window=4)
        steps = [model(tokens[:, :6], cache=cache)]
        steps.append(model(tokens[:, 6:10], cache=cache))  # a chunk over a cache
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(10, 19)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 19 and isinstance(cache, KVCacheView)
    for i, kind in enumerate(cfg.attention):
        assert cache.stored_positions(i) == (4 if kind == "local" else 19)


@pytest.mark.parametrize("gate", ["token", "head"])
def test_hybrid_gate_limits(tiny_config, gate):
    tokens = torch.randint(0, 61, (1, 23))
    hybrid = R1kitForCausalLM(tiny_config(attention="hybrid", hybrid_gate=gate)).eval()
    state = {k: v for k, v in hybrid.state_dict().items() if ".gate." not in k}
    outputs = {}
    for kind in ("global", "local"):
        plain = R1kitForCausalLM(tiny_config(attention=kind)).eval()
        plain.load_state_dict(state)
        outputs[kind] = plain(tokens)
    with torch.no_grad():
        for local, kind in ((False, "global"), (True, "local")):
            hooks = pin_gates(hybrid, local)
            torch.testing.assert_close(hybrid(tokens), outputs[kind].detach(), atol=1e-5, rtol=1e-5)
            for hook in hooks:
                hook.remove()


def test_hard_gate_skips_global_only_where_gate_is_confident(tiny_config):
    tokens = torch.randint(0, 61, (2, 17))
    soft = R1kitForCausalLM(tiny_config(attention="hybrid")).eval()
    hard = R1kitForCausalLM(tiny_config(attention="hybrid", hybrid_gate_threshold=0.5)).eval()
    hard.load_state_dict(soft.state_dict())
    with torch.no_grad():
        for layer in soft.model.layers:  # bias the gates so some tokens are above 0.5 and some below
            layer.self_attn.gate[2].bias.fill_(0.0)
        hard.load_state_dict(soft.state_dict())
        gates = torch.sigmoid(soft.model.layers[0].self_attn.gate(soft.model.layers[0].input_layernorm(soft.model.embed_tokens(tokens))))
        assert (gates > 0.5).any() and (gates < 0.5).any()
        expected, got = soft(tokens), hard(tokens)
    assert not torch.allclose(got, expected)  # the tokens above the threshold skipped their global branch
    with torch.no_grad():
        for a, b in zip(hard.model.layers, soft.model.layers):
            a.self_attn.gate[2].bias.fill_(-50.0)  # every gate ~0 (< threshold): global everywhere
            b.self_attn.gate[2].bias.fill_(-50.0)
        torch.testing.assert_close(hard(tokens), soft(tokens), atol=1e-5, rtol=1e-5)
        for a in hard.model.layers:
            a.self_attn.gate[2].bias.fill_(50.0)  # every gate ~1: local only
        local_only = hard(tokens)
        pin_gates(soft, local=True)
        torch.testing.assert_close(local_only, soft(tokens), atol=1e-5, rtol=1e-5)


def test_proportional_window_growth(tiny_config):
    cfg = tiny_config(window_growth="proportional", local_window=256, max_local_window=4096)
    assert [cfg.window_for(n) for n in (100, 1024, 4096, 8192, 16384, 65536)] == [256, 256, 1024, 2048, 4096, 4096]
    assert tiny_config(local_window=256, max_local_window=4096).window_for(16384) == 256


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(tiny_config):
    cfg = tiny_config(attention="hybrid", ffn="topk", dropout=0.1)
    base_state = R1kitForCausalLM(cfg).state_dict()
    tokens = torch.randint(0, 61, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = R1kitForCausalLM(cfg).train()
        model.load_state_dict(base_state)
        model.gradient_checkpointing = ckpt
        torch.manual_seed(123)
        model(tokens).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])



class LeftPaddedCache:
    """A reference batched cache: rows are left-padded, so each row's real tokens end together.

    It exercises the model's explicit-mask path the engine uses: masks come from per-row positions.
    """

    def __init__(self, pads, window):
        self.pads, self.window = torch.tensor(pads), window
        self.keys, self.values, self.length = {}, {}, 0

    def next_positions(self, m, device):
        self.m = m
        slots = torch.arange(self.length, self.length + m)
        return (slots[None, :] - self.pads[:, None]).clamp_min(0)

    def update(self, i, k, v):
        if i in self.keys:
            k, v = torch.cat((self.keys[i], k), 2), torch.cat((self.values[i], v), 2)
        self.keys[i], self.values[i] = k, v
        return k, v

    def attend(self, layer_idx, kind, q, k, v):
        return sdpa(q, k, v, mask=self.attention_mask(kind, self.window))

    def rope_store_attend(self, layer_idx, kind, qkv, cos, sin, num_heads):
        return None

    def attend_hybrid(self, layer_idx, branch, q, k, v, g, threshold):
        return None

    def attention_mask(self, kind, window):
        n = self.length + self.m
        q_slot = torch.arange(self.length, n)[None, :, None]
        k_slot = torch.arange(n)[None, None, :]
        real_key = k_slot >= self.pads[:, None, None]
        allowed = real_key & (k_slot <= q_slot)
        if kind == "local":
            allowed &= window_mask(q_slot, k_slot, window)
        allowed |= q_slot == k_slot  # padded query rows see themselves (their output is ignored)
        return allowed[:, None]

    def advance(self, m):
        self.length += m


@pytest.mark.parametrize("attention", ["global", "local", "hybrid", "hybrid-hard-gate"])
@pytest.mark.parametrize("ffn", ["dense", "topk"])
def test_masked_batch_path_equals_single_sequences(tiny_config, attention, ffn):
    if attention == "hybrid-hard-gate":  # a threshold near the gates' values: some tokens skip, some mix
        cfg = tiny_config(attention="hybrid", ffn=ffn, hybrid_gate_threshold=0.5)
    else:
        cfg = tiny_config(attention=attention, ffn=ffn)
    model = R1kitForCausalLM(cfg).eval()
    seqs = [torch.randint(0, 61, (n,)) for n in (9, 5, 7)]
    longest = max(len(s) for s in seqs)
    pads = [longest - len(s) for s in seqs]
    batch = torch.stack([torch.cat((torch.zeros(p, dtype=torch.long), s)) for p, s in zip(pads, seqs)])
    cache = LeftPaddedCache(pads, window=4)
    assert isinstance(cache, KVCacheView)
    with torch.no_grad():
        prefill = model(batch, cache=cache)
        nxt = torch.randint(0, 61, (3, 1))
        step = model(nxt, cache=cache)
        for row, (s, p) in enumerate(zip(seqs, pads)):
            alone = model(torch.cat((s, nxt[row]))[None], window=4)
            torch.testing.assert_close(prefill[row, p:], alone[0, :-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[row, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_a_cast_model_keeps_its_rotary_frequencies_in_float32(tiny_config):
    """`.to(bfloat16)` would round the frequencies (up to 0.4%), and the angles built from them drift
    further at every position; they stay float32, bit for bit, through casts and back."""
    model = R1kitForCausalLM(tiny_config())
    inv_freq = model.rotary.inv_freq.clone()
    positions = torch.tensor([5, 999, 4000])
    cos, _ = model.rotary(positions, torch.float32)
    model.to(torch.bfloat16).half().float().bfloat16()
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, inv_freq)
    assert torch.equal(model.rotary(positions, torch.bfloat16)[0], cos.to(torch.bfloat16))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
