// The adaptive sampler's matrices from its saliency logits, forward and backward, one sample per task.
//
// The same maths as timm_ssb.layers.sampling_matrices.adaptive_matrices (the reference; read its docstrings for
// the why), for maps whose two axes are both resampled: the saliency map is the softmax of the logits over all
// H x W positions; its log-marginal along each axis places the samples (saliency_positions: a Gaussian
// neighbourhood of each uniform target, weighted by the marginal, over the axis extended by replicate padding,
// minus the same neighbourhood under constant saliency, tail cut at exp(-50) of the row's largest, positions
// clamped to [0, 1]); Gaussian read-out and scatter-back matrices at those positions (gaussian_matrices: tail
// cut at exp(-18)). In PyTorch that is about a hundred small tensor ops per block, forward, and as many again
// backward; here it is one call each way, in double precision, with the exponentials that do not depend on the
// sample (the attraction kernel, the uniform neighbourhood) computed once per call, and the Gaussian matrices'
// exponentials evaluated only inside their cut.
//
// Logits (B, H, W) float32 or float64; the matrices come out in that dtype: down_y (B, s, H), down_x (B, s, W),
// up_y (B, H, s), up_x (B, W, s). A sample with a NaN or infinite logit sum gets all-NaN matrices (as in
// PyTorch, where its log-softmax is NaN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

// The softmaxes' tail cuts, timm_ssb.layers.tail_cuts' constants, passed by the build (cpu/build.py's cflags):
// the saliency-weighted neighbourhoods' (SMALLEST_WEIGHT_LOG) and the Gaussian sampling matrices' (KERNEL_WEIGHT_LOG).
constexpr double kPositionCut = TIMM_SSB_SMALLEST_WEIGHT_LOG;
constexpr double kKernelCut = TIMM_SSB_KERNEL_WEIGHT_LOG;
// Below this, a product of a marginal and a kernel weight may have lost precision (subnormal doubles start at
// 2e-308): the neighbourhood is computed in log space instead.
constexpr double kSmallestProduct = 1e-280;

// What the positions along one axis need that does not depend on the sample.
struct Axis {
  int64_t length, size;
  double a_down, a_up;                // 0.5 / sigma^2 of the read-out and scatter kernels
  std::vector<double> target;         // (s): uniform targets (i + 1/2) / s
  std::vector<double> extended;       // (3L): pixel centres of the axis extended by L on each side
  std::vector<double> centre;         // (L): pixel centres (j + 1/2) / L
  std::vector<double> kernel_log;     // (s, 3L): attraction kernel minus its row maximum (<= 0)
  std::vector<double> kernel_exp;     // (s, 3L): exp(kernel_log)
  std::vector<double> uniform_mean;   // (s): sum_j w0_ij e_j, the neighbourhood's mean under constant saliency

  Axis(int64_t length, int64_t size, double sigma_g, double sigma_down, double sigma_up)
      : length(length), size(size), a_down(0.5 / (sigma_down * sigma_down)), a_up(0.5 / (sigma_up * sigma_up)),
        target(size), extended(3 * length), centre(length), kernel_log(size * 3 * length),
        kernel_exp(size * 3 * length), uniform_mean(size) {
    const int64_t n = 3 * length;
    for (int64_t i = 0; i < size; ++i) target[i] = (i + 0.5) / size;
    for (int64_t j = 0; j < n; ++j) extended[j] = (j - length + 0.5) / length;
    for (int64_t j = 0; j < length; ++j) centre[j] = (j + 0.5) / length;
    const double a_g = 0.5 / (sigma_g * sigma_g);
    for (int64_t i = 0; i < size; ++i) {
      double* k = kernel_log.data() + i * n;
      double largest = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const double d = target[i] - extended[j];
        k[j] = -a_g * d * d;
        largest = std::max(largest, k[j]);
      }
      for (int64_t j = 0; j < n; ++j) {
        k[j] -= largest;
        kernel_exp[i * n + j] = std::exp(k[j]);
      }
    }
    // Under constant saliency by the very operations a sample's neighbourhood takes, so that constant saliency
    // gives the uniform targets exactly (their difference is zero, not a rounding error).
    const std::vector<double> zero(length, 0.0), one(length, 1.0);
    std::vector<double> w(n);
    for (int64_t i = 0; i < size; ++i) {
      neighbourhood(zero.data(), one.data(), i, w.data());
      uniform_mean[i] = mean(w.data());
    }
  }

  // sum_j w_j e_j: the mean of a neighbourhood's points.
  double mean(const double* w) const {
    double m = 0.0;
    for (int64_t j = 0; j < 3 * length; ++j) m += w[j] * extended[j];
    return m;
  }

  // The pixel of the axis that extended point j replicates.
  int64_t source(int64_t j) const { return std::min(std::max(j - length, int64_t(0)), length - 1); }

  // Row i of the saliency-weighted neighbourhood w_ij = softmax_j(log_m[source(j)] + kernel_log_ij), tail cut.
  // log_m: (L) log-marginal minus its maximum; marginal: (L) its exponential.
  void neighbourhood(const double* log_m, const double* marginal, int64_t i, double* w) const {
    const int64_t n = 3 * length;
    const double* k_exp = kernel_exp.data() + i * n;
    double largest = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      w[j] = marginal[source(j)] * k_exp[j];
      largest = std::max(largest, w[j]);
    }
    if (largest >= kSmallestProduct) {
      const double floor = largest * std::exp(kPositionCut);
      double total = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        w[j] = w[j] >= floor ? w[j] : 0.0;
        total += w[j];
      }
      for (int64_t j = 0; j < n; ++j) w[j] /= total;
      return;
    }
    const double* k_log = kernel_log.data() + i * n;
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) top = std::max(top, log_m[source(j)] + k_log[j]);
    double total = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double z = log_m[source(j)] + k_log[j] - top;
      w[j] = z >= kPositionCut ? std::exp(z) : 0.0;
      total += w[j];
    }
    for (int64_t j = 0; j < n; ++j) w[j] /= total;
  }
};

// Per-thread buffers for one sample's axis.
struct AxisWork {
  std::vector<double> log_m, marginal, w, unclamped, position, down, up;
  explicit AxisWork(const Axis& axis)
      : log_m(axis.length), marginal(axis.length), w(3 * axis.length), unclamped(axis.size), position(axis.size),
        down(axis.size * axis.length), up(axis.length * axis.size) {}
};

// Positions along the axis (unclamped and clamped to [0, 1]) from its log-marginal lm (L).
void positions(const Axis& axis, const double* lm, AxisWork& work) {
  const double top = *std::max_element(lm, lm + axis.length);
  for (int64_t l = 0; l < axis.length; ++l) {
    work.log_m[l] = lm[l] - top;
    work.marginal[l] = std::exp(work.log_m[l]);
  }
  for (int64_t i = 0; i < axis.size; ++i) {
    axis.neighbourhood(work.log_m.data(), work.marginal.data(), i, work.w.data());
    work.unclamped[i] = axis.target[i] + (axis.mean(work.w.data()) - axis.uniform_mean[i]);
    work.position[i] = std::min(std::max(work.unclamped[i], 0.0), 1.0);
  }
}

// row[k] = softmax_k(-a * squared(k)) over count entries, tail cut at kKernelCut below the largest; exponentials
// only inside the cut.
template <typename Squared>
void gaussian_row(double a, int64_t count, Squared squared, double* row) {
  double nearest = std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < count; ++k) nearest = std::min(nearest, squared(k));
  double total = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    const double z = -a * (squared(k) - nearest);
    row[k] = z >= kKernelCut ? std::exp(z) : 0.0;
    total += row[k];
  }
  for (int64_t k = 0; k < count; ++k) row[k] /= total;
}

// Gaussian matrices at the positions: down (s, L) rows over pixels j and up (L, s) rows over samples i are
// softmaxes of -a (u_i - c_j)^2.
void gaussian(const Axis& axis, AxisWork& work) {
  const int64_t s = axis.size, L = axis.length;
  const double* u = work.position.data();
  const double* c = axis.centre.data();
  for (int64_t i = 0; i < s; ++i) {
    gaussian_row(axis.a_down, L, [&](int64_t j) { return (u[i] - c[j]) * (u[i] - c[j]); }, work.down.data() + i * L);
  }
  for (int64_t j = 0; j < L; ++j) {
    gaussian_row(axis.a_up, s, [&](int64_t i) { return (u[i] - c[j]) * (u[i] - c[j]); }, work.up.data() + j * s);
  }
}

// Gradient of the positions from the matrices' gradients (either may be null: zero), through the Gaussian
// softmaxes, the clamp (passing at the bounds, as torch.clamp) and the neighbourhood softmaxes, to the
// log-marginal: d_lm (L), overwritten. (The marginal's maximum, subtracted before the softmaxes, gets no gradient:
// each softmax row's gradient sums to zero.)
template <typename T>
void positions_backward(const Axis& axis, const T* grad_down, const T* grad_up, AxisWork& work, double* d_lm) {
  const int64_t s = axis.size, L = axis.length, n = 3 * L;
  const double* u = work.position.data();
  std::vector<double> du(s, 0.0);
  if (grad_down) {
    for (int64_t i = 0; i < s; ++i) {
      const double* row = work.down.data() + i * L;
      const T* g = grad_down + i * L;
      double dot = 0.0;
      for (int64_t j = 0; j < L; ++j) dot += row[j] * static_cast<double>(g[j]);
      for (int64_t j = 0; j < L; ++j) {
        du[i] += row[j] * (static_cast<double>(g[j]) - dot) * (-2.0 * axis.a_down) * (u[i] - axis.centre[j]);
      }
    }
  }
  if (grad_up) {
    for (int64_t j = 0; j < L; ++j) {
      const double* row = work.up.data() + j * s;
      const T* g = grad_up + j * s;
      double dot = 0.0;
      for (int64_t i = 0; i < s; ++i) dot += row[i] * static_cast<double>(g[i]);
      for (int64_t i = 0; i < s; ++i) {
        du[i] += row[i] * (static_cast<double>(g[i]) - dot) * (-2.0 * axis.a_up) * (u[i] - axis.centre[j]);
      }
    }
  }
  std::fill(d_lm, d_lm + L, 0.0);
  for (int64_t i = 0; i < s; ++i) {
    const double v = work.unclamped[i];
    if (!(v >= 0.0 && v <= 1.0) || du[i] == 0.0) continue;
    axis.neighbourhood(work.log_m.data(), work.marginal.data(), i, work.w.data());
    const double mean = axis.mean(work.w.data());
    for (int64_t j = 0; j < n; ++j) d_lm[axis.source(j)] += work.w[j] * du[i] * (axis.extended[j] - mean);
  }
}

// One sample's saliency map and its log-marginals. With e = exp(logits - max) (H, W), the saliency map is
// e / sum(e) and the marginals are e's row and column sums over that sum: one exponential per position. A row or
// column whose sum is too small to keep its precision is summed in log space.
struct Saliency {
  int64_t height, width;
  std::vector<double> logit, e, row_sum, col_sum, lm_y, lm_x;
  double total = 0.0;
  Saliency(int64_t height, int64_t width)
      : height(height), width(width), logit(height * width), e(height * width), row_sum(height), col_sum(width),
        lm_y(height), lm_x(width) {}

  // Returns false if the logits' log-sum-exp is not finite (NaN, +inf or all -inf logits).
  template <typename T>
  bool compute(const T* logits) {
    const int64_t n = height * width;
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < n; ++k) {
      logit[k] = static_cast<double>(logits[k]);
      top = std::max(top, logit[k]);
    }
    if (!std::isfinite(top)) return false;
    total = 0.0;
    std::fill(row_sum.begin(), row_sum.end(), 0.0);
    std::fill(col_sum.begin(), col_sum.end(), 0.0);
    for (int64_t h = 0; h < height; ++h) {
      for (int64_t w = 0; w < width; ++w) {
        logit[h * width + w] -= top;
        const double v = std::exp(logit[h * width + w]);
        e[h * width + w] = v;
        row_sum[h] += v;
        col_sum[w] += v;
        total += v;
      }
    }
    if (std::isnan(total)) return false;
    const double log_total = std::log(total);
    for (int64_t h = 0; h < height; ++h) lm_y[h] = log_sum(row_sum[h], logit.data() + h * width, width, 1) - log_total;
    for (int64_t w = 0; w < width; ++w) lm_x[w] = log_sum(col_sum[w], logit.data() + w, height, width) - log_total;
    return true;
  }

  // exp(logit - lm) / exp(log_total) for one entry of a row (or column) whose sum is sum: its share of that sum.
  double share(int64_t k, double sum, double lm) const {
    return sum >= kSmallestProduct ? e[k] / sum : std::exp(logit[k] - std::log(total) - lm);
  }

 private:
  static double log_sum(double sum, const double* v, int64_t count, int64_t stride) {
    if (sum >= kSmallestProduct) return std::log(sum);
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < count; ++k) m = std::max(m, v[k * stride]);
    if (m == -std::numeric_limits<double>::infinity()) return m;
    double s = 0.0;
    for (int64_t k = 0; k < count; ++k) s += std::exp(v[k * stride] - m);
    return m + std::log(s);
  }
};

template <typename T>
void store(const std::vector<double>& src, T* dst) {
  for (size_t k = 0; k < src.size(); ++k) dst[k] = static_cast<T>(src[k]);
}

void check_arguments(const at::Tensor& logits, int64_t size, double sigma_g, double sigma_down, double sigma_up) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3 && logits.is_contiguous(),
              "logits must be a contiguous (B, H, W) CPU tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "logits must be float32 or float64");
  TORCH_CHECK(size > 0 && size < logits.size(1) && size < logits.size(2),
              "size must be positive and smaller than both sides of the map");
  const std::pair<const char*, double> sigmas[3] = {{"sigma_g", sigma_g}, {"sigma_down", sigma_down},
                                                    {"sigma_up", sigma_up}};
  for (const auto& [name, sigma] : sigmas) {
    TORCH_CHECK(std::isfinite(sigma) && sigma > 0.0, name, " must be a positive finite number; got ", sigma);
  }
}

std::vector<at::Tensor> adaptive_matrices(const at::Tensor& logits, int64_t size, double sigma_g, double sigma_down,
                                          double sigma_up) {
  check_arguments(logits, size, sigma_g, sigma_down, sigma_up);
  const int64_t batch = logits.size(0), height = logits.size(1), width = logits.size(2);
  const Axis axis_y(height, size, sigma_g, sigma_down, sigma_up), axis_x(width, size, sigma_g, sigma_down, sigma_up);
  auto options = logits.options();
  at::Tensor down_y = at::empty({batch, size, height}, options), down_x = at::empty({batch, size, width}, options);
  at::Tensor up_y = at::empty({batch, height, size}, options), up_x = at::empty({batch, width, size}, options);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "adaptive_matrices", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Saliency saliency(height, width);
      AxisWork work_y(axis_y), work_x(axis_x);
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* outs[4] = {down_y.data_ptr<scalar_t>() + b * size * height,
                             down_x.data_ptr<scalar_t>() + b * size * width, up_y.data_ptr<scalar_t>() + b * height * size,
                             up_x.data_ptr<scalar_t>() + b * width * size};
        if (!saliency.compute(logits.data_ptr<scalar_t>() + b * height * width)) {
          std::fill(outs[0], outs[0] + size * height, std::numeric_limits<scalar_t>::quiet_NaN());
          std::fill(outs[1], outs[1] + size * width, std::numeric_limits<scalar_t>::quiet_NaN());
          std::fill(outs[2], outs[2] + height * size, std::numeric_limits<scalar_t>::quiet_NaN());
          std::fill(outs[3], outs[3] + width * size, std::numeric_limits<scalar_t>::quiet_NaN());
          continue;
        }
        positions(axis_y, saliency.lm_y.data(), work_y);
        positions(axis_x, saliency.lm_x.data(), work_x);
        gaussian(axis_y, work_y);
        gaussian(axis_x, work_x);
        store(work_y.down, outs[0]);
        store(work_x.down, outs[1]);
        store(work_y.up, outs[2]);
        store(work_x.up, outs[3]);
      }
    });
  });
  return {down_y, down_x, up_y, up_x};
}

// The logits' gradient from the matrices' gradients (undefined: zero), recomputing the forward from the logits.
at::Tensor adaptive_matrices_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& grad_down_y,
                                      const c10::optional<at::Tensor>& grad_down_x,
                                      const c10::optional<at::Tensor>& grad_up_y,
                                      const c10::optional<at::Tensor>& grad_up_x, int64_t size, double sigma_g,
                                      double sigma_down, double sigma_up) {
  check_arguments(logits, size, sigma_g, sigma_down, sigma_up);
  const int64_t batch = logits.size(0), height = logits.size(1), width = logits.size(2);
  const Axis axis_y(height, size, sigma_g, sigma_down, sigma_up), axis_x(width, size, sigma_g, sigma_down, sigma_up);
  const std::vector<int64_t> shapes[4] = {{batch, size, height}, {batch, size, width}, {batch, height, size},
                                          {batch, width, size}};
  at::Tensor grads[4];
  const c10::optional<at::Tensor>* given[4] = {&grad_down_y, &grad_down_x, &grad_up_y, &grad_up_x};
  for (int k = 0; k < 4; ++k) {
    if (given[k]->has_value() && given[k]->value().defined()) {
      grads[k] = given[k]->value().to(logits.scalar_type()).contiguous();
      TORCH_CHECK(grads[k].sizes() == at::IntArrayRef(shapes[k]), "gradient ", k, " has the wrong shape");
    }
  }
  at::Tensor grad_logits = at::zeros_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "adaptive_matrices_backward", [&] {
    auto ptr = [&](int k, int64_t offset) -> const scalar_t* {
      return grads[k].defined() ? grads[k].data_ptr<scalar_t>() + offset : nullptr;
    };
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Saliency saliency(height, width);
      std::vector<double> d_lm_y(height), d_lm_x(width), d_ls(height * width);
      AxisWork work_y(axis_y), work_x(axis_x);
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* out = grad_logits.data_ptr<scalar_t>() + b * height * width;
        if (!saliency.compute(logits.data_ptr<scalar_t>() + b * height * width)) {
          std::fill(out, out + height * width, std::numeric_limits<scalar_t>::quiet_NaN());
          continue;
        }
        positions(axis_y, saliency.lm_y.data(), work_y);
        positions(axis_x, saliency.lm_x.data(), work_x);
        gaussian(axis_y, work_y);
        gaussian(axis_x, work_x);
        positions_backward(axis_y, ptr(0, b * size * height), ptr(2, b * height * size), work_y, d_lm_y.data());
        positions_backward(axis_x, ptr(1, b * size * width), ptr(3, b * width * size), work_x, d_lm_x.data());
        // Through the log-marginals (log-sum-exps along each axis) to the log-saliency map, then through its
        // log-softmax to the logits.
        // (d lm_y[h] / d ls[h][w] is row h's share of exp(ls), likewise for columns; an all -inf row has none.)
        double total = 0.0;
        for (int64_t h = 0; h < height; ++h) {
          for (int64_t w = 0; w < width; ++w) {
            const int64_t k = h * width + w;
            double d = 0.0;
            if (saliency.lm_y[h] > -std::numeric_limits<double>::infinity()) {
              d += d_lm_y[h] * saliency.share(k, saliency.row_sum[h], saliency.lm_y[h]);
            }
            if (saliency.lm_x[w] > -std::numeric_limits<double>::infinity()) {
              d += d_lm_x[w] * saliency.share(k, saliency.col_sum[w], saliency.lm_x[w]);
            }
            d_ls[k] = d;
            total += d;
          }
        }
        for (int64_t k = 0; k < height * width; ++k) {
          out[k] = static_cast<scalar_t>(d_ls[k] - saliency.e[k] / saliency.total * total);
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(timm_ssb_cpu, m) {
  m.def("adaptive_matrices(Tensor logits, int size, float sigma_g, float sigma_down, float sigma_up) -> Tensor[]");
  m.def(
      "adaptive_matrices_backward(Tensor logits, Tensor? grad_down_y, Tensor? grad_down_x, Tensor? grad_up_y, "
      "Tensor? grad_up_x, int size, float sigma_g, float sigma_down, float sigma_up) -> Tensor");
  m.impl("adaptive_matrices", c10::DispatchKey::CPU, TORCH_FN(adaptive_matrices));
  m.impl("adaptive_matrices_backward", c10::DispatchKey::CPU, TORCH_FN(adaptive_matrices_backward));
}
