// Flash attention for CPU, float32 and float64, forward and backward, with the log-sum-exp.
//
// Shapes: q (B, H, L, D); k, v (B, Hkv, S, D), H % Hkv == 0 (GQA); out like q; lse (B, H, L).
// Every operand may be strided, with unit stride along D; all share one dtype. Causal masking is top-left
// aligned: query i sees keys 0..i.
//
// Same tiling as torch's CPU flash kernel (256 queries x 512 keys, BLAS for the products, an online softmax
// in between), with one difference that matters to ring attention: where a tile crosses the diagonal, it is
// computed in slices of 64 queries, each over only the keys it can see. torch's kernel computes the whole
// 256 x 512 tile there, so a causal block costs it about 0.5 + 256 / L of a full block; here it costs about
// 0.5 + 32 / L, and a striped ring, which computes a causal block at every step, runs near the dense rate.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// Fortran BLAS, as torch's CPU library exports it (MKL or OpenBLAS).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc);

namespace {

constexpr int64_t kQueryTile = 256;
constexpr int64_t kKeyTile = 512;
constexpr int64_t kDiagonalSlice = 64;  // query rows per slice where a tile crosses the diagonal

// Column-major BLAS: c (m x n) = alpha * op(a) * op(b) + beta * c. A row-major (r x s) matrix with leading
// dimension ld is the column-major (s x r) matrix with the same ld, so row-major products are written
// transposed below.
template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  }
}

template <typename T>
T row_max(const T* row, int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(row + j));
  if (j < len) {
    acc = at::vec::maximum(acc, Vec::set(acc, Vec::loadu(row + j, len - j), len - j));
  }
  return at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, acc);
}

// row[0:len] <- exp(row[0:len] - shift); returns their sum.
template <typename T>
T exp_shifted(T* row, int64_t len, T shift) {
  using Vec = at::vec::Vectorized<T>;
  const Vec s(shift);
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    Vec e = (Vec::loadu(row + j) - s).exp_u20();
    e.store(row + j);
    acc = acc + e;
  }
  if (j < len) {
    Vec e = (Vec::loadu(row + j, len - j) - s).exp_u20();
    e.store(row + j, len - j);
    acc = acc + Vec::set(Vec(T(0)), e, len - j);
  }
  return at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
}

// The keys [n, n + kb) of a tile that query m + i sees: all kb, or fewer on the causal diagonal.
inline int64_t visible(bool causal, int64_t m, int64_t i, int64_t n, int64_t kb) {
  return causal ? std::clamp<int64_t>(m + i - n + 1, 0, kb) : kb;
}

// Calls body(n, kb, i0, i1, kc) for each piece of work of the query tile [m, m + qb) against S keys: key
// tiles [n, n + kb), each for rows [i0, i1) of the query tile over the tile's first kc keys (those its last
// row sees; earlier rows may see fewer, which the body masks). Off the diagonal a piece is the whole tile;
// on it, a slice of kDiagonalSlice rows, so no row computes more than kDiagonalSlice keys it does not see.
template <typename Body>
void for_each_piece(bool causal, int64_t m, int64_t qb, int64_t S, Body&& body) {
  const int64_t num_keys = causal ? std::min(m + qb, S) : S;
  for (int64_t n = 0; n < num_keys; n += kKeyTile) {
    const int64_t kb = std::min(kKeyTile, num_keys - n);
    const int64_t slice = causal && n + kb > m + 1 ? kDiagonalSlice : qb;
    for (int64_t i0 = 0; i0 < qb; i0 += slice) {
      const int64_t i1 = std::min(qb, i0 + slice), kc = visible(causal, m, i1 - 1, n, kb);
      if (kc > 0) body(n, kb, i0, i1, kc);
    }
  }
}

template <typename T>
struct Strided {  // a (B, H, len, D) operand with unit stride along D, or a (B, H, len) one
  T* data;
  int64_t b, h, row;  // row: the BLAS leading dimension, never below D (a single row may have any stride)
  explicit Strided(const at::Tensor& t)
      : data(t.data_ptr<T>()), b(t.stride(0)), h(t.stride(1)),
        row(t.dim() == 4 && t.size(2) == 1 ? std::max(t.stride(2), t.size(3)) : t.stride(2)) {}
  T* at(int64_t bi, int64_t hi, int64_t r = 0) const { return data + bi * b + hi * h + r * row; }
};

void check(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, name, " must be a CPU tensor of dtype ", dtype);
  TORCH_CHECK(t.sizes() == shape, name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.dim() == 3 || (t.stride(3) == 1 && (t.stride(2) >= t.size(3) || t.size(2) == 1)), name,
              " needs contiguous, non-overlapping rows (unit stride along head_dim)");
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q, k, v must be 4-D (batch, heads, len, head_dim)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "float32 or float64 only");
  check(q, "q", q.sizes(), q.scalar_type()), check(k, "k", k.sizes(), q.scalar_type());
  check(v, "v", k.sizes(), q.scalar_type());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "q and k/v disagree on batch or head_dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "heads must be a multiple of kv_heads");
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, bool causal, double scale_) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t group = H / k.size(1), tiles = (L + kQueryTile - 1) / kQueryTile;
  const T scale = static_cast<T>(scale_);
  const Strided<T> Q(q), K(k), V(v), O(out), LSE(lse);

  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(std::min(kQueryTile, L) * std::min(kKeyTile, S)), row_max_(kQueryTile), row_sum(kQueryTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % tiles, bh = task / tiles, b = bh / H, h = bh % H, hk = h / group;
      const int64_t m = t * kQueryTile, qb = std::min(kQueryTile, L - m);
      T* o = O.at(b, h, m);
      T* l = LSE.at(b, h, m);
      for (int64_t i = 0; i < qb; ++i) {
        row_max_[i] = l[i * LSE.row];
        row_sum[i] = row_max_[i] == -std::numeric_limits<T>::infinity() ? T(0) : T(1);  // out has weight 1
      }
      for_each_piece(causal, m, qb, S, [&](int64_t n, int64_t kb, int64_t i0, int64_t i1, int64_t kc) {
        const int64_t rows = i1 - i0;
        T* p = scores.data() + i0 * kb;
        gemm('T', 'N', kc, rows, D, scale, K.at(b, hk, n), K.row, Q.at(b, h, m + i0), Q.row, T(0), p, kb);
        for (int64_t i = i0; i < i1; ++i) {
          T* r = p + (i - i0) * kb;
          const int64_t len = visible(causal, m, i, n, kb);
          std::fill(r + len, r + kc, T(0));
          if (len == 0) continue;
          const T new_max = std::max(row_max_[i], row_max(r, len));
          const T rescale = std::exp(row_max_[i] - new_max);
          row_sum[i] = row_sum[i] * rescale + exp_shifted(r, len, new_max);
          row_max_[i] = new_max;
          if (rescale != T(1)) {
            T* oi = o + i * O.row;
            for (int64_t d = 0; d < D; ++d) oi[d] *= rescale;
          }
        }
        gemm('N', 'N', D, rows, kc, T(1), V.at(b, hk, n), V.row, p, kb, T(1), o + i0 * O.row, O.row);
      });
      for (int64_t i = 0; i < qb; ++i) {
        if (row_sum[i] == T(0)) continue;  // no key seen, before or now
        const T inv = T(1) / row_sum[i];
        T* oi = o + i * O.row;
        for (int64_t d = 0; d < D; ++d) oi[d] *= inv;
        l[i * LSE.row] = row_max_[i] + std::log(row_sum[i]);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, bool causal, double scale_) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t group = H / Hkv;
  const T scale = static_cast<T>(scale_);
  const Strided<T> Q(q), K(k), V(v), dO(dout), O(out), LSE(lse), dQ(dq), dK(dk), dV(dv);

  using Vec = at::vec::Vectorized<T>;
  // One task per (batch, kv head): it owns that head's dK/dV, so tasks never write the same memory.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile = std::min(kQueryTile, L) * std::min(kKeyTile, S);  // small blocks, small buffers
    std::vector<T> p_buf(tile), dp_buf(tile), delta(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      T* dk_h = dK.at(b, hk);
      T* dv_h = dV.at(b, hk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i = 0; i < L; ++i) {  // delta_i = dO_i . O_i, accumulated in double
          const T *a = dO.at(b, h, i), *c = O.at(b, h, i);
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += static_cast<double>(a[d]) * c[d];
          delta[i] = static_cast<T>(s);
        }
        const T* lse_h = LSE.at(b, h);
        T* dq_h = dQ.at(b, h);
        for (int64_t m = 0; m < L; m += kQueryTile) {
          const int64_t qb = std::min(kQueryTile, L - m);
          for_each_piece(causal, m, qb, S, [&](int64_t n, int64_t kb, int64_t i0, int64_t i1, int64_t kc) {
            const int64_t rows = i1 - i0;
            T* p = p_buf.data() + i0 * kb;
            T* dp = dp_buf.data() + i0 * kb;
            const T* q_rows = Q.at(b, h, m + i0);
            const T* do_rows = dO.at(b, h, m + i0);
            gemm('T', 'N', kc, rows, D, scale, K.at(b, hk, n), K.row, q_rows, Q.row, T(0), p, kb);  // scores
            gemm('T', 'N', kc, rows, D, T(1), V.at(b, hk, n), V.row, do_rows, dO.row, T(0), dp, kb);  // dO V^T
            for (int64_t i = i0; i < i1; ++i) {  // P = exp(scores - lse), dS = P * (dP - delta)
              T* pr = p + (i - i0) * kb;
              T* dpr = dp + (i - i0) * kb;
              const int64_t len = visible(causal, m, i, n, kb);
              exp_shifted(pr, len, lse_h[(m + i) * LSE.row]);
              std::fill(pr + len, pr + kc, T(0));
              const Vec dl(delta[m + i]);
              int64_t j = 0;
              for (; j + Vec::size() <= kc; j += Vec::size()) {
                (Vec::loadu(pr + j) * (Vec::loadu(dpr + j) - dl)).store(dpr + j);
              }
              for (; j < kc; ++j) dpr[j] = pr[j] * (dpr[j] - delta[m + i]);
            }
            // dV += P^T dO;  dQ += scale dS K;  dK += scale dS^T Q
            gemm('N', 'T', D, kc, rows, T(1), do_rows, dO.row, p, kb, T(1), dv_h + n * dV.row, dV.row);
            gemm('N', 'N', D, rows, kc, scale, K.at(b, hk, n), K.row, dp, kb, T(1), dq_h + (m + i0) * dQ.row,
                 dQ.row);
            gemm('N', 'T', D, kc, rows, scale, q_rows, Q.row, dp, kb, T(1), dk_h + n * dK.row, dK.row);
          });
        }
      }
    }
  });
}

}  // namespace

// Folds softmax(scale * q k^T) v into the running sums, in place: out (B, H, L, D) and lse (B, H, L) hold the
// attention of these queries over the keys seen so far (out = 0 and lse = -inf where none), and on return
// over those keys and k too. The earlier keys act as one more key, of score lse and value out, so the merge
// is the kernel's own online softmax. A query that sees no key of k keeps its sums.
void flash_forward_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, bool causal, double scale_) {
  check_qkv(q, k, v);
  check(out, "out", q.sizes(), q.scalar_type()), check(lse, "lse", q.sizes().slice(0, 3), q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_forward_", [&] {
    forward_impl<scalar_t>(q, k, v, out, lse, causal, scale_);
  });
}

// Adds this block's gradients into dq (B, H, L, D), dk and dv (B, Hkv, S, D), in place, given the output
// gradient and the *final* out and lse of these queries (over every key, not only k's).
void flash_backward_(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv, bool causal, double scale_) {
  check_qkv(q, k, v);
  const auto dtype = q.scalar_type();
  check(dout, "dout", q.sizes(), dtype), check(out, "out", q.sizes(), dtype);
  check(lse, "lse", q.sizes().slice(0, 3), dtype);
  check(dq, "dq", q.sizes(), dtype), check(dk, "dk", k.sizes(), dtype), check(dv, "dv", k.sizes(), dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "flash_backward_", [&] {
    backward_impl<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, causal, scale_);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_", &flash_forward_, "fold a block into the running (out, lse), in place");
  m.def("backward_", &flash_backward_, "add a block's gradients into (dq, dk, dv), in place");
}
