// CPU driver for the fused (residual add +) LayerNorm / RMSNorm kernels.
//
// Rows are independent, so the forward pass is an OpenMP loop over rows. The
// backward pass also needs dweight / dbias, which are sums over rows: each
// thread accumulates private [cols] partials for its block of rows and the
// threads then reduce those partials column-wise, so there are no atomics and
// the result does not depend on scheduling.
#include "fused_ln_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_LN_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define FUSED_LN_HAVE_AVX2_PATH 0
#endif

namespace fused_ln {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMinElems = 1 << 15;

namespace generic {
// Portable policy: one lane. The four-accumulator loops in the row kernels still
// give the compiler independent chains to schedule (and to auto-vectorise).
struct Vec {
  using T = float;
  static constexpr int W = 1;
  static T zero() { return 0.0f; }
  static T set1(float a) { return a; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  static T fmadd(T a, T b, T c) { return a * b + c; }
  static T fnmadd(T a, T b, T c) { return c - a * b; }
  static float hsum(T a) { return a; }
};
#include "fused_ln_cpu_rows.inc"
}  // namespace generic

#if FUSED_LN_HAVE_AVX2_PATH
// Compiled for AVX2+FMA regardless of the command-line -m flags (the Paddle
// build passes none), and only called after CPUID confirms support.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#include "fused_ln_cpu_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool cpu_has_avx2_fma() {
#if FUSED_LN_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool use_avx2(bool portable) { return !portable && cpu_has_avx2_fma(); }

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Missing affine parameters become explicit ones / zeros so the row kernels
// have no per-element branches.
struct Affine {
  std::vector<float> storage;
  const float* w;
  const float* b;
  Affine(const float* weight, const float* bias, int64_t cols) : w(weight), b(bias) {
    if (w == nullptr || b == nullptr) storage.resize(2 * cols);
    if (w == nullptr) {
      std::fill(storage.begin(), storage.begin() + cols, 1.0f);
      w = storage.data();
    }
    if (b == nullptr) b = storage.data() + cols;  // the zero half
  }
};

}  // namespace

const char* cpu_isa() { return cpu_has_avx2_fma() ? "avx2-fma" : "generic"; }

void cpu_forward(const CpuForwardArgs& a) {
  const Affine affine(a.weight, a.bias, a.cols);
  const bool avx2_path = use_avx2(a.portable);
  const int64_t rows = a.rows, cols = a.cols;
  const bool parallel = rows > 1 && rows * cols >= kParallelMinElems;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t off = i * cols;
    const float* r = a.residual != nullptr ? a.residual + off : nullptr;
    float* s = a.residual != nullptr ? a.residual_out + off : nullptr;
#if FUSED_LN_HAVE_AVX2_PATH
    if (avx2_path) {
      avx2::forward_row(a.x + off, r, affine.w, affine.b, a.y + off, s, a.mean + i, a.rstd + i, cols, a.epsilon,
                        a.rms_norm);
      continue;
    }
#endif
    generic::forward_row(a.x + off, r, affine.w, affine.b, a.y + off, s, a.mean + i, a.rstd + i, cols, a.epsilon,
                         a.rms_norm);
  }
}

void cpu_backward(const CpuBackwardArgs& a) {
  const int64_t rows = a.rows, cols = a.cols;
  if (a.dy == nullptr) {
    // y got no gradient: the layer norm contributes nothing, dx is the residual-out gradient.
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float v = a.dresidual_out != nullptr ? a.dresidual_out[i] : 0.0f;
      a.dx[i] = v;
      if (a.dresidual != nullptr) a.dresidual[i] = v;
    }
    if (a.dweight != nullptr) std::fill(a.dweight, a.dweight + cols, 0.0f);
    if (a.dbias != nullptr) std::fill(a.dbias, a.dbias + cols, 0.0f);
    return;
  }
  const Affine affine(a.weight, nullptr, cols);
  const bool avx2_path = use_avx2(a.portable);
  const bool parallel = rows > 1 && rows * cols >= kParallelMinElems;
  const int64_t nt = parallel ? std::max<int64_t>(1, std::min<int64_t>(max_threads(), rows)) : 1;
  // partials[t] holds thread t's dweight sums, partials[nt + t] its dbias sums.
  std::vector<float> partials(static_cast<size_t>(2 * nt * cols), 0.0f);

#pragma omp parallel num_threads(static_cast<int>(nt)) if (parallel)
  {
#if defined(_OPENMP)
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t t = 0, team = 1;
#endif
    float* dwp = partials.data() + t * cols;
    float* dbp = partials.data() + (nt + t) * cols;
    const int64_t begin = rows * t / team, end = rows * (t + 1) / team;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = i * cols;
      const float* ds = a.dresidual_out != nullptr ? a.dresidual_out + off : nullptr;
      float* dr = a.dresidual != nullptr ? a.dresidual + off : nullptr;
#if FUSED_LN_HAVE_AVX2_PATH
      if (avx2_path) {
        avx2::backward_row(a.xn + off, a.dy + off, affine.w, ds, a.mean[i], a.rstd[i], dwp, dbp, a.dx + off, dr,
                           cols, a.rms_norm);
        continue;
      }
#endif
      generic::backward_row(a.xn + off, a.dy + off, affine.w, ds, a.mean[i], a.rstd[i], dwp, dbp, a.dx + off, dr,
                            cols, a.rms_norm);
    }
#pragma omp barrier
    // Column-wise reduction of the per-thread partials, split across the team.
    const int64_t c0 = cols * t / team, c1 = cols * (t + 1) / team;
    for (int64_t j = c0; j < c1; ++j) {
      float sw = 0.0f, sb = 0.0f;
      for (int64_t p = 0; p < nt; ++p) {
        sw += partials[p * cols + j];
        sb += partials[(nt + p) * cols + j];
      }
      if (a.dweight != nullptr) a.dweight[j] = sw;
      if (a.dbias != nullptr) a.dbias[j] = sb;
    }
  }
}

}  // namespace fused_ln
