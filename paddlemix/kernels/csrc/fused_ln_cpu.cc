// CPU driver for the fused (residual add +) LayerNorm / RMSNorm kernels.
//
// Rows are independent, so the forward pass is an OpenMP loop over rows. The
// backward pass also needs dweight / dbias, which are sums over rows. Rows are
// cut into a fixed number of contiguous chunks (independent of the thread
// count); each chunk accumulates private [cols] partials and the partials are
// then summed column-wise in chunk order. No atomics, and dweight / dbias are
// bit-identical whatever OMP_NUM_THREADS is or how the chunks were scheduled.
//
// Both loops hand out work dynamically in small pieces: on a shared or
// oversubscribed machine a descheduled thread then delays only its current
// piece, instead of half of the work behind a static split.
#include "fused_ln_cpu.h"
#include "simd_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

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
// Rows per dynamically scheduled piece of the forward loop.
constexpr int64_t kForwardRowsPerPiece = 16;
// Backward row chunks (each with its own dweight / dbias partials). Enough
// pieces to balance a few threads, few enough that the partials stay small.
constexpr int64_t kBackwardChunks = 64;
// Column block of the final partial reduction (fits in L1 as two accumulators).
constexpr int64_t kReduceColumns = 512;

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
using Vec = paddlemix_simd::Avx2;
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
#pragma omp parallel for schedule(monotonic: dynamic, kForwardRowsPerPiece) if (parallel)
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
  const int64_t chunks = std::min<int64_t>(rows, kBackwardChunks);
  // partials[c] holds chunk c's dweight sums, partials[chunks + c] its dbias sums;
  // each chunk zeroes its own pair, so the buffer starts uninitialised.
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(2 * chunks * cols)]);

#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(monotonic: dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      float* dwp = partials.get() + c * cols;
      float* dbp = partials.get() + (chunks + c) * cols;
      std::fill(dwp, dwp + cols, 0.0f);
      std::fill(dbp, dbp + cols, 0.0f);
      for (int64_t i = rows * c / chunks, end = rows * (c + 1) / chunks; i < end; ++i) {
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
    }
    // (implicit barrier) Column blocks of the chunk partials, summed in chunk order.
#pragma omp for schedule(static)
    for (int64_t j0 = 0; j0 < cols; j0 += kReduceColumns) {
      const int64_t n = std::min<int64_t>(kReduceColumns, cols - j0);
      float sw[kReduceColumns], sb[kReduceColumns];
      std::fill(sw, sw + n, 0.0f);
      std::fill(sb, sb + n, 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pw = partials.get() + c * cols + j0;
        const float* pb = partials.get() + (chunks + c) * cols + j0;
        for (int64_t j = 0; j < n; ++j) {
          sw[j] += pw[j];
          sb[j] += pb[j];
        }
      }
      if (a.dweight != nullptr) std::copy(sw, sw + n, a.dweight + j0);
      if (a.dbias != nullptr) std::copy(sb, sb + n, a.dbias + j0);
    }
  }
}

}  // namespace fused_ln
