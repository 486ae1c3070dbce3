// CUDA side of the `fused_ln` operator: wraps the launchers in
// fused_ln_cuda.cuh for Paddle tensors. Compiled only when Paddle itself is
// built with CUDA (see paddlemix/kernels/build_config.py); fused_ln_op.cc has already
// validated and made contiguous every argument.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

#include "fused_ln_cuda.cuh"
#include "paddle/phi/api/all.h"

using paddle::DataType;
using paddle::Tensor;
using OptTensor = paddle::optional<Tensor>;

namespace {

OptTensor AsF32(const OptTensor& t) {
  if (!t || t->dtype() == DataType::FLOAT32) return t;
  return OptTensor(t->cast(DataType::FLOAT32));
}

void Check(cudaError_t err, const char* what) {
  PD_CHECK(err == cudaSuccess, "fused_ln CUDA ", what, " failed: ", cudaGetErrorString(err),
           (err == cudaErrorInvalidValue ? " (the CUDA kernels support rows of 1 to 8192 elements)" : ""));
}

template <typename T>
void Forward(const Tensor& x, const OptTensor& residual, const OptTensor& w, const OptTensor& b, Tensor& y,
             Tensor& s, Tensor& mean, Tensor& rstd, float epsilon, bool rms_norm) {
  fused_ln_cuda::ForwardParams p;
  p.x = x.data();
  p.residual = residual ? residual->data() : nullptr;
  p.weight = w ? w->data<float>() : nullptr;
  p.bias = b ? b->data<float>() : nullptr;
  p.y = y.data();
  p.residual_out = residual ? s.data() : nullptr;
  p.mean = mean.data<float>();
  p.rstd = rstd.data<float>();
  p.cols = x.shape().back();
  p.rows = x.numel() / p.cols;
  p.epsilon = epsilon;
  p.rms_norm = rms_norm;
  Check(fused_ln_cuda::launch_forward<T>(p, x.stream()), "forward");
}

template <typename T>
void Backward(const Tensor& xn, const OptTensor& w, const Tensor& mean, const Tensor& rstd, const Tensor& dy,
              const OptTensor& ds, Tensor& dx, Tensor* dr, Tensor* dw, Tensor* db, bool rms_norm) {
  const int64_t cols = xn.shape().back();
  const int64_t rows = xn.numel() / cols;
  Tensor workspace = paddle::empty(std::vector<int64_t>{fused_ln_cuda::backward_workspace_floats<T>(rows, cols)}, DataType::FLOAT32,
                                   xn.place());
  fused_ln_cuda::BackwardParams p;
  p.xn = xn.data();
  p.weight = w ? w->data<float>() : nullptr;
  p.mean = mean.data<float>();
  p.rstd = rstd.data<float>();
  p.dy = dy.data();
  p.dresidual_out = ds ? ds->data() : nullptr;
  p.dx = dx.data();
  p.dresidual = dr != nullptr ? dr->data() : nullptr;
  p.dweight = dw != nullptr ? dw->data<float>() : nullptr;
  p.dbias = db != nullptr ? db->data<float>() : nullptr;
  p.workspace = workspace.data<float>();
  p.rows = rows;
  p.cols = cols;
  p.rms_norm = rms_norm;
  p.rows_per_group = 0;
  Check(fused_ln_cuda::launch_backward<T>(p, xn.stream()), "backward");
}

}  // namespace

std::vector<Tensor> FusedLnCudaForward(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                       const OptTensor& bias, float epsilon, bool rms_norm) {
  const auto& shape = x.shape();
  const std::vector<int64_t> stat(shape.begin(), shape.end() - 1);
  Tensor y = paddle::empty(shape, x.dtype(), x.place());
  Tensor s = paddle::empty(residual ? shape : std::vector<int64_t>{0}, x.dtype(), x.place());
  Tensor mean = paddle::empty(stat, DataType::FLOAT32, x.place());
  Tensor rstd = paddle::empty(stat, DataType::FLOAT32, x.place());
  const OptTensor w = AsF32(weight), b = AsF32(bias);
  switch (x.dtype()) {
    case DataType::FLOAT32:
      Forward<float>(x, residual, w, b, y, s, mean, rstd, epsilon, rms_norm);
      break;
    case DataType::FLOAT16:
      Forward<__half>(x, residual, w, b, y, s, mean, rstd, epsilon, rms_norm);
      break;
    case DataType::BFLOAT16:
      Forward<__nv_bfloat16>(x, residual, w, b, y, s, mean, rstd, epsilon, rms_norm);
      break;
    default:
      PD_THROW("fused_ln CUDA: x must be float32, float16 or bfloat16.");
  }
  return {y, s, mean, rstd};
}

std::vector<Tensor> FusedLnCudaBackward(const Tensor& xn, const OptTensor& weight, const Tensor& mean,
                                        const Tensor& rstd, const Tensor& dy, const OptTensor& dresidual_out,
                                        bool has_residual, const OptTensor& bias, bool rms_norm) {
  const auto& shape = xn.shape();
  const int64_t cols = shape.back();
  Tensor dr;
  if (!dy.initialized()) {
    // y received no gradient: the norm contributes nothing to any input.
    Tensor dx = dresidual_out ? dresidual_out->copy_to(xn.place(), false)
                              : paddle::full(shape, 0.0, xn.dtype(), xn.place());
    if (has_residual) dr = dx.copy_to(xn.place(), false);
    return {dx, dr, weight ? paddle::full(std::vector<int64_t>{cols}, 0.0, weight->dtype(), xn.place()) : Tensor(),
            bias ? paddle::full(std::vector<int64_t>{cols}, 0.0, bias->dtype(), xn.place()) : Tensor()};
  }
  const OptTensor w = AsF32(weight);
  Tensor dx = paddle::empty(shape, xn.dtype(), xn.place());
  if (has_residual) dr = paddle::empty(shape, xn.dtype(), xn.place());
  Tensor dw = weight ? paddle::empty(std::vector<int64_t>{cols}, DataType::FLOAT32, xn.place()) : Tensor();
  Tensor db = bias ? paddle::empty(std::vector<int64_t>{cols}, DataType::FLOAT32, xn.place()) : Tensor();
  Tensor* drp = has_residual ? &dr : nullptr;
  Tensor* dwp = weight ? &dw : nullptr;
  Tensor* dbp = bias ? &db : nullptr;
  const Tensor dyc = dy.is_contiguous() ? dy : dy.contiguous();
  switch (xn.dtype()) {
    case DataType::FLOAT32:
      Backward<float>(xn, w, mean, rstd, dyc, dresidual_out, dx, drp, dwp, dbp, rms_norm);
      break;
    case DataType::FLOAT16:
      Backward<__half>(xn, w, mean, rstd, dyc, dresidual_out, dx, drp, dwp, dbp, rms_norm);
      break;
    case DataType::BFLOAT16:
      Backward<__nv_bfloat16>(xn, w, mean, rstd, dyc, dresidual_out, dx, drp, dwp, dbp, rms_norm);
      break;
    default:
      PD_THROW("fused_ln CUDA: x must be float32, float16 or bfloat16.");
  }
  if (weight && weight->dtype() != DataType::FLOAT32) dw = dw.cast(weight->dtype());
  if (bias && bias->dtype() != DataType::FLOAT32) db = db.cast(bias->dtype());
  return {dx, dr, dw, db};
}
