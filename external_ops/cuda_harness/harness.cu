// Standalone correctness + bandwidth harness for external_ops/fused_ln/fused_ln_cuda.cuh.
//
// Build (no GPU needed to compile; see external_ops/README.md):
//   nvcc -O3 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
//        -I paddlemix/kernels/csrc external_ops/cuda_harness/harness.cu -o fused_ln_harness
// Run on a GPU machine:
//   ./fused_ln_harness            # check, then time the default shapes
//   ./fused_ln_harness --json     # same, one JSON object per line
//
// It first checks the kernels against a double-precision host reference on
// small odd and even shapes, then times forward and backward (with residual)
// and reports effective bandwidth = bytes that must cross DRAM (each tensor
// read or written once) / median kernel time, next to the device-to-device
// copy bandwidth measured the same way. Exit code: 0 ok, 1 mismatch / CUDA
// error, 2 no CUDA device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fused_ln_cuda.cuh"

namespace {

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                          \
    cudaError_t err_ = (expr);                                                                  \
    if (err_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, \
                   __LINE__, #expr);                                                            \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

template <typename T>
struct HostType;
template <>
struct HostType<float> {
  static const char* name() { return "float32"; }
  static float to_dev(float v) { return v; }
  static float to_host(float v) { return v; }
  static double tol() { return 2e-5; }
};
template <>
struct HostType<__half> {
  static const char* name() { return "float16"; }
  static __half to_dev(float v) { return __float2half_rn(v); }
  static float to_host(__half v) { return __half2float(v); }
  static double tol() { return 1.5e-2; }
};
template <>
struct HostType<__nv_bfloat16> {
  static const char* name() { return "bfloat16"; }
  static __nv_bfloat16 to_dev(float v) { return __float2bfloat16_rn(v); }
  static float to_host(__nv_bfloat16 v) { return __bfloat162float(v); }
  static double tol() { return 1e-1; }
};

template <typename T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) { CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(ptr); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void upload(const std::vector<T>& h) { CHECK_CUDA(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    CHECK_CUDA(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <typename T>
std::vector<T> random_dev_values(size_t n, std::mt19937& rng, float scale, float shift) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<T> v(n);
  for (auto& e : v) e = HostType<T>::to_dev(dist(rng) * scale + shift);
  return v;
}

// Double-precision reference of forward + backward with residual, on the
// exact device-precision inputs; returns the worst error relative to the
// tolerance (<= 1 passes).
template <typename T>
double check_case(int64_t rows, int64_t cols, bool rms, std::mt19937& rng) {
  const size_t n = static_cast<size_t>(rows * cols);
  const auto hx = random_dev_values<T>(n, rng, 1.f, 0.5f);
  const auto hr = random_dev_values<T>(n, rng, 1.f, 0.f);
  const auto hdy = random_dev_values<T>(n, rng, 1.f, 0.f);
  const auto hds = random_dev_values<T>(n, rng, 1.f, 0.f);
  std::vector<float> hw(cols), hb(cols);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (auto& e : hw) e = 1.f + 0.5f * dist(rng);
  for (auto& e : hb) e = 0.5f * dist(rng);

  DevBuf<T> x(n), r(n), y(n), s(n), dy(n), ds(n), dx(n), dr(n);
  DevBuf<float> w(cols), b(cols), mean(rows), rstd(rows), dw(cols), db(cols);
  x.upload(hx);
  r.upload(hr);
  dy.upload(hdy);
  ds.upload(hds);
  w.upload(hw);
  b.upload(hb);

  fused_ln_cuda::ForwardParams fp{x.ptr, r.ptr, w.ptr, rms ? nullptr : b.ptr, y.ptr, s.ptr, mean.ptr, rstd.ptr,
                                  rows, cols, 1e-5f, rms};
  CHECK_CUDA(fused_ln_cuda::launch_forward<T>(fp, 0));
  DevBuf<float> ws(fused_ln_cuda::backward_workspace_floats<T>(rows, cols));
  fused_ln_cuda::BackwardParams bp{s.ptr, w.ptr, mean.ptr, rstd.ptr, dy.ptr, ds.ptr, dx.ptr, dr.ptr, dw.ptr,
                                   rms ? nullptr : db.ptr, ws.ptr, rows, cols, rms, 0};
  CHECK_CUDA(fused_ln_cuda::launch_backward<T>(bp, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  const auto gy = y.download(), gs = s.download(), gdx = dx.download(), gdr = dr.download();
  const auto gdw = dw.download(), gdb = db.download();
  const double tol = HostType<T>::tol();
  double worst = 0.0;
  auto note = [&](double got, double want, double scale) {
    worst = std::max(worst, std::fabs(got - want) / (tol * std::max(1.0, scale)));
  };
  std::vector<double> rdw(cols, 0.0), rdb(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> sv(cols);
    double sum = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      const size_t k = static_cast<size_t>(i * cols + j);
      // The residual sum is rounded to T before the norm, exactly as stored.
      sv[j] = HostType<T>::to_host(HostType<T>::to_dev(HostType<T>::to_host(hx[k]) + HostType<T>::to_host(hr[k])));
      sum += sv[j];
    }
    const double mu = rms ? 0.0 : sum / cols;
    double var = 0.0;
    for (int64_t j = 0; j < cols; ++j) var += (sv[j] - mu) * (sv[j] - mu);
    var /= cols;
    const double rs = 1.0 / std::sqrt(var + 1e-5);
    double a = 0.0, bsum = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      const size_t k = static_cast<size_t>(i * cols + j);
      const double xh = (sv[j] - mu) * rs;
      const double d = HostType<T>::to_host(hdy[k]);
      const double g = d * hw[j];
      a += g;
      bsum += g * xh;
      rdw[j] += d * xh;
      rdb[j] += d;
      note(HostType<T>::to_host(gy[k]), xh * hw[j] + (rms ? 0.0 : hb[j]), std::fabs(xh * hw[j]));
      note(HostType<T>::to_host(gs[k]), sv[j], std::fabs(sv[j]));
    }
    const double ca = rms ? 0.0 : a / cols, cb = bsum / cols;
    for (int64_t j = 0; j < cols; ++j) {
      const size_t k = static_cast<size_t>(i * cols + j);
      const double xh = (sv[j] - mu) * rs;
      const double want = (HostType<T>::to_host(hdy[k]) * hw[j] - ca - xh * cb) * rs + HostType<T>::to_host(hds[k]);
      note(HostType<T>::to_host(gdx[k]), want, std::fabs(want));
      note(HostType<T>::to_host(gdr[k]), want, std::fabs(want));
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    note(gdw[j], rdw[j], std::sqrt(static_cast<double>(rows)));
    if (!rms) note(gdb[j], rdb[j], std::sqrt(static_cast<double>(rows)));
  }
  return worst;
}

template <typename F>
float median_ms(F&& launch, int iters) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    launch();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device-to-device copy of a buffer much larger than L2: read + write bytes / time.
double copy_bandwidth_gbs(int iters) {
  const size_t bytes = size_t(1) << 30;
  DevBuf<char> src(bytes), dst(bytes);
  CHECK_CUDA(cudaMemset(src.ptr, 1, bytes));
  const float ms = median_ms([&] { CHECK_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice)); },
                             iters);
  return 2.0 * bytes / (ms * 1e6);
}

template <typename T>
void time_case(int64_t rows, int64_t cols, int rows_per_group, double copy_gbs, bool json, int iters) {
  const size_t n = static_cast<size_t>(rows * cols);
  std::mt19937 rng(7);
  DevBuf<T> x(n), r(n), y(n), s(n), dy(n), ds(n), dx(n), dr(n);
  DevBuf<float> w(cols), b(cols), mean(rows), rstd(rows), dw(cols), db(cols);
  x.upload(random_dev_values<T>(n, rng, 1.f, 0.f));
  r.upload(random_dev_values<T>(n, rng, 1.f, 0.f));
  dy.upload(random_dev_values<T>(n, rng, 1.f, 0.f));
  ds.upload(random_dev_values<T>(n, rng, 1.f, 0.f));
  w.upload(std::vector<float>(cols, 1.f));
  b.upload(std::vector<float>(cols, 0.f));
  fused_ln_cuda::ForwardParams fp{x.ptr, r.ptr, w.ptr, b.ptr, y.ptr, s.ptr, mean.ptr, rstd.ptr,
                                  rows, cols, 1e-5f, false};
  DevBuf<float> ws(fused_ln_cuda::backward_workspace_floats<T>(rows, cols, rows_per_group));
  fused_ln_cuda::BackwardParams bp{s.ptr, w.ptr, mean.ptr, rstd.ptr, dy.ptr, ds.ptr, dx.ptr, dr.ptr, dw.ptr,
                                   db.ptr, ws.ptr, rows, cols, false, rows_per_group};
  const float fwd_ms = median_ms([&] { CHECK_CUDA(fused_ln_cuda::launch_forward<T>(fp, 0)); }, iters);
  const float bwd_ms = median_ms([&] { CHECK_CUDA(fused_ln_cuda::launch_backward<T>(bp, 0)); }, iters);
  const double elem = sizeof(T);
  // forward: read x, r; write y, s (+ 8 bytes of stats per row)
  const double fwd_bytes = 4.0 * n * elem + 8.0 * rows;
  // backward: read s, dy, ds; write dx, dr (+ stats); workspace traffic not counted as useful
  const double bwd_bytes = 5.0 * n * elem + 8.0 * rows;
  const double fwd_gbs = fwd_bytes / (fwd_ms * 1e6), bwd_gbs = bwd_bytes / (bwd_ms * 1e6);
  const long long groups = static_cast<long long>(fused_ln_cuda::backward_groups<T>(rows, cols, rows_per_group));
  if (json) {
    std::printf(
        "{\"dtype\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"fwd_ms\": %.4f, \"bwd_ms\": %.4f, "
        "\"fwd_gbs\": %.1f, \"bwd_gbs\": %.1f, \"copy_gbs\": %.1f, \"fwd_frac\": %.3f, \"bwd_frac\": %.3f, "
        "\"bwd_groups\": %lld}\n",
        HostType<T>::name(), static_cast<long long>(rows), static_cast<long long>(cols), fwd_ms, bwd_ms, fwd_gbs,
        bwd_gbs, copy_gbs, fwd_gbs / copy_gbs, bwd_gbs / copy_gbs, groups);
  } else {
    std::printf("%-8s [%6lld, %5lld]  fwd %8.3f ms %7.1f GB/s (%5.1f%% of copy)   bwd %8.3f ms %7.1f GB/s (%5.1f%%)"
                "  groups %lld\n",
                HostType<T>::name(), static_cast<long long>(rows), static_cast<long long>(cols), fwd_ms, fwd_gbs,
                100.0 * fwd_gbs / copy_gbs, bwd_ms, bwd_gbs, 100.0 * bwd_gbs / copy_gbs, groups);
  }
}

template <typename T>
bool check_all(std::mt19937& rng) {
  bool ok = true;
  const int64_t shapes[][2] = {{37, 1}, {37, 7}, {33, 768}, {19, 1408}, {9, 5120}, {5, 8192}, {130, 256}};
  for (const auto& sh : shapes) {
    for (int rms = 0; rms < 2; ++rms) {
      const double worst = check_case<T>(sh[0], sh[1], rms != 0, rng);
      const bool pass = worst <= 1.0;
      ok = ok && pass;
      if (!pass) {
        std::printf("MISMATCH %s rows=%lld cols=%lld rms=%d: error %.3g x tolerance\n", HostType<T>::name(),
                    static_cast<long long>(sh[0]), static_cast<long long>(sh[1]), rms, worst);
      }
    }
  }
  std::printf("check %-8s %s\n", HostType<T>::name(), ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  int rows_per_group = 0;
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) {
      json = true;
    } else if (std::strcmp(argv[i], "--rows-per-group") == 0 && i + 1 < argc) {
      rows_per_group = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--json] [--rows-per-group N] [--iters N]\n", argv[0]);
      return 1;
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "no CUDA device: this binary only runs on a GPU machine\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);

  std::mt19937 rng(1234);
  bool ok = check_all<float>(rng);
  ok = check_all<__half>(rng) && ok;
  ok = check_all<__nv_bfloat16>(rng) && ok;

  const double copy_gbs = copy_bandwidth_gbs(iters);
  std::printf("device-to-device copy: %.1f GB/s (read + write)\n", copy_gbs);
  const int64_t shapes[][2] = {{8192, 768}, {8192, 1408}, {2048, 5120}, {65536, 768}, {16384, 1408}, {16384, 5120}};
  for (const auto& sh : shapes) {
    time_case<float>(sh[0], sh[1], rows_per_group, copy_gbs, json, iters);
    time_case<__half>(sh[0], sh[1], rows_per_group, copy_gbs, json, iters);
    time_case<__nv_bfloat16>(sh[0], sh[1], rows_per_group, copy_gbs, json, iters);
  }
  return ok ? 0 : 1;
}
