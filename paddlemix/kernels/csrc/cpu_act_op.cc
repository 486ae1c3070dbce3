// CPU operators for the two element-wise steps of a ViT block that Paddle's CPU
// kernels run far below memory speed (single-threaded, scalar; the README's
// Performance section has the measurements):
//
//   cpu_gelu(x)     exact (erf) GELU, x * Phi(x)
//   cpu_bias_gelu(x, b)  GELU(x + b), b along the last axis, in place on x (no gradient: inference)
//   cpu_split_heads(qkv, bias, scale)  [B, L, 3, H, D] (+ bias) -> q * scale, k, v as [B, H, L, D] (inference)
//   cpu_bias_residual(y, b, r)  r + (y + b), b along the last axis, in place on y: a linear
//                   layer's bias and the residual add after it in one pass (inference)
//   cpu_softmax(x)  softmax over the last axis
//   cpu_attention(qkv, bias, mask)  the attention core per head (with Paddle's bundled MKL only)
//   cpu_gemm_pack(w), cpu_packed_gemm(x, packed, bias)  a linear layer's weight packed once for
//                   MKL's GEMM and the products with it (with Paddle's bundled MKL only; inference)
//
// with their gradient operators. Both are float32 on CPU only: the kernel
// dispatch (paddlemix/kernels/dispatch.py) calls them for float32 CPU tensors in
// dynamic mode and uses Paddle's own ops everywhere else.
//
// The vector paths (cpu_act_rows.inc, compiled for AVX2+FMA and for AVX-512 and
// picked by CPUID at run time) evaluate exp and the normal CDF with their own
// polynomials:
//  * exp(r): range reduction r = x - n ln2 (ln2 split in two so n ln2 is exact),
//    then the degree-7 Taylor polynomial of e^r on |r| <= ln2/2 (truncation
//    error < 2e-9 relative) and 2^n through the exponent bits. Inputs below
//    -87.3 (where float32 e^x leaves the normal range) give exactly 0.
//  * Phi(x) = erfc(-x / sqrt2) / 2 from the Chebyshev-fitted form
//    erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), whose published
//    coefficients (Press et al., Numerical Recipes, sec. 6.2) give a
//    fractional error below 1.2e-7 for every z >= 0. Computing the tail
//    Phi(x) of negative x directly keeps its relative accuracy, which
//    1 + erf(x / sqrt2) would lose.
// Results agree with Paddle's kernels to ~1e-7 relative (tests/test_cpu_fast_paths.py).
// Rows/chunks are split over OpenMP threads; the tails of rows use the same
// math one lane at a time, so results do not depend on the thread count, and
// element-wise results not on the instruction set either.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "paddle/phi/api/all.h"
#include "simd_vec.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CPU_ACT_HAVE_X86 1
#include <immintrin.h>
#else
#define CPU_ACT_HAVE_X86 0
#endif

using paddle::DataType;
using paddle::Tensor;

namespace {

constexpr float kExpLo = -87.33654f;  // e^x underflows float32's normal range below this
constexpr float kExpHi = 88.0f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr int64_t kChunk = 8192;  // elements per OpenMP work item for element-wise ops

// ------------------------------------------------------------------ scalar math
// Used when the CPU lacks AVX2/FMA, and for the tails of rows (the vector formulas, one lane).
inline float ExpScalar(float x) {
  if (x < kExpLo) return 0.0f;
  x = std::min(x, kExpHi);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(-n, 0.693359375f, x);
  r = std::fma(-n, -2.12194440e-4f, r);
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  return std::ldexp(p, static_cast<int>(n));
}

// erfc(z) for z >= 0.
inline float ErfcScalar(float z) {
  const float t = 1.0f / std::fma(0.5f, z, 1.0f);
  float p = 0.17087277f;
  p = std::fma(p, t, -0.82215223f);
  p = std::fma(p, t, 1.48851587f);
  p = std::fma(p, t, -1.13520398f);
  p = std::fma(p, t, 0.27886807f);
  p = std::fma(p, t, -0.18628806f);
  p = std::fma(p, t, 0.09678418f);
  p = std::fma(p, t, 0.37409196f);
  p = std::fma(p, t, 1.00002368f);
  p = std::fma(p, t, -1.26551223f);
  return t * ExpScalar(std::fma(-z, z, p));
}

inline float PhiScalar(float x) {
  const float half_erfc = 0.5f * ErfcScalar(std::fabs(x) * kInvSqrt2);
  return x >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

inline float GeluScalar(float x) { return x * PhiScalar(x); }

inline float GeluGradScalar(float x, float dy) {
  const float pdf = kInvSqrt2Pi * ExpScalar(-0.5f * x * x);
  return dy * std::fma(x, pdf, PhiScalar(x));
}

// ------------------------------------------------------------- vector kernels
#if CPU_ACT_HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using Vec = paddlemix_simd::Avx2;
#include "cpu_act_rows.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")
namespace avx512 {
using Vec = paddlemix_simd::Avx512;
#include "cpu_act_rows.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa BestIsa() {
#if CPU_ACT_HAVE_X86
  static const Isa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
                             ? Isa::kAvx512
                             : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                                : Isa::kGeneric);
  return isa;
#else
  return Isa::kGeneric;
#endif
}

// ------------------------------------------------------------ generic kernels
void GeluForwardGeneric(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = GeluScalar(x[i]);
}

void BiasGeluRowGeneric(const float* x, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = GeluScalar(x[i] + b[i]);
}

void GeluBackwardGeneric(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = GeluGradScalar(x[i], dy[i]);
}

void SoftmaxRowGeneric(const float* x, float* y, int64_t n) {
  float m = -INFINITY, sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  for (int64_t i = 0; i < n; ++i) sum += (y[i] = ExpScalar(x[i] - m));
  for (int64_t i = 0; i < n; ++i) y[i] *= 1.0f / sum;
}

void SoftmaxGradRowGeneric(const float* y, const float* dy, float* dx, int64_t n) {
  float dot = 0.0f;
  for (int64_t i = 0; i < n; ++i) dot += y[i] * dy[i];
  for (int64_t i = 0; i < n; ++i) dx[i] = y[i] * (dy[i] - dot);
}

// --------------------------------------------------------------- operators
Tensor Checked(const Tensor& t, const char* op, const char* what) {
  PD_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor (the operator has no GPU kernel).");
  PD_CHECK(t.dtype() == DataType::FLOAT32, op, ": ", what, " must be float32.");
  return t.is_contiguous() ? t : t.contiguous();
}

// An operand the operator overwrites: it must already be a contiguous float32 CPU tensor.
void CheckedInPlace(const Tensor& t, const char* op, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == DataType::FLOAT32 && t.is_contiguous(), op, ": ", what,
           " (written in place) must be a contiguous float32 CPU tensor.");
}

// The widest kernel `name` the CPU runs: AVX-512, AVX2 + FMA, or `name##Generic` (same signature).
#if CPU_ACT_HAVE_X86
#define CPU_ACT_PICK(name) \
  (BestIsa() == Isa::kAvx512 ? avx512::name : BestIsa() == Isa::kAvx2 ? avx2::name : name##Generic)
#else
#define CPU_ACT_PICK(name) (name##Generic)
#endif

// fn(start, length) over [0, count) in pieces of `step`, split over OpenMP threads.
template <typename Fn>
void ForPieces(int64_t count, int64_t step, const Fn& fn) {
#pragma omp parallel for schedule(static)
  for (int64_t start = 0; start < count; start += step) fn(start, std::min(step, count - start));
}

std::vector<Tensor> GeluFwd(const Tensor& x_in) {
  const Tensor x = Checked(x_in, "cpu_gelu", "x");
  Tensor y = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  const float* px = x.data<float>();
  float* py = y.data<float>();
  const auto kernel = CPU_ACT_PICK(GeluForward);
  ForPieces(x.numel(), kChunk, [&](int64_t i, int64_t len) { kernel(px + i, py + i, len); });
  return {y};
}

std::vector<Tensor> GeluBwd(const Tensor& x_in, const Tensor& dy_in) {
  const Tensor x = Checked(x_in, "cpu_gelu_grad", "x");
  const Tensor dy = Checked(dy_in, "cpu_gelu_grad", "dy");
  Tensor dx = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  const float* px = x.data<float>();
  const float* pdy = dy.data<float>();
  float* pdx = dx.data<float>();
  const auto kernel = CPU_ACT_PICK(GeluBackward);
  ForPieces(x.numel(), kChunk, [&](int64_t i, int64_t len) { kernel(px + i, pdy + i, pdx + i, len); });
  return {dx};
}

int64_t LastDim(const Tensor& t, const char* op) {
  PD_CHECK(!t.shape().empty() && t.shape().back() > 0, op, ": x needs a non-empty last axis.");
  return t.shape().back();
}

// A fused qkv projection's output [B, L, 3, H, D] and its bias [3 H D] (when with_bias), checked.
// The data pointers are read once here: HeadVector runs once per token, head and part.
struct Qkv {
  Tensor qkv, bias;
  int64_t B, L, H, D;
  const float* data;
  const float* bias_data;  // nullptr without a bias
};

Qkv CheckedQkv(const Tensor& qkv_in, const Tensor& bias_in, bool with_bias, const char* op) {
  const Tensor qkv = Checked(qkv_in, op, "qkv");
  const auto& s = qkv.shape();
  PD_CHECK(s.size() == 5 && s[2] == 3, op, ": qkv must be [B, L, 3, H, D].");
  const int64_t H = s[3], D = s[4];
  const Tensor bias = with_bias ? Checked(bias_in, op, "bias") : bias_in;
  PD_CHECK(!with_bias || bias.numel() == 3 * H * D, op, ": bias must have 3 * H * D values.");
  return {qkv, bias, s[0], s[1], H, D, qkv.data<float>(), with_bias ? bias.data<float>() : nullptr};
}

// Token l of batch b, head h, part t (0: q, 1: k, 2: v) into `to` [D]: the bias added, q scaled.
inline void HeadVector(const Qkv& x, int64_t b, int64_t l, int64_t t, int64_t h, float scale, float* to) {
  const int64_t at = (t * x.H + h) * x.D;
  const float* from = x.data + (b * x.L + l) * 3 * x.H * x.D + at;
  const float* add = x.bias_data == nullptr ? nullptr : x.bias_data + at;
  for (int64_t d = 0; d < x.D; ++d) {
    const float v = add == nullptr ? from[d] : from[d] + add[d];
    to[d] = t == 0 ? v * scale : v;
  }
}

// qkv [B, L, 3, H, D] (+ bias [3 H D] when with_bias) -> q * scale, k, v, each [B, H, L, D]
// (contiguous), in one multi-threaded pass: the layout change attention needs before its two
// batched GEMMs, with the qkv projection's bias added on the way. Inference only.
std::vector<Tensor> SplitHeadsFwd(const Tensor& qkv_in, const Tensor& bias_in, float scale, bool with_bias) {
  const Qkv x = CheckedQkv(qkv_in, bias_in, with_bias, "cpu_split_heads");
  const int64_t B = x.B, L = x.L, H = x.H, D = x.D;
  std::vector<Tensor> out;
  for (int i = 0; i < 3; ++i) out.push_back(paddle::empty({B, H, L, D}, DataType::FLOAT32, x.qkv.place()));
  float* dst[3] = {out[0].data<float>(), out[1].data<float>(), out[2].data<float>()};
  ForPieces(B * L, 1, [&](int64_t row, int64_t) {
    const int64_t b = row / L, l = row % L;
    for (int64_t t = 0; t < 3; ++t) {
      for (int64_t h = 0; h < H; ++h) HeadVector(x, b, l, t, h, scale, dst[t] + ((b * H + h) * L + l) * D);
    }
  });
  return out;
}

// In place on x (a GEMM's output that nothing else reads): no second buffer of the block's widest
// activation. Inference only (no gradient operator): the kernel dispatch calls it when no
// gradient is needed.
void BiasGeluFwd(Tensor& x, const Tensor& b_in) {
  CheckedInPlace(x, "cpu_bias_gelu", "x");
  const Tensor b = Checked(b_in, "cpu_bias_gelu", "bias");
  const int64_t cols = LastDim(x, "cpu_bias_gelu");
  PD_CHECK(b.numel() == cols, "cpu_bias_gelu: bias has ", b.numel(), " values, x's last axis ", cols, ".");
  float* px = x.data<float>();
  const float* pb = b.data<float>();
  const auto kernel = CPU_ACT_PICK(BiasGeluRow);
  ForPieces(x.numel() / cols, 1, [&](int64_t r, int64_t) { kernel(px + r * cols, pb, px + r * cols, cols); });
}

// r + (y + b) with b along the last axis, in place on y (a GEMM's output that nothing else
// reads; any shape with r's numel): the bias add and the residual add that follow a block's
// last linear layer, in one multi-threaded pass instead of two single-threaded ones. Same two
// float32 additions in the same order as the separate ops (-ffp-contract=off), so the same
// bits. Inference only.
void BiasResidualFwd(Tensor& y, const Tensor& b_in, const Tensor& r_in) {
  CheckedInPlace(y, "cpu_bias_residual", "y");
  const Tensor b = Checked(b_in, "cpu_bias_residual", "bias");
  const Tensor r = Checked(r_in, "cpu_bias_residual", "residual");
  const int64_t cols = LastDim(r, "cpu_bias_residual");
  PD_CHECK(b.numel() == cols, "cpu_bias_residual: bias has ", b.numel(), " values, the residual's last axis ", cols, ".");
  PD_CHECK(y.numel() == r.numel(), "cpu_bias_residual: y has ", y.numel(), " values, the residual ", r.numel(), ".");
  float* py = y.data<float>();
  const float* pb = b.data<float>();
  const float* pr = r.data<float>();
  ForPieces(r.numel() / cols, 1, [&](int64_t row, int64_t) {
    const int64_t at = row * cols;
    for (int64_t c = 0; c < cols; ++c) py[at + c] = pr[at + c] + (py[at + c] + pb[c]);
  });
}

#if PADDLEMIX_CBLAS
// The single-precision GEMM of the CBLAS interface, from the MKL that Paddle bundles (linked by
// build_config.link_flags; declared here because its wheels ship the library without headers).
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

// qkv [B, L, 3, H, D] (+ bias [3 H D]) -> softmax(q k^T * scale + mask) v as [B, L, H * D]:
// the whole attention core of one head in one work item, its q, k, v, scores and output in
// the core's cache. Each step is the one the separate operators take (cpu_split_heads' bias,
// copy and q scaling; one sgemm per head for q k^T and for the probabilities times v, as
// Paddle's batched matmul calls it; the mask add; cpu_softmax's row kernel), so the result is
// theirs; the output is written straight into the [B, L, H * D] layout the projection reads,
// which saves the head merge. Inference only.
std::vector<Tensor> AttentionFwd(const Tensor& qkv_in, const Tensor& bias_in, const Tensor& mask_in, float scale,
                                 bool with_bias, bool with_mask) {
  const Qkv x = CheckedQkv(qkv_in, bias_in, with_bias, "cpu_attention");
  const int64_t B = x.B, L = x.L, H = x.H, D = x.D;
  const Tensor mask = with_mask ? Checked(mask_in, "cpu_attention", "mask") : mask_in;
  PD_CHECK(!with_mask || mask.numel() == L * L, "cpu_attention: the mask must be [L, L].");
  Tensor out = paddle::empty({B, L, H * D}, DataType::FLOAT32, x.qkv.place());
  const float* pm = with_mask ? mask.data<float>() : nullptr;
  float* po = out.data<float>();
  const auto softmax_row = CPU_ACT_PICK(SoftmaxRow);
  const int n = static_cast<int>(L), d = static_cast<int>(D), ldo = static_cast<int>(H * D);
#pragma omp parallel
  {
    std::vector<float> buf(static_cast<size_t>(3 * L * D + L * L));
    float* q = buf.data();
    float* k = q + L * D;
    float* v = k + L * D;
    float* scores = v + L * D;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* dst[3] = {q, k, v};
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t t = 0; t < 3; ++t) HeadVector(x, b, l, t, h, scale, dst[t] + l * D);
      }
      cblas_sgemm(kCblasRowMajor, kCblasNoTrans, kCblasTrans, n, n, d, 1.0f, q, d, k, d, 0.0f, scores, n);
      for (int64_t i = 0; i < L; ++i) {
        float* row = scores + i * L;
        if (pm != nullptr) {
          for (int64_t j = 0; j < L; ++j) row[j] = row[j] + pm[i * L + j];
        }
        softmax_row(row, row, L);
      }
      cblas_sgemm(kCblasRowMajor, kCblasNoTrans, kCblasNoTrans, n, d, n, 1.0f, scores, n, v, d, 0.0f,
                  po + b * L * H * D + h * D, ldo);
    }
  }
  return {out};
}

// MKL's packed-GEMM interface (same library): a linear layer's weight packed once into the
// layout MKL's GEMM kernels read, instead of being repacked inside every cblas_sgemm call.
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                 const float* src, int ld, float* dest);
extern "C" void cblas_sgemm_compute(int layout, int trans_a, int trans_b, int m, int n, int k, const float* a,
                                    int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kCblasBMatrix = 162, kCblasPacked = 151;

int BlasDim(int64_t v, const char* op, const char* what) {
  PD_CHECK(v > 0 && v <= INT32_MAX, op, ": ", what, " is ", v, "; MKL's 32-bit interface takes 1 to 2^31 - 1.");
  return static_cast<int>(v);
}

// weight [K, N] -> MKL's packed copy of it as the B operand of GEMMs with `rows` rows of A. MKL
// lays the pack out for that row count: a pack made for another count gives a correct product
// but can run slower than an unpacked GEMM, so the caller packs per row count. Stored as a
// float32 tensor of the size MKL asks for (only the weight's size is written); it must stay at
// the address it was written to (MKL's metadata in it is address-dependent), as a tensor does.
std::vector<Tensor> GemmPackFwd(const Tensor& w_in, int64_t rows) {
  const Tensor w = Checked(w_in, "cpu_gemm_pack", "weight");
  PD_CHECK(w.shape().size() == 2, "cpu_gemm_pack: the weight must be [K, N].");
  const int k = BlasDim(w.shape()[0], "cpu_gemm_pack", "K"), n = BlasDim(w.shape()[1], "cpu_gemm_pack", "N");
  const int m = BlasDim(rows, "cpu_gemm_pack", "the row count");
  const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, m, n, k);
  Tensor packed = paddle::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                                DataType::FLOAT32, w.place());
  cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, kCblasNoTrans, m, n, k, 1.0f, w.data<float>(), n,
                   packed.data<float>());
  return {packed};
}

// x [M, K] times a weight [K, N] packed by cpu_gemm_pack -> [M, N]; with_bias: plus bias [N],
// added as Paddle's addmm adds it (the output starts as the bias and the GEMM accumulates into
// it), so a packed linear layer rounds as the unpacked one. Inference only.
std::vector<Tensor> PackedGemmFwd(const Tensor& x_in, const Tensor& packed_in, const Tensor& bias_in, int64_t k,
                                  int64_t n, bool with_bias) {
  const Tensor x = Checked(x_in, "cpu_packed_gemm", "x");
  const Tensor packed = Checked(packed_in, "cpu_packed_gemm", "packed weight");
  PD_CHECK(x.shape().size() == 2 && x.shape()[1] == k, "cpu_packed_gemm: x must be [M, ", k, "].");
  const int64_t rows = x.shape()[0];
  const int ki = BlasDim(k, "cpu_packed_gemm", "K"), ni = BlasDim(n, "cpu_packed_gemm", "N");
  // A pack of another weight shape would be read past its end.
  PD_CHECK(packed.numel() * sizeof(float) >= cblas_sgemm_pack_get_size(kCblasBMatrix, 1, ni, ki),
           "cpu_packed_gemm: the packed weight is smaller than a [", k, ", ", n, "] weight's pack.");
  Tensor out = paddle::empty({rows, n}, DataType::FLOAT32, x.place());
  if (rows == 0) return {out};
  float* po = out.data<float>();
  if (with_bias) {
    const Tensor bias = Checked(bias_in, "cpu_packed_gemm", "bias");
    PD_CHECK(bias.numel() == n, "cpu_packed_gemm: bias has ", bias.numel(), " values, the output ", n, " columns.");
    const float* pb = bias.data<float>();
    ForPieces(rows, 1, [&](int64_t r, int64_t) { std::copy(pb, pb + n, po + r * n); });
  }
  const int m = BlasDim(rows, "cpu_packed_gemm", "M");
  cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m, ni, ki, x.data<float>(), ki,
                      packed.data<float>(), ni, with_bias ? 1.0f : 0.0f, po, ni);
  return {out};
}
#endif  // PADDLEMIX_CBLAS

std::vector<Tensor> SoftmaxFwd(const Tensor& x_in) {
  const Tensor x = Checked(x_in, "cpu_softmax", "x");
  const int64_t cols = LastDim(x, "cpu_softmax");
  Tensor y = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  const float* px = x.data<float>();
  float* py = y.data<float>();
  const auto kernel = CPU_ACT_PICK(SoftmaxRow);
  ForPieces(x.numel() / cols, 1, [&](int64_t r, int64_t) { kernel(px + r * cols, py + r * cols, cols); });
  return {y};
}

std::vector<Tensor> SoftmaxBwd(const Tensor& y_in, const Tensor& dy_in) {
  const Tensor y = Checked(y_in, "cpu_softmax_grad", "y");
  const Tensor dy = Checked(dy_in, "cpu_softmax_grad", "dy");
  const int64_t cols = LastDim(y, "cpu_softmax_grad");
  Tensor dx = paddle::empty(y.shape(), DataType::FLOAT32, y.place());
  const float* py = y.data<float>();
  const float* pdy = dy.data<float>();
  float* pdx = dx.data<float>();
  const auto kernel = CPU_ACT_PICK(SoftmaxGradRow);
  ForPieces(y.numel() / cols, 1,
            [&](int64_t r, int64_t) { kernel(py + r * cols, pdy + r * cols, pdx + r * cols, cols); });
  return {dx};
}

}  // namespace

PD_BUILD_OP(cpu_gelu).Inputs({"X"}).Outputs({"Y"}).SetKernelFn(PD_KERNEL(GeluFwd));
PD_BUILD_GRAD_OP(cpu_gelu).Inputs({"X", paddle::Grad("Y")}).Outputs({paddle::Grad("X")}).SetKernelFn(PD_KERNEL(GeluBwd));

PD_BUILD_OP(cpu_split_heads)
    .Inputs({"QKV", "Bias"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"scale: float", "with_bias: bool"})
    .SetKernelFn(PD_KERNEL(SplitHeadsFwd));

PD_BUILD_OP(cpu_bias_gelu)
    .Inputs({"X", "Bias"})
    .Outputs({"Y"})
    .SetInplaceMap({{"X", "Y"}})
    .SetKernelFn(PD_KERNEL(BiasGeluFwd));

PD_BUILD_OP(cpu_bias_residual)
    .Inputs({"Y", "Bias", "Residual"})
    .Outputs({"Out"})
    .SetInplaceMap({{"Y", "Out"}})
    .SetKernelFn(PD_KERNEL(BiasResidualFwd));

#if PADDLEMIX_CBLAS
PD_BUILD_OP(cpu_attention)
    .Inputs({"QKV", "Bias", "Mask"})
    .Outputs({"Out"})
    .Attrs({"scale: float", "with_bias: bool", "with_mask: bool"})
    .SetKernelFn(PD_KERNEL(AttentionFwd));

PD_BUILD_OP(cpu_gemm_pack).Inputs({"W"}).Outputs({"Packed"}).Attrs({"rows: int64_t"}).SetKernelFn(PD_KERNEL(GemmPackFwd));

PD_BUILD_OP(cpu_packed_gemm)
    .Inputs({"X", "Packed", "Bias"})
    .Outputs({"Out"})
    .Attrs({"k: int64_t", "n: int64_t", "with_bias: bool"})
    .SetKernelFn(PD_KERNEL(PackedGemmFwd));
#endif

PD_BUILD_OP(cpu_softmax).Inputs({"X"}).Outputs({"Y"}).SetKernelFn(PD_KERNEL(SoftmaxFwd));
PD_BUILD_GRAD_OP(cpu_softmax)
    .Inputs({"Y", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(SoftmaxBwd));
