// Fused (residual add +) LayerNorm / RMSNorm CUDA kernels.
//
// Self-contained: CUDA runtime and cuda_fp16 / cuda_bf16 only, no Paddle. The
// Paddle operator (fused_ln_op.cu) and the standalone timing harness
// (external_ops/cuda_harness/harness.cu) both include this one header, so the
// code that is timed on a GPU is the code that ships.
//
// Design
// * Inputs fp32 / fp16 / bf16; weight and bias are fp32 (the operator casts
//   them, they are tiny); statistics and all arithmetic are fp32.
// * A "row group" of TX threads (TX a multiple of 32) owns one row at a time;
//   a block holds TY row groups (TY > 1 only when TX == 32, i.e. warp per row).
//   Thread t of a group owns vectors t, t + TX, t + 2 TX, ... of the row, each
//   vector VEC elements = 16 bytes when the row length and pointers allow it.
// * Each thread keeps its at most kElems = 16 row elements in registers, so the
//   variance is an exact two-pass over registers and every input byte is read
//   from DRAM once. Rows longer than kMaxCols = 512 * 16 are rejected.
// * Backward keeps the columns a thread owns fixed across the rows it visits,
//   so dweight / dbias accumulate in registers; each row group writes one
//   partial row to a workspace and a small column kernel sums those partials.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fused_ln_cuda {

constexpr int kElems = 16;            // row elements one thread holds in registers
constexpr int kMaxThreadsPerRow = 512;  // keeps the backward register budget under 128/thread
constexpr int64_t kMaxCols = int64_t(kMaxThreadsPerRow) * kElems;
constexpr int kWarpRowsPerBlock = 4;  // rows per block when a single warp covers a row
constexpr int kBackwardRowsPerGroup = 32;  // default rows each backward row group walks

struct ForwardParams {
  const void* x;         // [rows, cols], type T
  const void* residual;  // [rows, cols] T, or nullptr
  const float* weight;   // [cols] or nullptr (ones)
  const float* bias;     // [cols] or nullptr (zeros)
  void* y;               // [rows, cols] T
  void* residual_out;    // [rows, cols] T; written only with a residual
  float* mean;           // [rows]
  float* rstd;           // [rows]
  int64_t rows;
  int64_t cols;
  float epsilon;
  bool rms_norm;
};

struct BackwardParams {
  const void* xn;             // [rows, cols] T: the tensor that was normalised
  const float* weight;        // [cols] or nullptr
  const float* mean;          // [rows]
  const float* rstd;          // [rows]
  const void* dy;             // [rows, cols] T (required; the operator handles "no dy")
  const void* dresidual_out;  // [rows, cols] T or nullptr
  void* dx;                   // [rows, cols] T
  void* dresidual;            // [rows, cols] T or nullptr
  float* dweight;             // [cols] fp32 or nullptr
  float* dbias;               // [cols] fp32 or nullptr
  float* workspace;           // backward_workspace_floats(...) floats
  int64_t rows;
  int64_t cols;
  bool rms_norm;
  int rows_per_group;         // 0 = kBackwardRowsPerGroup; a tuning knob for the harness
};

namespace detail {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = Cvt<T>::to(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = Cvt<T>::from(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// fp32 parameters: VEC floats may be 16 or 32 bytes, alignment follows VEC of T.
template <int VEC>
__device__ __forceinline__ void load_param(const float* p, int col, float fill, float (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = fill;
    return;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = __ldg(p + col + k);
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the TX threads of this row group; every thread gets the total.
// smem: [TY][32] float2. Only TY == 1 groups (TX > 32) touch shared memory, so
// the __syncthreads are block-uniform.
__device__ __forceinline__ float2 row_sum(float2 v, float2* smem) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction has finished reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : make_float2(0.f, 0.f);
  return warp_sum(v);
}

template <typename T, int VEC, int kVecs>
__global__ void __launch_bounds__(kMaxThreadsPerRow) forward_kernel(ForwardParams p) {
  __shared__ float2 smem[32];
  const int64_t cols = p.cols;
  const int nvec = static_cast<int>(cols / VEC);
  const float inv_n = 1.0f / static_cast<float>(cols);
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* s_out = static_cast<T*>(p.residual_out);

  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < p.rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t base = row * cols;
    float v[kVecs][VEC];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int vi = i * blockDim.x + threadIdx.x;
      if (vi < nvec) {
        const int col = vi * VEC;
        load_vec<T, VEC>(x + base + col, v[i]);
        if (res != nullptr) {
          float r[VEC];
          load_vec<T, VEC>(res + base + col, r);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[i][k] = Cvt<T>::to(Cvt<T>::from(v[i][k] + r[k]));  // as stored
          store_vec<T, VEC>(s_out + base + col, v[i]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += v[i][k];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
      }
    }
    float2* slot = smem;  // TY > 1 never reaches shared memory (see row_sum)
    const float mean = p.rms_norm ? 0.f : row_sum(make_float2(sum, 0.f), slot).x * inv_n;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      if (i * blockDim.x + threadIdx.x < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[i][k] - mean;
          sq += d * d;
        }
      }
    }
    const float var = row_sum(make_float2(sq, 0.f), slot).x * inv_n;
    const float rstd = rsqrtf(var + p.epsilon);
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int vi = i * blockDim.x + threadIdx.x;
      if (vi < nvec) {
        const int col = vi * VEC;
        float w[VEC], b[VEC], o[VEC];
        load_param<VEC>(p.weight, col, 1.f, w);
        load_param<VEC>(p.bias, col, 0.f, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = (v[i][k] - mean) * rstd * w[k] + b[k];
        store_vec<T, VEC>(y + base + col, o);
      }
    }
  }
}

template <typename T, int VEC, int kVecs>
__global__ void __launch_bounds__(kMaxThreadsPerRow) backward_kernel(BackwardParams p) {
  __shared__ float2 smem[32];
  const int64_t cols = p.cols;
  const int nvec = static_cast<int>(cols / VEC);
  const float inv_n = 1.0f / static_cast<float>(cols);
  const T* xn = static_cast<const T*>(p.xn);
  const T* dy = static_cast<const T*>(p.dy);
  const T* ds = static_cast<const T*>(p.dresidual_out);
  T* dx = static_cast<T*>(p.dx);
  T* dr = static_cast<T*>(p.dresidual);

  float dw[kVecs][VEC], db[kVecs][VEC];
#pragma unroll
  for (int i = 0; i < kVecs; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = db[i][k] = 0.f;

  const int64_t group = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t ngroups = int64_t(gridDim.x) * blockDim.y;
  for (int64_t row = group; row < p.rows; row += ngroups) {
    const int64_t base = row * cols;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float xh[kVecs][VEC], g[kVecs][VEC];
    float2 acc = make_float2(0.f, 0.f);  // (sum g, sum g * xh)
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int vi = i * blockDim.x + threadIdx.x;
      if (vi < nvec) {
        const int col = vi * VEC;
        float d[VEC], w[VEC];
        load_vec<T, VEC>(xn + base + col, xh[i]);
        load_vec<T, VEC>(dy + base + col, d);
        load_param<VEC>(p.weight, col, 1.f, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[i][k] = (xh[i][k] - mean) * rstd;
          g[i][k] = d[k] * w[k];
          acc.x += g[i][k];
          acc.y += g[i][k] * xh[i][k];
          dw[i][k] += d[k] * xh[i][k];
          db[i][k] += d[k];
        }
      }
    }
    acc = row_sum(acc, smem);
    const float ca = p.rms_norm ? 0.f : acc.x * inv_n;
    const float cb = acc.y * inv_n;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int vi = i * blockDim.x + threadIdx.x;
      if (vi < nvec) {
        const int64_t off = base + vi * VEC;
        float o[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = (g[i][k] - ca - xh[i][k] * cb) * rstd;
        if (ds != nullptr) {
          float t[VEC];
          load_vec<T, VEC>(ds + off, t);
#pragma unroll
          for (int k = 0; k < VEC; ++k) o[k] += t[k];
        }
        store_vec<T, VEC>(dx + off, o);
        if (dr != nullptr) store_vec<T, VEC>(dr + off, o);
      }
    }
  }
  // One partial row per row group: workspace = [dweight partials | dbias partials].
  float* pw = p.workspace + group * cols;
  float* pb = p.workspace + (ngroups + group) * cols;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int vi = i * blockDim.x + threadIdx.x;
    if (vi < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        pw[vi * VEC + k] = dw[i][k];
        pb[vi * VEC + k] = db[i][k];
      }
    }
  }
}

// Column sums of the [ngroups, cols] partials: 32 columns per block, 8 row
// slices per column, a shared-memory tree for the slices.
__global__ void reduce_partials_kernel(const float* workspace, int64_t ngroups, int64_t cols, float* dweight,
                                       float* dbias) {
  __shared__ float sw[8][33], sb[8][33];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float aw = 0.f, ab = 0.f;
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < ngroups; r += 8) {
      aw += workspace[r * cols + col];
      ab += workspace[(ngroups + r) * cols + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int r = 1; r < 8; ++r) {
      aw += sw[r][threadIdx.x];
      ab += sb[r][threadIdx.x];
    }
    if (dweight != nullptr) dweight[col] = aw;
    if (dbias != nullptr) dbias[col] = ab;
  }
}

struct LaunchShape {
  int vec;    // elements per vector access
  int tx;     // threads per row
  int ty;     // rows per block
  bool ok;
};

template <typename T>
inline bool aligned16(const void* ptr) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) == 0;
}

template <typename T>
inline LaunchShape pick_shape(int64_t cols, bool aligned) {
  LaunchShape s{1, 32, 1, false};
  constexpr int kVecT = 16 / sizeof(T);
  s.vec = (aligned && cols % kVecT == 0) ? kVecT : 1;
  const int64_t nvec = cols / s.vec;
  const int64_t per_thread = kElems / s.vec;
  int64_t tx = (nvec + per_thread - 1) / per_thread;
  tx = ((tx + 31) / 32) * 32;
  if (tx < 32) tx = 32;
  s.ok = cols >= 1 && tx <= kMaxThreadsPerRow;
  s.tx = static_cast<int>(tx);
  s.ty = tx == 32 ? kWarpRowsPerBlock : 1;
  return s;
}

inline int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

}  // namespace detail

// Number of row groups the backward pass uses; the workspace holds two
// [groups, cols] fp32 matrices. Each group walks about rows_per_group rows, so
// the partials cost ~1/rows_per_group of the dy traffic, but never fewer groups
// than one full wave of resident blocks, so that every SM has work.
template <typename T>
inline int64_t backward_groups(int64_t rows, int64_t cols, int rows_per_group = 0) {
  const detail::LaunchShape s = detail::pick_shape<T>(cols, true);
  constexpr int kVecT = 16 / sizeof(T);
  int per_sm = 0;
  if (s.vec == kVecT) {
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, detail::backward_kernel<T, kVecT, kElems / kVecT>,
                                                  s.tx * s.ty, 0);
  } else {
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, detail::backward_kernel<T, 1, kElems>, s.tx * s.ty, 0);
  }
  if (per_sm < 1) per_sm = 1;
  const int per = rows_per_group > 0 ? rows_per_group : kBackwardRowsPerGroup;
  int64_t groups = (rows + per - 1) / per;
  const int64_t wave = int64_t(detail::sm_count()) * per_sm * s.ty;
  if (groups < wave) groups = wave;
  if (groups > rows) groups = rows;
  groups = ((groups + s.ty - 1) / s.ty) * s.ty;  // whole blocks
  return groups < 1 ? 1 : groups;
}

template <typename T>
inline int64_t backward_workspace_floats(int64_t rows, int64_t cols, int rows_per_group = 0) {
  return 2 * backward_groups<T>(rows, cols, rows_per_group) * cols;
}

// Returns cudaErrorInvalidValue when cols is outside [1, kMaxCols].
template <typename T>
cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const bool aligned = detail::aligned16<T>(p.x) && detail::aligned16<T>(p.residual) &&
                       detail::aligned16<T>(p.y) && detail::aligned16<T>(p.residual_out);
  const detail::LaunchShape s = detail::pick_shape<T>(p.cols, aligned);
  if (!s.ok) return cudaErrorInvalidValue;
  const dim3 block(s.tx, s.ty);
  int64_t grid = (p.rows + s.ty - 1) / s.ty;
  if (grid > (1 << 30)) grid = 1 << 30;  // rows beyond are covered by the grid-stride loop
  constexpr int kVecT = 16 / sizeof(T);
  if (s.vec == kVecT) {
    detail::forward_kernel<T, kVecT, kElems / kVecT><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
  } else {
    detail::forward_kernel<T, 1, kElems><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BackwardParams& p, cudaStream_t stream) {
  const bool aligned = detail::aligned16<T>(p.xn) && detail::aligned16<T>(p.dy) &&
                       detail::aligned16<T>(p.dresidual_out) && detail::aligned16<T>(p.dx) &&
                       detail::aligned16<T>(p.dresidual);
  const detail::LaunchShape s = detail::pick_shape<T>(p.cols, aligned);
  if (!s.ok) return cudaErrorInvalidValue;
  if (p.rows == 0) {
    if (p.dweight != nullptr) cudaMemsetAsync(p.dweight, 0, sizeof(float) * p.cols, stream);
    if (p.dbias != nullptr) cudaMemsetAsync(p.dbias, 0, sizeof(float) * p.cols, stream);
    return cudaGetLastError();
  }
  // Both vector widths put 16 elements on a thread, so tx, ty and hence the
  // group count agree with backward_workspace_floats whatever the alignment.
  const int64_t groups = backward_groups<T>(p.rows, p.cols, p.rows_per_group);
  const dim3 block(s.tx, s.ty);
  const unsigned grid = static_cast<unsigned>(groups / s.ty);
  constexpr int kVecT = 16 / sizeof(T);
  if (s.vec == kVecT) {
    detail::backward_kernel<T, kVecT, kElems / kVecT><<<grid, block, 0, stream>>>(p);
  } else {
    detail::backward_kernel<T, 1, kElems><<<grid, block, 0, stream>>>(p);
  }
  const dim3 rblock(32, 8);
  const unsigned rgrid = static_cast<unsigned>((p.cols + 31) / 32);
  detail::reduce_partials_kernel<<<rgrid, rblock, 0, stream>>>(p.workspace, groups, p.cols, p.dweight, p.dbias);
  return cudaGetLastError();
}

}  // namespace fused_ln_cuda
