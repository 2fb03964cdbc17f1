"""Attention on one block, with its log-sum-exp: fused kernels per device, a pure-PyTorch reference, the merge.

Shapes, everywhere in this module:
  q: (batch, heads, q_len, head_dim)      k, v: (batch, kv_heads, k_len, head_dim), heads % kv_heads == 0
  out: like q                             lse: (batch, heads, q_len), float32 (float64 for float64 input)
``lse`` is the natural log-sum-exp of the scaled scores of each query over the keys it sees. ``causal``
is top-left aligned: query i sees keys 0..i. ``window`` (None: none) limits query i to the keys j with
i - j < window: a sliding window, or a band of a layout's piece (then, without causal, window <= 0 too: the
keys from i + 1 - window on). Every query must see at least one key.

The backward functions take the *final* output and log-sum-exp of the whole ring, not the block's own:
with those, the gradient of each block is exact and local (no second forward pass).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import zlib
from pathlib import Path

import torch

__all__ = [
    "attention_forward", "attention_backward", "attention_forward_", "attention_backward_", "reference_forward",
    "reference_backward", "merge_", "no_keys_seen", "first_sums", "visible",
]

aten = torch.ops.aten
# "torch": only torch's own fused kernels (no compiled CPU kernel); "flash", "efficient", "cudnn": that one of
# torch's CUDA kernels (a ValueError where it does not take the inputs)
BACKENDS = ("auto", "torch", "reference", "flash", "efficient", "cudnn")


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Repeat K/V heads to match q's heads (local only: K/V travel unexpanded)."""
    groups = q.shape[1] // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold_kv_grad(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum an expanded K/V gradient (batch, heads, len, dim) back to (batch, kv_heads, len, dim)."""
    b, h, n, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, n, d).sum(2)


def visible(q_len: int, k_len: int, causal: bool, window: int | None, device, offset: int = 0) -> torch.Tensor | None:
    """(q_len, k_len) bool, True where query i sees key j; None where it sees every key. ``offset``: the first
    query's position minus the first key's (0: both start at the sequence's start)."""
    if not causal and window is None:
        return None
    rows = torch.arange(offset, offset + q_len, device=device)
    distance = rows[:, None] - torch.arange(k_len, device=device)[None, :]
    seen = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    return seen if window is None else seen & (distance < window)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of running sums and gradient accumulators for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Pure-PyTorch reference: any device, any dtype; materializes the (q_len, k_len) scores of one block.
# ----------------------------------------------------------------------------------------------------------


def _scores(qf, kf, causal, window, scale):
    scores = qf @ kf.transpose(-1, -2) * scale
    mask = visible(qf.shape[2], kf.shape[2], causal, window, qf.device)
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def reference_forward(q, k, v, *, causal: bool, scale: float, window: int | None = None):
    """(out, lse) for one block, computed with plain matmuls in float32 (float64 for float64 input)."""
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), _expand_kv(q, k).to(acc), _expand_kv(q, v).to(acc)
    scores = _scores(qf, kf, causal, window, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vf
    return out.to(q.dtype), lse


def reference_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, window: int | None = None):
    """(dq, dk, dv) of one block given the final out and lse; dk/dv have kv_heads heads."""
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), _expand_kv(q, k).to(acc), _expand_kv(q, v).to(acc)
    do, o = dout.to(acc), out.to(acc)
    scores = _scores(qf, kf, causal, window, scale)
    p = torch.exp(scores - lse.to(acc).unsqueeze(-1))
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (do * o).sum(-1, keepdim=True)) * scale
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ qf
    kv_heads = k.shape[1]
    return dq.to(q.dtype), _fold_kv_grad(dk, kv_heads).to(k.dtype), _fold_kv_grad(dv, kv_heads).to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# Fused kernels (torch's private SDPA ops).
# ----------------------------------------------------------------------------------------------------------


# The CPU kernels take strided views (a block's row slices) as they are: copying them first was measured
# no faster, and costs memory.


def _cpu_forward(q, k, v, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


# float32 and float64 on CPU (16-bit inputs too, on float32 copies, where torch's kernel is slow or takes no
# window: see torch_cpu_has_16_bit_tiles): this package's own flash kernel (csrc/flash_cpu.cpp), compiled for
# this machine on first use. It tiles like torch's, but computes the square on the causal diagonal with its own
# register-blocked products, each strip of queries only as far as it sees, so a causal block costs ~0.5 of a
# full one instead of ~0.5 + 256/len (striped pays it every step).


_CSRC = Path(__file__).parent / "csrc" / "flash_cpu.cpp"
_VEC_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
# torch's intra-op threads are OpenMP's; on Linux the kernel builds with -fopenmp and shares torch's libgomp
_OPENMP = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
_extension: list = []  # [module or None], once loaded or failed


def cpu_extension():
    """The compiled CPU kernel module (float32, float64), building it on first use (about 30 s, cached by torch
    under $TORCH_EXTENSIONS_DIR); None, with one warning, where it cannot be built (no C++ compiler, no ninja).
    Where the compiler has no OpenMP, it is built without, with a warning: then it computes on one thread."""
    if not _extension:
        capability = torch.backends.cpu.get_cpu_capability()
        vec = capability if capability in _VEC_FLAGS else "DEFAULT"
        # one build per checkout too: torch rebuilds a name whose source path changed, so two checkouts of one
        # name on a machine would rebuild it (about 30 s) each time the other one ran
        where = f"{zlib.crc32(str(_CSRC).encode()):08x}"
        name = f"striped_attention_flash_cpu_{vec}_torch{torch.__version__}_{where}"
        name = name.replace(".", "_").replace("+", "_")
        flags = ["-O3", *_VEC_FLAGS.get(vec, []), f"-DCPU_CAPABILITY={vec}"]
        flags += [f"-DCPU_CAPABILITY_{vec}"] if vec != "DEFAULT" else []
        # without -fopenmp, at::parallel_for in the kernel would run its tasks one after the other
        tries = [["-fopenmp"], []] if _OPENMP else [[]]
        for openmp in tries:
            try:
                from torch.utils.cpp_extension import load

                _extension.append(load(name, [str(_CSRC)], extra_cflags=flags + openmp, extra_ldflags=openmp))
                break
            except Exception as e:  # noqa: BLE001 - any build failure: try without OpenMP, then use torch's kernel
                failure = f"{type(e).__name__}: {e}"
                if openmp:
                    warnings.warn(f"striped_attention: could not build the CPU flash kernel with OpenMP ({failure}); "
                                  "building it without: it will compute on one thread", RuntimeWarning, stacklevel=2)
        else:
            warnings.warn(f"striped_attention: could not build the CPU flash kernel ({failure}); using torch's CPU "
                          "flash kernel instead", RuntimeWarning, stacklevel=2)
            _extension.append(None)
    return _extension[0]


# How the compiled CPU kernel computes the chunks of keys every query of a tile sees whole: None, its build's
# choice for this processor (register blocks on AMD's, where they beat torch's MKL; BLAS elsewhere); True
# (register blocks) or False (BLAS) to override it. benchmarks/kernels.py --chunks compares the two.
cpu_register_chunks: bool | None = None


def _own_cpu_forward_(out, lse, q, k, v, causal, scale, window=None):
    """Fold the block into the sums (out, lse) in place: the kernel's online softmax is the merge."""
    cpu_extension().forward_(*_unit_stride(q, k, v), out, lse, causal, scale, window, cpu_register_chunks)


def _own_cpu_backward_(dq, dk, dv, dout, q, k, v, out, lse, causal, scale, window=None):
    cpu_extension().backward_(*_unit_stride(dout, q, k, v, out), lse, dq, dk, dv, causal, scale, window,
                              cpu_register_chunks)


def _own_cpu_forward(q, k, v, causal, scale, window=None):
    out, lse = no_keys_seen(q)
    _own_cpu_forward_(out, lse, q, k, v, causal, scale, window)
    return out, lse


def _own_cpu_backward(dout, q, k, v, out, lse, causal, scale, window=None):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _own_cpu_backward_(dq, dk, dv, dout, q, k, v, out, lse, causal, scale, window)
    return dq, dk, dv


def _widened(*tensors):
    """16-bit operands as float32 copies (float32 and float64 as they are) for the CPU kernel."""
    return tuple(t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors)


def _widened_cpu_forward(q, k, v, causal, scale, window=None):
    """A 16-bit block on the CPU kernel, on float32 copies: where torch's CPU flash is slow at 16 bits (no AMX:
    torch_cpu_has_16_bit_tiles) or takes no window (every windowed block). Memory linear in the block's length."""
    out, lse = _own_cpu_forward(*_widened(q, k, v), causal, scale, window)
    return out.to(q.dtype), lse


def _widened_cpu_backward(dout, q, k, v, out, lse, causal, scale, window=None):
    grads = _own_cpu_backward(*_widened(dout, q, k, v, out), lse, causal, scale, window)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


_OWN_CPU = (_own_cpu_forward, _own_cpu_backward, _widened_cpu_forward, _widened_cpu_backward)


@functools.cache
def torch_cpu_has_16_bit_tiles() -> bool:
    """Whether this CPU has AMX tiles, with which torch's CPU flash kernel computes 16-bit blocks fast. Its time
    against this package's kernel on float32 copies (4,096 tokens, 8 heads, one thread): on an Intel Xeon with
    AMX 0.44-0.48x forward and 0.96-1.07x backward (bfloat16); on an AMD EPYC (AVX2) 1.3-2.1x forward and 7-12x
    backward (bfloat16, float16). So 16-bit blocks go to torch's kernel with AMX, to this package's without."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _rows_fit(t: torch.Tensor) -> bool:
    """Rows the CPU kernel can read in place: each row (head_dim) contiguous, rows not overlapping."""
    return t.stride(-1) == 1 and (t.stride(-2) >= t.shape[-1] or t.shape[-2] == 1)


def _unit_stride(*tensors):
    """The operands as the CPU kernel and torch's flash and cuDNN kernels read them: a block's row slices (the
    shifted ones too) as they lie, without a copy; overlapping or strided rows copied."""
    return tuple(t if _rows_fit(t) else t.contiguous() for t in tensors)


def _contiguous(*tensors):
    return tuple(t.contiguous() for t in tensors)


def _cuda_rng_placeholders(device):
    """Philox seed and offset for the backward ops; unused without dropout."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return zero, zero


# CUDA: torch's flash (FlashAttention-2), memory-efficient and cuDNN kernels. Each computes a square or dense
# block; a causal block with q_len != k_len is cut into square and dense pieces first (_top_left_causal), since
# the kernels do not agree on where such a mask is aligned.


def _flash_forward(q, k, v, causal, scale):
    q, k, v = _unit_stride(q, k, v)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    out, lse, *_ = aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)
    return out, lse


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    dout, q, k, v, out = _unit_stride(dout, q, k, v, out)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    seed, offset = _cuda_rng_placeholders(q.device)
    # No cumulative sequence lengths (None, as the forward returns them): the dense, not the varlen, kernel.
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout, q, ke, ve, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset,
        scale=scale,
    )
    return dq, _fold_kv_grad(dk, k.shape[1]), _fold_kv_grad(dv, v.shape[1])


def _efficient_forward(q, k, v, causal, scale):
    q, k, v = _contiguous(q, k, v)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, ke, ve, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]  # the kernel pads lse's length to a multiple of 32


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    dout, q, k, v, out, lse = _contiguous(dout, q, k, v, out, lse)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    seed, offset = _cuda_rng_placeholders(q.device)
    lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))  # the kernel's own lse is padded to 32
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, ke, ve, None, out, lse.contiguous(), seed, offset, 0.0, [True, True, True, False], causal,
        scale=scale,
    )
    return dq, _fold_kv_grad(dk, k.shape[1]), _fold_kv_grad(dv, v.shape[1])


def _cudnn_forward(q, k, v, causal, scale):
    q, k, v = _unit_stride(q, k, v)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, ke, ve, None, True, 0.0, causal, False, scale=scale)
    return out, lse.view(q.shape[:3])  # cuDNN's statistics are (batch, heads, q_len, 1)


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    if q.shape[2] == k.shape[2] == 1:  # cuDNN refuses it ("s_q = s_kv = 1 is not supported", torch 2.11)
        return _flash_backward(dout, q, k, v, out, lse, causal, scale)
    dout, q, k, v, out = _unit_stride(dout, q, k, v, out)
    ke, ve = _expand_kv(q, k), _expand_kv(q, v)
    seed, offset = _cuda_rng_placeholders(q.device)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, ke, ve, out, lse.contiguous().unsqueeze(-1), seed, offset, None, None, None, q.shape[2],
        k.shape[2], 0.0, causal, scale=scale,
    )
    return dq, _fold_kv_grad(dk, k.shape[1]), _fold_kv_grad(dv, v.shape[1])


def _causal_pieces(q_len: int, k_len: int) -> list[tuple[slice, slice, bool]]:
    """A top-left causal (q_len, k_len) block as (q rows, k rows, causal) pieces that are square or dense."""
    if q_len <= k_len:  # keys past the last query are never seen
        return [(slice(0, q_len), slice(0, q_len), True)]
    return [(slice(0, k_len), slice(0, k_len), True), (slice(k_len, q_len), slice(0, k_len), False)]


def _top_left_causal(forward, backward):
    """The (forward, backward) pair, with non-square causal blocks computed as square and dense pieces."""

    def square(q, k, causal):
        return not causal or q.shape[2] == k.shape[2]

    def forward_(q, k, v, causal, scale):
        if square(q, k, causal):
            return forward(q, k, v, causal, scale)
        parts = [forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], c, scale)
                 for qs, ks, c in _causal_pieces(q.shape[2], k.shape[2])]
        return tuple(torch.cat(piece, dim=2) for piece in zip(*parts))

    def backward_(dout, q, k, v, out, lse, causal, scale):
        if square(q, k, causal):
            return backward(dout, q, k, v, out, lse, causal, scale)
        dq = []
        dk, dv = (torch.zeros(t.shape, dtype=acc_dtype(t.dtype), device=t.device) for t in (k, v))
        for qs, ks, c in _causal_pieces(q.shape[2], k.shape[2]):
            dq_p, dk_p, dv_p = backward(dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                                        lse[:, :, qs], c, scale)
            dq.append(dq_p)
            dk[:, :, ks] += dk_p
            dv[:, :, ks] += dv_p
        return torch.cat(dq, dim=2), dk.to(k.dtype), dv.to(v.dtype)

    return forward_, backward_


# Windows on CUDA: FlashAttention-2 takes a band (window_size_left, window_size_right) aligned at the bottom
# right: query i sees key j iff i + (k_len - q_len) - left <= j <= i + (k_len - q_len) + right, which is ours
# (i - window < j, and j <= i if causal) with left = window - 1 + k_len - q_len and right = q_len - k_len. It
# caps both at k_len (larger means no bound, which it then sets to k_len), so a call takes at most k_len
# queries: a causal piece's first k_len rows, then the later ones, which see every key up to the window, in
# parts of k_len rows. Causal keys past the last query are never seen and are left out.


def _flash_window_parts(q_len: int, k_len: int, causal: bool, window: int) -> list[tuple[slice, bool, int]]:
    """(query rows, causal, window of those rows) of the FlashAttention-2 calls of one windowed block."""
    parts, start = [], 0
    if causal:
        start = min(q_len, k_len)
        parts.append((slice(0, start), True, window))
    for a in range(start, q_len, k_len):
        parts.append((slice(a, min(q_len, a + k_len)), False, window - a))  # row a + i sees keys from i + 1 - (window - a)
    return parts


def _flash_band_args(q_len, k_len, causal, window):
    k_len = min(k_len, q_len) if causal else k_len
    return k_len, {"window_size_left": window - 1 + k_len - q_len, "window_size_right": q_len - k_len if causal else None}


def _flash_window_forward(q, k, v, causal, scale, window):
    outs, lses = [], []
    for rows, part_causal, part_window in _flash_window_parts(q.shape[2], k.shape[2], causal, window):
        q_len = rows.stop - rows.start
        k_len, band = _flash_band_args(q_len, k.shape[2], part_causal, part_window)
        q_, k_, v_ = (t.transpose(1, 2) for t in _unit_stride(q[:, :, rows], k[:, :, :k_len], v[:, :, :k_len]))
        out, lse, *_ = aten._flash_attention_forward(q_, k_, v_, None, None, q_len, k_len, 0.0, False, False,
                                                     scale=scale, **band)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _flash_window_backward(dout, q, k, v, out, lse, causal, scale, window):
    seed, offset = _cuda_rng_placeholders(q.device)
    dqs, dk_all, dv_all = [], *(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
    for rows, part_causal, part_window in _flash_window_parts(q.shape[2], k.shape[2], causal, window):
        q_len = rows.stop - rows.start
        k_len, band = _flash_band_args(q_len, k.shape[2], part_causal, part_window)
        dout_, q_, k_, v_, out_ = (t.transpose(1, 2) for t in _unit_stride(
            dout[:, :, rows], q[:, :, rows], k[:, :, :k_len], v[:, :, :k_len], out[:, :, rows]))
        dq, dk, dv = aten._flash_attention_backward(
            dout_, q_, k_, v_, out_, lse[:, :, rows].contiguous(), None, None, q_len, k_len, 0.0, False, seed,
            offset, scale=scale, **band,
        )
        dqs.append(dq.transpose(1, 2))
        dk_all[:, :, :k_len] += dk.transpose(1, 2)  # keys no query sees get no gradient
        dv_all[:, :, :k_len] += dv.transpose(1, 2)
    return torch.cat(dqs, dim=2), dk_all.to(k.dtype), dv_all.to(v.dtype)


CUDA_KERNELS = {
    "flash": _top_left_causal(_flash_forward, _flash_backward),
    "efficient": _top_left_causal(_efficient_forward, _efficient_backward),
    "cudnn": _top_left_causal(_cudnn_forward, _cudnn_backward),
}


def cuda_kernel_fits(name: str, q: torch.Tensor) -> bool:
    """Whether torch's CUDA kernel ``name`` takes q's dtype and head_dim."""
    half, head_dim = q.dtype in (torch.float16, torch.bfloat16), q.shape[-1]
    if name == "flash":
        return half and head_dim <= 256 and head_dim % 8 == 0
    if name == "cudnn":
        return half and head_dim <= 128 and head_dim % 8 == 0 and torch.backends.cudnn.is_available()
    # The memory-efficient kernel: float32 only. Its 16-bit backward gave wrong dQ and dK (relative error 0.1 to
    # 0.8, forward and dV right) on an H100 with torch 2.11 in tests/test_cuda.py; flash and cuDNN cover 16-bit.
    return q.dtype == torch.float32 and head_dim % 4 == 0


@functools.lru_cache(maxsize=None)
def _cuda_preference(device: torch.device) -> tuple[str, ...]:
    """The CUDA kernels "auto" tries, fastest first: on Hopper and later cuDNN's, which uses the chip's own
    matrix instructions (1.7-1.9x FlashAttention-2's speed on an H100, README); before, FlashAttention-2.
    Cached per device: it is asked for every block."""
    if torch.cuda.get_device_capability(device)[0] >= 9:
        return "cudnn", "flash", "efficient"
    return "flash", "efficient"


def _reference_forward(q, k, v, causal, scale, window=None):
    return reference_forward(q, k, v, causal=causal, scale=scale, window=window)


def _reference_backward(dout, q, k, v, out, lse, causal, scale, window=None):
    return reference_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, window=window)


def _select(q: torch.Tensor, backend: str, window: int | None = None):
    """The (forward, backward) pair for q's device and dtype; each takes (..., causal, scale) and, with a
    window, ``window`` after them."""
    if backend == "reference":
        return _reference_forward, _reference_backward
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if window is not None:
        return _select_windowed(q, backend)
    if backend in CUDA_KERNELS:
        if q.device.type != "cuda" or not cuda_kernel_fits(backend, q):
            raise ValueError(f"backend {backend!r} is a CUDA kernel for other inputs than {q.dtype} with head_dim "
                             f"{q.shape[-1]} on {q.device.type}; use 'auto'")
        return CUDA_KERNELS[backend]
    if q.device.type == "cpu":
        if backend != "torch" and cpu_extension() is not None:
            if q.dtype in (torch.float32, torch.float64):
                return _own_cpu_forward, _own_cpu_backward
            if not torch_cpu_has_16_bit_tiles():
                return _widened_cpu_forward, _widened_cpu_backward
        return _cpu_forward, _cpu_backward
    if q.device.type == "cuda":
        for name in _cuda_preference(q.device):
            if cuda_kernel_fits(name, q):
                return CUDA_KERNELS[name]
    return _reference_forward, _reference_backward


def _select_windowed(q: torch.Tensor, backend: str):
    """The pair for a windowed block: this package's CPU kernel (16-bit inputs on float32 copies),
    FlashAttention-2 on CUDA, else the reference."""
    if backend in CUDA_KERNELS and backend != "flash":
        raise ValueError(f"backend {backend!r} takes no window; use 'auto', 'flash' or 'reference'")
    if q.device.type == "cpu" and backend == "auto" and cpu_extension():
        if q.dtype in (torch.float32, torch.float64):
            return _own_cpu_forward, _own_cpu_backward
        return _widened_cpu_forward, _widened_cpu_backward
    if q.device.type == "cuda" and backend in ("auto", "flash") and cuda_kernel_fits("flash", q):
        return _flash_window_forward, _flash_window_backward
    if backend == "flash":
        raise ValueError(f"backend 'flash' is a CUDA kernel for other inputs than {q.dtype} with head_dim "
                         f"{q.shape[-1]} on {q.device.type}; use 'auto'")
    return _reference_forward, _reference_backward


def _window_arg(window: int | None) -> tuple:
    return () if window is None else (window,)


def attention_forward(q, k, v, *, causal: bool, scale: float, backend: str = "auto", window: int | None = None):
    """(out, lse) of one block: out like q, lse (batch, heads, q_len) float32 (float64 for float64 input)."""
    forward, _ = _select(q, backend, window)
    return forward(q, k, v, causal, scale, *_window_arg(window))


def attention_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, backend: str = "auto",
                       window: int | None = None):
    """(dq, dk, dv) of one block, given the final out and lse of the whole ring for these queries."""
    _, backward = _select(q, backend, window)
    return backward(dout, q, k, v, out, lse, causal, scale, *_window_arg(window))


def first_sums(q, k, v, *, causal: bool, scale: float, backend: str = "auto", window: int | None = None):
    """The running sums (out, lse) in the accumulation dtype after one block that every query of q attends
    to: what attention_forward_ leaves in no_keys_seen(q), without merging into zeros (a kernel that returns
    its block's output pays a cast instead of a merge). Contiguous, whatever layout the kernel wrote."""
    forward, _ = _select(q, backend, window)
    if forward in _OWN_CPU:  # the kernel's own sums, already in the accumulation dtype (16-bit: not rounded)
        return _own_cpu_forward(*_widened(q, k, v), causal, scale, window)
    out, lse = forward(q, k, v, causal, scale, *_window_arg(window))
    acc = acc_dtype(q.dtype)
    return out.to(acc, memory_format=torch.contiguous_format), lse.to(acc, memory_format=torch.contiguous_format)


def attention_forward_(out, lse, q, k, v, *, causal: bool, scale: float, backend: str = "auto",
                       window: int | None = None) -> None:
    """Fold one block into the running sums in place: ``out`` (like q, in the accumulation dtype) and ``lse``
    (batch, heads, q_len) hold the attention of these queries over the keys seen so far (0 and -inf where
    none), and afterwards over those keys and k too. Views (a block's rows) are updated where they lie."""
    forward, _ = _select(q, backend, window)
    if forward in _OWN_CPU and _rows_fit(out):
        _own_cpu_forward_(out, lse, *_widened(q, k, v), causal, scale, window)
    else:
        merge_(out, lse, *forward(q, k, v, causal, scale, *_window_arg(window)))


def attention_backward_(dq, dk, dv, dout, q, k, v, out, lse, *, causal: bool, scale: float, backend: str = "auto",
                        window: int | None = None):
    """Add one block's gradients into ``dq`` (like q) and ``dk``, ``dv`` (like k), in the accumulation dtype,
    in place; ``out`` and ``lse`` are the final ones of the whole ring for these queries."""
    _, backward = _select(q, backend, window)
    if backward in _OWN_CPU and all(map(_rows_fit, (dq, dk, dv))):
        _own_cpu_backward_(dq, dk, dv, *_widened(dout, q, k, v, out), lse, causal, scale, window)
        return
    for total, part in zip((dq, dk, dv), backward(dout, q, k, v, out, lse, causal, scale, *_window_arg(window))):
        total += part


def takes_pieces(q, pieces, backend: str) -> bool:
    """Whether the CPU kernel computes every one of a ring step's pieces (:class:`layouts.Block`) under
    ``backend``, so that :func:`fold_pieces_` and :func:`fold_piece_gradients_` take them in one call: not on
    other devices or backends, nor for 16-bit inputs on a CPU with AMX tiles."""
    return q.device.type == "cpu" and all(_select(q, backend, w)[0] in _OWN_CPU for w in {p.window for p in pieces})


def fold_pieces_(out, lse, q, k, v, pieces, *, scale: float) -> None:
    """Fold a ring step's pieces (local to q and k; ``takes_pieces``) into the running sums ``out``, ``lse``
    (contiguous, the accumulation dtype) in place, in one call of the CPU kernel: packed documents' many small
    pieces cost no Python call each."""
    cpu_extension().forward_pieces_(*_unit_stride(*_widened(q, k, v)), out, lse, _piece_table(pieces, q.shape[0]),
                                    scale, cpu_register_chunks)


def fold_piece_gradients_(dq, dk, dv, dout, q, k, v, out, lse, pieces, *, scale: float) -> None:
    """Add a ring step's pieces' gradients (``takes_pieces``) into ``dq`` and ``dk``, ``dv`` (contiguous, the
    accumulation dtype) in place, in one call of the CPU kernel."""
    cpu_extension().backward_pieces_(*_unit_stride(*_widened(dout, q, k, v, out)), lse, dq, dk, dv,
                                     _piece_table(pieces, q.shape[0]), scale, cpu_register_chunks)


def _piece_table(pieces, batch: int) -> torch.Tensor:
    """(P, 9) int64, a row per piece: its batch rows, queries, keys (start, stop), causal, windowed, window."""
    rows = []
    for p in pieces:
        first, stop, step = p.rows.indices(batch)
        assert step == 1, "a piece's batch rows are one run"
        window = 0 if p.window is None else p.window
        rows.append((first, stop, p.q.start, p.q.stop, p.k.start, p.k.stop, p.causal, p.window is not None, window))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 9)


def no_keys_seen(q):
    """Running sums before any key: out = 0 (like q, in the accumulation dtype) and lse = -inf."""
    acc = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    return out, torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------------------------------------
# The merge: fold one block's (out_b, lse_b) into running fp32 accumulators, in place.
# ----------------------------------------------------------------------------------------------------------


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """out, lse <- the softmax-weighted combination of (out, lse) and (out_b, lse_b), in place.

    out: (..., n, d) and lse: (..., n) accumulators (may be views); out_b, lse_b: one block's results for the
    same queries. out moves towards out_b by sigmoid(lse_b - lse), the block's share of the total softmax
    mass, and lse becomes logaddexp(lse, lse_b). A query that has seen no key yet (lse = -inf, out = 0) takes
    the block's values exactly (sigmoid(+inf) = 1), without NaN; a block query that saw none (lse_b = -inf,
    out_b = 0) changes nothing, also when neither has seen a key.
    """
    weight = torch.sigmoid(lse_b - lse).nan_to_num_(0.0).unsqueeze(-1).to(out.dtype)
    out.lerp_(out_b.to(out.dtype), weight)
    lse.copy_(torch.logaddexp(lse, lse_b))


def build_cpu_extension() -> None:
    """Build (or load) the CPU kernel now and say where it is: what ``make`` runs after installing."""
    module = cpu_extension()
    print(f"CPU flash kernel (float32, float64): {module.__file__ if module else 'unavailable, torch kernels in use'}")
