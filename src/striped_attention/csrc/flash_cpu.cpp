// Flash attention for CPU, float32 and float64, forward and backward, with the log-sum-exp.
//
// Shapes: q (B, H, L, D); k, v (B, Hkv, S, D), H % Hkv == 0 (GQA); out like q; lse (B, H, L).
// Every operand may be strided, with unit stride along D; all share one dtype. Causal masking is top-left
// aligned: query i sees keys 0..i. A window (sliding windows, the bands of a layout's pieces) also keeps query i
// to the keys j > i - window.
//
// Tiled like torch's CPU flash kernel: 256 queries at a time, against 512 keys at a time, an online softmax
// between the products. Under a causal mask a query tile [m, m + 256) sees the keys before m whole (dense
// chunks) and a triangle of the 256 keys from m on: the diagonal square. That square is where causal blocks
// lose time - torch's kernel computes it whole, twice its work - and a striped ring has one in every step's
// block, where zigzag has dense rectangles. Here register-blocked products compute it strip by strip, each strip
// only as far as its last row sees: half the square's work, so a causal block costs 0.50-0.51 of a full one
// (benchmarks/kernels.py measures it). The dense chunks go to BLAS, or, on AMD processors, where they are faster
// than torch's MKL, to the same register blocks (register_chunks_by_default).
//
// Threads: torch's intra-op threads (torch.set_num_threads) take the forward's (batch, head, query tile) tasks
// one at a time; the backward's task is a (batch, kv head) pair, cut into parts of equal work with spare dK/dV
// where there are fewer pairs than threads. Inside the threads' parallel region BLAS runs single-threaded.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

// Fortran BLAS, as torch's CPU library exports it (MKL or OpenBLAS).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc);

namespace {

// While a kernel task runs: denormal floats flushed to zero (FTZ) and read as zero (DAZ), then the caller's
// mode back. Peaked attention makes many probabilities, and products of them, below 1e-38, and each denormal
// costs a microcode assist in the products: with scores of standard deviation 30, a backward pass ran 1.3x
// slower without this (20x where the exp itself returned denormals). No sum the kernel forms can hold them.
#if defined(__x86_64__) || defined(_M_X64)
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
};
#else
struct FlushDenormals {};
#endif

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kQueryTile = 256;
constexpr int64_t kKeyTile = 512;
static_assert(kQueryTile <= kKeyTile, "a score row holds a chunk of keys or the diagonal square");
// The forward's softmax shift trails the running maximum by up to this much (natural log units): terms of at
// most e^8 ~ 3000 cannot overflow (float32 sums of them overflow only past 1e35 keys), and the shift, with
// the rescaling of the row's output, moves only on the rare chunk whose scores exceed it by more.
constexpr double kShiftSlack = 8.0;

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
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V lowest(-std::numeric_limits<T>::infinity());
  V acc[4] = {lowest, lowest, lowest, lowest};  // independent chains: short rows are latency-bound
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W)
    for (int u = 0; u < 4; ++u) acc[u] = at::vec::maximum(acc[u], V::loadu(row + j + u * W));
  for (; j + W <= len; j += W) acc[0] = at::vec::maximum(acc[0], V::loadu(row + j));
  if (j < len) acc[1] = at::vec::maximum(acc[1], V::set(lowest, V::loadu(row + j, len - j), len - j));
  const V all = at::vec::maximum(at::vec::maximum(acc[0], acc[1]), at::vec::maximum(acc[2], acc[3]));
  return at::vec::vec_reduce_all<T>([](V& x, V& y) { return at::vec::maximum(x, y); }, all);
}

// exp(x - shift), lane by lane: 0 below 2^-125 (never a denormal) and for -inf, inf far above, NaN stays NaN.
// With AVX-512, for float: 2^n 2^f, where (x - shift) log2(e) = n + f, |f| <= 1/2, 2^f from a degree-5
// polynomial (relative error 2.4e-7, about 4 ulp; coefficients fitted for relative error on [-1/2, 1/2]) and
// 2^n applied by vscalefps: half the instructions of Vectorized::exp_u20 (20 ulp). Elsewhere exp_u20, whose
// float versions would turn NaN into a large number.
template <typename T>
Vec<T> exp_minus(const Vec<T>& x, const Vec<T>& shift) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(x, shift), _mm512_set1_ps(1.44269504088896341f));
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(192.f), scaled);  // min(a, NaN) is NaN
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.32764713e-3f), f, _mm512_set1_ps(9.67554096e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55071309e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40221202e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93146944e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000012f));
    const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.f), _CMP_NLE_UQ);  // NaN included
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
#endif
  const Vec<T> d = x - shift;
  return Vec<T>::blendv(d.exp_u20(), d, d.isnan());
}

// row[0:len] <- exp(row[0:len] - shift); returns their sum.
template <typename T>
T exp_shifted(T* row, int64_t len, T shift) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V s(shift);
  V acc[4] = {V(T(0)), V(T(0)), V(T(0)), V(T(0))};  // independent chains, as in row_max
  auto step = [&](int64_t j, V& sum) {
    const V e = exp_minus(V::loadu(row + j), s);
    e.store(row + j);
    sum = sum + e;
  };
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W)
    for (int u = 0; u < 4; ++u) step(j + u * W, acc[u]);
  for (; j + W <= len; j += W) step(j, acc[0]);
  if (j < len) {
    V e = exp_minus(V::loadu(row + j, len - j), s);
    e.store(row + j, len - j);
    acc[1] = acc[1] + V::set(V(T(0)), e, len - j);
  }
  const V all = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  return at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, all);
}

// a . b over n elements, accumulated in double in 8 independent partial sums (no chain of dependent adds).
template <typename T>
T dot_in_double(const T* a, const T* b, int64_t n) {
  double part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) part[u] += static_cast<double>(a[d + u]) * b[d + u];
  for (; d < n; ++d) part[0] += static_cast<double>(a[d]) * b[d];
  double sum = 0.0;
  for (double x : part) sum += x;
  return static_cast<T>(sum);
}

// ---------------------------------------------------------------------------------------------------------
// Staircases: query tile rows [m, m + qb) against keys [n, n + kw), row i seeing the first min(before + i + 1, kw)
// of them. The square on the causal diagonal is one (n = m, before = 0): BLAS would compute the whole square
// (twice the work) or thin slices of it (slow shapes), so these register-blocked products compute it strip by
// strip, each strip only as far as its last row sees: about half the square's work. A chunk every row sees
// whole is one too (before = kw), computed by them where they beat BLAS (register_chunks_by_default). Rows of P
// (and dS) are kept valid - true value or zero - up to kPad keys past the row's last visible key, so strips of
// up to kPad + 1 rows may read them whole.
// ---------------------------------------------------------------------------------------------------------

// Register blocks: a score strip holds kScoreRows x kPanel accumulators, an accumulating strip kStripRows x
// kStripVectors, plus the vectors they stream. AVX-512 has 32 vector registers; AVX2 16, where the AVX-512
// blocks spill (a striped step's forward 7% and backward 4% slower, measured with MKL held to AVX2 too).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kScoreRows = 8, kPanel = 2, kStripRows = 6, kStripVectors = 4;
#else
constexpr int kScoreRows = 6, kPanel = 2, kStripRows = 4, kStripVectors = 3;
#endif
constexpr int64_t kPad = kStripRows - 1;

// The chunks every row sees whole go, by default, to the register blocks on AMD processors, where they beat torch's
// MKL (an AMD EPYC, AVX2 build: a full 4,096 x 4,096 block's forward 1.17x and backward 1.10x faster), and to
// BLAS elsewhere (an Intel Xeon: the AVX2 build's blocks 0.93-0.94x forward and 0.86-0.87x backward; the AVX-512
// build's no clear gain, full blocks 0.97-1.10x forward and 1.05-1.13x backward but causal ones 0.99-1.06x and
// 0.94-1.04x; README). AMD's AVX-512 machines are unmeasured and follow their vendor; builds without AVX2 keep
// BLAS. A call may choose either (register_chunks), which benchmarks/kernels.py --chunks compares.
bool register_chunks_by_default() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}
const bool kRegisterChunksByDefault = register_chunks_by_default();

template <typename T>
int64_t round_up(int64_t x) {
  return (x + Vec<T>::size() - 1) / Vec<T>::size() * Vec<T>::size();
}

// Calls f(std::integral_constant<int, n>) for a run-time n in [1, Max]: register blocks of every size compile.
template <int Max, typename F>
void with_constant(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_constant<Max - 1>(n, f);
  }
  f(std::integral_constant<int, Max>{});
}

// Panels of b^T for strip_scores: keys [c * P, (c + 1) * P) of b's first `cols` rows (row stride ldb), P =
// kPanel vectors, go to panel c, a (D x P) row-major block at bt + c * D * P, so a strip streams through
// it; zeros after cols. The square is the first product in its tile to read these rows, and the transposes'
// order (a cache line from each of 16 rows in turn) defeats the hardware prefetcher, so the rows two blocks
// ahead are prefetched by hand.
template <typename T>
void pack_panels(const T* b, int64_t ldb, int64_t cols, int64_t D, T* bt) {
  constexpr int64_t W = Vec<T>::size(), P = kPanel * W;
  auto at = [&](int64_t j, int64_t d) { return bt + (j / P) * D * P + d * P + j % P; };
  if (cols % P) {  // the last panel's columns after cols
    for (int64_t d = 0; d < D; ++d) std::fill(at(cols, d), at(cols - cols % P, d) + P, T(0));
  }
  int64_t j = 0;
  for (; j + W <= cols; j += W) {
    for (int64_t r = j + 2 * W; r < std::min(j + 3 * W, cols); ++r)
      for (int64_t d = 0; d < D; d += 64 / sizeof(T)) __builtin_prefetch(b + r * ldb + d);
    int64_t d = 0;
    for (; d + W <= D; d += W) at::vec::transpose_mxn<T, W, W>(b + j * ldb + d, ldb, at(j, d), P);
    for (; d < D; ++d)
      for (int64_t jj = j; jj < j + W; ++jj) *at(jj, d) = b[jj * ldb + d];
  }
  for (; j < cols; ++j)
    for (int64_t d = 0; d < D; ++d) *at(j, d) = b[j * ldb + d];
}

// s[r][0, w) = scale * a[r] . b[0, w) for R rows of a (row stride lda), b packed by pack_panels; w a multiple
// of the vector size. Accumulators: R x kPanel vectors.
template <typename T, int R>
void strip_scores(const T* a, int64_t lda, const T* bt, int64_t D, int64_t w, T scale, T* s, int64_t lds) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> sc(scale);
  for (int64_t j = 0; j < w; j += kPanel * W, bt += D * kPanel * W) {
    with_constant<kPanel>(std::min<int64_t>(kPanel, (w - j) / W), [&](auto NV) {
      Vec<T> acc[R][NV];
      for (int r = 0; r < R; ++r) for (int c = 0; c < NV; ++c) acc[r][c] = Vec<T>(T(0));
      for (int64_t d = 0; d < D; ++d) {
        Vec<T> bv[NV];
        for (int c = 0; c < NV; ++c) bv[c] = Vec<T>::loadu(bt + d * kPanel * W + c * W);
        for (int r = 0; r < R; ++r) {
          const Vec<T> x(a[r * lda + d]);
          for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(x, bv[c], acc[r][c]);
        }
      }
      for (int r = 0; r < R; ++r) for (int c = 0; c < NV; ++c) (acc[r][c] * sc).store(s + r * lds + j + c * W);
    });
  }
}

// One chunk of NV vectors of D (the last one `tail` wide unless Whole) of out[r] += sum_j p[r * ldp + j * ldj] x[j],
// for R outputs r and `count` terms j: P x with ldj = 1 (rows of P), P^T x with ldp = 1 (columns of P).
template <typename T, int R, int NV, bool Whole>
void strip_chunk(const T* p, int64_t ldp, int64_t ldj, const T* x, int64_t ldx, int64_t count, int64_t tail,
                 T* out, int64_t ldo) {
  constexpr int64_t W = Vec<T>::size();
  auto load = [tail](const T* ptr, int c) {
    return Whole || c + 1 < NV ? Vec<T>::loadu(ptr) : Vec<T>::loadu(ptr, tail);
  };
  Vec<T> acc[R][NV];  // the chunk's own sums, added to out at the end (as BLAS does): a long chunk's small
  for (int r = 0; r < R; ++r)  // terms, added one by one to out's large running sums, would lose their bits
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec<T>(T(0));
  for (int64_t j = 0; j < count; ++j) {
    Vec<T> xs[NV];
    for (int c = 0; c < NV; ++c) xs[c] = load(x + j * ldx + c * W, c);
    for (int r = 0; r < R; ++r) {
      const Vec<T> pr(p[r * ldp + j * ldj]);
      for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(pr, xs[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) {
      const Vec<T> sum = load(out + r * ldo + c * W, c) + acc[r][c];
      if (Whole || c + 1 < NV) sum.store(out + r * ldo + c * W);
      else sum.store(out + r * ldo + c * W, tail);
    }
}

// out[r][0, D) += sum_{j < count} p[r * ldp + j * ldj] x[j][0, D), for R outputs, D in chunks of kStripVectors
// vectors.
template <typename T, int R>
void strip_accumulate(const T* p, int64_t ldp, int64_t ldj, const T* x, int64_t ldx, int64_t count, int64_t D,
                      T* out, int64_t ldo) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t d = 0; d < D; d += kStripVectors * W) {
    const int64_t left = std::min<int64_t>(D - d, kStripVectors * W), nv = (left + W - 1) / W;
    const int64_t tail = left - (nv - 1) * W;
    auto chunk = [&](auto nv_, auto whole) {
      strip_chunk<T, R, decltype(nv_)::value, decltype(whole)::value>(p, ldp, ldj, x + d, ldx, count, tail, out + d, ldo);
    };
    using Whole = std::true_type;
    if (nv == kStripVectors && tail == W) chunk(std::integral_constant<int, kStripVectors>{}, Whole{});
    else with_constant<kStripVectors>(nv, [&](auto nv_) { chunk(nv_, std::false_type{}); });
  }
}

// s (qb x lds) <- scale * a b^T on a staircase: row i of a (qb rows) against rows [0, min(before + i + 1, kw))
// of b, computed at least that far (whole vectors). bt: scratch of panel_size(D, kw).
template <typename T>
void staircase_scores(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t qb, int64_t before, int64_t kw,
                      int64_t D, T scale, T* s, int64_t lds, T* bt) {
  pack_panels(b, ldb, kw, D, bt);
  for (int64_t r0 = 0; r0 < qb; r0 += kScoreRows) {
    const int64_t rows = std::min<int64_t>(kScoreRows, qb - r0), w = round_up<T>(std::min(kw, before + r0 + rows));
    with_constant<kScoreRows>(rows, [&](auto R) {
      strip_scores<T, R>(a + r0 * lda, lda, bt, D, w, scale, s + r0 * lds, lds);
    });
  }
}

// out[i] += sum_j p[i][j] x[j] on a staircase (row i of p is valid up to staircase_valid(i, before, kw) keys).
template <typename T>
void staircase_rows_times(const T* p, int64_t ldp, const T* x, int64_t ldx, int64_t qb, int64_t before, int64_t kw,
                          int64_t D, T* out, int64_t ldo) {
  for (int64_t r0 = 0; r0 < qb; r0 += kStripRows) {
    const int64_t rows = std::min<int64_t>(kStripRows, qb - r0), count = std::min(kw, before + r0 + rows);
    with_constant<kStripRows>(rows, [&](auto R) {
      strip_accumulate<T, R>(p + r0 * ldp, ldp, 1, x, ldx, count, D, out + r0 * ldo, ldo);
    });
  }
}

// out[j] += sum_i p[i][j] x[i] on a staircase: key j gets rows i >= j - before.
template <typename T>
void staircase_transposed_times(const T* p, int64_t ldp, const T* x, int64_t ldx, int64_t qb, int64_t before,
                                int64_t kw, int64_t D, T* out, int64_t ldo) {
  for (int64_t j0 = 0; j0 < kw; j0 += kStripRows) {
    const int64_t keys = std::min<int64_t>(kStripRows, kw - j0), r = std::clamp<int64_t>(j0 - before, 0, qb);
    with_constant<kStripRows>(keys, [&](auto R) {
      strip_accumulate<T, R>(p + r * ldp + j0, 1, ldp, x + r * ldx, ldx, qb - r, D, out + j0 * ldo, ldo);
    });
  }
}

// The keys of a staircase row i sees, and how far its row of P is kept valid.
inline int64_t staircase_len(int64_t i, int64_t before, int64_t kw) { return std::min(before + i + 1, kw); }
inline int64_t staircase_valid(int64_t i, int64_t before, int64_t kw) { return std::min(before + i + 1 + kPad, kw); }

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

// A scratch buffer of n elements starting on a cache line, so whole-vector loads never straddle two.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : storage_(n + 64 / sizeof(T)) {
    void* p = storage_.data();
    size_t space = storage_.size() * sizeof(T);
    data_ = static_cast<T*>(std::align(64, n * sizeof(T), p, space));
  }
  T* data() const { return data_; }

 private:
  std::vector<T> storage_;
  T* data_;
};

// Tasks handed out one at a time to torch's intra-op threads, each thread taking the next as it finishes one:
// causal tiles differ in work, and a static split would leave threads idle. Every task writes memory no other
// task touches, so the result does not depend on which thread ran which.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  int64_t threads() const { return std::min<int64_t>(n_, at::get_num_threads()); }  // for at::parallel_for
  bool take(int64_t& task) {
    task = next_.fetch_add(1, std::memory_order_relaxed);
    return task < n_;
  }

 private:
  const int64_t n_;
  std::atomic<int64_t> next_{0};
};

// The elements of the panels staircase_scores packs kw keys into (kw rounded up to whole panels, times D).
template <typename T>
int64_t panel_size(int64_t D, int64_t kw) {
  return D * (round_up<T>(kw) + kPanel * Vec<T>::size());
}

inline int64_t query_tiles(int64_t L) { return (L + kQueryTile - 1) / kQueryTile; }  // the last may be short

// The keys each query of a call sees: row i sees keys [first(i), end(i)) of S. Causal: end(i) = i + 1. A
// window (a sliding window, or a band of a layout's piece): first(i) = i - window + 1, any window without a
// causal mask (<= 0 too: the keys from i + 1 - window on), >= 1 with one.
struct Band {
  bool causal, windowed;
  int64_t window, S;
  int64_t first(int64_t i) const { return windowed ? std::clamp<int64_t>(i - window + 1, 0, S) : 0; }
  int64_t end(int64_t i) const { return causal ? std::clamp<int64_t>(i + 1, 0, S) : S; }
};

// The keys [0, dense) every query of the tile [m, m + qb) sees whole, and the width of the diagonal square
// after them (its first row sees one key of it, its last min(qb, kw)). Without a mask: every key, no square.
inline int64_t dense_keys(bool causal, int64_t m, int64_t S) { return causal ? std::min(m, S) : S; }
inline int64_t diagonal_keys(bool causal, int64_t m, int64_t qb, int64_t S) {
  return causal ? std::clamp<int64_t>(S - m, 0, qb) : 0;
}

// The work of the query tile [m, m + qb), piece by piece, each on at most kKeyTile keys:
// - chunk(n, kb, first, end): BLAS products on the keys [n, n + kb), of which row i sees [first(i), end(i));
// - staircase(n, before, kw, len, valid): register-blocked products on the keys [n, n + kw), of which row i sees
//   the first len(i) = min(before + i + 1, kw); valid(i): how far its row of scores is kept valid (zeros after).
// The keys before the causal diagonal go by chunks (staircases with before = kw where register_chunks and every
// row sees the chunk whole, the usual case), then the square on the diagonal is a staircase with before = 0.
// A window that cuts into the square leaves none: the tile's keys go by chunks, each row's own range of each.
template <typename Chunk, typename Staircase>
void for_each_piece(const Band& band, bool register_chunks, int64_t m, int64_t qb, Chunk&& chunk,
                    Staircase&& staircase) {
  const int64_t S = band.S, last = m + qb - 1;
  const bool square = band.causal && band.first(last) <= m;
  const int64_t from = band.first(m), to = square ? dense_keys(true, m, S) : band.end(last);
  const int64_t whole_from = band.first(last), whole_to = band.end(m);  // the keys every row of the tile sees
  auto stairs = [&staircase](int64_t n, int64_t before, int64_t kw) {
    staircase(n, before, kw, [before, kw](int64_t i) { return staircase_len(i, before, kw); },
              [before, kw](int64_t i) { return staircase_valid(i, before, kw); });
  };
  for (int64_t n = from; n < to; n += kKeyTile) {
    const int64_t kb = std::min(kKeyTile, to - n);
    if (n >= whole_from && n + kb <= whole_to) {
      if (register_chunks) stairs(n, kb, kb);
      else chunk(n, kb, [](int64_t) { return int64_t(0); }, [kb](int64_t) { return kb; });
    } else {
      chunk(n, kb, [&band, m, n, kb](int64_t i) { return std::clamp<int64_t>(band.first(m + i) - n, 0, kb); },
            [&band, m, n, kb](int64_t i) { return std::clamp<int64_t>(band.end(m + i) - n, 0, kb); });
    }
  }
  const int64_t kw = square ? diagonal_keys(true, m, qb, S) : 0;
  if (kw > 0) stairs(m, 0, kw);
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, const Band& band, bool register_chunks, double scale_) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t group = H / k.size(1), tiles = query_tiles(L);
  const int64_t ld = round_up<T>(std::min(kKeyTile, S));  // score rows; the diagonal is narrower (kQueryTile)
  const T scale = static_cast<T>(scale_);
  const Strided<T> Q(q), K(k), V(v), O(out), LSE(lse);

  TaskQueue queue(B * H * tiles);
  at::parallel_for(0, queue.threads(), 1, [&](int64_t, int64_t) {
    const FlushDenormals ftz;
    Scratch<T> scores(std::min(kQueryTile, L) * ld), packed(panel_size<T>(D, std::min(kKeyTile, S)));
    std::vector<T> shift(kQueryTile), row_sum(kQueryTile);
    for (int64_t task; queue.take(task);) {
      const int64_t t = task % tiles, bh = task / tiles, b = bh / H, h = bh % H, hk = h / group;
      const int64_t m = t * kQueryTile, qb = std::min(kQueryTile, L - m);
      T* o = O.at(b, h, m);
      T* l = LSE.at(b, h, m);
      for (int64_t i = 0; i < qb; ++i) {
        shift[i] = l[i * LSE.row];
        row_sum[i] = shift[i] == -std::numeric_limits<T>::infinity() ? T(0) : T(1);  // out has weight 1
      }
      // The online softmax over the scores of row i's keys [first(i), end(i)); zeros elsewhere, up to valid(i).
      // row_sum[i] and out's row i hold sum exp(score - shift[i]) and sum exp(score - shift[i]) v over the keys
      // so far; any shift is exact, and it need not be the running maximum as long as no term can overflow.
      auto fold = [&](auto first, auto end, auto valid) {
        for (int64_t i = 0; i < qb; ++i) {
          T* row = scores.data() + i * ld;
          const int64_t a = first(i), n = end(i) - a;
          std::fill(row, row + a, T(0));
          if (n <= 0) {  // no key of this chunk
            std::fill(row + a, row + valid(i), T(0));
            continue;
          }
          T* r = row + a;
          const T top = row_max(r, n);
          if (top > shift[i] + kShiftSlack) {  // the shift moves only when a score would overflow its slack
            const T rescale = std::exp(shift[i] - top);
            row_sum[i] *= rescale;
            shift[i] = top;
            T* oi = o + i * O.row;
            for (int64_t d = 0; d < D; ++d) oi[d] *= rescale;
          }
          row_sum[i] += exp_shifted(r, n, shift[i]);
          std::fill(row + a + n, row + valid(i), T(0));
        }
      };
      auto blas_chunk = [&](int64_t n, int64_t kb, auto first, auto end) {
        gemm('T', 'N', kb, qb, D, scale, K.at(b, hk, n), K.row, Q.at(b, h, m), Q.row, T(0), scores.data(), ld);
        fold(first, end, [kb](int64_t) { return kb; });
        gemm('N', 'N', D, qb, kb, T(1), V.at(b, hk, n), V.row, scores.data(), ld, T(1), o, O.row);
      };
      auto staircase = [&](int64_t n, int64_t before, int64_t kw, auto len, auto valid) {
        staircase_scores(Q.at(b, h, m), Q.row, K.at(b, hk, n), K.row, qb, before, kw, D, scale, scores.data(), ld,
                         packed.data());
        fold([](int64_t) { return int64_t(0); }, len, valid);
        staircase_rows_times(scores.data(), ld, V.at(b, hk, n), V.row, qb, before, kw, D, o, O.row);
      };
      for_each_piece(band, register_chunks, m, qb, blas_chunk, staircase);
      for (int64_t i = 0; i < qb; ++i) {
        if (row_sum[i] == T(0)) continue;  // no key seen, before or now
        const T inv = T(1) / row_sum[i];
        T* oi = o + i * O.row;
        for (int64_t d = 0; d < D; ++d) oi[d] *= inv;
        l[i * LSE.row] = shift[i] + std::log(row_sum[i]);
      }
    }
  });
}

constexpr int64_t kSpareBytes = int64_t(256) << 20;  // the most the backward allocates for spare dK/dV

// Boundaries of `parts` runs of a kv head's (query head, query tile) items, item = head * tiles + tile, of about
// equal work (a causal tile's work grows with the keys it sees): cut[p] .. cut[p + 1] is part p.
inline std::vector<int64_t> cut_by_work(const Band& band, int64_t L, int64_t tiles, int64_t group,
                                        int64_t parts) {
  std::vector<double> done(group * tiles + 1, 0.0);  // work of the items before each one
  for (int64_t item = 0; item < group * tiles; ++item) {
    const int64_t m = item % tiles * kQueryTile, qb = std::min(kQueryTile, L - m);
    const double keys = 0.5 * (std::max<int64_t>(0, band.end(m) - band.first(m)) +
                               std::max<int64_t>(0, band.end(m + qb - 1) - band.first(m + qb - 1)));
    done[item + 1] = done[item] + qb * (keys + 64);  // + 64: a tile's own cost, as if it saw 64 more keys
  }
  std::vector<int64_t> cut(parts + 1, group * tiles);
  for (int64_t p = 0, item = 0; p < parts; ++p) {
    while (done[item] < done.back() * p / parts) ++item;
    cut[p] = item;
  }
  return cut;
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, const Band& band, bool register_chunks, double scale_) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t group = H / Hkv, ld = round_up<T>(std::min(kKeyTile, S));
  const T scale = static_cast<T>(scale_);
  const Strided<T> Q(q), K(k), V(v), dO(dout), O(out), LSE(lse), dQ(dq), dK(dk), dV(dv);
  if (B == 0 || L == 0 || S == 0) return;  // no query or no key: nothing to add

  // A task is a part of the (query head, query tile) items of one (batch, kv head) pair, and owns its dQ rows. Part 0
  // adds into the pair's dK/dV; with fewer pairs than threads, each pair is cut into parts of equal work, and
  // parts 1.. add into zeroed spares (at most kSpareBytes of them) that are summed into dK/dV after, in part
  // order: tasks never write the same memory, and one thread count always gives the same result.
  const int64_t tiles = query_tiles(L), items = group * tiles, pairs = B * Hkv;
  const int64_t threads = at::get_num_threads();
  const int64_t part_bytes = std::max<int64_t>(1, pairs * 2 * S * D * int64_t(sizeof(T)));  // a part's spares
  const int64_t parts =
      pairs >= threads ? 1 : std::min({items, (threads + pairs - 1) / pairs, 1 + kSpareBytes / part_bytes});
  const std::vector<int64_t> cut = cut_by_work(band, L, tiles, group, parts);
  std::vector<T> spares((parts - 1) * pairs * 2 * S * D);  // dK then dV of (part, pair), rows of D; zeros
  auto spare_of = [&](int64_t part, int64_t pair) { return spares.data() + ((part - 1) * pairs + pair) * 2 * S * D; };
  TaskQueue queue(pairs * parts);
  at::parallel_for(0, queue.threads(), 1, [&](int64_t, int64_t) {
    const FlushDenormals ftz;
    const int64_t tile = std::min(kQueryTile, L) * ld;  // small blocks, small buffers
    Scratch<T> p_buf(tile), ds_buf(tile), packed(panel_size<T>(D, std::min(kKeyTile, S)));
    std::vector<T> delta(kQueryTile);
    T *p = p_buf.data(), *ds = ds_buf.data();
    for (int64_t task; queue.take(task);) {
      const int64_t pair = task / parts, part = task % parts, b = pair / Hkv, hk = pair % Hkv;
      T* dk_h = part == 0 ? dK.at(b, hk) : spare_of(part, pair);
      T* dv_h = part == 0 ? dV.at(b, hk) : spare_of(part, pair) + S * D;
      const int64_t ldk = part == 0 ? dK.row : D, ldv = part == 0 ? dV.row : D;
      for (int64_t item = cut[part]; item < cut[part + 1]; ++item) {
        const int64_t h = hk * group + item / tiles, m = item % tiles * kQueryTile, qb = std::min(kQueryTile, L - m);
        for (int64_t i = 0; i < qb; ++i) delta[i] = dot_in_double(dO.at(b, h, m + i), O.at(b, h, m + i), D);  // dO.O
        const T* q_rows = Q.at(b, h, m);
        const T* do_rows = dO.at(b, h, m);
        const T* lse_rows = LSE.at(b, h, m);
        T* dq_rows = dQ.at(b, h, m);
        // From scores (p) and dO V^T (ds), for row i's keys [first(i), end(i)): P = exp(scores - lse) and
        // dS = scale * P * (dP - delta); zeros elsewhere, up to valid(i).
        auto gradients = [&](auto first, auto end, auto valid) {
          for (int64_t i = 0; i < qb; ++i) {
            const int64_t a = first(i), n = std::max<int64_t>(0, end(i) - a);
            std::fill(p + i * ld, p + i * ld + a, T(0));
            std::fill(ds + i * ld, ds + i * ld + a, T(0));
            T* pr = p + i * ld + a;
            T* dsr = ds + i * ld + a;
            exp_shifted(pr, n, lse_rows[i * LSE.row]);
            const T di = delta[i];
            const Vec<T> dl(di), sc(scale);
            int64_t j = 0;
            for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
              (Vec<T>::loadu(pr + j) * (Vec<T>::loadu(dsr + j) - dl) * sc).store(dsr + j);
            }
            for (; j < n; ++j) dsr[j] = pr[j] * (dsr[j] - di) * scale;
            std::fill(pr + n, p + i * ld + valid(i), T(0));
            std::fill(dsr + n, ds + i * ld + valid(i), T(0));
          }
        };
        auto blas_chunk = [&](int64_t n, int64_t kb, auto first, auto end) {
          gemm('T', 'N', kb, qb, D, scale, K.at(b, hk, n), K.row, q_rows, Q.row, T(0), p, ld);  // scores
          gemm('T', 'N', kb, qb, D, T(1), V.at(b, hk, n), V.row, do_rows, dO.row, T(0), ds, ld);  // dO V^T
          gradients(first, end, [kb](int64_t) { return kb; });
          // dV += P^T dO;  dQ += dS K;  dK += dS^T Q
          gemm('N', 'T', D, kb, qb, T(1), do_rows, dO.row, p, ld, T(1), dv_h + n * ldv, ldv);
          gemm('N', 'N', D, qb, kb, T(1), K.at(b, hk, n), K.row, ds, ld, T(1), dq_rows, dQ.row);
          gemm('N', 'T', D, kb, qb, T(1), q_rows, Q.row, ds, ld, T(1), dk_h + n * ldk, ldk);
        };
        auto staircase = [&](int64_t n, int64_t before, int64_t kw, auto len, auto valid) {  // the same products
          staircase_scores(q_rows, Q.row, K.at(b, hk, n), K.row, qb, before, kw, D, scale, p, ld, packed.data());
          staircase_scores(do_rows, dO.row, V.at(b, hk, n), V.row, qb, before, kw, D, T(1), ds, ld, packed.data());
          gradients([](int64_t) { return int64_t(0); }, len, valid);
          staircase_transposed_times(p, ld, do_rows, dO.row, qb, before, kw, D, dv_h + n * ldv, ldv);
          staircase_rows_times(ds, ld, K.at(b, hk, n), K.row, qb, before, kw, D, dq_rows, dQ.row);
          staircase_transposed_times(ds, ld, q_rows, Q.row, qb, before, kw, D, dk_h + n * ldk, ldk);
        };
        for_each_piece(band, register_chunks, m, qb, blas_chunk, staircase);
      }
    }
  });
  if (parts > 1) {  // dK/dV += the spares, part by part
    at::parallel_for(0, pairs * S, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t pair = row / S, j = row % S;
        T* dk_row = dK.at(pair / Hkv, pair % Hkv, j);
        T* dv_row = dV.at(pair / Hkv, pair % Hkv, j);
        for (int64_t part = 1; part < parts; ++part) {
          const T* spare = spare_of(part, pair) + j * D;
          for (int64_t d = 0; d < D; ++d) dk_row[d] += spare[d];
          for (int64_t d = 0; d < D; ++d) dv_row[d] += spare[S * D + d];
        }
      }
    });
  }
}

Band band_of(bool causal, std::optional<int64_t> window, int64_t S) {
  TORCH_CHECK(!causal || !window || *window >= 1, "a causal window must be at least 1");
  return Band{causal, window.has_value(), window.value_or(0), S};
}

void check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse) {
  check_qkv(q, k, v);
  check(out, "out", q.sizes(), q.scalar_type()), check(lse, "lse", q.sizes().slice(0, 3), q.scalar_type());
}

void check_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                    const at::Tensor& dv) {
  check_forward(q, k, v, out, lse);
  check(dout, "dout", q.sizes(), q.scalar_type()), check(dq, "dq", q.sizes(), q.scalar_type());
  check(dk, "dk", k.sizes(), q.scalar_type()), check(dv, "dv", k.sizes(), q.scalar_type());
}

// A table of pieces (P, 9) int64, a row each: batch rows [b0, b1), queries [q0, q1), keys [k0, k1), causal,
// windowed, window. One call for a ring step's pieces: packed documents give many small ones, each of which
// would otherwise pay a Python call.
struct Piece {
  int64_t b0, b1, q0, q1, k0, k1;
  Band band;
  // the piece's part of a (B, H, len, ...) tensor indexed like the queries, or like the keys
  at::Tensor queries(const at::Tensor& t) const { return t.narrow(0, b0, b1 - b0).narrow(2, q0, q1 - q0); }
  at::Tensor keys(const at::Tensor& t) const { return t.narrow(0, b0, b1 - b0).narrow(2, k0, k1 - k0); }
};

std::vector<Piece> pieces_of(const at::Tensor& table, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 9,
              "pieces must be a CPU int64 tensor of shape (P, 9)");
  const at::Tensor rows = table.contiguous();
  const int64_t* r = rows.data_ptr<int64_t>();
  std::vector<Piece> pieces;
  for (int64_t i = 0; i < rows.size(0); ++i, r += 9) {
    TORCH_CHECK(0 <= r[0] && r[0] <= r[1] && r[1] <= q.size(0) && 0 <= r[2] && r[2] <= r[3] && r[3] <= q.size(2) &&
                    0 <= r[4] && r[4] <= r[5] && r[5] <= k.size(2),
                "piece ", i, " reaches outside q or k");
    const std::optional<int64_t> window = r[7] ? std::optional<int64_t>(r[8]) : std::nullopt;
    if (r[1] > r[0] && r[3] > r[2] && r[5] > r[4]) pieces.push_back({r[0], r[1], r[2], r[3], r[4], r[5],
                                                                      band_of(r[6] != 0, window, r[5] - r[4])});
  }
  return pieces;
}

}  // namespace

// Folds softmax(scale * q k^T) v into the running sums, in place: out (B, H, L, D) and lse (B, H, L) hold the
// attention of these queries over the keys seen so far (out = 0 and lse = -inf where none), and on return
// over those keys and k too. The earlier keys act as one more key, of score lse and value out, so the merge
// is the kernel's own online softmax. A query that sees no key of k keeps its sums. Query i sees key j iff
// j <= i (causal) and i - j < window (a window given).
void flash_forward_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, bool causal, double scale_, std::optional<int64_t> window,
                    std::optional<bool> register_chunks) {
  check_forward(q, k, v, out, lse);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_forward_", [&] {
    forward_impl<scalar_t>(q, k, v, out, lse, band_of(causal, window, k.size(2)),
                           register_chunks.value_or(kRegisterChunksByDefault), scale_);
  });
}

// Adds this block's gradients into dq (B, H, L, D), dk and dv (B, Hkv, S, D), in place, given the output
// gradient and the *final* out and lse of these queries (over every key, not only k's).
void flash_backward_(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv, bool causal, double scale_, std::optional<int64_t> window,
                     std::optional<bool> register_chunks) {
  check_backward(dout, q, k, v, out, lse, dq, dk, dv);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_backward_", [&] {
    backward_impl<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, band_of(causal, window, k.size(2)),
                            register_chunks.value_or(kRegisterChunksByDefault), scale_);
  });
}

// flash_forward_ for each piece of a table (pieces_of), one after the other.
void flash_forward_pieces_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, const at::Tensor& pieces, double scale_,
                           std::optional<bool> register_chunks) {
  check_forward(q, k, v, out, lse);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_forward_pieces_", [&] {
    for (const Piece& p : pieces_of(pieces, q, k)) {
      forward_impl<scalar_t>(p.queries(q), p.keys(k), p.keys(v), p.queries(out), p.queries(lse), p.band,
                             register_chunks.value_or(kRegisterChunksByDefault), scale_);
    }
  });
}

// flash_backward_ for each piece of a table (pieces_of), one after the other.
void flash_backward_pieces_(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                            const at::Tensor& dv, const at::Tensor& pieces, double scale_,
                            std::optional<bool> register_chunks) {
  check_backward(dout, q, k, v, out, lse, dq, dk, dv);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_backward_pieces_", [&] {
    for (const Piece& p : pieces_of(pieces, q, k)) {
      backward_impl<scalar_t>(p.queries(dout), p.queries(q), p.keys(k), p.keys(v), p.queries(out), p.queries(lse),
                              p.queries(dq), p.keys(dk), p.keys(dv), p.band,
                              register_chunks.value_or(kRegisterChunksByDefault), scale_);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_", &flash_forward_, "fold a block into the running (out, lse), in place", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("causal"), py::arg("scale"), py::arg("window") = py::none(),
        py::arg("register_chunks") = py::none());
  m.def("backward_", &flash_backward_, "add a block's gradients into (dq, dk, dv), in place", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("causal"), py::arg("scale"), py::arg("window") = py::none(),
        py::arg("register_chunks") = py::none());
  m.def("forward_pieces_", &flash_forward_pieces_, "forward_ for each piece of a (P, 9) table, in place",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("pieces"), py::arg("scale"),
        py::arg("register_chunks") = py::none());
  m.def("backward_pieces_", &flash_backward_pieces_, "backward_ for each piece of a (P, 9) table, in place",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("pieces"), py::arg("scale"), py::arg("register_chunks") = py::none());
  m.attr("register_chunks") = kRegisterChunksByDefault;  // this machine's choice for the chunks every row sees whole
#ifdef INTRA_OP_PARALLEL
  m.attr("intra_op_parallel") = true;  // tasks run on torch's intra-op (OpenMP) threads
#else
  m.attr("intra_op_parallel") = false;  // built without OpenMP: one thread
#endif
}
