// Paddle custom operator `fused_ln`: optional residual add, then LayerNorm or
// RMSNorm over the last axis, with its gradient operator.
//
//   y, residual_out, mean, rstd = fused_ln(x, residual?, weight?, bias?,
//                                          epsilon, rms_norm, portable)
//
// residual_out = x + residual (an empty [0] tensor when no residual is given)
// is the tensor the norm is taken of and the next residual stream of a
// pre-norm transformer block; mean and rstd are float32 [rows] statistics kept
// for the backward pass. For RMSNorm mean is all zeros.
//
// This file checks arguments, allocates outputs and dispatches to the CPU
// kernels (fused_ln_cpu.cc) or, when Paddle is built with CUDA, to the GPU
// launchers (fused_ln_op.cu). It includes paddle/phi/api/all.h rather than
// paddle/extension.h: the operator needs nothing more, and the narrower header
// compiles in a fraction of the time.
#include <cstdint>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fused_ln_cpu.h"
#include "paddle/phi/api/all.h"

using paddle::DataType;
using paddle::Tensor;
using OptTensor = paddle::optional<Tensor>;

#if defined(PADDLE_WITH_CUDA)
// Defined in fused_ln_op.cu; arguments are validated and contiguous.
std::vector<Tensor> FusedLnCudaForward(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                                       const OptTensor& bias, float epsilon, bool rms_norm);
std::vector<Tensor> FusedLnCudaBackward(const Tensor& xn, const OptTensor& weight, const Tensor& mean,
                                        const Tensor& rstd, const Tensor& dy, const OptTensor& dresidual_out,
                                        bool has_residual, const OptTensor& bias, bool rms_norm);
#endif

namespace {

bool IsHalf(DataType t) { return t == DataType::FLOAT16 || t == DataType::BFLOAT16; }

std::string DtypeName(DataType t) {
  switch (t) {
    case DataType::FLOAT32:
      return "float32";
    case DataType::FLOAT16:
      return "float16";
    case DataType::BFLOAT16:
      return "bfloat16";
    case DataType::FLOAT64:
      return "float64";
    default:
      return "dtype#" + std::to_string(static_cast<int>(t));
  }
}

std::vector<int64_t> StatShape(const std::vector<int64_t>& x_shape) {
  return std::vector<int64_t>(x_shape.begin(), x_shape.end() - 1);
}

Tensor Contig(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

OptTensor Contig(const OptTensor& t) { return t ? OptTensor(Contig(*t)) : OptTensor(); }

// Rejects anything the kernels do not handle, naming the offending argument.
void CheckArgs(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias) {
  const auto& shape = x.shape();
  PD_CHECK(!shape.empty(), "fused_ln: x must have at least one dimension (the normalised axis); got a 0-d tensor.");
  const int64_t cols = shape.back();
  PD_CHECK(cols >= 1, "fused_ln: the last axis of x must be non-empty; got shape with last dim ", cols, ".");
  const DataType dt = x.dtype();
  PD_CHECK(dt == DataType::FLOAT32 || IsHalf(dt), "fused_ln: x must be float32, float16 or bfloat16; got ",
           DtypeName(dt), ". Use paddle.nn.functional.layer_norm for other dtypes.");
  if (residual) {
    PD_CHECK(residual->shape() == shape, "fused_ln: residual must have the shape of x.");
    PD_CHECK(residual->dtype() == dt, "fused_ln: residual dtype ", DtypeName(residual->dtype()),
             " differs from x dtype ", DtypeName(dt), "; cast one of them.");
    PD_CHECK(residual->place() == x.place(), "fused_ln: residual and x are on different devices.");
  }
  for (const OptTensor* p : {&weight, &bias}) {
    if (!*p) continue;
    const char* name = p == &weight ? "weight" : "bias";
    PD_CHECK((*p)->numel() == cols, "fused_ln: ", name, " must have ", cols, " elements (the last axis of x); got ",
             (*p)->numel(), ".");
    PD_CHECK((*p)->dtype() == dt || (*p)->dtype() == DataType::FLOAT32, "fused_ln: ", name, " must be float32 or ",
             DtypeName(dt), " like x; got ", DtypeName((*p)->dtype()), ".");
    PD_CHECK((*p)->place() == x.place(), "fused_ln: ", name, " and x are on different devices.");
  }
}

// Paddle's CPU allocator hands large blocks back to the OS, so every fresh
// output is first-touched page by page: for a 25 MB tensor ~6000 page faults,
// which cost as much as the kernel itself. Asking for transparent huge pages on
// the (still untouched) buffer turns them into a dozen 2 MB faults. A hint only:
// it is ignored where THP is disabled, and memory already touched stays as is.
void HintHugePages(Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data());
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * 4;
  if (bytes < 4 * kHuge) return;
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

const float* OptF32(const OptTensor& t) { return t ? t->data<float>() : nullptr; }

OptTensor AsF32(const OptTensor& t) {
  if (!t || t->dtype() == DataType::FLOAT32) return t;
  return OptTensor(t->cast(DataType::FLOAT32));
}

Tensor AsF32(const Tensor& t) { return t.dtype() == DataType::FLOAT32 ? t : t.cast(DataType::FLOAT32); }

Tensor CastTo(const Tensor& t, DataType dt) { return t.dtype() == dt ? t : t.cast(dt); }

// fp16 / bf16 on CPU are computed in float32 (cast in, cast out): CPUs have no
// fast half arithmetic and the statistics are float32 anyway.
std::vector<Tensor> CpuForward(const Tensor& x_in, const OptTensor& residual_in, const OptTensor& weight,
                               const OptTensor& bias, float epsilon, bool rms_norm, bool portable) {
  const DataType dt = x_in.dtype();
  const Tensor x = AsF32(x_in);
  const OptTensor residual = AsF32(residual_in);
  const OptTensor w = AsF32(weight), b = AsF32(bias);
  const auto& shape = x.shape();
  const int64_t cols = shape.back();
  const int64_t rows = cols > 0 ? x.numel() / cols : 0;

  Tensor y = paddle::empty(shape, DataType::FLOAT32, x.place());
  Tensor s = paddle::empty(residual ? shape : std::vector<int64_t>{0}, DataType::FLOAT32, x.place());
  Tensor mean = paddle::empty(StatShape(shape), DataType::FLOAT32, x.place());
  Tensor rstd = paddle::empty(StatShape(shape), DataType::FLOAT32, x.place());
  HintHugePages(y);
  if (residual) HintHugePages(s);

  fused_ln::CpuForwardArgs args;
  args.x = x.data<float>();
  args.residual = residual ? residual->data<float>() : nullptr;
  args.weight = OptF32(w);
  args.bias = OptF32(b);
  args.y = y.data<float>();
  args.residual_out = residual ? s.data<float>() : nullptr;
  args.mean = mean.data<float>();
  args.rstd = rstd.data<float>();
  args.rows = rows;
  args.cols = cols;
  args.epsilon = epsilon;
  args.rms_norm = rms_norm;
  args.portable = portable;
  fused_ln::cpu_forward(args);
  return {CastTo(y, dt), CastTo(s, dt), mean, rstd};
}

std::vector<Tensor> CpuBackward(const Tensor& xn_in, const OptTensor& weight, const Tensor& mean, const Tensor& rstd,
                                const Tensor& dy_in, const OptTensor& ds_in, bool has_residual, const OptTensor& bias,
                                bool rms_norm, bool portable) {
  const bool has_bias = static_cast<bool>(bias);
  const DataType dt = xn_in.dtype();
  const Tensor xn = AsF32(xn_in);
  const OptTensor w = AsF32(weight);
  const bool has_dy = dy_in.initialized();
  const Tensor dy = has_dy ? AsF32(Contig(dy_in)) : Tensor();
  const OptTensor ds = AsF32(Contig(ds_in));
  const auto& shape = xn.shape();
  const int64_t cols = shape.back();
  const int64_t rows = xn.numel() / cols;

  Tensor dx = paddle::empty(shape, DataType::FLOAT32, xn.place());
  Tensor dr = has_residual ? paddle::empty(shape, DataType::FLOAT32, xn.place()) : Tensor();
  Tensor dw = weight ? paddle::empty(std::vector<int64_t>{cols}, DataType::FLOAT32, xn.place()) : Tensor();
  Tensor db = has_bias ? paddle::empty(std::vector<int64_t>{cols}, DataType::FLOAT32, xn.place()) : Tensor();
  HintHugePages(dx);
  if (has_residual) HintHugePages(dr);

  fused_ln::CpuBackwardArgs args;
  args.xn = xn.data<float>();
  args.weight = OptF32(w);
  args.mean = mean.data<float>();
  args.rstd = rstd.data<float>();
  args.dy = has_dy ? dy.data<float>() : nullptr;
  args.dresidual_out = ds ? ds->data<float>() : nullptr;
  args.dx = dx.data<float>();
  args.dresidual = has_residual ? dr.data<float>() : nullptr;
  args.dweight = weight ? dw.data<float>() : nullptr;
  args.dbias = has_bias ? db.data<float>() : nullptr;
  args.rows = rows;
  args.cols = cols;
  args.rms_norm = rms_norm;
  args.portable = portable;
  fused_ln::cpu_backward(args);
  return {CastTo(dx, dt), has_residual ? CastTo(dr, dt) : Tensor(), weight ? CastTo(dw, weight->dtype()) : Tensor(),
          has_bias ? CastTo(db, bias->dtype()) : Tensor()};
}

}  // namespace

std::vector<Tensor> FusedLnForward(const Tensor& x_in, const OptTensor& residual_in, const OptTensor& weight_in,
                                   const OptTensor& bias_in, float epsilon, bool rms_norm, bool portable) {
  const Tensor x = Contig(x_in);
  const OptTensor residual = Contig(residual_in), weight = Contig(weight_in), bias = Contig(bias_in);
  CheckArgs(x, residual, weight, bias);
  if (x.is_cpu()) return CpuForward(x, residual, weight, bias, epsilon, rms_norm, portable);
#if defined(PADDLE_WITH_CUDA)
  if (x.is_gpu()) return FusedLnCudaForward(x, residual, weight, bias, epsilon, rms_norm);
#endif
  PD_THROW("fused_ln: unsupported device for x; this build has CPU",
#if defined(PADDLE_WITH_CUDA)
           " and CUDA",
#endif
           " kernels only.");
}

std::vector<Tensor> FusedLnBackward(const Tensor& x, const OptTensor& residual, const OptTensor& weight_in,
                                    const OptTensor& bias, const Tensor& residual_out, const Tensor& mean,
                                    const Tensor& rstd, const Tensor& dy, const Tensor& dresidual_out, bool rms_norm,
                                    bool portable) {
  const bool has_residual = static_cast<bool>(residual);
  // With a residual the norm was taken of residual_out = x + residual.
  const Tensor xn = Contig(has_residual ? residual_out : x);
  const OptTensor weight = Contig(weight_in);
  const OptTensor ds = (has_residual && dresidual_out.initialized()) ? OptTensor(dresidual_out) : OptTensor();
  if (xn.is_cpu()) {
    return CpuBackward(xn, weight, mean, rstd, dy, ds, has_residual, bias, rms_norm, portable);
  }
#if defined(PADDLE_WITH_CUDA)
  if (xn.is_gpu()) {
    return FusedLnCudaBackward(xn, weight, mean, rstd, dy, Contig(ds), has_residual, bias, rms_norm);
  }
#endif
  PD_THROW("fused_ln_grad: unsupported device.");
}

std::vector<std::vector<int64_t>> FusedLnInferShape(const std::vector<int64_t>& x_shape,
                                                    const paddle::optional<std::vector<int64_t>>& residual_shape,
                                                    const paddle::optional<std::vector<int64_t>>& weight_shape,
                                                    const paddle::optional<std::vector<int64_t>>& bias_shape) {
  const std::vector<int64_t> stat(x_shape.begin(), x_shape.end() - (x_shape.empty() ? 0 : 1));
  return {x_shape, residual_shape ? x_shape : std::vector<int64_t>{0}, stat, stat};
}

std::vector<DataType> FusedLnInferDtype(const DataType& x_dtype, const paddle::optional<DataType>& residual_dtype,
                                        const paddle::optional<DataType>& weight_dtype,
                                        const paddle::optional<DataType>& bias_dtype) {
  return {x_dtype, x_dtype, DataType::FLOAT32, DataType::FLOAT32};
}

PD_BUILD_OP(fused_ln)
    .Inputs({"X", paddle::Optional("Residual"), paddle::Optional("Weight"), paddle::Optional("Bias")})
    .Outputs({"Y", "ResidualOut", "Mean", "Rstd"})
    .Attrs({"epsilon: float", "rms_norm: bool", "portable: bool"})
    .SetKernelFn(PD_KERNEL(FusedLnForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FusedLnInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FusedLnInferDtype));

PD_BUILD_GRAD_OP(fused_ln)
    .Inputs({"X", paddle::Optional("Residual"), paddle::Optional("Weight"), paddle::Optional("Bias"), "ResidualOut",
             "Mean", "Rstd", paddle::Grad("Y"), paddle::Grad("ResidualOut")})
    .Outputs({paddle::Grad("X"), paddle::Grad(paddle::Optional("Residual")), paddle::Grad(paddle::Optional("Weight")),
              paddle::Grad(paddle::Optional("Bias"))})
    .Attrs({"rms_norm: bool", "portable: bool"})
    .SetKernelFn(PD_KERNEL(FusedLnBackward));
