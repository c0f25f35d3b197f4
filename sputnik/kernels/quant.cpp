// Matrix products with weights kept in GGUF's block formats (Q4_0, Q4_1, Q8_0 by integer dot products over
// q8-quantized activations; F32 and BF16 read in place; Q4_K, Q5_K, Q6_K, F16 by decoding one row at a time into
// floats).
//
// One build serves every x86 CPU: the AVX2 functions carry a target attribute and are chosen at run time from the
// CPU's flags, so the library is compiled without -march. Rows of the output are split across torch's threads.

#include "quant.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPUTNIK_X86 1
#endif

namespace {

// ggml's type ids (the numbers stored in a GGUF file's tensor infos).
enum : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

struct Format {
  int64_t block;  // elements per block
  int64_t bytes;  // bytes per block
};

Format format_of(int64_t t) {
  switch (t) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "sputnik kernels: unsupported GGML type ", t);
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// ---------------------------------------------------------------- decoding one block to floats (every type)

// The 6-bit scale and min of sub-block j in a K-quant's 12 packed scale bytes.
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void decode_q4k(const uint8_t* b, float* y) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int chunk = 0; chunk < 4; ++chunk, q += 32, y += 64) {
    int s1, m1, s2, m2;
    scale_min_k4(2 * chunk, scales, &s1, &m1);
    scale_min_k4(2 * chunk + 1, scales, &s2, &m2);
    for (int l = 0; l < 32; ++l) y[l] = d * s1 * (q[l] & 0xF) - dmin * m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d * s2 * (q[l] >> 4) - dmin * m2;
  }
}

void decode_q5k(const uint8_t* b, float* y) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int chunk = 0; chunk < 4; ++chunk, ql += 32, y += 64) {
    int s1, m1, s2, m2;
    scale_min_k4(2 * chunk, scales, &s1, &m1);
    scale_min_k4(2 * chunk + 1, scales, &s2, &m2);
    const uint8_t u1 = 1 << (2 * chunk), u2 = 2 << (2 * chunk);
    for (int l = 0; l < 32; ++l) y[l] = d * s1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - dmin * m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d * s2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - dmin * m2;
  }
}

void decode_q6k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_at(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
  }
}

void decode_block(int64_t t, const uint8_t* b, float* y) {
  switch (t) {
    case F32: std::memcpy(y, b, 4); return;
    case F16: y[0] = half_at(b); return;
    case BF16: {
      uint16_t bits;
      std::memcpy(&bits, b, 2);
      y[0] = static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
      return;
    }
    case Q4_0: {
      const float d = half_at(b);
      for (int j = 0; j < 16; ++j) {
        y[j] = ((b[2 + j] & 0xF) - 8) * d;
        y[j + 16] = ((b[2 + j] >> 4) - 8) * d;
      }
      return;
    }
    case Q4_1: {
      const float d = half_at(b), m = half_at(b + 2);
      for (int j = 0; j < 16; ++j) {
        y[j] = (b[4 + j] & 0xF) * d + m;
        y[j + 16] = (b[4 + j] >> 4) * d + m;
      }
      return;
    }
    case Q8_0: {
      const float d = half_at(b);
      for (int j = 0; j < 32; ++j) y[j] = static_cast<int8_t>(b[2 + j]) * d;
      return;
    }
    case Q4_K: decode_q4k(b, y); return;
    case Q5_K: decode_q5k(b, y); return;
    case Q6_K: decode_q6k(b, y); return;
  }
  TORCH_CHECK(false, "sputnik kernels: unsupported GGML type ", t);
}

void decode_row(int64_t t, const uint8_t* row, int64_t K, float* y) {
  if (t == F32) {
    std::memcpy(y, row, K * 4);
    return;
  }
  const Format f = format_of(t);
  for (int64_t b = 0; b < K / f.block; ++b) decode_block(t, row + b * f.bytes, y + b * f.block);
}

// ---------------------------------------------------------------- q8 activations

// Each token's row cut into blocks of 32: int8 values, the block's scale d, the sum of its values (what Q4_0 and
// Q8_0 fold into their integer dot products) and d times that sum (Q4_1's offsets). Made by quantize_act (AVX2,
// below): only the AVX2 paths multiply integers.
struct Act {
  int64_t N, K;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> qsum;
};

// ---------------------------------------------------------------- portable paths

// Any type: decode a row, dot it with every token's float activations.
void rows_decoded(int64_t t, const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t N, int64_t M,
                  float* out, int64_t r0, int64_t r1, bool use_avx2);

void rows_decoded_scalar(int64_t t, const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t N,
                         int64_t M, float* out, int64_t r0, int64_t r1) {
  std::vector<float> buf(K);
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(t, w + r * row_bytes, K, buf.data());
    for (int64_t n = 0; n < N; ++n) {
      const float* xn = x + n * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += buf[k] * xn[k];
      out[n * M + r] = acc;
    }
  }
}

#ifdef SPUTNIK_X86
// ---------------------------------------------------------------- AVX2 paths

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block of 32 activations as int8 values v = nearbyint(x * 127 / max|x|) (ties to even), eight lanes at a
// time; returns their sum and sets the block's scale d = max|x| / 127.
AVX2 inline int quantize_block(const float* x, int8_t* q, float* d_out) {
  __m256 v[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i)
    v[i] = _mm256_loadu_ps(x + 8 * i), m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
  __m256i iv[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 scaled = _mm256_mul_ps(v[i], _mm256_set1_ps(inv));
    iv[i] = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, iv[i]);
  }
  // The packs work within 128-bit halves: bytes come out as 4-value groups 0, 2, 4, 6, 1, 3, 5, 7 of the block.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  *d_out = d;
  return _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
}

AVX2 Act quantize_act(const float* x, int64_t N, int64_t K) {
  Act a{N, K, std::vector<int8_t>(N * K), std::vector<float>(N * K / 32), std::vector<float>(N * K / 32),
        std::vector<int32_t>(N * K / 32)};
  at::parallel_for(0, N * K / 32, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      a.qsum[b] = quantize_block(x + b * 32, a.q.data() + b * 32, &a.d[b]);
      a.s[b] = a.d[b] * a.qsum[b];
    }
  });
  return a;
}

// ---------------------------------------------------------------- Q4_0 / Q4_1 / Q8_0: one row per lane
//
// Every path computes a (row, token) output the same way, so it does not depend on the tile, the batch or the
// instruction set: per block an exact integer dot product of the row's integers with the token's q8 values (Q4_0's
// -8, and the +128 that makes Q8_0's bytes unsigned for zmm, taken off exactly with the token's sum of q8 values),
// then acc = fma(float(dot), d_w * d_x, acc) block after block, for Q4_1 also off = fma(m_w, s_x, off); the output
// is acc + off. A vector holds one 4-byte group of each of 8 (ymm) or 16 (zmm) rows, so a block's dot product needs
// no horizontal sum: its 8 groups are 8 multiply-adds against the token's matching 4 bytes broadcast to every lane,
// and one fma scales 8 or 16 rows.

// How the ymm panels multiply u8 x s8: AVX2's vpmaddubsw (+ vpmaddwd), or vpdpbusd where the CPU has VNNI
// (EVEX-encoded with AVX512-VNNI and AVX512-VL, VEX-encoded with AVX-VNNI). Written as assembly so the panels stay
// one template compiled for AVX2; only a CPU that has the instruction is given a panel that issues it.
enum Dot { kMadd, kVnniEvex, kVnniVex };

template <Dot D>
AVX2 inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  if constexpr (D == kVnniEvex) asm("vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  else asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  return acc;
}

AVX2 inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
AVX2 inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The 4-byte group k of 16 bytes at p + i * stride for rows i = 0..7, lane i of t[k]: rows i and i + 4 in one ymm's
// halves, then a 4 x 4 transpose of 4-byte groups inside each half.
AVX2 inline void transpose8(const uint8_t* p, int64_t stride, __m256i t[4]) {
  __m256i z[4];
  for (int j = 0; j < 4; ++j)
    z[j] = _mm256_inserti128_si256(_mm256_castsi128_si256(load16(p + j * stride)), load16(p + (j + 4) * stride), 1);
  const __m256i a = _mm256_unpacklo_epi32(z[0], z[1]), b = _mm256_unpackhi_epi32(z[0], z[1]);
  const __m256i c = _mm256_unpacklo_epi32(z[2], z[3]), e = _mm256_unpackhi_epi32(z[2], z[3]);
  t[0] = _mm256_unpacklo_epi64(a, c), t[1] = _mm256_unpackhi_epi64(a, c);
  t[2] = _mm256_unpacklo_epi64(b, e), t[3] = _mm256_unpackhi_epi64(b, e);
}

// The eight halves at bit `shift` of each 32-bit lane, as floats.
AVX2 inline __m256 halves8(__m256i v, int shift) {
  const __m256i h = _mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(0xFFFF));
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// 8 rows of type T at `base`, `stride` bytes apart, x NT tokens from n0, u8 x s8 by D: outputs out[token][row], the
// first `rows` of the 8 stored.
template <int64_t T, int NT, Dot D>
AVX2 inline void panel8(const uint8_t* base, int64_t stride, const Act& a, float* out, int64_t M, int rows,
                        int64_t n0, const uint8_t* ahead, int64_t ahead_step) {
  constexpr int64_t bytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : 34;
  constexpr int64_t qoff = T == Q4_1 ? 4 : 2;
  const int64_t nb = a.K / 32;
  const __m256i idx = _mm256_mullo_epi32(_mm256_set1_epi32(static_cast<int32_t>(stride)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 acc[NT], mo[NT];
  for (int j = 0; j < NT; ++j) acc[j] = mo[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (ahead != nullptr)  // the next panel, the same share of it per block as this one reads
      for (int64_t p = b * ahead_step; p < (b + 1) * ahead_step; p += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + p), _MM_HINT_T0);
    const uint8_t* blk = base + b * bytes;
    const __m256i head = _mm256_i32gather_epi32(reinterpret_cast<const int*>(blk), idx, 1);
    const __m256 dw = halves8(head, 0);
    __m256 mw = _mm256_setzero_ps();
    if constexpr (T == Q4_1) mw = halves8(head, 16);
    __m256i g[8];
    transpose8(blk + qoff, stride, g);
    if constexpr (T == Q8_0) {
      transpose8(blk + qoff + 16, stride, g + 4);
    } else {
      const __m256i low = _mm256_set1_epi8(0x0F);
      for (int k = 0; k < 4; ++k)
        g[k + 4] = _mm256_and_si256(_mm256_srli_epi16(g[k], 4), low), g[k] = _mm256_and_si256(g[k], low);
    }
    for (int j = 0; j < NT; ++j) {
      const int64_t ab = (n0 + j) * nb + b;
      const int8_t* x = a.q.data() + ab * 32;
      __m256i dot;
      if constexpr (T == Q8_0) {  // |w| x (x with w's sign): the same products as u8 x s8, pairs within int16
        __m256i part[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // two chains: exact integer sums
        for (int k = 0; k < 8; ++k) {
          const __m256i s = _mm256_sign_epi8(bcast4(x + 4 * k), g[k]), u = _mm256_abs_epi8(g[k]);
          if constexpr (D == kMadd) part[k & 1] = _mm256_add_epi32(part[k & 1], _mm256_madd_epi16(
                                                    _mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
          else part[k & 1] = dpbusd<D>(part[k & 1], u, s);
        }
        dot = _mm256_add_epi32(part[0], part[1]);
      } else if constexpr (D == kMadd) {  // nibbles <= 15: eight groups' pair sums stay inside int16
        __m256i pairs = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(g[k], bcast4(x + 4 * k)));
        dot = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
      } else {
        __m256i part[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int k = 0; k < 8; ++k) part[k & 1] = dpbusd<D>(part[k & 1], g[k], bcast4(x + 4 * k));
        dot = _mm256_add_epi32(part[0], part[1]);
      }
      if constexpr (T == Q4_0) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * a.qsum[ab]));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, _mm256_set1_ps(a.d[ab])), acc[j]);
      if constexpr (T == Q4_1) mo[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[ab]), mo[j]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    alignas(32) float y[8];
    _mm256_store_ps(y, _mm256_add_ps(acc[j], mo[j]));
    std::memcpy(out + (n0 + j) * M, y, rows * sizeof(float));
  }
}

// Rows r0..r1 of the output for every token in panels of L rows: Panel(base, stride, out, rows, n0, NT-token
// tile, ahead, step) for tiles of 8, 4 and 1 tokens (8 only where Wide). The last panel, when short, runs on a
// copy padded with its last row, so a panel always reads L rows `row_bytes` apart.
template <int L, bool Wide, typename Panel>
inline void rows_in_panels(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t M, float* out, int64_t r0,
                           int64_t r1, Panel panel) {
  const int64_t nb = a.K / 32;
  std::vector<uint8_t> pad;
  for (int64_t r = r0; r < r1; r += L) {
    const int rows = static_cast<int>(std::min<int64_t>(L, r1 - r));
    const uint8_t* base = w + r * row_bytes;
    if (rows < L) {
      pad.resize(L * row_bytes);
      for (int i = 0; i < L; ++i) std::memcpy(pad.data() + i * row_bytes, w + (r + std::min(i, rows - 1)) * row_bytes,
                                              row_bytes);
      base = pad.data();
    }
    // The next panel, prefetched by the first token tile: the same share of it per block as this panel reads.
    const bool next = r + L < r1;
    const uint8_t* ahead = next ? w + (r + L) * row_bytes : nullptr;
    const int64_t step = next ? (std::min<int64_t>(L, r1 - r - L) * row_bytes + nb - 1) / nb : 0;
    int64_t n = 0;
    const auto tiles = [&](auto nt) {
      for (; n + decltype(nt)::value <= a.N; n += decltype(nt)::value)
        panel(base, out + r, rows, n, nt, n == 0 ? ahead : nullptr, step);
    };
    if constexpr (Wide) tiles(std::integral_constant<int, 8>());
    tiles(std::integral_constant<int, 4>());
    tiles(std::integral_constant<int, 1>());
  }
}

// Rows r0..r1 of the output for every token: panels of 8 rows, 4 tokens at a time.
template <int64_t T, Dot D>
AVX2 void rows_int_avx2(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t M, float* out, int64_t r0,
                        int64_t r1) {
  rows_in_panels<8, false>(w, row_bytes, a, M, out, r0, r1,
                           [&](const uint8_t* base, float* o, int rows, int64_t n0, auto nt, const uint8_t* ahead,
                               int64_t step) AVX2 {
                             panel8<T, decltype(nt)::value, D>(base, row_bytes, a, o, M, rows, n0, ahead, step);
                           });
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

AVX512 inline __m512i bcast4x16(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The 4-byte group k of 16 bytes at p + i * stride for rows i = 0..15, lane i of t[k]: rows i, i + 4, i + 8,
// i + 12 in one zmm's quarters, then a 4 x 4 transpose inside each quarter.
AVX512 inline void transpose16(const uint8_t* p, int64_t stride, __m512i t[4]) {
  __m512i z[4];
  for (int j = 0; j < 4; ++j) {
    z[j] = _mm512_castsi128_si512(load16(p + j * stride));
    for (int q = 1; q < 4; ++q) z[j] = _mm512_inserti32x4(z[j], load16(p + (j + 4 * q) * stride), q);
  }
  const __m512i a = _mm512_unpacklo_epi32(z[0], z[1]), b = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i c = _mm512_unpacklo_epi32(z[2], z[3]), e = _mm512_unpackhi_epi32(z[2], z[3]);
  t[0] = _mm512_unpacklo_epi64(a, c), t[1] = _mm512_unpackhi_epi64(a, c);
  t[2] = _mm512_unpacklo_epi64(b, e), t[3] = _mm512_unpackhi_epi64(b, e);
}

// panel8 with 16 rows to a zmm and vpdpbusd (AVX512-VNNI); Q8_0 as (w + 128) x s less 128 x the token's sum.
template <int64_t T, int NT>
AVX512 inline void panel16(const uint8_t* base, int64_t stride, const Act& a, float* out, int64_t M, int rows,
                           int64_t n0, const uint8_t* ahead, int64_t ahead_step) {
  constexpr int64_t bytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : 34;
  constexpr int64_t qoff = T == Q4_1 ? 4 : 2;
  const int64_t nb = a.K / 32;
  const __m512i idx = _mm512_mullo_epi32(_mm512_set1_epi32(static_cast<int32_t>(stride)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512 acc[NT], mo[NT];
  for (int j = 0; j < NT; ++j) acc[j] = mo[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (ahead != nullptr)
      for (int64_t p = b * ahead_step; p < (b + 1) * ahead_step; p += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + p), _MM_HINT_T0);
    const uint8_t* blk = base + b * bytes;
    const __m512i head = _mm512_i32gather_epi32(idx, blk, 1);
    const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
    __m512 mw = _mm512_setzero_ps();
    if constexpr (T == Q4_1) mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
    __m512i g[8];
    transpose16(blk + qoff, stride, g);
    if constexpr (T == Q8_0) {
      transpose16(blk + qoff + 16, stride, g + 4);
      for (int k = 0; k < 8; ++k) g[k] = _mm512_xor_si512(g[k], _mm512_set1_epi8(-128));
    } else {
      const __m512i low = _mm512_set1_epi8(0x0F);
      for (int k = 0; k < 4; ++k)
        g[k + 4] = _mm512_and_si512(_mm512_srli_epi16(g[k], 4), low), g[k] = _mm512_and_si512(g[k], low);
    }
    for (int j = 0; j < NT; ++j) {
      const int64_t ab = (n0 + j) * nb + b;
      const int8_t* x = a.q.data() + ab * 32;
      __m512i part[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  // two chains: exact integer sums
      for (int k = 0; k < 8; ++k) part[k & 1] = _mm512_dpbusd_epi32(part[k & 1], g[k], bcast4x16(x + 4 * k));
      __m512i dot = _mm512_add_epi32(part[0], part[1]);
      if constexpr (T == Q4_0) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * a.qsum[ab]));
      if constexpr (T == Q8_0) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * a.qsum[ab]));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[ab])), acc[j]);
      if constexpr (T == Q4_1) mo[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[ab]), mo[j]);
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  for (int j = 0; j < NT; ++j) _mm512_mask_storeu_ps(out + (n0 + j) * M, keep, _mm512_add_ps(acc[j], mo[j]));
}

// Rows r0..r1 of the output for every token: panels of 16 rows, 8 tokens at a time.
template <int64_t T>
AVX512 void rows_int_avx512(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t M, float* out, int64_t r0,
                            int64_t r1) {
  rows_in_panels<16, true>(w, row_bytes, a, M, out, r0, r1,
                           [&](const uint8_t* base, float* o, int rows, int64_t n0, auto nt, const uint8_t* ahead,
                               int64_t step) AVX512 {
                             panel16<T, decltype(nt)::value>(base, row_bytes, a, o, M, rows, n0, ahead, step);
                           });
}

// Eight weights as floats: float32 as they are, bfloat16 widened (its bits are a float's top half: exact).
AVX2 inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
AVX2 inline __m256 load8(const c10::BFloat16* w) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// RT rows of float32 or bfloat16 weights (types F32 and BF16, read in place) against one token: each 8 floats of the
// token are loaded once for RT rows. Every output keeps rows_decoded_avx2's two accumulators and order, so a row's
// result is the same whichever tile computes it, however many tokens share the call.
template <int RT, typename W>
AVX2 inline void tile_dense_avx2(const W* w, int64_t K, const float* x, float* out, int64_t r, int64_t r_end) {
  __m256 acc0[RT], acc1[RT];
  for (int i = 0; i < RT; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  // The tile after next (its RT rows are contiguous), the same share of it per step as this tile reads
  const char* ahead = reinterpret_cast<const char*>(w + (r + 2 * RT) * K);
  const char* ahead_end = reinterpret_cast<const char*>(w + std::min(r + 3 * RT, r_end) * K);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (const char* p = ahead + k * RT * sizeof(W); p < ahead + (k + 16) * RT * sizeof(W) && p < ahead_end; p += 64)
      _mm_prefetch(p, _MM_HINT_T0);
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int i = 0; i < RT; ++i) {
      const W* wr = w + (r + i) * K + k;
      acc0[i] = _mm256_fmadd_ps(load8(wr), x0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(load8(wr + 8), x1, acc1[i]);
    }
  }
  for (int i = 0; i < RT; ++i) {
    float acc = hsum(_mm256_add_ps(acc0[i], acc1[i]));
    for (int64_t j = k; j < K; ++j) acc = std::fma(static_cast<float>(w[(r + i) * K + j]), x[j], acc);
    out[r + i] = acc;
  }
}

// Rows r0..r1 of float32 or bfloat16 weights for every token, 4 rows at a time: the tile (4 K weights) stays in L1
// while each token passes over it, so the matrix streams from memory once. The row-decoding path copied every row
// first.
template <typename W>
AVX2 void rows_dense_avx2(const W* w, int64_t K, const float* x, int64_t N, int64_t M, float* out, int64_t r0,
                          int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4)
    for (int64_t n = 0; n < N; ++n) tile_dense_avx2<4>(w, K, x + n * K, out + n * M, r, r1);
  for (; r < r1; ++r)
    for (int64_t n = 0; n < N; ++n) tile_dense_avx2<1>(w, K, x + n * K, out + n * M, r, r1);
}

AVX2 void rows_decoded_avx2(int64_t t, const uint8_t* w, int64_t row_bytes, int64_t K,
                                                           const float* x, int64_t N, int64_t M, float* out,
                                                           int64_t r0, int64_t r1) {
  std::vector<float> buf(K);
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(t, w + r * row_bytes, K, buf.data());
    for (int64_t n = 0; n < N; ++n) {
      const float* xn = x + n * K;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(buf.data() + k), _mm256_loadu_ps(xn + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(buf.data() + k + 8), _mm256_loadu_ps(xn + k + 8), acc1);
      }
      float acc = hsum(_mm256_add_ps(acc0, acc1));
      for (; k < K; ++k) acc += buf[k] * xn[k];
      out[n * M + r] = acc;
    }
  }
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// The VNNI encoding this CPU runs, kMadd where it has none.
Dot cpu_vnni() {
  if (!cpu_has_avx2()) return kMadd;
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return kVnniEvex;
  return __builtin_cpu_supports("avxvnni") ? kVnniVex : kMadd;
}

bool cpu_has_avx512() {
  return cpu_vnni() == kVnniEvex && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

// The block-format panels of type T for path 1 (AVX2), 2 (VNNI on ymm) or 3 (AVX-512 VNNI on zmm).
template <int64_t T>
void rows_int_path(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t M, float* out, int64_t r0, int64_t r1,
                   int64_t path) {
  static const Dot vnni = cpu_vnni();
  if (path == 3) return rows_int_avx512<T>(w, row_bytes, a, M, out, r0, r1);
  if (path == 2 && vnni == kVnniEvex) return rows_int_avx2<T, kVnniEvex>(w, row_bytes, a, M, out, r0, r1);
  if (path == 2 && vnni == kVnniVex) return rows_int_avx2<T, kVnniVex>(w, row_bytes, a, M, out, r0, r1);
  rows_int_avx2<T, kMadd>(w, row_bytes, a, M, out, r0, r1);
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

void rows_decoded(int64_t t, const uint8_t* w, int64_t row_bytes, int64_t K, const float* x, int64_t N, int64_t M,
                  float* out, int64_t r0, int64_t r1, bool use_avx2) {
#ifdef SPUTNIK_X86
  if (use_avx2) return rows_decoded_avx2(t, w, row_bytes, K, x, N, M, out, r0, r1);
#endif
  rows_decoded_scalar(t, w, row_bytes, K, x, N, M, out, r0, r1);
}

// ---------------------------------------------------------------- entry points

void check_weight(const torch::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(),
              "sputnik kernels: weights must be a contiguous 2-d uint8 CPU tensor");
  const Format f = format_of(qtype);
  TORCH_CHECK(K > 0 && K % f.block == 0, "sputnik kernels: in_features ", K, " is not a multiple of the block size ",
              f.block);
  TORCH_CHECK(w.size(1) == K / f.block * f.bytes, "sputnik kernels: rows of ", w.size(1), " bytes, expected ",
              K / f.block * f.bytes);
}

// The best path this CPU runs: 3 AVX-512 VNNI, 2 AVX2 with VNNI's dot products, 1 AVX2, 0 portable C++.
int64_t best_path() {
#ifdef SPUTNIK_X86
  if (cpu_has_avx512()) return 3;
  if (cpu_vnni() != kMadd) return 2;
#endif
  return cpu_has_avx2() ? 1 : 0;
}

// Rows r0..r1 of one weight for every token, written at column offset `col` of an output `stride` floats wide.
void rows_of(const torch::Tensor& w, int64_t qtype, const float* x, const Act* a, int64_t N, int64_t K, float* out,
             int64_t stride, int64_t r0, int64_t r1, int64_t path) {
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
#ifdef SPUTNIK_X86
  if (qtype == F32 && path >= 1)
    return rows_dense_avx2(reinterpret_cast<const float*>(wp), K, x, N, stride, out, r0, r1);
  if (qtype == BF16 && path >= 1)
    return rows_dense_avx2(reinterpret_cast<const c10::BFloat16*>(wp), K, x, N, stride, out, r0, r1);
  if (a != nullptr && (qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0)) {
    if (qtype == Q4_0) rows_int_path<Q4_0>(wp, row_bytes, *a, stride, out, r0, r1, path);
    else if (qtype == Q4_1) rows_int_path<Q4_1>(wp, row_bytes, *a, stride, out, r0, r1, path);
    else rows_int_path<Q8_0>(wp, row_bytes, *a, stride, out, r0, r1, path);
    return;
  }
#endif
  rows_decoded(qtype, wp, row_bytes, K, x, N, stride, out, r0, r1, path >= 1);
}

}  // namespace

namespace sputnik {

// x [N, K] float32 times the rows of several weights (each M_i rows of GGUF blocks, one type each) -> [N, sum M_i],
// their outputs side by side: the activations are quantized once and the threads split all the rows together, so
// q/k/v (or gate/up) cost one call. path: -1 best, 0 portable, 1 AVX2, 2 AVX2 with VNNI, 3 AVX-512 VNNI.
torch::Tensor qmatmul_cat(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> qtypes, int64_t path) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2,
              "sputnik kernels: activations must be a 2-d float32 CPU tensor");
  TORCH_CHECK(!ws.empty() && ws.size() == qtypes.size(), "sputnik kernels: one type per weight");
  x = x.contiguous();
  const int64_t N = x.size(0), K = x.size(1);
  std::vector<int64_t> starts{0};
  bool integer = false;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_weight(ws[i], qtypes[i], K);
    starts.push_back(starts.back() + ws[i].size(0));
    integer = integer || qtypes[i] == Q4_0 || qtypes[i] == Q4_1 || qtypes[i] == Q8_0;
  }
  if (path < 0) path = best_path();
  TORCH_CHECK(path >= 0 && path <= best_path(), "sputnik kernels: path ", path, " is not available here");
  const int64_t total = starts.back();
  auto out = torch::empty({N, total}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  Act a;
#ifdef SPUTNIK_X86
  if (path >= 1 && integer) a = quantize_act(xp, N, K);  // path 1 and up: the CPU has AVX2
#endif
  const Act* ap = path >= 1 && integer ? &a : nullptr;
  at::parallel_for(0, total, 16, [&](int64_t g0, int64_t g1) {
    for (size_t i = 0; i < ws.size(); ++i) {  // the part of [g0, g1) that falls in weight i
      const int64_t r0 = std::max(g0, starts[i]) - starts[i], r1 = std::min(g1, starts[i + 1]) - starts[i];
      if (r0 < r1) rows_of(ws[i], qtypes[i], xp, ap, N, K, op + starts[i], total, r0, r1, path);
    }
  });
  return out;
}

// x [N, K] float32 times the rows of w (M rows of GGUF blocks) -> [N, M].
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t path) {
  return qmatmul_cat(x, {w}, {qtype}, path);
}

// Rows of GGUF blocks [M, row bytes] -> float32 [M, K].
torch::Tensor dequantize(torch::Tensor w, int64_t qtype, int64_t K) {
  check_weight(w, qtype, K);
  const int64_t M = w.size(0), row_bytes = w.size(1);
  auto out = torch::empty({M, K}, torch::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode_row(qtype, wp + r * row_bytes, K, op + r * K);
  });
  return out;
}

}  // namespace sputnik

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &sputnik::qmatmul, "x [N, K] @ GGUF-block weights [M, bytes]^T -> [N, M]");
  m.def("qmatmul_cat", &sputnik::qmatmul_cat, "x [N, K] @ several GGUF-block weights -> their outputs side by side");
  m.def("dequantize", &sputnik::dequantize, "GGUF-block rows -> float32");
  m.def("best_path", &best_path, "3: AVX-512 VNNI, 2: AVX2 with VNNI, 1: AVX2, 0: portable C++");
  sputnik::bind_decoder(m);
}
