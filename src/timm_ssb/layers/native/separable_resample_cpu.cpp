// Fused separable resampling on channels-last CPU maps: out = epilogue(A_y @ x @ A_x^T), per sample and channel.
//
// x is (B, C, H, W) in channels-last memory, i.e. (B, H, W, C) contiguous; a_y (B, P, H) and a_x (B, Q, W) are
// float32 matrices; the output is (B, C, P, Q), channels-last. The epilogue optionally adds a residual of the
// output's shape and applies a ReLU. One pass: each output row p reads only the input rows where a_y[p] is not
// zero (the band of a Gaussian read-out, its tail cut to exact zeros) into a float32 row buffer over (W, C), then
// each output pixel q reads only the columns where a_x[q] is not zero, adds the residual, applies the ReLU and
// stores -- the full-resolution map is read once and the output written once, with no intermediate tensor.
// float32 and bfloat16 maps (bfloat16 in and out, float32 accumulation). The same op maps a result back up
// (P = H of the block, x the small map) and, with transposed matrices, computes the gradients of both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 16 float32 lanes: one AVX-512 register, two AVX2 ones (GCC/Clang vector extensions; unaligned by memcpy).
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

constexpr int kRows = 4;  // outputs computed together, sharing each load of an input row

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load16(const c10::BFloat16* p) {
  u16x16 half;
  std::memcpy(&half, p, sizeof(half));
  u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

inline void store16(c10::BFloat16* p, f32x16 v) {
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
  rounded = v != v ? u32x16{} + 0x7FC0u : rounded;                 // NaN stays NaN
  u16x16 half = __builtin_convertvector(rounded, u16x16);
  std::memcpy(p, &half, sizeof(half));
}

inline float load1(const float* p) { return *p; }

inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }

inline void store1(float* p, float value) { *p = value; }

inline void store1(c10::BFloat16* p, float value) { *p = c10::BFloat16(value); }  // round to nearest even

// [first, last + 1) of the nonzero entries of each row of a (rows, cols) matrix; an all-zero row gives [0, 0).
void nonzero_bands(const float* m, int64_t rows, int64_t cols, int64_t* lo, int64_t* hi) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * cols;
    int64_t first = 0, last = cols;
    while (first < cols && row[first] == 0.0f) ++first;
    while (last > first && row[last - 1] == 0.0f) --last;
    lo[r] = first < last ? first : 0;
    hi[r] = first < last ? last : 0;
  }
}

// dst[r][j] = epilogue(sum_k w[r * w_stride + k] * src[k][j]) for r < R and j in [offset, offset + 16 V): R outputs
// of 16 V values accumulated in float32 registers, each input vector loaded once for all R. The epilogue adds
// res[r][j] (if res) and applies a ReLU (if relu) before storing in D.
template <typename T, typename D, int R, int V>
inline void weighted_rows(const float* w, int64_t w_stride, const T* const* src, int64_t count, int64_t offset,
                          D* const* dst, const D* const* res, bool relu) {
  f32x16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = f32x16{};
  for (int64_t k = 0; k < count; ++k) {
    f32x16 in[V];
    for (int v = 0; v < V; ++v) in[v] = load16(src[k] + offset + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float weight = w[r * w_stride + k];
      for (int v = 0; v < V; ++v) acc[r][v] += weight * in[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      f32x16 out = acc[r][v];
      if (res) out += load16(res[r] + offset + 16 * v);
      if (relu) out = out < 0.0f ? f32x16{} : out;
      store16(dst[r] + offset + 16 * v, out);
    }
  }
}

// weighted_rows over [offset, offset + n), any n: blocks of 64 and 16 values, then a scalar tail.
template <typename T, typename D, int R>
void weighted_rows_range(const float* w, int64_t w_stride, const T* const* src, int64_t count, int64_t offset,
                         int64_t n, D* const* dst, const D* const* res, bool relu) {
  const int64_t end = offset + n;
  int64_t j = offset;
  for (; j + 64 <= end; j += 64) weighted_rows<T, D, R, 4>(w, w_stride, src, count, j, dst, res, relu);
  for (; j + 16 <= end; j += 16) weighted_rows<T, D, R, 1>(w, w_stride, src, count, j, dst, res, relu);
  for (; j < end; ++j) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < count; ++k) acc += w[r * w_stride + k] * load1(src[k] + j);
      if (res) acc += load1(res[r] + j);
      if (relu) acc = acc < 0.0f ? 0.0f : acc;
      store1(dst[r] + j, acc);
    }
  }
}

template <typename T>
void resample_kernel(const T* x, const float* a_y, const float* a_x, const T* residual, bool relu, T* out,
                     int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t out_h, int64_t out_w) {
  std::vector<int64_t> y_lo(batch * out_h), y_hi(batch * out_h), x_lo(batch * out_w), x_hi(batch * out_w);
  nonzero_bands(a_y, batch * out_h, height, y_lo.data(), y_hi.data());
  nonzero_bands(a_x, batch * out_w, width, x_lo.data(), x_hi.data());
  // Zero-padded copies of the matrices, kRows - 1 rows longer per sample, so a block of kRows rows never
  // reads past a sample's matrix (the extra outputs are computed and dropped).
  const int64_t pad_h = out_h + kRows - 1, pad_w = out_w + kRows - 1;
  std::vector<float> my(batch * pad_h * height, 0.0f), mx(batch * pad_w * width, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(my.data() + b * pad_h * height, a_y + b * out_h * height, sizeof(float) * out_h * height);
    std::memcpy(mx.data() + b * pad_w * width, a_x + b * out_w * width, sizeof(float) * out_w * width);
  }
  auto block_band = [](const int64_t* lo, const int64_t* hi, int64_t first, int64_t last) {
    int64_t b_lo = INT64_MAX, b_hi = 0;
    for (int64_t i = first; i < last; ++i) {
      if (hi[i] > lo[i]) {
        b_lo = std::min(b_lo, lo[i]);
        b_hi = std::max(b_hi, hi[i]);
      }
    }
    return b_hi > 0 ? std::make_pair(b_lo, b_hi) : std::make_pair(int64_t(0), int64_t(0));
  };
  const int64_t row_len = width * channels;
  const int64_t blocks_h = (out_h + kRows - 1) / kRows, blocks_w = (out_w + kRows - 1) / kRows;
  at::parallel_for(0, batch * blocks_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t(kRows * row_len);        // output rows read along y: kRows x (W, C)
    std::vector<T> scratch_out(channels), scratch_res(channels, T(0));  // for blocks past the last pixel
    std::vector<const float*> t_rows(width);
    std::vector<const T*> x_rows(height);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks_h, p0 = (item % blocks_h) * kRows, p1 = std::min(p0 + kRows, out_h);
      // Columns any output pixel of this sample reads; t is computed only there.
      const auto cols = block_band(x_lo.data() + b * out_w, x_hi.data() + b * out_w, 0, out_w);
      const auto rows = block_band(y_lo.data() + b * out_h, y_hi.data() + b * out_h, p0, p1);
      for (int64_t h = rows.first; h < rows.second; ++h) x_rows[h - rows.first] = x + (b * height + h) * row_len;
      float* t_dst[kRows];
      for (int r = 0; r < kRows; ++r) t_dst[r] = t.data() + r * row_len;
      weighted_rows_range<T, float, kRows>(my.data() + (b * pad_h + p0) * height + rows.first, height,
                                           x_rows.data(), rows.second - rows.first, cols.first * channels,
                                           (cols.second - cols.first) * channels, t_dst, nullptr, false);
      for (int64_t p = p0; p < p1; ++p) {
        const float* t_p = t.data() + (p - p0) * row_len;
        for (int64_t w = 0; w < width; ++w) t_rows[w] = t_p + w * channels;
        for (int64_t qb = 0; qb < blocks_w; ++qb) {
          const int64_t q0 = qb * kRows;
          const auto band = block_band(x_lo.data() + b * out_w, x_hi.data() + b * out_w, q0,
                                       std::min(q0 + kRows, out_w));
          T* out_dst[kRows];
          const T* res_src[kRows];
          for (int r = 0; r < kRows; ++r) {
            const bool inside = q0 + r < out_w;  // rows past the sample's last go to scratch
            const int64_t offset = ((b * out_h + p) * out_w + q0 + r) * channels;
            out_dst[r] = inside ? out + offset : scratch_out.data();
            res_src[r] = !residual ? nullptr : inside ? residual + offset : scratch_res.data();
          }
          weighted_rows_range<float, T, kRows>(mx.data() + (b * pad_w + q0) * width + band.first, width,
                                               t_rows.data() + band.first, band.second - band.first, 0, channels,
                                               out_dst, residual ? res_src : nullptr, relu);
        }
      }
    }
  });
}

at::Tensor separable_resample(const at::Tensor& x, const at::Tensor& a_y, const at::Tensor& a_x,
                              const c10::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "x must be a 4-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels-last contiguous");
  TORCH_CHECK(a_y.scalar_type() == at::kFloat && a_x.scalar_type() == at::kFloat, "matrices must be float32");
  TORCH_CHECK(a_y.dim() == 3 && a_x.dim() == 3 && a_y.is_contiguous() && a_x.is_contiguous(),
              "matrices must be contiguous (B, P, H) and (B, Q, W)");
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = a_y.size(1), out_w = a_x.size(1);
  TORCH_CHECK(a_y.size(0) == batch && a_y.size(2) == height && a_x.size(0) == batch && a_x.size(2) == width,
              "matrix shapes do not fit x");
  auto out = at::empty({batch, channels, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor* res = nullptr;
  if (residual.has_value()) {
    res = &residual.value();
    TORCH_CHECK(res->scalar_type() == x.scalar_type(), "residual must have x's dtype");
    TORCH_CHECK(res->sizes() == out.sizes() && res->is_contiguous(at::MemoryFormat::ChannelsLast),
                "residual must be channels-last with the output's shape");
  }
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    resample_kernel<float>(x.data_ptr<float>(), a_y.data_ptr<float>(), a_x.data_ptr<float>(),
                           res ? res->data_ptr<float>() : nullptr, relu, out.data_ptr<float>(), batch, channels,
                           height, width, out_h, out_w);
  } else {
    using bf16 = c10::BFloat16;
    resample_kernel<bf16>(x.data_ptr<bf16>(), a_y.data_ptr<float>(), a_x.data_ptr<float>(),
                          res ? res->data_ptr<bf16>() : nullptr, relu, out.data_ptr<bf16>(), batch, channels,
                          height, width, out_h, out_w);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(timm_ssb_cpu, m) {
  m.def("separable_resample(Tensor x, Tensor a_y, Tensor a_x, Tensor? residual, bool relu) -> Tensor");
  m.impl("separable_resample", c10::DispatchKey::CPU, TORCH_FN(separable_resample));
}
