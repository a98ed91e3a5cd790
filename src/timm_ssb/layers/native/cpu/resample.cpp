// Fused separable resampling on channels-last CPU maps: out = epilogue(A_y @ x @ A_x^T), per sample and channel.
//
// x is (B, C, H, W) in channels-last memory, i.e. (B, H, W, C) contiguous; matrix_y (B, P, H) and matrix_x (B, Q, W) are
// float32 matrices; the output is (B, C, P, Q), channels-last. The epilogue optionally adds a residual of the
// output's shape and applies a ReLU. One pass: each output row p reads only the input rows where matrix_y[p] is not
// zero (the band of a Gaussian read-out, its tail cut to exact zeros) into a float32 row buffer over (W, C), then
// each output pixel q reads only the columns where matrix_x[q] is not zero, adds the residual, applies the ReLU and
// stores -- the full-resolution map is read once and the output written once, with no intermediate tensor.
// float32 and bfloat16 maps (bfloat16 in and out, float32 accumulation). The same op maps a result back up
// (P = H of the block, x the small map); the gradients are separable_resample_backward's (below).
// separable_resample_saliency also computes a 1x1 conv of the output to one channel (the next block's saliency
// logits) while each output pixel is still in cache, sparing the next block a read of the whole map;
// separable_resample_into_residual writes the output (and those logits) into the residual, for inference where the
// residual is dead after the call.
//
// separable_resample_backward is the whole backward in one call per sample: with g the output's gradient (zero
// where the ReLU cut, written out once for the residual) and u = g A_x (P, W, C), it computes grad_x = A_y^T u,
// grad_A_y[p][h] = <u[p], x[h]> and grad_A_x, in one pass over the rows of the full-resolution map (x when
// mapping down, g when mapping up), so that it is read from memory once (below). The matrices' zeros are
// structural: their gradient is computed on the nonzero entries only (the band of each row) and is zero elsewhere,
// as for a sparse matrix -- exact for matrices whose zero entries have no derivative (a softmax with its tail cut
// to zero, bilinear weights), and a fraction of the dense products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX__)  // implied by AVX2 and AVX-512
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The vector the target ISA has (GCC/Clang vector extensions; unaligned loads by memcpy): 16 float32 lanes and 32
// registers with AVX-512, 8 lanes and 16 registers with AVX/AVX2, 4 lanes (32 registers on AArch64 NEON, 16 on
// SSE). The register tiles below are sized from these, so that their accumulators stay in registers: a tile
// written for one ISA's register file spills on a smaller one (on AVX2 the AVX-512 tiling kept half of its
// accumulators on the stack and ran 3-4x slower than PyTorch's path).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#elif defined(__aarch64__)
constexpr int kVectorBytes = 16, kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 16, kVectorRegisters = 16;
#endif
constexpr int kLanes = kVectorBytes / 4;
typedef float fvec __attribute__((vector_size(kVectorBytes)));
typedef uint16_t u16vec __attribute__((vector_size(kVectorBytes / 2)));
typedef uint32_t u32vec __attribute__((vector_size(kVectorBytes)));

// Outputs computed together, sharing each load of an input row: kRowsY output rows in the pass along y (over
// whole (W, C) rows), kRowsX output pixels in the pass along x (over C). A block reads the union of its outputs'
// bands, so larger blocks multiply more zero weights. Of the pairs tried (1-8 each; fp32 and bf16, layer2-4 maps,
// AVX-512 and AVX2 builds) 4/2 was at or near the fastest everywhere; against 4/4 it took the AVX-512 build's
// fp32 layer2 way up from 2.2 to 1.75 ms (batch 16, 2 threads), elsewhere within the run-to-run noise (~10%).
constexpr int kRowsY = 4, kRowsX = 2;
// Vectors per output row when weighted_rows computes R rows: R x V accumulators, V inputs and a broadcast weight
// fit the register file, up to 4 (AVX-512 and NEON 4 for any R; AVX2 and SSE 3 for 4 rows, 4 for 2 or 1). Sized per
// R rather than for the largest block, the AVX2 build's way down went 7-12% faster than with 2 vectors throughout
// (fp32 and bf16, layer2/3 maps, batch 16, 2 threads); its way up stayed within the noise (+-4%).
template <int R>
constexpr int kVectorsFor = std::min(4, (kVectorRegisters - 1) / (R + 1));
// kVectorsFor<R> in pairs, for a pass reading bfloat16 as even and odd values (load_split). The pass along y had 2
// vectors a row in every build: with AVX-512's 4, bfloat16's way down took 0.93-0.97 of its time (layers 2-4, the
// AVX512-BF16 and x86-64-v4 builds; the AVX2 build's full blocks keep 2; results/cpu_kernel_ab_bf16_split_vectors_*).
template <int R>
constexpr int kSplitVectorsFor = std::max(2, kVectorsFor<R> / 2 * 2);
// Rows of dot_tile's I x 4 tile: its I x 4 sums, I + 4 loaded vectors fit the register file.
constexpr int kDotRows = kVectorRegisters >= 32 ? 4 : 2;

inline fvec load_vec(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 is float32's upper half: each value widened to 32 bits and shifted up. On x86 the widening is one
// vpmovzxwd from memory; GCC (12) lowers the generic vector conversion below to four shuffles (two half-width
// widenings, an extract and an insert), all on the one shuffle port, which bounded the bfloat16 loops here (perf
// put the way up's hottest instructions, in its saliency dot products, on those shuffles).
inline fvec load_vec(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
#elif defined(__AVX2__)
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16);
#else
  u16vec half;
  std::memcpy(&half, p, sizeof(half));
  const u32vec bits = __builtin_convertvector(half, u32vec) << 16;
#endif
  fvec v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store_vec(float* p, fvec v) { std::memcpy(p, &v, sizeof(v)); }

// Keeps a loaded vector in a register for all its uses. Without it GCC (12) folds each use of a float32 vector into
// a multiply-add's memory operand, loading it again for every sum it enters (dot_tile's 4 x 4 tile issued 20 loads
// per 16 multiply-adds and ran at 30 GMAC/s a core on the Zen 4 with its rows in L1, 47 with them kept), and
// redoes a bfloat16 load's widening for each (weighted_rows' way down 4-13% slower). No effect on AArch64, whose
// multiply-adds take no memory operand.
inline void keep_in_register(fvec& v) {
#if defined(__x86_64__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Each lane's bfloat16 bits, in the low half of its 32: rounded to nearest even, NaN kept.
inline u32vec bfloat16_lanes(fvec v) {
  u32vec bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32vec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? u32vec{} + 0x7FC0u : rounded;
}

// Rounds to nearest even. Where AVX512-BF16 is built for, its conversion instruction replaces the seven integer
// operations (the way up 10-20% faster in bfloat16); it flushes float32 subnormals (below 1.2e-38) to zero, where
// the integer rounding and PyTorch's keep them as bfloat16 subnormals.
inline u16vec bfloat16_bits(fvec v) {
  u16vec half;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  __m512 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  const __m256bh converted = _mm512_cvtneps_pbh(wide);
  std::memcpy(&half, &converted, sizeof(half));
#else
  half = __builtin_convertvector(bfloat16_lanes(v), u16vec);
#endif
  return half;
}

inline void store_vec(c10::BFloat16* p, fvec v) {
  const u16vec half = bfloat16_bits(v);
  std::memcpy(p, &half, sizeof(half));
}

// Two vectors' values at p and p + kLanes. bfloat16 on AVX2 is narrowed as one pair: one pack and one permute for
// both, where each vector's own narrowing took a mask, a pack and a permute (GCC 12): with the rounding's integer
// operations a bound of the AVX2 build's bfloat16 loops (paired, the way up took 0.91-0.96 of the time, the way down
// 0.93-0.99; Zen 4).
inline void store_vec2(float* p, fvec a, fvec b) {
  store_vec(p, a);
  store_vec(p + kLanes, b);
}

inline void store_vec2(c10::BFloat16* p, fvec a, fvec b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const u32vec low = bfloat16_lanes(a), high = bfloat16_lanes(b);
  __m256i l, h;
  std::memcpy(&l, &low, sizeof(l));
  std::memcpy(&h, &high, sizeof(h));
  // packus interleaves the two per 128-bit half (a0-3 b0-3 a4-7 b4-7); the permute restores a's and b's order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(l, h), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#else
  store_vec(p, a);
  store_vec(p + kLanes, b);
#endif
}

// bfloat16 in the x86 builds read and written as even and odd values: one load of two vectors' width gives two
// float32 vectors, the even values widened by a shift and the odd ones by a mask (vpmovzxwd is a shuffle, one a
// vector, on the CPU's one shuffle port, which AVX-512's multiply-adds share), and the two are written back merged
// (merged_bfloat16: no pack and permute where the build has no bfloat16 instructions). A pass that reads so holds
// its values in that order within each 2 x kLanes channels, and so must every pass after it that shares them (the
// way's scratch rows, the residual) up to the merged store: resample_kernel uses it for both its passes or for
// neither. Against widening each vector and narrowing it (pairs with a pack and a permute in the AVX2 build), on
// an Intel Xeon, layers 2-4: the way down 0.93-0.95 of its time and the way up 0.76-0.89 in the AVX2 build
// (results/cpu_kernel_ab_bf16_even_odd_avx512_amx_x86-64-v3), the way down 0.96-0.98 and up 0.93-0.96 in the
// AVX512-BF16 build (-march=native there), 0.92-0.94 and 0.86-0.90 in x86-64-v4's AVX-512 without bfloat16
// instructions (results/cpu_kernel_ab_bf16_even_odd_avx512_builds_*).
#if defined(__AVX2__)
constexpr bool kSplitBfloat16 = true;
#else
constexpr bool kSplitBfloat16 = false;
#endif

inline void load_split(const c10::BFloat16* p, fvec& even, fvec& odd) {
  u32vec bits;
  std::memcpy(&bits, p, sizeof(bits));
  const u32vec e = bits << 16, o = bits & 0xFFFF0000u;
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

inline void load_split(const float* p, fvec& even, fvec& odd) {
  even = load_vec(p);
  odd = load_vec(p + kLanes);
}

// The even and odd values' bfloat16 bits, interleaved back into their order. With AVX512-BF16 one conversion
// rounds both vectors (even ones in the low 256 bits, odd ones in the high) and one word permute interleaves them:
// the integer rounding of each vector instead took the way down and up 1.02-1.14x as long there
// (results/cpu_kernel_ab_bf16_merged_integer_rounding_tried_*).
inline u32vec merged_bfloat16(fvec even, fvec odd) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  __m512 e, o;
  std::memcpy(&e, &even, sizeof(e));
  std::memcpy(&o, &odd, sizeof(o));
  const __m512bh converted = _mm512_cvtne2ps_pbh(o, e);
  __m512i halves;
  std::memcpy(&halves, &converted, sizeof(halves));
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i words = _mm512_permutexvar_epi16(order, halves);
  u32vec merged;
  std::memcpy(&merged, &words, sizeof(merged));
  return merged;
#else
  return bfloat16_lanes(even) | bfloat16_lanes(odd) << 16;
#endif
}

inline void store_merged(c10::BFloat16* p, fvec even, fvec odd) {
  const u32vec merged = merged_bfloat16(even, odd);
  std::memcpy(p, &merged, sizeof(merged));
}

inline void store_merged(float* p, fvec even, fvec odd) { store_vec2(p, even, odd); }

// Stores past the cache (non-temporal), to a vector-aligned address; store_vec where the ISA has no such store.
// The output of a pass is written whole and read by the next op: storing it through the cache first reads every
// line it writes (a read for ownership), which was most of the way down's time where those lines were slow to
// fetch (the Zen 4 VM: one thread's share of the layer4 output 9x slower to write, in some of the buffers the
// allocator hands out; no page faults) and costs a read of the whole output everywhere else.
// Streamed with AVX-512 (a store a cache line: 16 float32 values, or two vectors' 32 bfloat16 ones) and float32 on
// AVX/AVX2 (half a line a store). Not the AVX2 build's bfloat16: streamed, its way down and up were 5-21% slower,
// in 16-byte stores and in 32-byte ones of two vectors alike (Zen 4).
template <typename T>
constexpr bool kStreamStores = kVectorBytes == 64 || (kVectorBytes == 32 && sizeof(T) == 4);

inline void stream_vec(float* p, fvec v) {
#if defined(__AVX512F__)
  __m512 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  _mm512_stream_ps(p, wide);
#elif defined(__AVX__)
  __m256 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  _mm256_stream_ps(p, wide);
#else
  store_vec(p, v);
#endif
}

// Two vectors' bfloat16 values, at p and p + kLanes: with AVX-512 one store of a whole cache line.
inline void stream_vec2(c10::BFloat16* p, fvec a, fvec b) {
  const u16vec low = bfloat16_bits(a), high = bfloat16_bits(b);
#if defined(__AVX512F__)
  __m256i l, h;
  std::memcpy(&l, &low, sizeof(l));
  std::memcpy(&h, &high, sizeof(h));
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1));
#else
  std::memcpy(p, &low, sizeof(low));
  std::memcpy(p + kLanes, &high, sizeof(high));
#endif
}

// store_merged's values streamed: with AVX-512 one store of a whole cache line.
inline void stream_merged(c10::BFloat16* p, fvec even, fvec odd) {
#if defined(__AVX512F__)
  const u32vec merged = merged_bfloat16(even, odd);
  __m512i line;
  std::memcpy(&line, &merged, sizeof(line));
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), line);
#else
  store_merged(p, even, odd);
#endif
}

// V vectors' results at p, p + kLanes, ...: streamed (p aligned to the store; bfloat16 two vectors a store).
template <int V>
inline void stream_vecs(float* p, const fvec* v) {
  for (int i = 0; i < V; ++i) stream_vec(p + kLanes * i, v[i]);
}

template <int V>
inline void stream_vecs(c10::BFloat16* p, const fvec* v) {
  static_assert(V % 2 == 0, "bfloat16 is streamed two vectors at a time");
  for (int i = 0; i < V; i += 2) stream_vec2(p + kLanes * i, v[i], v[i + 1]);
}

// Whether a map of `channels` channels at p, written whole, is streamed: where the build streams T, p starts a cache
// line and so does every pixel.
template <typename T>
bool streams_to(const T* p, int64_t channels) {
  return kStreamStores<T> && p && reinterpret_cast<std::uintptr_t>(p) % 64 == 0 && channels * sizeof(T) % 64 == 0;
}

// Orders this thread's streamed stores before what follows (their readers run after the parallel region).
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

inline float load1(const float* p) { return *p; }

inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }

inline void store1(float* p, float value) { *p = value; }

inline void store1(c10::BFloat16* p, float value) { *p = c10::BFloat16(value); }  // round to nearest even

// A float buffer of at least n values, one per calling thread and per Slot, kept between calls and left
// uninitialised (its users write every value before reading it), starting on a cache line. A fresh buffer per call
// cost a zero fill, and for the larger ones (above glibc's mmap threshold, 128 KiB) new pages and their page faults
// on every call, which made the kernel's time depend on the allocator's state: up to several times slower,
// erratically. malloc's 16-byte alignment (mmap'd blocks start 16 bytes into a page) had split every 64-byte
// vector of the buffer over two cache lines: aligned, the way down 3-12% faster (fp32 and bf16, both builds).
template <int Slot>
float* thread_scratch(int64_t n) {
  constexpr int64_t kLine = 64;
  thread_local std::vector<float> buffer;
  const int64_t padded = n + kLine / static_cast<int64_t>(sizeof(float));
  if (static_cast<int64_t>(buffer.size()) < padded) buffer.resize(padded);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + (kLine - address % kLine) % kLine / sizeof(float);
}

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

// [lo, hi) covering the nonzero bands [lo[r], hi[r]) of `rows` rows ([0, 0) if all are empty).
std::pair<int64_t, int64_t> band_union(const int64_t* lo, const int64_t* hi, int64_t rows) {
  int64_t first = INT64_MAX, last = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (hi[r] > lo[r]) first = std::min(first, lo[r]), last = std::max(last, hi[r]);
  }
  return first < last ? std::make_pair(first, last) : std::make_pair(int64_t{0}, int64_t{0});
}

// dst[r][j] = epilogue(sum_k w[r * w_stride + k] * src[k][j]) for r < R and j in [offset, offset + kLanes V): R
// outputs of kLanes V values accumulated in float32 registers, each input vector loaded once for all R. The epilogue adds
// res[r][j] (if res) and applies a ReLU (if relu) before storing in D; with res_ahead, the residual's values that many
// further on are prefetched (residual_ahead_values). With Split, bfloat16 src, res and dst are read and written as
// even and odd values (load_split, store_merged), V vectors holding V / 2 pairs.
template <typename T, typename D, int R, int V, bool Split = false>
__attribute__((always_inline)) inline void weighted_rows(const float* w, int64_t w_stride, const T* const* src,
                                                         int64_t count, int64_t offset, D* const* dst,
                                                         const D* const* res, bool relu, bool stream,
                                                         int64_t res_ahead) {
  static_assert(!Split || V % 2 == 0, "split values come in pairs of vectors");
  // One prefetch per 128 bytes (the L2 fetches lines in pairs): one per 64 made layer4's way up 2-3% slower.
  if (res && res_ahead) {
    constexpr int kLineValues = 128 / sizeof(D);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kLanes * V; i += kLineValues) __builtin_prefetch(res[r] + offset + res_ahead + i, 1, 3);
  }
  fvec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = fvec{};
  for (int64_t k = 0; k < count; ++k) {
    fvec in[V];
    if constexpr (Split) {
      for (int v = 0; v < V; v += 2) load_split(src[k] + offset + kLanes * v, in[v], in[v + 1]);
    } else {
      for (int v = 0; v < V; ++v) in[v] = load_vec(src[k] + offset + kLanes * v);
    }
    if constexpr (R > 1)
      for (int v = 0; v < V; ++v) keep_in_register(in[v]);
    for (int r = 0; r < R; ++r) {
      const float weight = w[r * w_stride + k];
      for (int v = 0; v < V; ++v) acc[r][v] += weight * in[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (res) {
      if constexpr (Split) {
        for (int v = 0; v < V; v += 2) {
          fvec even, odd;
          load_split(res[r] + offset + kLanes * v, even, odd);
          acc[r][v] += even, acc[r][v + 1] += odd;
        }
      } else {
        for (int v = 0; v < V; ++v) acc[r][v] += load_vec(res[r] + offset + kLanes * v);
      }
    }
    if (relu)
      for (int v = 0; v < V; ++v) acc[r][v] = acc[r][v] < 0.0f ? fvec{} : acc[r][v];
    if constexpr (Split) {
      if constexpr (std::is_same_v<D, c10::BFloat16>) {
        if (stream) {
          for (int v = 0; v < V; v += 2) stream_merged(dst[r] + offset + kLanes * v, acc[r][v], acc[r][v + 1]);
          continue;
        }
      }
      for (int v = 0; v < V; v += 2) store_merged(dst[r] + offset + kLanes * v, acc[r][v], acc[r][v + 1]);
      continue;
    }
    if constexpr (std::is_same_v<D, float> || V % 2 == 0) {
      if (stream) {
        stream_vecs<V>(dst[r] + offset, acc[r]);
        continue;
      }
    }
    int v = 0;
    for (; v + 2 <= V; v += 2) store_vec2(dst[r] + offset + kLanes * v, acc[r][v], acc[r][v + 1]);
    if constexpr (V % 2 == 1) store_vec(dst[r] + offset + kLanes * v, acc[r][v]);
  }
}

// weighted_rows over [offset, offset + n), any n: blocks of V vectors and of one vector, then a scalar tail. With
// stream, dst's rows are aligned and n a multiple of 64 bytes (for bfloat16 with V odd, not streamed). With Split
// (bfloat16 read or written as even and odd values: load_split), n and offset are multiples of kLanes V.
// Compiled as a function of its own, with weighted_rows inlined into it: left to GCC (12), where it was inlined
// depended on its callers, and one more caller (a block of another row count) took a loop's loaded vectors out of
// the registers or its accumulators to the stack on each call (the way down 10-30% slower). As its own function
// it costs a call per block of pixels: the fp32 forward at layer2, whose blocks are shortest, 1-8% slower than
// inlined (results/cpu_kernel_ab_exact_blocks_*, with the change below).
template <typename T, typename D, int R, int V = kVectorsFor<R>, bool Split = false>
__attribute__((noinline)) void weighted_rows_range(const float* w, int64_t w_stride, const T* const* src,
                                                   int64_t count, int64_t offset, int64_t n, D* const* dst,
                                                   const D* const* res, bool relu, bool stream = false,
                                                   int64_t res_ahead = 0) {
  const int64_t end = offset + n;
  int64_t j = offset;
  for (; j + kLanes * V <= end; j += kLanes * V)
    weighted_rows<T, D, R, V, Split>(w, w_stride, src, count, j, dst, res, relu, stream, res_ahead);
  if constexpr (Split) return;
  for (; j + kLanes <= end; j += kLanes)
    weighted_rows<T, D, R, 1>(w, w_stride, src, count, j, dst, res, relu, stream, res_ahead);
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

// The lane sums of four vectors, in sums[0..3]: two rounds of interleaving adds leave each 128-bit lane holding the
// four partial sums, then the lanes are added. Per vector, GCC (12) added the lanes one by one, ~25 instructions a
// sum; a 4 x 4 dot tile paid 16 of them after each dot product, as long as the product itself over 512 values.
inline void lane_sums4(fvec a0, fvec a1, fvec a2, fvec a3, float* sums) {
#if defined(__AVX512F__)
  __m512 v0, v1, v2, v3;
  std::memcpy(&v0, &a0, sizeof(v0)), std::memcpy(&v1, &a1, sizeof(v1));
  std::memcpy(&v2, &a2, sizeof(v2)), std::memcpy(&v3, &a3, sizeof(v3));
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512 lanes = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(lanes),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1)));
  _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1)));
#elif defined(__AVX__)
  __m256 v0, v1, v2, v3;
  std::memcpy(&v0, &a0, sizeof(v0)), std::memcpy(&v1, &a1, sizeof(v1));
  std::memcpy(&v2, &a2, sizeof(v2)), std::memcpy(&v3, &a3, sizeof(v3));
  const __m256 t0 = _mm256_add_ps(_mm256_unpacklo_ps(v0, v1), _mm256_unpackhi_ps(v0, v1));
  const __m256 t1 = _mm256_add_ps(_mm256_unpacklo_ps(v2, v3), _mm256_unpackhi_ps(v2, v3));
  const __m256 lanes = _mm256_add_ps(_mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
  _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1)));
#else
  const fvec a[4] = {a0, a1, a2, a3};
  for (int j = 0; j < 4; ++j) {
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += a[j][l];
    sums[j] = sum;
  }
#endif
}

// out[i * out_stride + j] += <a[i], b[j]> for i < I, j < J, over `segments` runs of n values (run s of a row
// starting s * a_step after run 0; of b, s * b_step): the I x J sums accumulate in registers and are reduced once,
// each load of a row serving all the sums it enters.
template <typename T, int I, int J>
inline void dot_tile(const T* const* a, const float* const* b, int64_t segments, int64_t n, int64_t a_step,
                     int64_t b_step, float* out, int64_t out_stride) {
  static_assert(J <= 4, "lane_sums4 reduces up to 4 sums a row");
  fvec acc[I][J];
  float tail[I][J] = {};
  for (int i = 0; i < I; ++i)
    for (int j = 0; j < J; ++j) acc[i][j] = fvec{};
  for (int64_t s = 0; s < segments; ++s) {
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      fvec a_k[I], b_k[J];
      for (int i = 0; i < I; ++i) a_k[i] = load_vec(a[i] + s * a_step + k);
      for (int j = 0; j < J; ++j) b_k[j] = load_vec(b[j] + s * b_step + k);
      // Not for bfloat16 rows: there it made the AVX2 build's backward 6% slower.
      if constexpr (I > 1 && std::is_same_v<T, float>)
        for (int j = 0; j < J; ++j) keep_in_register(b_k[j]);
      if constexpr (J > 1 && std::is_same_v<T, float>)
        for (int i = 0; i < I; ++i) keep_in_register(a_k[i]);
      for (int i = 0; i < I; ++i)
        for (int j = 0; j < J; ++j) acc[i][j] += a_k[i] * b_k[j];
    }
    for (; k < n; ++k)
      for (int i = 0; i < I; ++i)
        for (int j = 0; j < J; ++j) tail[i][j] += load1(a[i] + s * a_step + k) * b[j][s * b_step + k];
  }
  for (int i = 0; i < I; ++i) {
    float sums[4];
    lane_sums4(acc[i][0], J > 1 ? acc[i][J > 1 ? 1 : 0] : fvec{}, J > 2 ? acc[i][J > 2 ? 2 : 0] : fvec{},
               J > 3 ? acc[i][J > 3 ? 3 : 0] : fvec{}, sums);
    for (int j = 0; j < J; ++j) out[i * out_stride + j] += sums[j] + tail[i][j];
  }
}

// out[i * out_stride + j] += <a[i], b[j]> for i < rows_a, j < rows_b over the runs of dot_tile, in kDotRows x 4
// tiles.
template <typename T>
void dot_matrix(const T* const* a, int64_t rows_a, const float* const* b, int64_t rows_b, int64_t segments,
                int64_t n, int64_t a_step, int64_t b_step, float* out, int64_t out_stride) {
  auto tile = [&](auto rows_i, auto rows_j, int64_t i, int64_t j) {
    dot_tile<T, decltype(rows_i)::value, decltype(rows_j)::value>(a + i, b + j, segments, n, a_step, b_step,
                                                                   out + i * out_stride + j, out_stride);
  };
  using one = std::integral_constant<int, 1>;
  using two = std::integral_constant<int, 2>;
  using three = std::integral_constant<int, 3>;
  using four = std::integral_constant<int, 4>;
  using tall = std::integral_constant<int, kDotRows>;
  // The last 1-3 rows of b in one tile: as single columns each loaded a's rows again.
  auto row_of_tiles = [&](auto rows_i, int64_t i) {
    int64_t j = 0;
    for (; j + 4 <= rows_b; j += 4) tile(rows_i, four{}, i, j);
    if (rows_b - j == 3) tile(rows_i, three{}, i, j);
    if (rows_b - j == 2) tile(rows_i, two{}, i, j);
    if (rows_b - j == 1) tile(rows_i, one{}, i, j);
  };
  int64_t i = 0;
  for (; i + kDotRows <= rows_a; i += kDotRows) row_of_tiles(tall{}, i);
  // Likewise the last 1-3 rows of a (the last 2 or 3 pixels of a layer3 or layer4 map's row).
  if constexpr (kDotRows > 3)
    if (rows_a - i == 3) row_of_tiles(three{}, i);
  if constexpr (kDotRows > 2)
    if (rows_a - i == 2) row_of_tiles(two{}, i);
  if (rows_a - i == 1) row_of_tiles(one{}, i);
}

// dot_matrix where a's row i meets only b's rows in its band [lo[i], hi[i]): kDotRows of a's rows at a time, against
// the union of their bands (a matrix's gradient on its nonzero entries, the rest of out untouched).
template <typename T>
void banded_dot_matrix(const T* const* a, int64_t rows_a, const int64_t* lo, const int64_t* hi, const float* const* b,
                       int64_t segments, int64_t n, int64_t a_step, int64_t b_step, float* out, int64_t out_stride) {
  for (int64_t i0 = 0; i0 < rows_a; i0 += kDotRows) {
    const int64_t rows = std::min<int64_t>(kDotRows, rows_a - i0);
    const auto [first, last] = band_union(lo + i0, hi + i0, rows);
    dot_matrix<T>(a + i0, rows, b + first, last - first, segments, n, a_step, b_step, out + i0 * out_stride + first,
                  out_stride);
  }
}

// out[r] = bias + <pixels[r], w> over n values, for R pixels: each weight vector loaded once for all R, and 4
// independent sums in flight (R x 2 or 4 accumulators), where one sum a pixel waited on each add's latency (the
// way up's saliency logits had taken ~15% of its time so). The R sums are reduced together (lane_sums4) and each
// weight vector kept in a register: summed lane by lane, each pixel's reduction was a chain of 16 scalar adds and GCC
// (12) stored the accumulators to the stack every iteration; with the weight loaded again for each row, the way up
// into the residual took 1.02-1.08x as long (results/cpu_kernel_ab_saliency_sums_*).
template <typename T, int R>
inline void saliency_dots(const T* const* pixels, const float* w, int64_t n, float bias, float* out) {
  constexpr int U = R >= 2 ? 2 : 4;
  fvec acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = fvec{};
  int64_t k = 0;
  for (; k + U * kLanes <= n; k += U * kLanes) {
    for (int u = 0; u < U; ++u) {
      fvec weight = load_vec(w + k + u * kLanes);
      if constexpr (R > 1) keep_in_register(weight);
      for (int r = 0; r < R; ++r) acc[r][u] += load_vec(pixels[r] + k + u * kLanes) * weight;
    }
  }
  for (; k + kLanes <= n; k += kLanes) {
    const fvec weight = load_vec(w + k);
    for (int r = 0; r < R; ++r) acc[r][0] += load_vec(pixels[r] + k) * weight;
  }
  static_assert(R <= 4, "lane_sums4 reduces up to 4 sums");
  fvec total[4] = {};
  for (int r = 0; r < R; ++r) {
    total[r] = acc[r][0];
    for (int u = 1; u < U; ++u) total[r] += acc[r][u];
  }
  float sums[4];
  lane_sums4(total[0], total[1], total[2], total[3], sums);
  for (int r = 0; r < R; ++r) {
    float sum = bias + sums[r];
    for (int64_t j = k; j < n; ++j) sum += load1(pixels[r] + j) * w[j];
    out[r] = sum;
  }
}

// f(std::integral_constant<int, rows>{}) for rows in [1, Max]: a block's row count as a template argument, so that
// the last block of a map whose side is not a multiple of the block's computes only the rows it has. Padded to a
// whole block, layer3's 14 rows and layer4's 7 had computed 16 and 8: without, the ops at layers 3 and 4 took
// 0.84-1.02 of the time, 0.86-0.96 the way up at layer4 (both builds; results/cpu_kernel_ab_exact_blocks_*).
template <int Max, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, f);
  }
  f(std::integral_constant<int, Max>{});
}

// How far ahead of the pixels it reads the pass along x prefetches the residual, in values (0: not at all). The
// pass reads two pixels' residuals at a time, then computes the next two from rows in its own cache: where a
// pixel's values are short (layer2: 1-2 KiB), its loads of them had waited on memory, a third of the way up's time
// in the AVX2 build (perf). Prefetched 4 KiB ahead, the way up at layer2 takes 0.82-0.99 of its time and at layer3
// in bf16 (2 KiB) 0.91-0.99 (written into the residual or not, both builds, Intel Xeon); where a pixel's values
// fill 8 KiB (layer4, fp32) the prefetches cost 2-10%, at 4 KiB they did not pay (cpu_kernel_ab_residual_prefetch_*).
template <typename T>
int64_t residual_ahead_values(int64_t channels) {
  constexpr int64_t kAheadBytes = 4096;
  return channels * static_cast<int64_t>(sizeof(T)) < kAheadBytes ? kAheadBytes / static_cast<int64_t>(sizeof(T)) : 0;
}

template <typename T>
void resample_kernel(const T* x, const float* matrix_y, const float* matrix_x, const T* residual, bool relu, T* out,
                     const float* saliency_w, float saliency_b, float* saliency, int64_t batch, int64_t channels,
                     int64_t height, int64_t width, int64_t out_h, int64_t out_w) {
  std::vector<int64_t> y_lo(batch * out_h), y_hi(batch * out_h), x_lo(batch * out_w), x_hi(batch * out_w);
  nonzero_bands(matrix_y, batch * out_h, height, y_lo.data(), y_hi.data());
  nonzero_bands(matrix_x, batch * out_w, width, x_lo.data(), x_hi.data());
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
  const int64_t blocks_h = (out_h + kRowsY - 1) / kRowsY, blocks_w = (out_w + kRowsX - 1) / kRowsX;
  // The output streamed past the cache where nothing reads it back in this call (the saliency dots read each pixel
  // just written; written into the residual, its lines are in cache already).
  const bool stream = !saliency && out != residual && streams_to(out, channels);
  const int64_t residual_ahead = residual_ahead_values<T>(channels);
  // bfloat16 as even and odd values in both passes (kSplitBfloat16), where every block of values is whole: the
  // passes' 2 or 4 vectors divide the channels.
  constexpr bool split = kSplitBfloat16 && std::is_same_v<T, c10::BFloat16>;
  const bool split_here = split && channels % (4 * kLanes) == 0;
  at::parallel_for(0, batch * blocks_h, 1, [&](int64_t begin, int64_t end) {
    float* const t = thread_scratch<0>(kRowsY * row_len);  // output rows read along y: kRowsY x (W, C)
    std::vector<const float*> t_rows(width);
    std::vector<const T*> x_rows(height);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks_h, p0 = (item % blocks_h) * kRowsY, p1 = std::min(p0 + kRowsY, out_h);
      // Columns any output pixel of this sample reads; t is computed only there.
      const auto cols = block_band(x_lo.data() + b * out_w, x_hi.data() + b * out_w, 0, out_w);
      const auto rows = block_band(y_lo.data() + b * out_h, y_hi.data() + b * out_h, p0, p1);
      for (int64_t h = rows.first; h < rows.second; ++h) x_rows[h - rows.first] = x + (b * height + h) * row_len;
      float* t_dst[kRowsY];
      for (int r = 0; r < kRowsY; ++r) t_dst[r] = t + r * row_len;
      with_rows<kRowsY>(p1 - p0, [&](auto rows_r) {
        if constexpr (split) {
          if (split_here) {
            weighted_rows_range<T, float, decltype(rows_r)::value, kSplitVectorsFor<decltype(rows_r)::value>, true>(
                matrix_y + (b * out_h + p0) * height + rows.first, height, x_rows.data(), rows.second - rows.first,
                cols.first * channels, (cols.second - cols.first) * channels, t_dst, nullptr, false);
            return;
          }
        }
        weighted_rows_range<T, float, decltype(rows_r)::value>(
            matrix_y + (b * out_h + p0) * height + rows.first, height, x_rows.data(), rows.second - rows.first,
            cols.first * channels, (cols.second - cols.first) * channels, t_dst, nullptr, false);
      });
      for (int64_t p = p0; p < p1; ++p) {
        const float* t_p = t + (p - p0) * row_len;
        for (int64_t w = 0; w < width; ++w) t_rows[w] = t_p + w * channels;
        for (int64_t qb = 0; qb < blocks_w; ++qb) {
          const int64_t q0 = qb * kRowsX, q1 = std::min(q0 + kRowsX, out_w);
          const auto band = block_band(x_lo.data() + b * out_w, x_hi.data() + b * out_w, q0, q1);
          T* out_dst[kRowsX];
          const T* res_src[kRowsX];
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t offset = ((b * out_h + p) * out_w + q) * channels;
            out_dst[q - q0] = out + offset;
            res_src[q - q0] = residual ? residual + offset : nullptr;
          }
          with_rows<kRowsX>(q1 - q0, [&](auto rows_r) {
            if constexpr (split) {
              if (split_here) {
                weighted_rows_range<float, T, decltype(rows_r)::value, 4, true>(
                    matrix_x + (b * out_w + q0) * width + band.first, width, t_rows.data() + band.first,
                    band.second - band.first, 0, channels, out_dst, residual ? res_src : nullptr, relu, stream,
                    residual_ahead);
                return;
              }
            }
            weighted_rows_range<float, T, decltype(rows_r)::value>(
                matrix_x + (b * out_w + q0) * width + band.first, width, t_rows.data() + band.first,
                band.second - band.first, 0, channels, out_dst, residual ? res_src : nullptr, relu, stream,
                residual_ahead);
          });
          // A 1x1 conv of the output to one channel (the next block's saliency logits), from the pixels just
          // written, which are still in cache.
          if (saliency) {
            float* const logits = saliency + (b * out_h + p) * out_w + q0;
            const T* const* written = out_dst;
            if (q0 + kRowsX <= out_w) {
              saliency_dots<T, kRowsX>(written, saliency_w, channels, saliency_b, logits);
            } else {
              for (int r = 0; q0 + r < out_w; ++r)
                saliency_dots<T, 1>(written + r, saliency_w, channels, saliency_b, logits + r);
            }
          }
        }
      }
    }
    if (stream) stream_fence();
  });
}

// (cols, rows) copy of a (rows, cols) matrix.
std::vector<float> transposed(const float* m, int64_t rows, int64_t cols) {
  std::vector<float> t(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

// Rows of weighted_sums computed together. A block multiplies the zeros in the union of its rows' bands, which
// costs more than the loads it shares for float32 with 16 registers (AVX2 build, backward at layer2: 4 rows 5-10%
// slower than 2, 1 row slower still); bfloat16 loads cost a conversion, and 4 rows stay fastest on both builds.
template <typename T, typename D>
constexpr int kSumRows = std::is_same_v<T, float> && std::is_same_v<D, float> && kVectorRegisters < 32 ? 2 : 4;

// dst[r] = sum_k m[r * m_cols + k] * src[k] over n values, k in the band [lo[r], hi[r]) of row r, for r < rows:
// blocks of kSumRows rows share each load of src[k] (k over the union of their bands), the rows left in one block.
// Their V stays 2 on 16-register ISAs: kVectorsFor's 3 or 4 made the AVX2 build's fp32 backward slower (the input's
// gradient by up to 30% at layer2/3 maps).
constexpr int kSumVectors = kVectorRegisters >= 32 ? 4 : 2;

template <typename T, typename D>
void weighted_sums(const float* m, int64_t m_cols, const int64_t* lo, const int64_t* hi, int64_t rows,
                   const T* const* src, int64_t n, D* const* dst, bool stream = false) {
  constexpr int R = kSumRows<T, D>;
  auto block = [&](auto rows_r, int64_t r) {
    constexpr int B = decltype(rows_r)::value;
    const auto [first, last] = band_union(lo + r, hi + r, B);
    weighted_rows_range<T, D, B, kSumVectors>(m + r * m_cols + first, m_cols, src + first, last - first, 0, n,
                                              dst + r, nullptr, false, stream);
  };
  int64_t r = 0;
  for (; r + R <= rows; r += R) block(std::integral_constant<int, R>{}, r);
  // The last 1-3 rows together (one at a time, each loaded src's rows again: the last of a layer4 map's 7).
  if constexpr (R > 3)
    if (rows - r == 3) block(std::integral_constant<int, 3>{}, r);
  if constexpr (R > 2)
    if (rows - r == 2) block(std::integral_constant<int, 2>{}, r);
  if (rows - r == 1) block(std::integral_constant<int, 1>{}, r);
}

// masked[i] = out[i] > 0 ? grad[i] : 0 for i in [start, start + n): the output's gradient through its ReLU. bfloat16
// is compared and selected as 16-bit integers (above zero: sign clear, not zero, not NaN), its values copied as
// they are: widened and rounded back, they lost subnormals to AVX512-BF16's conversion, and the AVX2 build's
// narrowing bounded the pass.
template <typename T>
void relu_gradient(const T* grad, const T* out, T* masked, int64_t start, int64_t n) {
  int64_t i = start;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    typedef int16_t i16vec __attribute__((vector_size(kVectorBytes / 2)));
    constexpr int16_t kInfinity = 0x7F80;
    for (; i + kLanes <= start + n; i += kLanes) {
      i16vec o, g;
      std::memcpy(&o, out + i, sizeof(o));
      std::memcpy(&g, grad + i, sizeof(g));
      g &= (o > 0) & (o <= kInfinity);
      std::memcpy(masked + i, &g, sizeof(g));
    }
  } else {
    for (; i + kLanes <= start + n; i += kLanes)
      store_vec(masked + i, load_vec(out + i) > 0.0f ? load_vec(grad + i) : fvec{});
  }
  for (; i < start + n; ++i) store1(masked + i, load1(out + i) > 0.0f ? load1(grad + i) : 0.0f);
}

// One sample's matrices for the backward: their transposes, and the band [lo, hi) of nonzero entries of each row
// of the four.
struct BackwardMatrices {
  std::vector<float> yt, xt;  // A_y^T (H, P), A_x^T (W, Q)
  std::vector<int64_t> y_lo, y_hi, yt_lo, yt_hi, x_lo, x_hi, xt_lo, xt_hi;

  BackwardMatrices(const float* m_y, const float* m_x, int64_t height, int64_t width, int64_t out_h, int64_t out_w)
      : yt(transposed(m_y, out_h, height)), xt(transposed(m_x, out_w, width)), y_lo(out_h), y_hi(out_h),
        yt_lo(height), yt_hi(height), x_lo(out_w), x_hi(out_w), xt_lo(width), xt_hi(width) {
    nonzero_bands(m_y, out_h, height, y_lo.data(), y_hi.data());
    nonzero_bands(yt.data(), height, out_h, yt_lo.data(), yt_hi.data());
    nonzero_bands(m_x, out_w, width, x_lo.data(), x_hi.data());
    nonzero_bands(xt.data(), width, out_w, xt_lo.data(), xt_hi.data());
  }
};

// out[(b * rows + r) * cols + c] = m[r * cols + c] != 0 ? dots[c * rows + r] : 0: a matrix's gradient on its
// nonzero entries, from dot products accumulated in (cols, rows) order.
void masked_transpose(const float* m, const float* dots, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = m[r * cols + c] != 0.0f ? dots[c * rows + r] : 0.0f;
}

// The backward where x is the larger map (the way down): one pass over x's rows, a block of them at a time, so
// that x is read from memory once and grad_x written once. With u = g A_x (P, W, C) and G = A_y^T g (H, Q, C):
// grad_x[h] = sum_p A_y[p][h] u[p], grad_A_y[p][h] = <u[p], x[h]> and grad_A_x[q][w] = sum_h <x[h][w], G[h][q]>,
// u's rows computed as a block first needs them and G's rows per block, both while x's block is in cache. (Through
// v = A_y x, as the way up does, x was read three times and its rows came from memory at layer2's map: that pass
// order made the fp32 backward at layer2 15-18% slower.)
template <typename T>
void backward_over_x_rows(const T* grad, const T* out, const T* x, const float* matrix_y, const float* matrix_x,
                          T* masked, T* grad_x, float* grad_matrix_y, float* grad_matrix_x, int64_t batch,
                          int64_t channels, int64_t height, int64_t width, int64_t out_h, int64_t out_w) {
  constexpr int kBlock = kSumRows<float, T>;  // x rows a block: grad_x's weighted sums share loads over them
  const int64_t row_len = width * channels, g_row_len = out_w * channels;
  // grad_x streamed past the cache, as the forward's output (resample_kernel): written once, read by the next op.
  const bool stream = streams_to(grad_x, channels);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    float* const u = thread_scratch<0>(out_h * row_len);
    float* const g_t = thread_scratch<1>(grad_matrix_y ? kBlock * g_row_len : 0);  // the block's rows of G
    float* const dots_y = thread_scratch<2>(grad_matrix_y ? height * out_h : 0);
    float* const dots_x = thread_scratch<3>(grad_matrix_y ? width * out_w : 0);
    std::vector<const float*> u_rows(out_h), g_t_pixels(out_w);
    std::vector<float*> u_pixels(width), g_t_rows(kBlock);
    std::vector<const T*> x_rows(height), g_rows(out_h), g_pixels(out_w), x_pixels(width);
    std::vector<T*> grad_x_rows(height);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g_offset = b * out_h * g_row_len;
      if (out) relu_gradient(grad, out, masked, g_offset, out_h * g_row_len);
      if (!grad_x && !grad_matrix_y) continue;  // only the residual's gradient asked for
      const float* m_y = matrix_y + b * out_h * height;
      const float* m_x = matrix_x + b * out_w * width;
      const BackwardMatrices m(m_y, m_x, height, width, out_h, out_w);
      const T* g_b = out ? masked + g_offset : grad + g_offset;
      for (int64_t h = 0; h < height; ++h) x_rows[h] = x + (b * height + h) * row_len;
      if (grad_x)
        for (int64_t h = 0; h < height; ++h) grad_x_rows[h] = grad_x + (b * height + h) * row_len;
      for (int64_t p = 0; p < out_h; ++p) u_rows[p] = u + p * row_len, g_rows[p] = g_b + p * g_row_len;
      for (int r = 0; r < kBlock; ++r) g_t_rows[r] = g_t + r * g_row_len;
      if (grad_matrix_y) {
        std::fill(dots_y, dots_y + height * out_h, 0.0f);
        std::fill(dots_x, dots_x + width * out_w, 0.0f);
      }
      int64_t u_done = 0;  // u's rows [0, u_done) are computed
      for (int64_t h0 = 0; h0 < height; h0 += kBlock) {
        const int64_t rows = std::min<int64_t>(kBlock, height - h0);
        const auto [p_lo, p_hi] = band_union(m.yt_lo.data() + h0, m.yt_hi.data() + h0, rows);
        for (; u_done < p_hi; ++u_done) {
          for (int64_t q = 0; q < out_w; ++q) g_pixels[q] = g_rows[u_done] + q * channels;
          for (int64_t w = 0; w < width; ++w) u_pixels[w] = u + u_done * row_len + w * channels;
          weighted_sums<T, float>(m.xt.data(), out_w, m.xt_lo.data(), m.xt_hi.data(), width, g_pixels.data(),
                                  channels, u_pixels.data());
        }
        const float* yt_block = m.yt.data() + h0 * out_h;
        if (grad_x)
          weighted_sums<float, T>(yt_block, out_h, m.yt_lo.data() + h0, m.yt_hi.data() + h0, rows, u_rows.data(),
                                  row_len, grad_x_rows.data() + h0, stream);
        if (!grad_matrix_y) continue;
        dot_matrix<T>(x_rows.data() + h0, rows, u_rows.data() + p_lo, p_hi - p_lo, 1, row_len, 0, 0,
                      dots_y + h0 * out_h + p_lo, out_h);
        weighted_sums<T, float>(yt_block, out_h, m.yt_lo.data() + h0, m.yt_hi.data() + h0, rows, g_rows.data(),
                                g_row_len, g_t_rows.data());
        // The block's rows as the dot products' runs: summed in registers, reduced once a block.
        for (int64_t w = 0; w < width; ++w) x_pixels[w] = x_rows[h0] + w * channels;
        for (int64_t q = 0; q < out_w; ++q) g_t_pixels[q] = g_t + q * channels;
        banded_dot_matrix<T>(x_pixels.data(), width, m.xt_lo.data(), m.xt_hi.data(), g_t_pixels.data(), rows,
                             channels, row_len, g_row_len, dots_x, out_w);
      }
      if (!grad_matrix_y) continue;
      masked_transpose(m_y, dots_y, out_h, height, grad_matrix_y + b * out_h * height);
      masked_transpose(m_x, dots_x, out_w, width, grad_matrix_x + b * out_w * width);
    }
    if (stream) stream_fence();
  });
}

// The backward where the output is the larger map (the way up): one pass over the output gradient's rows, a
// block of them at a time, so that it is read from memory once (and, through a ReLU, masked and written once).
// With u = g A_x (P, W, C) and v = A_y x: grad_A_x[q][w] = sum_p <g[p][q], v[p][w]> from each block of g's rows
// and v's, then grad_x = A_y^T u and grad_A_y[p][h] = <u[p], x[h]> over the small map.
template <typename T>
void backward_over_grad_rows(const T* grad, const T* out, const T* x, const float* matrix_y, const float* matrix_x,
                             T* masked, T* grad_x, float* grad_matrix_y, float* grad_matrix_x, int64_t batch,
                             int64_t channels, int64_t height, int64_t width, int64_t out_h, int64_t out_w) {
  constexpr int kBlock = kSumRows<T, float>;  // g rows a block: v's weighted sums share loads of x over them
  const int64_t row_len = width * channels, g_row_len = out_w * channels;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    float* const u = thread_scratch<0>(out_h * row_len);
    float* const v = thread_scratch<1>(grad_matrix_y ? kBlock * row_len : 0);  // the block's rows of v
    float* const dots_y = thread_scratch<2>(grad_matrix_y ? height * out_h : 0);
    float* const dots_x = thread_scratch<3>(grad_matrix_y ? out_w * width : 0);
    std::vector<const float*> u_rows(out_h), v_pixels(width);
    std::vector<float*> u_pixels(width), v_rows(kBlock);
    std::vector<const T*> x_rows(height), g_pixels(out_w);
    std::vector<T*> grad_x_rows(height);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g_offset = b * out_h * g_row_len;
      if (!grad_x && !grad_matrix_y) {  // only the residual's gradient asked for
        if (out) relu_gradient(grad, out, masked, g_offset, out_h * g_row_len);
        continue;
      }
      const float* m_y = matrix_y + b * out_h * height;
      const float* m_x = matrix_x + b * out_w * width;
      const BackwardMatrices m(m_y, m_x, height, width, out_h, out_w);
      const T* g_b = out ? masked + g_offset : grad + g_offset;
      for (int64_t h = 0; h < height; ++h) x_rows[h] = x + (b * height + h) * row_len;
      for (int64_t p = 0; p < out_h; ++p) u_rows[p] = u + p * row_len;
      for (int r = 0; r < kBlock; ++r) v_rows[r] = v + r * row_len;
      if (grad_matrix_y) {
        std::fill(dots_y, dots_y + height * out_h, 0.0f);
        std::fill(dots_x, dots_x + out_w * width, 0.0f);
      }
      for (int64_t p0 = 0; p0 < out_h; p0 += kBlock) {
        const int64_t rows = std::min<int64_t>(kBlock, out_h - p0);
        for (int64_t p = p0; p < p0 + rows; ++p) {
          if (out) relu_gradient(grad, out, masked, g_offset + p * g_row_len, g_row_len);
          for (int64_t q = 0; q < out_w; ++q) g_pixels[q] = g_b + p * g_row_len + q * channels;
          for (int64_t w = 0; w < width; ++w) u_pixels[w] = u + p * row_len + w * channels;
          weighted_sums<T, float>(m.xt.data(), out_w, m.xt_lo.data(), m.xt_hi.data(), width, g_pixels.data(),
                                  channels, u_pixels.data());
        }
        if (!grad_matrix_y) continue;
        weighted_sums<T, float>(m_y + p0 * height, height, m.y_lo.data() + p0, m.y_hi.data() + p0, rows,
                                x_rows.data(), row_len, v_rows.data());
        // The block's rows as the dot products' runs: summed in registers, reduced once a block.
        for (int64_t q = 0; q < out_w; ++q) g_pixels[q] = g_b + p0 * g_row_len + q * channels;
        for (int64_t w = 0; w < width; ++w) v_pixels[w] = v + w * channels;
        banded_dot_matrix<T>(g_pixels.data(), out_w, m.x_lo.data(), m.x_hi.data(), v_pixels.data(), rows, channels,
                             g_row_len, row_len, dots_x, width);
      }
      if (grad_x) {
        for (int64_t h = 0; h < height; ++h) grad_x_rows[h] = grad_x + (b * height + h) * row_len;
        weighted_sums<float, T>(m.yt.data(), out_h, m.yt_lo.data(), m.yt_hi.data(), height, u_rows.data(), row_len,
                                grad_x_rows.data());
      }
      if (!grad_matrix_y) continue;
      for (int64_t p0 = 0; p0 < out_h; p0 += 4) {
        const int64_t p1 = std::min<int64_t>(p0 + 4, out_h);
        const auto [lo, hi] = band_union(m.y_lo.data() + p0, m.y_hi.data() + p0, p1 - p0);
        dot_matrix<T>(x_rows.data() + lo, hi - lo, u_rows.data() + p0, p1 - p0, 1, row_len, 0, 0,
                      dots_y + lo * out_h + p0, out_h);
      }
      masked_transpose(m_y, dots_y, out_h, height, grad_matrix_y + b * out_h * height);
      for (int64_t q = 0; q < out_w; ++q)
        for (int64_t w = 0; w < width; ++w) {
          const int64_t i = q * width + w;
          grad_matrix_x[b * out_w * width + i] = m_x[i] != 0.0f ? dots_x[i] : 0.0f;
        }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& matrix_y, const at::Tensor& matrix_x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "x must be a 4-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels-last contiguous");
  TORCH_CHECK(matrix_y.scalar_type() == at::kFloat && matrix_x.scalar_type() == at::kFloat, "matrices must be float32");
  TORCH_CHECK(matrix_y.dim() == 3 && matrix_x.dim() == 3 && matrix_y.is_contiguous() && matrix_x.is_contiguous(),
              "matrices must be contiguous (B, P, H) and (B, Q, W)");
  TORCH_CHECK(matrix_y.size(0) == x.size(0) && matrix_y.size(2) == x.size(2) && matrix_x.size(0) == x.size(0) &&
                  matrix_x.size(2) == x.size(3),
              "matrix shapes do not fit x");
}

// A map of the output's shape and x's dtype, channels-last: the residual, the output's gradient, the output.
void check_output_shaped(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype");
  TORCH_CHECK(t.sizes() == sizes && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be channels-last with the output's shape");
}

// out = relu?(residual + matrix_y x matrix_x^T), and, given a 1x1 conv's (C,) weight and (1,) bias, that conv of out.
// With into_residual, out is the residual itself: each output value is written where its residual value was just
// read, sparing a new full-resolution tensor (its allocation, and the cache-line reads a write to fresh memory costs).
std::tuple<at::Tensor, at::Tensor> resample_impl(const at::Tensor& x, const at::Tensor& matrix_y, const at::Tensor& matrix_x,
                                                 const c10::optional<at::Tensor>& residual, bool relu,
                                                 const at::Tensor* saliency_w, const at::Tensor* saliency_b,
                                                 bool into_residual = false) {
  check_inputs(x, matrix_y, matrix_x);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = matrix_y.size(1), out_w = matrix_x.size(1);
  const std::vector<int64_t> out_sizes = {batch, channels, out_h, out_w};
  const at::Tensor* res = nullptr;
  if (residual.has_value()) {
    res = &residual.value();
    check_output_shaped(*res, x, out_sizes, "residual");
  }
  TORCH_CHECK(!into_residual || res, "writing into the residual needs a residual");
  if (into_residual) {
    TORCH_CHECK(!res->is_same(x) && !res->is_alias_of(x), "the residual written into must not alias x");
  }
  auto out = into_residual ? *res : at::empty(out_sizes, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor saliency;
  float bias = 0.0f;
  if (saliency_w) {
    TORCH_CHECK(saliency_w->scalar_type() == at::kFloat && saliency_w->is_contiguous() &&
                    saliency_w->numel() == channels,
                "saliency_weight must be a contiguous float32 tensor of x's ", channels, " channels");
    TORCH_CHECK(saliency_b->scalar_type() == at::kFloat && saliency_b->numel() == 1,
                "saliency_bias must be a float32 tensor of one value");
    saliency = at::empty({batch, 1, out_h, out_w}, matrix_y.options());
    bias = saliency_b->item<float>();
  }
  if (out.numel() == 0) return {out, saliency};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    resample_kernel<T>(x.data_ptr<T>(), matrix_y.data_ptr<float>(), matrix_x.data_ptr<float>(), res ? res->data_ptr<T>() : nullptr,
                       relu, out.data_ptr<T>(), saliency_w ? saliency_w->data_ptr<float>() : nullptr, bias,
                       saliency_w ? saliency.data_ptr<float>() : nullptr, batch, channels, height, width, out_h,
                       out_w);
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return {out, saliency};
}

// separable_resample_saliency's values written into the residual: returns the logits (an empty tensor without a
// saliency conv).
at::Tensor separable_resample_into_residual(const at::Tensor& x, const at::Tensor& matrix_y, const at::Tensor& matrix_x,
                                            const at::Tensor& residual, bool relu,
                                            const c10::optional<at::Tensor>& saliency_weight,
                                            const c10::optional<at::Tensor>& saliency_bias) {
  TORCH_CHECK(saliency_weight.has_value() == saliency_bias.has_value(),
              "saliency_weight and saliency_bias are given together or not at all");
  const at::Tensor* weight = saliency_weight.has_value() ? &saliency_weight.value() : nullptr;
  const at::Tensor* bias = saliency_bias.has_value() ? &saliency_bias.value() : nullptr;
  const auto logits = std::get<1>(resample_impl(x, matrix_y, matrix_x, residual, relu, weight, bias, true));
  return weight ? logits : at::empty({0}, matrix_y.options());
}

at::Tensor separable_resample(const at::Tensor& x, const at::Tensor& matrix_y, const at::Tensor& matrix_x,
                              const c10::optional<at::Tensor>& residual, bool relu) {
  return std::get<0>(resample_impl(x, matrix_y, matrix_x, residual, relu, nullptr, nullptr));
}

std::tuple<at::Tensor, at::Tensor> separable_resample_saliency(const at::Tensor& x, const at::Tensor& matrix_y,
                                                               const at::Tensor& matrix_x,
                                                               const c10::optional<at::Tensor>& residual, bool relu,
                                                               const at::Tensor& saliency_weight,
                                                               const at::Tensor& saliency_bias) {
  return resample_impl(x, matrix_y, matrix_x, residual, relu, &saliency_weight, &saliency_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> separable_resample_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& matrix_y, const at::Tensor& matrix_x,
    const c10::optional<at::Tensor>& out, bool need_x, bool need_matrices) {
  check_inputs(x, matrix_y, matrix_x);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = matrix_y.size(1), out_w = matrix_x.size(1);
  const std::vector<int64_t> out_sizes = {batch, channels, out_h, out_w};
  check_output_shaped(grad, x, out_sizes, "grad");
  const at::Tensor* mask = nullptr;
  if (out.has_value()) {
    mask = &out.value();
    check_output_shaped(*mask, x, out_sizes, "out");
  }
  const auto cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  const auto none = x.options();
  at::Tensor masked = mask ? at::empty(out_sizes, cl) : at::empty({0}, none);
  at::Tensor grad_x = need_x ? at::empty(x.sizes(), cl) : at::empty({0}, none);
  const auto f32 = matrix_y.options();
  at::Tensor grad_matrix_y = need_matrices ? at::empty(matrix_y.sizes(), f32) : at::empty({0}, f32);
  at::Tensor grad_matrix_x = need_matrices ? at::empty(matrix_x.sizes(), f32) : at::empty({0}, f32);
  if (x.numel() == 0 || grad.numel() == 0) {
    if (masked.numel()) masked.zero_();
    if (grad_x.numel()) grad_x.zero_();
    if (need_matrices) grad_matrix_y.zero_(), grad_matrix_x.zero_();
    return {grad_x, grad_matrix_y, grad_matrix_x, masked};
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = height >= out_h ? backward_over_x_rows<T> : backward_over_grad_rows<T>;
    kernel(grad.data_ptr<T>(), mask ? mask->data_ptr<T>() : nullptr, x.data_ptr<T>(), matrix_y.data_ptr<float>(),
           matrix_x.data_ptr<float>(), mask ? masked.data_ptr<T>() : nullptr, need_x ? grad_x.data_ptr<T>() : nullptr,
           need_matrices ? grad_matrix_y.data_ptr<float>() : nullptr,
           need_matrices ? grad_matrix_x.data_ptr<float>() : nullptr, batch, channels, height, width, out_h, out_w);
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return {grad_x, grad_matrix_y, grad_matrix_x, masked};
}

}  // namespace

TORCH_LIBRARY(timm_ssb_cpu, m) {
  m.def("separable_resample(Tensor x, Tensor matrix_y, Tensor matrix_x, Tensor? residual, bool relu) -> Tensor");
  m.impl("separable_resample", c10::DispatchKey::CPU, TORCH_FN(separable_resample));
  m.def(
      "separable_resample_saliency(Tensor x, Tensor matrix_y, Tensor matrix_x, Tensor? residual, bool relu, "
      "Tensor saliency_weight, Tensor saliency_bias) -> (Tensor, Tensor)");
  m.impl("separable_resample_saliency", c10::DispatchKey::CPU, TORCH_FN(separable_resample_saliency));
  m.def(
      "separable_resample_into_residual(Tensor x, Tensor matrix_y, Tensor matrix_x, Tensor(a!) residual, bool relu, "
      "Tensor? saliency_weight, Tensor? saliency_bias) -> Tensor");
  m.impl("separable_resample_into_residual", c10::DispatchKey::CPU, TORCH_FN(separable_resample_into_residual));
  m.def(
      "separable_resample_backward(Tensor grad, Tensor x, Tensor matrix_y, Tensor matrix_x, Tensor? out, bool need_x, "
      "bool need_matrices) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("separable_resample_backward", c10::DispatchKey::CPU, TORCH_FN(separable_resample_backward));
}
