import os
import subprocess
import sys

import pytest
import torch

from striped_attention import kernels
from striped_attention.launch import torch_threads


def _inputs(dtype, heads=4, kv_heads=2, q_len=37, k_len=37, d=24, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, d, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, d, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, d, generator=g).to(dtype)
    return q, k, v


def _assert_matches_reference(q, k, v, causal, scale, tol, backend):
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale, backend=backend)
    out_r, lse_r = kernels.reference_forward(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out.double() - out_r.double()).norm() / out_r.double().norm() < tol
    assert (lse.double() - lse_r.double()).abs().max() < tol * 10
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    fused = kernels.attention_backward(dout, q, k, v, out_r, lse_r, causal=causal, scale=scale, backend=backend)
    ref = kernels.reference_backward(dout, q, k, v, out_r, lse_r, causal=causal, scale=scale)
    for a, b in zip(fused, ref):
        assert a.shape == b.shape
        assert (a.double() - b.double()).norm() / b.double().norm() < tol


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(4, 2, 37, 37), (4, 1, 20, 33), (2, 2, 300, 300)])
def test_fused_cpu_kernel_matches_reference(dtype, tol, causal, shape, backend):
    heads, kv_heads, q_len, k_len = shape
    _assert_matches_reference(*_inputs(dtype, heads, kv_heads, q_len, k_len), causal, 0.3, tol, backend)


def test_compiled_cpu_kernel_is_built_and_chosen_for_float32_and_float64():
    assert kernels.cpu_extension() is not None, "the CPU kernel did not build (see the warning)"
    for dtype in (torch.float32, torch.float64):
        q, k, v = _inputs(dtype)
        assert kernels._select(q, "auto") == (kernels._own_cpu_forward, kernels._own_cpu_backward)
        assert kernels._select(q, "torch") == (kernels._cpu_forward, kernels._cpu_backward)
    assert kernels._select(q.bfloat16(), "torch") == (kernels._cpu_forward, kernels._cpu_backward)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_16_bit_blocks_on_the_compiled_cpu_kernel_without_amx(dtype, causal, monkeypatch):
    """Without AMX tiles (torch's 16-bit CPU kernel is slow there) 16-bit blocks run the compiled kernel on
    float32 copies: the ring's float32 sums and gradient accumulators get float32 attention of the 16-bit
    values, and the first block's sums are not rounded to 16 bits."""
    for amx in (True, False):
        monkeypatch.setattr(kernels, "torch_cpu_has_16_bit_tiles", lambda amx=amx: amx)
        want = (kernels._cpu_forward, kernels._cpu_backward) if amx else (
            kernels._widened_cpu_forward, kernels._widened_cpu_backward)
        assert kernels._select(torch.ones(1, 1, 1, 8, dtype=dtype), "auto") == want
    q, k, v = _inputs(dtype, q_len=300, k_len=300)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    exact = [t.double() for t in (q, k, v, dout)]  # the same 16-bit values, in float64
    want_out, want_lse = kernels.reference_forward(*exact[:3], causal=causal, scale=0.3)
    want_grads = kernels.reference_backward(exact[3], *exact[:3], want_out, want_lse, causal=causal, scale=0.3)
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=0.3)
    assert out.dtype == dtype and (out.double() - want_out).norm() / want_out.norm() < 1e-2
    first = kernels.first_sums(q, k, v, causal=causal, scale=0.3)
    folded = kernels.no_keys_seen(q)
    kernels.attention_forward_(*folded, q, k, v, causal=causal, scale=0.3)
    for sums in (first, folded):
        assert sums[0].dtype == torch.float32 and (sums[0].double() - want_out).norm() / want_out.norm() < 1e-5
        assert (sums[1].double() - want_lse).abs().max() < 1e-4
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=0.3)
    accumulators = [torch.zeros(t.shape) for t in (q, k, v)]
    kernels.attention_backward_(*accumulators, dout, q, k, v, want_out.float(), want_lse.float(), causal=causal,
                                scale=0.3)
    for got, acc, w in zip(grads, accumulators, want_grads):
        assert got.dtype == dtype and (got.double() - w).norm() / w.norm() < 2e-2
        assert (acc.double() - w).norm() / w.norm() < 1e-5


def test_compiled_cpu_kernel_takes_register_chunks_on_amd_processors_only():
    """By default whole chunks go to the register blocks on AMD processors (they beat torch's MKL there) and to
    BLAS on every other (on an Intel Xeon MKL was the faster)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            vendor = next(line.split(":")[1].strip() for line in cpuinfo if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        pytest.skip("no processor vendor in /proc/cpuinfo")
    vectorized = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert kernels.cpu_extension().register_chunks == (vectorized and vendor == "AuthenticAMD")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "heads, kv_heads, q_len, k_len, d",
    [(2, 1, 1100, 1100, 24),  # tiles of 256 queries x 512 keys, cut by the diagonal and by the ends
     (3, 3, 70, 700, 40),  # more keys than queries (causal: top-left aligned)
     (2, 2, 640, 130, 64)],  # more queries than keys
)
@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_across_tiles_and_on_strided_views(heads, kv_heads, q_len, k_len, d, causal):
    q, k, v = _inputs(torch.float32, heads, kv_heads, q_len, k_len, d)
    if causal and q_len > k_len:
        q = q[:, :, :k_len]
    _assert_matches_reference(q, k, v, causal, 0.2, 1e-5, "auto")
    # the ring passes row slices of larger tensors: strided views, computed in place
    rows = slice(1, None, 2)
    _assert_matches_reference(q[:, :, rows], k[:, :, rows], v[:, :, rows], causal, 0.2, 1e-5, "auto")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "q_len, k_len, d",
    [(263, 263, 24),  # a last tile of 7 rows; head_dim a vector and a half (float32), three vectors (float64)
     (600, 300, 72),  # causal: the second tile's diagonal square is 44 keys wide, later rows see every key
     (300, 600, 100),  # more keys than queries; head_dim 64 + 36 (a partial last vector)
     (520, 520, 128)],  # two chunks of 4 vectors of head_dim per strip
)
@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_diagonal_squares(q_len, k_len, d, dtype, tol):
    """The register-blocked products on the causal diagonal, at every strip height and head_dim tail."""
    q, k, v = _inputs(dtype, 2, 1, q_len, k_len, d)
    _assert_matches_reference(q, k, v, True, 0.2, tol, "auto")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("rise", [200.0, -200.0])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_softmax_shift_follows_rising_scores(rise, causal, dtype, tol):
    """Scores that climb by `rise` along the keys (about 90 per chunk of 512, 45 across a diagonal square: more
    than float32's exp can hold) make the forward's lagging softmax shift move, and rescale the output, in every
    chunk; falling ones set it at the first chunk and never move it again."""
    q, k, v = _inputs(dtype, 2, 1, 1100, 1100, 24)
    scale = 0.2
    q[..., -1] = 1.0
    k[..., -1] = torch.linspace(0.0, rise, 1100, dtype=dtype) / scale  # score(i, j) gains rise * j / 1099
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=scale, backend="auto")
    out_r, lse_r = kernels.reference_forward(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    assert (out.double() - out_r).norm() / out_r.norm() < tol
    assert (lse.double() - lse_r).abs().max() < tol * lse_r.abs().max()


@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_long_sums_keep_float32_precision():
    """Sums over 16,384 keys (the output) and 16,384 queries (dV) of terms near 1: each chunk's terms are summed
    on their own and then added to the running sums, as BLAS does. Added one by one to the large running sums,
    as the register blocks once did, they lost bits: 3.4e-6 relative error against 3e-7 now."""
    g = torch.Generator().manual_seed(0)
    n, d = 16384, 64
    zeros = torch.zeros(1, 2, 8, d)  # every score 0: the output is the mean of v, dV the sum of dO / 8
    k, v = torch.randn(1, 1, n, d, generator=g), 1 + 0.1 * torch.randn(1, 1, n, d, generator=g)
    out, _ = kernels.attention_forward(zeros, k, v, causal=False, scale=0.125, backend="auto")
    want = v.double().mean(2, keepdim=True)
    assert ((out.double() - want).abs().max() / want.abs().max()) < 1e-6
    q, dout = torch.zeros(1, 2, n, d), 1 + 0.1 * torch.randn(1, 2, n, d, generator=g)
    k, v = torch.randn(1, 1, 8, d, generator=g), torch.randn(1, 1, 8, d, generator=g)
    out, lse = kernels.attention_forward(q, k, v, causal=False, scale=0.125, backend="auto")
    _, _, dv = kernels.attention_backward(dout, q, k, v, out, lse, causal=False, scale=0.125, backend="auto")
    want = dout.double().sum((1, 2)) / 8
    assert ((dv[0].double() - want).abs().max() / want.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_keeps_a_nan_query_in_its_own_row(dtype, causal):
    """A NaN query makes its own row NaN (the exp keeps NaN, it does not flush it to 0 or clamp it to a number)
    and leaves every other row as exact as without it."""
    q, k, v = _inputs(dtype, q_len=300, k_len=300)
    q_nan = q.clone()
    q_nan[1, 3, 280, 5] = float("nan")  # batch 1, head 3, a query in the second tile
    out, _ = kernels.attention_forward(q_nan, k, v, causal=causal, scale=0.2, backend="auto")
    want, _ = kernels.reference_forward(q.double(), k.double(), v.double(), causal=causal, scale=0.2)
    assert out[1, 3, 280].isnan().all()
    out[1, 3, 280] = want[1, 3, 280].to(dtype)
    assert (out.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_on_peaked_attention(dtype, tol, causal):
    """Scores of standard deviation 30: most probabilities fall below 1e-38, where the kernel flushes denormals
    to zero. Exact all the same (float32's tolerance: its scores, of size ~100, carry rounding of ~1e-5 into
    every probability), and the caller's floating-point mode is back afterwards: denormals still compute."""
    q, k, v = _inputs(dtype, q_len=300, k_len=300, d=64)
    q = q * 30
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=0.125, backend="auto")
    out_r, lse_r = kernels.reference_forward(q.double(), k.double(), v.double(), causal=causal, scale=0.125)
    assert (out.double() - out_r).norm() / out_r.norm() < tol
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    fused = kernels.attention_backward(dout, q, k, v, out_r.to(dtype), lse_r.to(dtype), causal=causal, scale=0.125)
    ref = kernels.reference_backward(dout.double(), q.double(), k.double(), v.double(), out_r, lse_r, causal=causal,
                                     scale=0.125)
    for a, b in zip(fused, ref):
        assert (a.double() - b).norm() / b.norm() < tol
    for denormal in (torch.tensor(1e-39, dtype=torch.float32), torch.tensor(1e-310, dtype=torch.float64)):
        assert (denormal * 1.5).item() > 0  # neither flushed (FTZ) nor read as zero (DAZ)


def test_compiled_cpu_kernel_is_built_for_torch_threads():
    """torch's intra-op threads are OpenMP's on Linux: built without OpenMP, the kernel would run on one of them."""
    if not kernels._OPENMP:
        pytest.skip("torch here does not use OpenMP threads")
    assert kernels.cpu_extension().intra_op_parallel


def test_kernel_build_without_openmp_then_without_kernel(monkeypatch):
    """A compiler without OpenMP still gets the kernel (one thread, with a warning); no compiler, torch's."""
    import torch.utils.cpp_extension as cpp_extension

    tried = []

    def load(name, sources, extra_cflags, extra_ldflags):
        tried.append("-fopenmp" in extra_cflags)
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("omp.h: no such file")
        return "module"

    monkeypatch.setattr(kernels, "_OPENMP", True)
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(kernels, "_extension", [])
    with pytest.warns(RuntimeWarning, match="building it without: it will compute on one thread"):
        assert kernels.cpu_extension() == "module"
    assert tried == [True, False]

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "_extension", [])
    with pytest.warns(RuntimeWarning) as caught:
        assert kernels.cpu_extension() is None
    assert ["with OpenMP" in str(w.message) for w in caught] == [True, False]
    assert "using torch's CPU flash kernel instead" in str(caught[-1].message)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "batch, heads, kv_heads",
    [(1, 4, 1),  # one (batch, kv head) pair for 3 threads: the backward cuts it into 3 parts
     (1, 1, 1),  # 3 query tiles of unequal work (causal) in 3 parts
     (2, 3, 3)],  # more pairs than threads: one task each
)
@pytest.mark.usefixtures("dense_chunks")
def test_compiled_cpu_kernel_on_several_threads(batch, heads, kv_heads, dtype, tol, causal):
    """Each thread takes the next task when done; with fewer (batch, kv head) pairs than threads, the backward
    also splits a pair's query tiles into parts, each with its own dK/dV, summed after. Exact, and with a given
    thread count two runs are bitwise equal (BLAS may round differently for another thread count)."""
    q, k, v = _inputs(dtype, heads, kv_heads, q_len=700, k_len=700, d=40, batch=batch)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run():
        out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=0.2, backend="auto")
        return out, lse, *kernels.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=0.2)

    with torch_threads(3):
        _assert_matches_reference(q, k, v, causal, 0.2, tol, "auto")
        first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("batch, q_len, k_len", [(1, 0, 5), (1, 5, 0), (1, 0, 0), (0, 5, 5)])
def test_compiled_cpu_kernel_on_empty_pieces_and_several_threads(batch, q_len, k_len):
    """A piece without queries or without keys (a striped shifted block of one token) adds nothing."""
    q, k, v = _inputs(torch.float32, 2, 1, q_len=q_len, k_len=k_len, batch=batch)
    out, lse = kernels.no_keys_seen(q)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch_threads(3):
        kernels.cpu_extension().backward_(torch.ones_like(q), q, k, v, out, lse, dq, dk, dv, True, 0.2)
    assert not dq.any() and not dk.any() and not dv.any()


def test_compiled_cpu_kernel_on_overlapping_and_single_rows():
    q, k, v = _inputs(torch.float32, q_len=37, k_len=37)
    flat = torch.randn(2, 2, 38 * 12, generator=torch.Generator().manual_seed(3))
    overlapping = flat.as_strided((2, 2, 37, 24), (flat.stride(0), flat.stride(1), 12, 1))  # row i shares half of i+1
    _assert_matches_reference(q, overlapping, v, True, 0.2, 1e-5, "auto")
    one = q.as_strided((2, 4, 1, 24), (q.stride(0), q.stride(1), 1, 1))  # one query row, row stride 1 < 24
    _assert_matches_reference(one, k, v, False, 0.2, 1e-5, "auto")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or os.environ.get("ATEN_CPU_CAPABILITY"),
                    reason="checks the AVX2 build from a machine whose own build is AVX-512's")
def test_compiled_cpu_kernel_as_an_avx2_machine_builds_it():
    """The AVX2 build (its own register blocks: AVX2 has half AVX-512's vector registers) passes this file's
    kernel checks, with ATen and MKL held to AVX2 as on a machine without AVX-512."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          timeout=120).stdout.strip() == "AVX2"
    checks = "compiled_cpu_kernel and not avx2 and not threads or blocks_folded or extreme_logits"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", __file__, "-k", checks],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_steps_pieces_in_one_call_equal_one_call_each(dtype, monkeypatch):
    """fold_pieces_ / fold_piece_gradients_ (the ring's CPU path: a step's pieces in one kernel call) give what
    the kernel gives piece by piece, bitwise: causal, dense, windowed (a band above the diagonal too), one
    batch row, an empty piece, GQA."""
    from striped_attention.layouts import Block

    monkeypatch.setattr(kernels, "torch_cpu_has_16_bit_tiles", lambda: False)  # 16-bit: float32 copies too
    q, k, v = _inputs(dtype, heads=4, kv_heads=2, q_len=300, k_len=280, batch=2)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    pieces = (Block(slice(0, 40), slice(0, 40), True), Block(slice(40, 300), slice(0, 280), True, window=30),
              Block(slice(10, 20), slice(100, 260), False), Block(slice(50, 50), slice(0, 10), True),
              Block(slice(100, 200), slice(0, 150), False, rows=slice(1, 2), window=-20))
    assert kernels.takes_pieces(q, pieces, "auto") and not kernels.takes_pieces(q, pieces, "torch")
    sums, one_by_one = kernels.no_keys_seen(q), kernels.no_keys_seen(q)
    kernels.fold_pieces_(*sums, q, k, v, pieces, scale=0.3)
    for p in pieces:
        kernels.attention_forward_(p.queries(one_by_one[0]), p.queries(one_by_one[1]), p.queries(q), p.keys(k),
                                   p.keys(v), causal=p.causal, scale=0.3, window=p.window)
    assert all(torch.equal(a, b) for a, b in zip(sums, one_by_one)) and sums[0].abs().sum() > 0
    out = sums[0].to(dtype)
    grads, grads_one_by_one = ([torch.zeros(t.shape) for t in (q, k, v)] for _ in range(2))
    kernels.fold_piece_gradients_(*grads, dout, q, k, v, out, sums[1], pieces, scale=0.3)
    for p in pieces:
        dq, dk, dv = grads_one_by_one
        kernels.attention_backward_(p.queries(dq), p.keys(dk), p.keys(dv), p.queries(dout), p.queries(q), p.keys(k),
                                    p.keys(v), p.queries(out), p.queries(sums[1]), causal=p.causal, scale=0.3,
                                    window=p.window)
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(grads, grads_one_by_one))
    with pytest.raises(RuntimeError, match="piece 0 reaches outside q or k"):
        kernels.fold_pieces_(*sums, q, k, v, (Block(slice(0, 301), slice(0, 10), False),), scale=0.3)


def test_reference_matches_sdpa_in_float64():
    q, k, v = _inputs(torch.float64)
    out, _ = kernels.reference_forward(q, k, v, causal=True, scale=0.2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(out, want)


def test_merge_of_key_halves_equals_whole():
    q, k, v = _inputs(torch.float64, k_len=40)
    whole, whole_lse = kernels.reference_forward(q, k, v, causal=False, scale=0.25)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    for part in (slice(20, 40), slice(0, 20)):
        kernels.merge_(out, lse, *kernels.reference_forward(q, k[:, :, part], v[:, :, part], causal=False, scale=0.25))
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_blocks_folded_in_place_equal_the_whole(backend):
    """attention_forward_/attention_backward_ over key blocks, into row views of the sums, give the whole."""
    q, k, v = _inputs(torch.float32, q_len=600, k_len=600)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    out_w, lse_w = kernels.reference_forward(q.double(), k.double(), v.double(), causal=False, scale=0.3)
    rows, blocks = slice(100, 600), (slice(300, 600), slice(0, 300))
    out, lse = kernels.no_keys_seen(q)
    for part in blocks:
        kernels.attention_forward_(out[:, :, rows], lse[:, :, rows], q[:, :, rows], k[:, :, part], v[:, :, part],
                                   causal=False, scale=0.3, backend=backend)
    assert torch.equal(out[:, :, :100], torch.zeros_like(out[:, :, :100]))  # rows outside the view untouched
    torch.testing.assert_close(out[:, :, rows].double(), out_w[:, :, rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[:, :, rows].double(), lse_w[:, :, rows], rtol=1e-5, atol=1e-5)
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    for part in blocks:
        kernels.attention_backward_(dq[:, :, rows], dk[:, :, part], dv[:, :, part], dout[:, :, rows], q[:, :, rows],
                                    k[:, :, part], v[:, :, part], out_w[:, :, rows].float(), lse_w[:, :, rows].float(),
                                    causal=False, scale=0.3, backend=backend)
    want = kernels.reference_backward(dout[:, :, rows].double(), q[:, :, rows].double(), k.double(), v.double(),
                                      out_w[:, :, rows], lse_w[:, :, rows], causal=False, scale=0.3)
    for got, exact in zip((dq[:, :, rows], dk, dv), want):
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_merge_into_empty_accumulator_has_no_nan():
    out = torch.zeros(1, 1, 3, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    block = torch.randn(1, 1, 3, 2)
    kernels.merge_(out, lse, block, torch.tensor([[[1.0, -5.0, 1e4]]]))
    assert torch.equal(out, block)
    assert lse.tolist() == [[[1.0, -5.0, 1e4]]]


def test_merge_of_a_block_that_saw_no_key_changes_nothing():
    """A block query that saw no key (out 0, lse -inf: a varlen call's joining query) leaves the sums as they
    were, also for a query that has seen no key either."""
    out, lse = torch.randn(1, 1, 3, 2), torch.tensor([[[0.5, float("-inf"), 7.0]]])
    out[0, 0, 1] = 0
    before = out.clone(), lse.clone()
    kernels.merge_(out, lse, torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), float("-inf")))
    assert torch.equal(out, before[0]) and torch.equal(lse, before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_stay_finite(dtype):
    q, k, v = _inputs(torch.float32, q_len=16, k_len=16)
    q = (q * 100).to(dtype)  # scores around 1e4
    k, v = k.to(dtype), v.to(dtype)
    out, lse = kernels.attention_forward(q, k, v, causal=True, scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, _ = kernels.reference_forward(q.double(), k.double(), v.double(), causal=True, scale=1.0)
    assert (out.double() - ref).abs().max() < 0.05


def test_unknown_backend():
    q, k, v = _inputs(torch.float32)
    with pytest.raises(ValueError, match="unknown kernel backend 'triton'; choose one of auto, torch, reference"):
        kernels.attention_forward(q, k, v, causal=True, scale=1.0, backend="triton")


CUDA_CASES = [("flash", torch.bfloat16), ("flash", torch.float16), ("efficient", torch.float32),
              ("cudnn", torch.bfloat16), ("cudnn", torch.float16)]


@pytest.mark.parametrize("name, dtype", CUDA_CASES)
@pytest.mark.parametrize("rows", [(slice(1, 37), slice(0, 36)), (slice(0, 37), slice(0, 20)), (slice(0, 9), slice(0, 37))],
                         ids=["shifted", "q>k", "q<k"])
def test_cuda_kernel_calls_fit_torch_op_schemas(name, dtype, rows):
    """No GPU here: the CUDA paths run on meta tensors through torch's shape functions for those ops, which
    checks argument order, the lse shape (efficient pads it, cuDNN adds a dimension), GQA folding, dtypes and
    the square pieces of a non-square causal block. tests/test_cuda.py checks the values on a GPU."""
    forward, backward = kernels.CUDA_KERNELS[name]
    q = torch.empty(2, 4, 37, 64, device="meta", dtype=dtype)
    k = torch.empty(2, 2, 37, 64, device="meta", dtype=dtype)
    qs, ks = q[:, :, rows[0]], k[:, :, rows[1]]
    out, lse = forward(qs, ks, ks, True, 0.1)
    assert out.shape == qs.shape and out.dtype == dtype
    assert lse.shape == qs.shape[:3] and lse.dtype == torch.float32
    dq, dk, dv = backward(out, qs, ks, ks, out, lse, True, 0.1)
    assert dq.shape == qs.shape and dk.shape == ks.shape and dv.shape == ks.shape
    assert dq.dtype == dk.dtype == dv.dtype == dtype


def test_causal_pieces_cover_the_top_left_mask():
    for q_len, k_len in [(5, 5), (3, 7), (7, 3), (1, 4), (4, 1)]:
        mask = torch.zeros(q_len, k_len, dtype=torch.bool)
        for qs, ks, causal in kernels._causal_pieces(q_len, k_len):
            piece = torch.ones(qs.stop - qs.start, ks.stop - ks.start, dtype=torch.bool)
            assert not mask[qs, ks].any()  # pieces do not overlap
            mask[qs, ks] = piece.tril() if causal else piece
            assert not causal or piece.shape[0] == piece.shape[1]  # causal pieces are square
        assert torch.equal(mask, torch.ones(q_len, k_len, dtype=torch.bool).tril())


def test_named_cuda_backend_refuses_inputs_it_cannot_take():
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="'flash' is a CUDA kernel"):
        kernels.attention_forward(q, q, q, causal=True, scale=1.0, backend="flash")
    fits = kernels.cuda_kernel_fits
    meta = lambda dtype, d: torch.empty(1, 1, 4, d, dtype=dtype, device="meta")  # noqa: E731
    assert fits("flash", meta(torch.bfloat16, 256)) and not fits("flash", meta(torch.bfloat16, 260))
    assert not fits("flash", meta(torch.float32, 64)) and not fits("cudnn", meta(torch.float32, 64))
    assert fits("efficient", meta(torch.float32, 20)) and not fits("efficient", meta(torch.bfloat16, 64))
