"""The Llama-style decoder on one process: shapes, presets, RoPE, RMSNorm, attention wiring, causality."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from striped_attention.models import PRESETS, Llama, LlamaConfig, get_config
from striped_attention.models.llama import RMSNorm, apply_rope, rope_angles

SMALL = LlamaConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)


def model(seed=0, cfg=SMALL):
    torch.manual_seed(seed)
    return Llama(cfg)


def test_logits_shape_and_dtype():
    tokens = torch.randint(0, 256, (2, 24))
    logits = model()(tokens, torch.arange(24))
    assert logits.shape == (2, 24, 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name, billions", [("1b", 1.24), ("3b", 3.43), ("7b", 6.74)])
def test_paper_shapes_on_the_meta_device(name, billions):
    cfg = get_config(name)
    with torch.device("meta"):
        m = Llama(cfg)
    count = sum(p.numel() for p in m.parameters())
    assert count == cfg.num_params()
    assert abs(count / 1e9 - billions) < 0.01
    assert m.layers[0].mlp.w1.weight.shape == (cfg.d_ff, cfg.d_model)
    assert len(m.layers) == cfg.n_layers


def test_every_preset_is_consistent():
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in Llama(cfg).parameters()) == cfg.num_params(), name


def test_bench_preset_is_attention_dominated_like_the_paper():
    def share(cfg, seq):
        f = cfg.training_flops_per_token(seq)
        return f["attention"] / (f["attention"] + f["dense"])

    assert share(PRESETS["bench"], 16384) == pytest.approx(share(PRESETS["7b"], 262144), abs=0.01)
    assert share(PRESETS["bench"], 16384) > 0.8


def test_gqa_projections():
    m = model()
    attn = m.layers[0].attention
    assert attn.wq.weight.shape == (32, 32) and attn.wk.weight.shape == (16, 32) and attn.wv.weight.shape == (16, 32)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = model(0).state_dict(), model(0).state_dict(), model(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])


def test_causal_future_tokens_do_not_change_earlier_logits():
    m = model()
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 7) % 256
    a, b = m(tokens, torch.arange(32)), m(changed, torch.arange(32))
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_attention_matches_sdpa_with_rope():
    """The Attention module equals SDPA (GQA, causal) on RoPE-rotated projections with the same weights."""
    m = model()
    attn = m.layers[0].attention
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16) + 100
    cos, sin = rope_angles(pos, SMALL.head_dim)
    got = attn(x, cos, sin, "striped", None)

    def heads(w, n):
        return w(x).view(2, 16, n, SMALL.head_dim).transpose(1, 2)

    q, k, v = heads(attn.wq, 4), heads(attn.wk, 2), heads(attn.wv, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = attn.wo(y.transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_sliding_windows_make_local_layers_and_every_kth_global():
    """window_of: the windowed layers and the global ones; a local layer's attention equals SDPA under the
    window's mask, and the model's logits change with the window."""
    gemma = LlamaConfig(d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=48, sliding_window=5, global_every=3)
    assert [gemma.window_of(i) for i in range(6)] == [5, 5, None, 5, 5, None]
    assert [replace(gemma, global_every=0).window_of(i) for i in range(6)] == [5] * 6
    assert [SMALL.window_of(i) for i in range(2)] == [None, None]
    local = model(cfg=replace(SMALL, sliding_window=5))
    attn = local.layers[0].attention
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_angles(torch.arange(16), SMALL.head_dim)

    def heads(w, n):
        return w(x).view(2, 16, n, SMALL.head_dim).transpose(1, 2)

    q, k = apply_rope(heads(attn.wq, 4), cos, sin), apply_rope(heads(attn.wk, 2), cos, sin)
    distance = torch.arange(16)[:, None] - torch.arange(16)[None, :]
    y = F.scaled_dot_product_attention(q, k, heads(attn.wv, 2), attn_mask=(distance >= 0) & (distance < 5),
                                       enable_gqa=True)
    want = attn.wo(y.transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(attn(x, cos, sin, "striped", None), want, atol=1e-6, rtol=1e-5)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(local(tokens, torch.arange(16)), model()(tokens, torch.arange(16)))


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(pq, pk):
        cq, sq = rope_angles(torch.tensor([pq]), 16)
        ck, sk = rope_angles(torch.tensor([pk]), 16)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(200_005, 200_002), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_rope_is_a_rotation_and_identity_at_zero():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rope_angles(torch.arange(5) * 1000, 16)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    c0, s0 = rope_angles(torch.zeros(5, dtype=torch.long), 16)
    assert torch.equal(apply_rope(x, c0, s0), x)


def test_per_sequence_positions_match_shared_positions():
    m = model()
    tokens = torch.randint(0, 256, (2, 12))
    shared = m(tokens, torch.arange(12))
    per_row = m(tokens, torch.arange(12).expand(2, 12))
    assert torch.allclose(shared, per_row)


def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_gradients(monkeypatch):
    """Each layer runs twice (forward, then again in the backward) and saves only its input for the backward;
    the gradients are those of the plain model, bit for bit; without grad nothing is recomputed."""
    from striped_attention.models import llama

    calls = []
    layer_forward = llama.Block.forward
    monkeypatch.setattr(llama.Block, "forward", lambda self, *a: calls.append(1) or layer_forward(self, *a))
    tokens, positions = torch.randint(0, 256, (2, 24)), torch.arange(24)
    results = []
    for checkpointed in (False, True):
        m = model()
        m.activation_checkpointing = checkpointed
        calls.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = m(tokens, positions).square().mean()
        loss.backward()
        results.append((len(calls), len(saved), [p.grad for p in m.parameters()]))
        with torch.no_grad():
            m(tokens, positions)
        assert len(calls) == results[-1][0] + len(m.layers)
    (plain_calls, plain_saved, plain_grads), (calls_made, saved_count, grads) = results
    assert plain_calls == 2 and calls_made == 4 and saved_count < plain_saved / 2, (plain_saved, saved_count)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(8.0))
    x = torch.randn(3, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(8.0)
    assert torch.allclose(norm(x), want, atol=1e-6)


def test_bfloat16_autocast_forward_and_backward():
    m = model()
    tokens = torch.randint(0, 256, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(tokens, torch.arange(16))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert m.layers[0].attention.wq.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), "multiple of n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(d_model=12, n_heads=4, n_kv_heads=4), "must be even for RoPE"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(sliding_window=0), "sliding_window must be a positive integer"),
        (dict(sliding_window=4, global_every=-1), "global_every must be an integer >= 0"),
        (dict(global_every=2), "it needs a sliding_window"),
    ],
)
def test_bad_config(kwargs, message):
    base = dict(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48)
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**base, **kwargs})


def test_bad_inputs():
    m = model()
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match=r"tokens must be \(batch, local_seq\)"):
        m(torch.zeros(8, dtype=torch.long), torch.arange(8))
    with pytest.raises(ValueError, match="positions must have shape"):
        m(torch.zeros(1, 8, dtype=torch.long), torch.arange(9))
