// CPU operators for the two element-wise steps of a ViT block that Paddle's CPU
// kernels run far below memory speed (single-threaded, scalar; the README's
// Performance section has the measurements):
//
//   cpu_gelu(x)     exact (erf) GELU, x * Phi(x)
//   cpu_bias_gelu(x, b)  GELU(x + b), b along the last axis (no gradient: inference)
//   cpu_split_heads(qkv, bias, scale)  [B, L, 3, H, D] (+ bias) -> q * scale, k, v as [B, H, L, D] (inference)
//   cpu_bias_residual(y, b, r)  r + (y + b), b along the last axis: a linear layer's bias and
//                   the residual add after it in one pass (inference)
//   cpu_softmax(x)  softmax over the last axis
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

// qkv [B, L, 3, H, D] (+ bias [3 H D] when with_bias) -> q * scale, k, v, each [B, H, L, D]
// (contiguous), in one multi-threaded pass: the layout change attention needs before its two
// batched GEMMs, with the qkv projection's bias added on the way. Inference only.
std::vector<Tensor> SplitHeadsFwd(const Tensor& qkv_in, const Tensor& bias_in, float scale, bool with_bias) {
  const Tensor qkv = Checked(qkv_in, "cpu_split_heads", "qkv");
  const auto& s = qkv.shape();
  PD_CHECK(s.size() == 5 && s[2] == 3, "cpu_split_heads: qkv must be [B, L, 3, H, D].");
  const int64_t B = s[0], L = s[1], H = s[3], D = s[4];
  const Tensor bias = with_bias ? Checked(bias_in, "cpu_split_heads", "bias") : bias_in;
  PD_CHECK(!with_bias || bias.numel() == 3 * H * D, "cpu_split_heads: bias must have 3 * H * D values.");
  std::vector<Tensor> out;
  for (int i = 0; i < 3; ++i) out.push_back(paddle::empty({B, H, L, D}, DataType::FLOAT32, qkv.place()));
  const float* src = qkv.data<float>();
  const float* pb = with_bias ? bias.data<float>() : nullptr;
  float* dst[3] = {out[0].data<float>(), out[1].data<float>(), out[2].data<float>()};
  ForPieces(B * L, 1, [&](int64_t row, int64_t) {
    const int64_t b = row / L, l = row % L;
    const float* in = src + row * 3 * H * D;
    for (int64_t t = 0; t < 3; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float* from = in + (t * H + h) * D;
        const float* add = pb == nullptr ? nullptr : pb + (t * H + h) * D;
        float* to = dst[t] + ((b * H + h) * L + l) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float v = add == nullptr ? from[d] : from[d] + add[d];
          to[d] = t == 0 ? v * scale : v;
        }
      }
    }
  });
  return out;
}

// Inference only (no gradient operator): the kernel dispatch calls it when no gradient is needed.
std::vector<Tensor> BiasGeluFwd(const Tensor& x_in, const Tensor& b_in) {
  const Tensor x = Checked(x_in, "cpu_bias_gelu", "x");
  const Tensor b = Checked(b_in, "cpu_bias_gelu", "bias");
  const int64_t cols = LastDim(x, "cpu_bias_gelu");
  PD_CHECK(b.numel() == cols, "cpu_bias_gelu: bias has ", b.numel(), " values, x's last axis ", cols, ".");
  Tensor y = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  const float* px = x.data<float>();
  const float* pb = b.data<float>();
  float* py = y.data<float>();
  const auto kernel = CPU_ACT_PICK(BiasGeluRow);
  ForPieces(x.numel() / cols, 1, [&](int64_t r, int64_t) { kernel(px + r * cols, pb, py + r * cols, cols); });
  return {y};
}

// r + (y + b) with b along the last axis, out of y (a GEMM's output, any shape with r's numel):
// the bias add and the residual add that follow a block's last linear layer, in one
// multi-threaded pass instead of two single-threaded ones. Same two float32 additions in the
// same order as the separate ops (-ffp-contract=off), so the same bits. Inference only.
std::vector<Tensor> BiasResidualFwd(const Tensor& y_in, const Tensor& b_in, const Tensor& r_in) {
  const Tensor y = Checked(y_in, "cpu_bias_residual", "y");
  const Tensor b = Checked(b_in, "cpu_bias_residual", "bias");
  const Tensor r = Checked(r_in, "cpu_bias_residual", "residual");
  const int64_t cols = LastDim(r, "cpu_bias_residual");
  PD_CHECK(b.numel() == cols, "cpu_bias_residual: bias has ", b.numel(), " values, the residual's last axis ", cols, ".");
  PD_CHECK(y.numel() == r.numel(), "cpu_bias_residual: y has ", y.numel(), " values, the residual ", r.numel(), ".");
  Tensor out = paddle::empty(r.shape(), DataType::FLOAT32, r.place());
  const float* py = y.data<float>();
  const float* pb = b.data<float>();
  const float* pr = r.data<float>();
  float* po = out.data<float>();
  ForPieces(r.numel() / cols, 1, [&](int64_t row, int64_t) {
    const int64_t at = row * cols;
    for (int64_t c = 0; c < cols; ++c) po[at + c] = pr[at + c] + (py[at + c] + pb[c]);
  });
  return {out};
}

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

PD_BUILD_OP(cpu_bias_gelu).Inputs({"X", "Bias"}).Outputs({"Y"}).SetKernelFn(PD_KERNEL(BiasGeluFwd));

PD_BUILD_OP(cpu_bias_residual)
    .Inputs({"Y", "Bias", "Residual"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(BiasResidualFwd));

PD_BUILD_OP(cpu_softmax).Inputs({"X"}).Outputs({"Y"}).SetKernelFn(PD_KERNEL(SoftmaxFwd));
PD_BUILD_GRAD_OP(cpu_softmax)
    .Inputs({"Y", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(SoftmaxBwd));
