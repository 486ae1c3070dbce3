// Fused (residual add +) LayerNorm / RMSNorm for CPU, float32 only.
//
// This header is deliberately free of Paddle includes: the kernels are plain
// C++ over raw pointers so they compile in a second or two and can be reused by
// any front end. The Paddle operator (fused_ln_op.cc) only checks arguments,
// allocates outputs and calls these two entry points.
//
// Layout: every tensor is a contiguous [rows, cols] matrix; normalisation runs
// over the last axis. Statistics are float32, one per row.
#pragma once

#include <cstdint>

namespace fused_ln {

struct CpuForwardArgs {
  const float* x;         // [rows, cols]
  const float* residual;  // [rows, cols] or nullptr: added to x before the norm
  const float* weight;    // [cols] or nullptr (treated as ones)
  const float* bias;      // [cols] or nullptr (treated as zeros)
  float* y;               // [rows, cols]
  float* residual_out;    // [rows, cols] = x + residual; only written when residual is given
  float* mean;            // [rows]; zeros for RMSNorm
  float* rstd;            // [rows] = 1 / sqrt(var + eps), or 1 / sqrt(mean(x^2) + eps) for RMSNorm
  int64_t rows;
  int64_t cols;
  float epsilon;
  bool rms_norm;
  bool portable = false;  // force the plain C++ row kernels (tests compare them with AVX2)
};

struct CpuBackwardArgs {
  const float* xn;            // [rows, cols] the tensor that was normalised (x, or x + residual)
  const float* weight;        // [cols] or nullptr (ones)
  const float* mean;          // [rows]
  const float* rstd;          // [rows]
  const float* dy;            // [rows, cols] or nullptr when y received no gradient
  const float* dresidual_out; // [rows, cols] or nullptr when the summed residual received no gradient
  float* dx;                  // [rows, cols]
  float* dresidual;           // [rows, cols] or nullptr; receives the same values as dx
  float* dweight;             // [cols] or nullptr
  float* dbias;               // [cols] or nullptr
  int64_t rows;
  int64_t cols;
  bool rms_norm;
  bool portable = false;
};

void cpu_forward(const CpuForwardArgs& args);
void cpu_backward(const CpuBackwardArgs& args);

// Which row kernels this process uses: "avx2-fma" or "generic". Chosen once at
// run time from CPUID, so one binary runs on any x86-64 (and non-x86) host.
const char* cpu_isa();

}  // namespace fused_ln
