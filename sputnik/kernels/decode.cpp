// One decode step of a Llama-family model (Llama, Qwen2's q/k/v bias, Qwen3's per-head q/k norm) over block-format
// (or float32, as type F32) weights, every layer in one call: at batch 1 the eager PyTorch step spends more time
// dispatching its ~20 small ops per layer than the matrix products take, which is the gap to llama.cpp. The
// arithmetic is sputnik.model's (RMSNorm, rotation by Rotary's tables, attention over the cache, SwiGLU); tests hold
// it to the PyTorch step.

#include "quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <optional>
#include <type_traits>
#include <vector>

namespace sputnik {
namespace {

// x [B, n] rows normed by RMS and scaled by w, into out.
void rms_norm(const float* x, const float* w, int64_t B, int64_t n, double eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += xb[i] * xb[i];
    const float inv = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) out[b * n + i] = xb[i] * inv * w[i];
  }
}

// Rotate one head of D values by Rotary's full-width tables (halves layout, the sign folded into sin):
// out_i = x_i cos_i + x_{(i + D/2) mod D} sin_i.
void rotate(float* x, const float* cos, const float* sin, int64_t D) {
  float tmp[512];
  TORCH_CHECK(D <= 512, "sputnik decoder: head_dim over 512");
  std::copy(x, x + D, tmp);
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) x[i] = tmp[i] * cos[i] + tmp[(i + half) % D] * sin[i];
}

// a . b with eight running sums: one sum is a chain of dependent adds (latency-bound), eight let the compiler keep
// them in vector lanes. At B = 32 over 200 cached tokens attention was 61 ms of a 165 ms step; this took 24 off.
#define INLINE inline __attribute__((always_inline))
template <typename C>
INLINE float dot(const float* a, const C* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * static_cast<float>(b[i + j]);
  for (; i < n; ++i) s[0] += a[i] * static_cast<float>(b[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// w[0..S) -> exp(w - top) in place, one exp per cached token and head; returns the sum, top the max: a softmax
// before its division, so that chunks of one row's slots can be merged.
float exps(float* w, int64_t S, float* top_out) {
  float top = -INFINITY, total = 0.f;
  for (int64_t s = 0; s < S; ++s) top = std::max(top, w[s]);
  for (int64_t s = 0; s < S; ++s) total += (w[s] = std::exp(w[s] - top));
  *top_out = top;
  return total;
}

#if defined(__x86_64__) || defined(_M_X64)
#define AVX2 __attribute__((target("avx2,fma,f16c")))

// e^x for x <= 0 in 8 lanes, as 2^n 2^f (n the nearest integer to x log2 e, |f| <= 1/2) with 2^f's Taylor
// polynomial of degree 6 (relative error under 2e-7): std::exp, one call per cached token and head, cost as much
// as that head's dot product with the key.
AVX2 inline __m256 exp_le0(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.54035304e-4f);
  for (float c : {1.33335581e-3f, 9.61812911e-3f, 5.55041087e-2f, 2.40226507e-1f, 6.93147181e-1f, 1.f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 float exps_avx2(float* w, int64_t S, float* top_out) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(w + s));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float top = *std::max_element(lanes, lanes + 8);
  for (; s < S; ++s) top = std::max(top, w[s]);
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (s = 0; s + 8 <= S; s += 8) {
    const __m256 e = exp_le0(_mm256_sub_ps(_mm256_loadu_ps(w + s), top8));
    _mm256_storeu_ps(w + s, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float total = hsum8(sum8);
  for (; s < S; ++s) total += (w[s] = std::exp(w[s] - top));
  *top_out = top;
  return total;
}
#endif

// One cached row of n values as the loops below read it: float and bfloat16 in place (bfloat16 widens in the loops:
// a shift), float16 widened into buf first (F16C's vcvtph2ps on the AVX2 path; c10::Half's own conversion is a
// scalar bit routine).
#if defined(__x86_64__) || defined(_M_X64)
AVX2 inline int64_t widen_f16c(const c10::Half* x, int64_t n, float* buf) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  return i;
}
#endif

template <bool kAvx2, typename C>
INLINE const auto* readable(const C* x, int64_t n, float* buf) {
  if constexpr (!std::is_same_v<C, c10::Half>) {
    return x;
  } else {
    int64_t i = 0;
#if defined(__x86_64__) || defined(_M_X64)
    if constexpr (kAvx2) i = widen_f16c(x, n, buf);
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return static_cast<const float*>(buf);
  }
}

// The G query heads of one key/value group (grouped-query attention: q holds them side by side, G x D) over S
// cached slots (a chunk of a row's): each cached key and value is read once for all G heads. Into part: per head its
// scores' max and sum of exps, then its values weighted by those exps (G x (2 + D)), the softmax's division left to
// the merge of a row's chunks. w: G x S scratch. The cache holds C: float, bfloat16 or float16 (whichever the engine
// keeps), widened as it is read.
template <bool kAvx2, typename C>
INLINE void attend_group_body(const float* q, int64_t G, const C* k, int64_t ks, const C* v, int64_t vs, int64_t S,
                              int64_t D, float scale, float* w, float* part) {
  float buf[512];  // D <= 512: rotate() checks it
  for (int64_t s = 0; s < S; ++s) {
    const auto* krow = readable<kAvx2>(k + s * ks, D, buf);
    for (int64_t h = 0; h < G; ++h) w[h * S + s] = dot(q + h * D, krow, D) * scale;
  }
  for (int64_t h = 0; h < G; ++h) {
    float* ml = part + h * (2 + D);
#if defined(__x86_64__) || defined(_M_X64)
    if constexpr (kAvx2) {
      ml[1] = exps_avx2(w + h * S, S, ml);
      continue;
    }
#endif
    ml[1] = exps(w + h * S, S, ml);
  }
  for (int64_t h = 0; h < G; ++h) std::fill_n(part + h * (2 + D) + 2, D, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    const auto* vrow = readable<kAvx2>(v + s * vs, D, buf);
    for (int64_t h = 0; h < G; ++h) {
      const float pw = w[h * S + s];
      float* o = part + h * (2 + D) + 2;
      for (int64_t d = 0; d < D; ++d) o[d] += pw * static_cast<float>(vrow[d]);
    }
  }
}

template <typename C>
void attend_group(const float* q, int64_t G, const C* k, int64_t ks, const C* v, int64_t vs, int64_t S, int64_t D,
                  float scale, float* w, float* part) {
  attend_group_body<false>(q, G, k, ks, v, vs, S, D, scale, w, part);
}

#if defined(__x86_64__) || defined(_M_X64)
// The same loops compiled for AVX2 and FMA (chosen at run time, as quant.cpp's paths are): 8 lanes, fused adds.
template <typename C>
AVX2 void attend_group_avx2(const float* q, int64_t G, const C* k, int64_t ks, const C* v, int64_t vs, int64_t S,
                            int64_t D, float scale, float* w, float* part) {
  attend_group_body<true>(q, G, k, ks, v, vs, S, D, scale, w, part);
}
#endif

// Slots a chunk of attention covers: a long row's slots split across the threads (at one row and three key/value
// groups, two threads split three items 2:1, and each streamed its cache at a third of the copy bandwidth). Fixed,
// so a row's result does not depend on its batch.
constexpr int64_t kChunk = 256;

// Heads' partials of a row's chunks (each G x (2 + D), as attend_group_body writes them) -> the softmax-weighted
// values, G x D: each chunk's sums rescaled to the heads' overall max.
void merge(const float* parts, int64_t chunks, int64_t G, int64_t D, float* out) {
  for (int64_t h = 0; h < G; ++h) {
    float top = -INFINITY, total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, parts[(c * G + h) * (2 + D)]);
    float* o = out + h * D;
    std::fill_n(o, D, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* ml = parts + (c * G + h) * (2 + D);
      const float f = std::exp(ml[0] - top);
      total += f * ml[1];
      for (int64_t d = 0; d < D; ++d) o[d] += f * ml[2 + d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= total;
  }
}

struct Layer {
  torch::Tensor in_norm, post_norm;
  std::optional<torch::Tensor> q_norm, k_norm;  // Qwen3
  std::vector<torch::Tensor> qkv, gate_up, o, down;  // rows of blocks: q, k, v / gate, up / o / down
  std::vector<int64_t> qkv_t, gate_up_t, o_t, down_t;
  std::optional<torch::Tensor> qkv_bias, o_bias, gate_up_bias, down_bias;
};

// A float32 or bfloat16 Linear's rows, given as bytes (engine/native.py): type F32 or BF16 to the kernels, but free
// to take ATen's GEMM.
constexpr int64_t kDense = -1, kDenseBf16 = -2, kF32 = 0, kBF16 = 30;

// Dense Linears past four tokens go to ATen's GEMM (at 32 tokens its register tiles run 2-3x faster than the
// kernels' row-at-a-time dot, which streams a matrix once and wins at one token; bfloat16 rows take the activations
// rounded to bfloat16 there, as a bfloat16 model's own step does); F32 and BF16 blocks stay in the kernels, whose rows
// do not depend on the batch.
torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w, const std::vector<int64_t>& t,
                     const std::optional<torch::Tensor>& bias) {
  const bool dense = std::all_of(t.begin(), t.end(), [](int64_t k) { return k < 0; });
  torch::Tensor y;
  if (dense && x.size(0) > 4) {
    std::vector<torch::Tensor> parts;
    const auto xb = std::count(t.begin(), t.end(), kDenseBf16) ? x.to(torch::kBFloat16) : x;
    for (size_t i = 0; i < w.size(); ++i)
      parts.push_back(t[i] == kDense ? torch::mm(x, w[i].view(torch::kFloat).t())
                                     : torch::mm(xb, w[i].view(torch::kBFloat16).t()).to(torch::kFloat));
    y = parts.size() == 1 ? parts[0] : torch::cat(parts, 1);
  } else {
    std::vector<int64_t> types(t);
    std::replace(types.begin(), types.end(), kDense, kF32);
    std::replace(types.begin(), types.end(), kDenseBf16, kBF16);
    y = qmatmul_cat(x, w, types, -1);
  }
  if (bias) y.add_(*bias);
  return y;
}

// A norm's weights as floats: a float32 tensor's own memory, a bfloat16 one's widened into buf (each step, so an
// in-place update by a trainer is seen).
const float* floats(const torch::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == torch::kFloat) return t.data_ptr<float>();
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, "sputnik decoder: norm weights must be float32 or bfloat16");
  const c10::BFloat16* p = t.data_ptr<c10::BFloat16>();
  buf.assign(p, p + t.numel());
  return buf.data();
}

}  // namespace

// The weights of every layer (views of the model's own tensors, no copies) and the step over them.
class Decoder {
 public:
  Decoder(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : H_(heads), Hkv_(kv_heads), D_(head_dim), eps_(eps), scale_(scale) {
#if defined(__x86_64__) || defined(_M_X64)
    avx2_ = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  }

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, std::optional<torch::Tensor> q_norm,
                 std::optional<torch::Tensor> k_norm, std::vector<torch::Tensor> qkv, std::vector<int64_t> qkv_t,
                 std::optional<torch::Tensor> qkv_bias, torch::Tensor o, int64_t o_t,
                 std::optional<torch::Tensor> o_bias, std::vector<torch::Tensor> gate_up,
                 std::vector<int64_t> gate_up_t, std::optional<torch::Tensor> gate_up_bias, torch::Tensor down,
                 int64_t down_t, std::optional<torch::Tensor> down_bias) {
    layers_.push_back(Layer{in_norm.contiguous(), post_norm.contiguous(), q_norm, k_norm, qkv, gate_up, {o}, {down},
                            qkv_t, gate_up_t, {o_t}, {down_t}, qkv_bias, o_bias, gate_up_bias, down_bias});
  }

  // x [B, dim] (the tokens' embeddings), cos/sin [B, head_dim], lens [B] (row b writes its token at slot lens[b]
  // and attends to slots <= lens[b]), k/v caches per layer [rows, kv_heads, slots, head_dim] -> the last layer's
  // output [B, dim], before the final norm.
  torch::Tensor step(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor lens,
                     std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2, "sputnik decoder: x must be [B, dim] float32");
    TORCH_CHECK(kc.size() == layers_.size() && vc.size() == layers_.size(), "sputnik decoder: one cache per layer");
    const int64_t B = x.size(0), dim = x.size(1), D = D_, H = H_, Hkv = Hkv_;
    x = x.contiguous().clone();
    cos = cos.contiguous(), sin = sin.contiguous();
    const auto len = lens.to(torch::kLong).contiguous();
    const int64_t* lp = len.data_ptr<int64_t>();
    std::vector<float> widened;  // a bfloat16 norm's weights
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      for (const auto& c : {kc[l], vc[l]})
        TORCH_CHECK((c.scalar_type() == torch::kFloat || c.scalar_type() == torch::kBFloat16 ||
                     c.scalar_type() == torch::kHalf) &&
                        c.scalar_type() == kc[l].scalar_type() && c.dim() == 4 && c.size(0) >= B &&
                        c.size(1) == Hkv && c.size(2) == kc[l].size(2) && c.size(3) == D && c.stride(3) == 1,
                    "sputnik decoder: caches must be float32, bfloat16 or float16 ",
                    "[rows >= B, kv_heads, slots, head_dim]");
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(lp[b] >= 0 && lp[b] < kc[l].size(2), "sputnik decoder: cache slot ", lp[b], " out of range");
      auto h = torch::empty_like(x);
      rms_norm(x.data_ptr<float>(), floats(L.in_norm, widened), B, dim, eps_, h.data_ptr<float>());
      auto qkv = linear(h, L.qkv, L.qkv_t, L.qkv_bias);  // [B, (H + 2 Hkv) D]
      auto attn = attend(qkv, L, kc[l], vc[l], cos, sin, lp);
      x.add_(linear(attn, L.o, L.o_t, L.o_bias));
      rms_norm(x.data_ptr<float>(), floats(L.post_norm, widened), B, dim, eps_, h.data_ptr<float>());
      auto gu = linear(h, L.gate_up, L.gate_up_t, L.gate_up_bias);  // [B, 2 I]
      const int64_t I = gu.size(1) / 2;
      // SwiGLU by ATen's own vectorized, threaded silu (the PyTorch step's op): a scalar exp loop on one thread
      // cost ~7 ms of a ~100 ms step at B = 32
      auto act = torch::silu(gu.narrow(1, 0, I)).mul_(gu.narrow(1, I, I));
      x.add_(linear(act, L.down, L.down_t, L.down_bias));
    }
    return x;
  }

 private:
  torch::Tensor attend(torch::Tensor& qkv, const Layer& L, torch::Tensor& kc, torch::Tensor& vc,
                       const torch::Tensor& cos, const torch::Tensor& sin, const int64_t* lp) {
    if (kc.scalar_type() == torch::kBFloat16) return attend_as<c10::BFloat16>(qkv, L, kc, vc, cos, sin, lp);
    if (kc.scalar_type() == torch::kHalf) return attend_as<c10::Half>(qkv, L, kc, vc, cos, sin, lp);
    return attend_as<float>(qkv, L, kc, vc, cos, sin, lp);
  }

  // q/k norm and rotation, the new k/v into the cache (C: its type), then each row's heads over its slots -> [B, H D].
  template <typename C>
  torch::Tensor attend_as(torch::Tensor& qkv, const Layer& L, torch::Tensor& kc, torch::Tensor& vc,
                          const torch::Tensor& cos, const torch::Tensor& sin, const int64_t* lp) {
    const int64_t B = qkv.size(0), D = D_, H = H_, Hkv = Hkv_, W = qkv.size(1);
    float* p = qkv.data_ptr<float>();
    std::vector<float> qw, kw;  // a bfloat16 model's q/k norm weights, widened once a step
    const float* qn = L.q_norm ? floats(*L.q_norm, qw) : nullptr;
    const float* kn = L.k_norm ? floats(*L.k_norm, kw) : nullptr;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t head = 0; head < H + Hkv; ++head) {
        float* hp = p + b * W + head * D;
        const float* norm = head < H ? qn : kn;
        if (norm) rms_norm(hp, norm, 1, D, eps_, hp);
        rotate(hp, cos.data_ptr<float>() + b * D, sin.data_ptr<float>() + b * D, D);
      }
    C *kp = kc.data_ptr<C>(), *vp = vc.data_ptr<C>();
    const auto put = [D](const float* from, C* to) {  // a 16-bit cache rounds to nearest even, as torch does
      std::transform(from, from + D, to, [](float f) { return C(f); });
    };
    const int64_t s0 = kc.stride(0), s1 = kc.stride(1), s2 = kc.stride(2);
    const int64_t t0 = vc.stride(0), t1 = vc.stride(1), t2 = vc.stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < Hkv; ++g) {
        put(p + b * W + (H + g) * D, kp + b * s0 + g * s1 + lp[b] * s2);
        put(p + b * W + (H + Hkv + g) * D, vp + b * t0 + g * t1 + lp[b] * t2);
      }
    auto out = torch::empty({B, H * D}, qkv.options());
    float* op = out.data_ptr<float>();
    const float scale = static_cast<float>(scale_);
    const int64_t G = H / Hkv;
    auto group = attend_group<C>;
#if defined(__x86_64__) || defined(_M_X64)
    if (avx2_) group = attend_group_avx2<C>;
#endif
    // Work items: (row, group, chunk of the row's slots), each into its own partials; first[b]: row b's first item
    std::vector<int64_t> first{0};
    for (int64_t b = 0; b < B; ++b) first.push_back(first.back() + Hkv * ((lp[b] + kChunk) / kChunk));
    std::vector<float> parts(first.back() * G * (2 + D));
    at::parallel_for(0, first.back(), 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> w;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
        const int64_t chunks = (first[b + 1] - first[b]) / Hkv, g = (i - first[b]) / chunks;
        const int64_t c0 = (i - first[b]) % chunks * kChunk, S = std::min(lp[b] + 1 - c0, kChunk);
        w.resize(G * S);
        group(p + b * W + g * G * D, G, kp + b * s0 + g * s1 + c0 * s2, s2, vp + b * t0 + g * t1 + c0 * t2, t2, S,
              D, scale, w.data(), parts.data() + i * G * (2 + D));
      }
    });
    at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, g = i % Hkv, chunks = (first[b + 1] - first[b]) / Hkv;
        merge(parts.data() + (first[b] + g * chunks) * G * (2 + D), chunks, G, D, op + b * H * D + g * G * D);
      }
    });
    return out;
  }

  int64_t H_, Hkv_, D_;
  double eps_, scale_;
  bool avx2_ = false;  // the AVX2 attention where the CPU has it
  std::vector<Layer> layers_;
};

void bind_decoder(pybind11::module& m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &Decoder::add_layer)
      .def("step", &Decoder::step);
}

}  // namespace sputnik
