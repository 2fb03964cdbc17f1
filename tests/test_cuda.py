"""On a CUDA GPU (skipped without one): the CUDA kernels, the ring on one GPU, simulated ranks on it, and real
ranks sharing it over gloo, each against float64 attention on the whole sequence; then what users run there,
the training recipe and a transformers model, against the CPU and the model's own attention.

One GPU cannot host an NCCL ring of several ranks (NCCL refuses two ranks on one device), so the multi-rank
test runs gloo ranks whose tensors live on the GPU: everything but the transport is the CUDA path.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ranks import full_inputs, reference, relative_error, run_ranks, sharded_run
from striped_attention import LAYOUTS, kernels, positions, ring_attention
from striped_attention.bench import random_inputs
from striped_attention.layouts import for_documents
from striped_attention.simulate import SimConfig, simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
KERNEL_CASES = [("flash", torch.bfloat16), ("flash", torch.float16), ("cudnn", torch.bfloat16),
                ("cudnn", torch.float16), ("efficient", torch.float32)]


def _block_inputs(dtype, seq):
    """float64 q, k, v, dout (GQA: 4 heads, 2 kv heads, head_dim 64) holding values ``dtype`` represents
    exactly, so the low-precision run and the reference see the same numbers."""
    return tuple(t.to(dtype).double() for t in full_inputs(0, 2, 4, 2, seq, 64))


def test_auto_picks_the_fastest_kernel_that_fits():
    q = torch.zeros(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert kernels._select(q, "auto") is kernels.CUDA_KERNELS["cudnn" if hopper else "flash"]
    assert kernels._select(q.float(), "auto") is kernels.CUDA_KERNELS["efficient"]
    assert kernels._select(q.double(), "auto")[0] is kernels._reference_forward


@pytest.mark.parametrize("name, dtype", KERNEL_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in KERNEL_CASES])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "rows",
    [  # (q rows, k rows) of 300-token tensors: square, striped's shifted block (strided views), non-square
        (slice(0, 300), slice(0, 300)),
        (slice(1, 300), slice(0, 299)),
        (slice(0, 120), slice(0, 300)),
        (slice(0, 300), slice(0, 77)),
    ],
    ids=["square", "shifted", "q<k", "q>k"],
)
def test_cuda_kernels_match_float64(name, dtype, causal, rows):
    """Forward (out, lse) and backward (dq, dk, dv, from the exact out and lse) of one block, GQA."""
    qs, ks = rows
    q, k, v, dout = (t[:, :, s] for t, s in zip(_block_inputs(dtype, 300), (qs, ks, ks, qs)))
    scale = 0.125
    out_w, lse_w = kernels.reference_forward(q, k, v, causal=causal, scale=scale)
    want = kernels.reference_backward(dout, q, k, v, out_w, lse_w, causal=causal, scale=scale)
    dev = [t.to("cuda", dtype) for t in (q, k, v, dout)]
    out, lse = kernels.attention_forward(*dev[:3], causal=causal, scale=scale, backend=name)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    grads = kernels.attention_backward(dev[3], *dev[:3], out_w.to("cuda", dtype), lse_w.float().cuda(),
                                       causal=causal, scale=scale, backend=name)
    assert all(g.dtype == dtype for g in grads)
    errors = {what: relative_error(got.cpu(), exact)
              for what, got, exact in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_w, *want))}
    errors["lse"] = ((lse.cpu().double() - lse_w).abs().max() / lse_w.abs().max()).item()
    assert max(errors.values()) <= TOL[dtype], errors


# (q rows, k rows, causal, window) of 300-token tensors: the bands windowed pieces hold (causal ones square or
# with more queries than keys, up to more than twice as many; dense ones above or below the diagonal, with more
# queries than keys too), every query seeing a key
WINDOW_BANDS = [(slice(0, 300), slice(0, 300), True, 1), (slice(0, 300), slice(0, 300), True, 37),
                (slice(1, 300), slice(0, 299), True, 150), (slice(0, 300), slice(0, 200), True, 150),
                (slice(0, 200), slice(0, 300), False, -60), (slice(0, 300), slice(0, 120), False, 200),
                (slice(0, 300), slice(0, 100), True, 250), (slice(0, 300), slice(0, 50), False, 280)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("band", WINDOW_BANDS, ids=["w1", "w37", "shifted-w150", "q>k-w150", "above", "below", "q>2k", "q>k-dense"])
def test_flash_windows_match_float64(band, dtype):
    """Windowed pieces on FlashAttention-2 (its bottom-right aligned band turned into the pieces' top-left one):
    forward and backward of one block, GQA, against the reference's mask."""
    qs, ks, causal, window = band
    q, k, v, dout = (t[:, :, s] for t, s in zip(_block_inputs(dtype, 300), (qs, ks, ks, qs)))
    out_w, lse_w = kernels.reference_forward(q, k, v, causal=causal, scale=0.125, window=window)
    want = kernels.reference_backward(dout, q, k, v, out_w, lse_w, causal=causal, scale=0.125, window=window)
    dev = [t.to("cuda", dtype) for t in (q, k, v, dout)]
    assert kernels._select(dev[0], "auto", window)[0] is kernels._flash_window_forward
    out, lse = kernels.attention_forward(*dev[:3], causal=causal, scale=0.125, window=window)
    grads = kernels.attention_backward(dev[3], *dev[:3], out_w.to("cuda", dtype), lse_w.float().cuda(),
                                       causal=causal, scale=0.125, window=window)
    errors = {"out": relative_error(out.cpu(), out_w), "lse": (lse.cpu().double() - lse_w).abs().max().item()}
    for what, got, exact in zip(("dq", "dk", "dv"), grads, want):  # dq is 0 under a window of 1
        errors[what] = (relative_error(got.cpu(), exact) if exact.norm() > 1e-6
                        else (got.double().norm() / dout.norm()).item())
    assert max(errors.values()) <= TOL[dtype], errors


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ring_with_a_window_on_one_gpu(layout):
    """The windowed ring on one GPU (bf16, flash) with packed documents, against float64 under the window."""
    from test_windows import windowed_reference

    q, k, v, dout = _block_inputs(torch.bfloat16, 256)
    cu_seqlens = [0, 100, 101, 256]
    want = windowed_reference(q, k, v, dout, 40, cu_seqlens)
    got = sharded_run(layout, torch.bfloat16, q, k, v, dout, device="cuda", window=40, cu_seqlens=cu_seqlens)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) <= TOL[torch.bfloat16], errors


@pytest.mark.parametrize("name, dtype", KERNEL_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in KERNEL_CASES])
def test_one_query_and_one_key(name, dtype):
    """The piece packed documents give where a document has one token on two ranks: cuDNN refuses its backward
    (torch 2.11), which then runs on FlashAttention-2. The query sees one key: out = v, dv = dout, dq = dk = 0."""
    q, k, v, dout = (t[:, :, 5:6].to("cuda", dtype) for t in _block_inputs(dtype, 8))
    out, lse = kernels.attention_forward(q, k, v, causal=True, scale=0.125, backend=name)
    dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, causal=True, scale=0.125, backend=name)
    assert relative_error(out, v.repeat_interleave(2, 1).double()) <= TOL[dtype]
    assert relative_error(dv, dout.double().view(2, 2, 2, 1, 64).sum(2)) <= TOL[dtype]
    assert max(dq.abs().max().item(), dk.abs().max().item()) <= TOL[dtype] * dout.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_blocks_fold_into_row_views(dtype):
    """attention_forward_/attention_backward_ over two key blocks into row views of the sums give the whole."""
    q, k, v, dout = _block_inputs(dtype, 256)
    out_w, lse_w = kernels.reference_forward(q, k, v, causal=False, scale=0.2)
    rows, blocks = slice(64, 256), (slice(128, 256), slice(0, 128))
    want = kernels.reference_backward(dout[:, :, rows], q[:, :, rows], k, v, out_w[:, :, rows], lse_w[:, :, rows],
                                      causal=False, scale=0.2)
    qd, kd, vd, dd = (t.to("cuda", dtype) for t in (q, k, v, dout))
    out, lse = kernels.no_keys_seen(qd)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device="cuda") for t in (qd, kd, vd))
    for part in blocks:
        kernels.attention_forward_(out[:, :, rows], lse[:, :, rows], qd[:, :, rows], kd[:, :, part], vd[:, :, part],
                                   causal=False, scale=0.2)
    for part in blocks:
        kernels.attention_backward_(dq[:, :, rows], dk[:, :, part], dv[:, :, part], dd[:, :, rows], qd[:, :, rows],
                                    kd[:, :, part], vd[:, :, part], out[:, :, rows].to(dtype), lse[:, :, rows],
                                    causal=False, scale=0.2)
    assert torch.equal(out[:, :, :64].cpu(), torch.zeros(out[:, :, :64].shape))  # rows outside the view untouched
    assert relative_error(out[:, :, rows].cpu(), out_w[:, :, rows]) <= TOL[dtype]
    for got, exact in zip((dq[:, :, rows], dk, dv), want):
        assert relative_error(got.cpu(), exact) <= TOL[dtype]


RING_CASES = [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "flash"), (torch.float16, "cudnn")]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype, backend", RING_CASES, ids=[f"{str(d)[6:]}-{b}" for d, b in RING_CASES])
def test_ring_of_one_on_cuda(layout, dtype, backend):
    q, k, v, dout = full_inputs(0, 2, 4, 2, 256, 64)
    want = reference(q, k, v, dout, True, None)
    local = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, layout=layout, backend=backend)
    out.backward(dout.to("cuda", dtype))
    got = (out.detach(), *(t.grad for t in local))
    assert all(g.dtype == dtype and g.is_cuda for g in got)
    errors = [relative_error(g.cpu(), w) for g, w in zip(got, want)]
    assert max(errors) <= TOL[dtype], errors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_simulated_ranks_on_cuda(dtype):
    """4 virtual ranks of every layout on the GPU: each rank's output and dQ are those of the whole sequence."""
    cfg = SimConfig(world_size=4, seq_len=512, batch=1, heads=4, kv_heads=2, head_dim=64, dtype=dtype,
                    passes=("fwd+bwd",), repeats=1, warmup=0, device="cuda")
    _, outputs = simulate(cfg, keep_outputs=True)
    q, k, v, dout = (t.double() for t in random_inputs(cfg, torch.device("cpu")))
    out, dq, _, _ = reference(q, k, v, dout, True, None)
    for name in LAYOUTS:
        outs, dqs = outputs[(name, "fwd+bwd")]
        for rank in range(cfg.world_size):
            index = positions(cfg.seq_len, layout=name, rank=rank, world_size=cfg.world_size)
            assert relative_error(outs[rank].cpu(), out[:, :, index]) <= TOL[getattr(torch, dtype)]
            assert relative_error(dqs[rank].cpu(), dq[:, :, index]) <= TOL[getattr(torch, dtype)]


DOCUMENTS = (0, 7, 100, 101, 250, 384)  # packed documents: causal pieces of unequal sides on the GPU kernels
PER_ROW = (DOCUMENTS, (0, 200, 384))  # each of the 2 rows its own documents
SHARED_GPU_CASES = [(name, causal, dtype, docs) for name in sorted(LAYOUTS) for causal in (True, False)
                    for dtype in ("float32", "bfloat16") for docs in (None, DOCUMENTS, PER_ROW)]
SHARED_GPU_CASES += [("balanced", causal, dtype, DOCUMENTS) for causal in (True, False)
                     for dtype in ("float32", "bfloat16")]  # balance_documents' layout


def run_on_shared_gpu():
    """On each gloo rank, tensors on cuda:0: relative errors (out, dq, dk, dv) of every case."""
    errors = {}
    for name, causal, dtype, docs in SHARED_GPU_CASES:
        q, k, v, dout = full_inputs(0, 2, 4, 2, 384, 64)
        want = reference(q, k, v, dout, causal, None, docs)
        layout = for_documents(name, docs, dist.get_world_size())
        got = sharded_run(layout, getattr(torch, dtype), q, k, v, dout, device="cuda", causal=causal, cu_seqlens=docs)
        errors[(name, causal, dtype, docs)] = [relative_error(g, w) for g, w in zip(got, want)]
    return errors


@pytest.mark.parametrize("docs", [DOCUMENTS, PER_ROW], ids=["documents", "per-row"])
def test_packed_documents_take_one_varlen_call_per_step(monkeypatch, docs):
    """A world of one on the GPU: the documents' pieces go through FlashAttention-2's varlen kernel, exactly."""
    from striped_attention import varlen

    calls = []
    for name in ("_kernel_forward", "_kernel_backward"):
        kernel = getattr(varlen, name)
        monkeypatch.setattr(varlen, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    q, k, v, dout = full_inputs(0, 2, 4, 2, 384, 64)
    want = reference(q, k, v, dout, True, None, docs)
    got = sharded_run("striped", torch.bfloat16, q, k, v, dout, device="cuda", cu_seqlens=docs)
    assert sorted(set(calls)) == ["_kernel_backward", "_kernel_forward"]
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) <= TOL[torch.bfloat16], errors


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sharing_the_gpu(world):
    """The whole engine on the GPU, K/V and dK/dV travelling the ring (through the host: gloo)."""
    for rank_errors in run_ranks(run_on_shared_gpu, world):
        for (name, causal, dtype, docs), errors in rank_errors.items():
            assert max(errors) <= TOL[getattr(torch, dtype)], (name, causal, dtype, docs, errors)


def compiled_ring_errors(device: str, documents) -> tuple[list[float], int]:
    """A world of one under torch.compile (inductor, fullgraph) on ``device``, bf16, striped: the worst relative
    errors (out, dq, dk, dv) against float64 attention over each set of ``documents`` given as a tensor (or one
    run without), and the frames compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    attention = torch.compile(lambda q, k, v, cu: ring_attention(q * 0.5, k, v, cu_seqlens=cu), fullgraph=True,
                              backend=counter)
    worst = [0.0] * 4
    for docs in documents or [None]:
        q, k, v, dout = full_inputs(0, 2, 4, 2, 384, 64)
        out_w, dq_w, dk_w, dv_w = reference(q * 0.5, k, v, dout, True, None, docs)
        want = (out_w, dq_w * 0.5, dk_w, dv_w)
        local = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = attention(*local, None if docs is None else torch.tensor(docs, device=device))
        out.backward(dout.to(device, torch.bfloat16))
        got = (out.detach(), *(t.grad for t in local))
        worst = [max(w, relative_error(g.cpu(), e)) for w, g, e in zip(worst, got, want)]
    return worst, counter.frame_count


@pytest.mark.parametrize("documents", [None, [DOCUMENTS, (0, 50, 51, 200, 300, 384)]], ids=["whole", "documents"])
def test_compiled_ring_on_cuda(documents):
    """The ring's custom ops under inductor on the GPU (the varlen call for documents): exact, and a second set
    of as many documents does not recompile."""
    errors, frames = compiled_ring_errors("cuda", documents)
    assert max(errors) <= TOL[torch.bfloat16] and frames == 1, (errors, frames)


# ----------------------------------------------------------------------------------------------------------
# What users run on the GPU: the training recipe and a transformers model
# ----------------------------------------------------------------------------------------------------------


def test_training_on_cuda():
    """The recipe's model on one GPU: float32 step-1 gradients equal the CPU's (other kernels and summation
    orders, hence 1e-4 where CPU-vs-CPU tests ask 1e-5); under bfloat16 autocast it learns like on the CPU."""
    from dataclasses import replace

    from striped_attention import train as T
    from test_train import BASE, first_step_gradients, reference, relative

    gpu = first_step_gradients(replace(BASE, device="cuda"), T.Parallel())
    assert gpu.is_cuda and relative(gpu.cpu(), first_step_gradients(BASE, T.Parallel())) < 1e-4

    losses = [r["loss"] for r in T.train_on_rank(replace(BASE, device="cuda", dtype="bfloat16"))]
    want = [r["loss"] for r in reference()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3
    assert abs(losses[0] / want[0] - 1) < 1e-2, (losses[0], want[0])  # step 1: before any update


def test_a_padded_batch_of_a_transformers_model_on_cuda():
    """The padding mask, on the GPU, given to shard_inputs: the tokens' logits, loss and gradients of the model
    given the mask (a world of one)."""
    pytest.importorskip("transformers")
    from test_transformers import TOL as HF_TOL
    from test_transformers import compare_padded

    errors = compare_padded("llama", "striped", device="cuda")
    assert max(errors.values()) <= HF_TOL, errors


@pytest.mark.parametrize("packing", [None, "documents-per-row"])
def test_a_transformers_model_on_cuda(packing):
    """A world of one serving a transformers model on the GPU, its batch moved there as a user would: logits,
    loss and gradients equal its own sdpa's (with packed documents: each document run on its own)."""
    pytest.importorskip("transformers")
    import copy

    from striped_attention.integrations.transformers import prepare, shard_inputs
    from test_transformers import PACKINGS, inputs, one_process, tiny_model
    from test_transformers import TOL as HF_TOL

    ids, labels = inputs()
    rows, how = PACKINGS[packing] if packing else (None, {})
    ref = tiny_model("llama").cuda()
    want_logits, want_loss = one_process(ref, ids.cuda(), labels.cuda(), rows)
    want_loss.backward()
    model = prepare(copy.deepcopy(ref))
    model.zero_grad()
    batch = {name: t.cuda() for name, t in shard_inputs(input_ids=ids, labels=labels, **how).items()}
    got = model(**batch)
    got.loss.backward()
    assert got.logits.is_cuda and model.config._attn_implementation.startswith("striped_attention")
    assert relative_error(got.logits.detach(), want_logits.double()) <= HF_TOL
    assert abs(got.loss.item() / want_loss.item() - 1) <= HF_TOL
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert relative_error(p.grad, q.grad.double()) <= HF_TOL
