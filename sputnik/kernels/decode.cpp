// One decode step of a Llama-family model (Llama, Qwen2's q/k/v bias, Qwen3's per-head q/k norm) over block-format
// (or float32, as type F32) weights, every layer in one call: at batch 1 the eager PyTorch step spends more time
// dispatching its ~20 small ops per layer than the matrix products take, which is the gap to llama.cpp. The
// arithmetic is sputnik.model's (RMSNorm, rotation by Rotary's tables, attention over the cache, SwiGLU); tests hold
// it to the PyTorch step.

#include "quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
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
float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

struct Layer {
  torch::Tensor in_norm, post_norm;
  std::optional<torch::Tensor> q_norm, k_norm;  // Qwen3
  std::vector<torch::Tensor> qkv, gate_up, o, down;  // rows of blocks: q, k, v / gate, up / o / down
  std::vector<int64_t> qkv_t, gate_up_t, o_t, down_t;
  std::optional<torch::Tensor> qkv_bias, o_bias, gate_up_bias, down_bias;
};

// A float32 Linear's rows, given as bytes (engine/native.py): type F32 to the kernels, but free to take ATen's GEMM.
constexpr int64_t kDense = -1, kF32 = 0;

// Float32 Linears past four tokens go to ATen's GEMM (at 32 tokens its register tiles run 2-3x faster than the
// kernels' row-at-a-time dot, which streams a matrix once and wins at one token); F32 blocks stay in the kernels,
// whose rows do not depend on the batch.
torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w, const std::vector<int64_t>& t,
                     const std::optional<torch::Tensor>& bias) {
  const bool dense = std::all_of(t.begin(), t.end(), [](int64_t k) { return k == kDense; });
  torch::Tensor y;
  if (dense && x.size(0) > 4) {
    std::vector<torch::Tensor> parts;
    for (const auto& rows : w) parts.push_back(torch::mm(x, rows.view(torch::kFloat).t()));
    y = parts.size() == 1 ? parts[0] : torch::cat(parts, 1);
  } else {
    std::vector<int64_t> types(t);
    std::replace(types.begin(), types.end(), kDense, kF32);
    y = qmatmul_cat(x, w, types, -1);
  }
  if (bias) y.add_(*bias);
  return y;
}

}  // namespace

// The weights of every layer (views of the model's own tensors, no copies) and the step over them.
class Decoder {
 public:
  Decoder(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : H_(heads), Hkv_(kv_heads), D_(head_dim), eps_(eps), scale_(scale) {}

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
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      for (const auto& c : {kc[l], vc[l]})
        TORCH_CHECK(c.scalar_type() == torch::kFloat && c.dim() == 4 && c.size(0) >= B && c.size(1) == Hkv &&
                        c.size(2) == kc[l].size(2) && c.size(3) == D && c.stride(3) == 1,
                    "sputnik decoder: caches must be float32 [rows >= B, kv_heads, slots, head_dim]");
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(lp[b] >= 0 && lp[b] < kc[l].size(2), "sputnik decoder: cache slot ", lp[b], " out of range");
      auto h = torch::empty_like(x);
      rms_norm(x.data_ptr<float>(), L.in_norm.data_ptr<float>(), B, dim, eps_, h.data_ptr<float>());
      auto qkv = linear(h, L.qkv, L.qkv_t, L.qkv_bias);  // [B, (H + 2 Hkv) D]
      auto attn = attend(qkv, L, kc[l], vc[l], cos, sin, lp);
      x.add_(linear(attn, L.o, L.o_t, L.o_bias));
      rms_norm(x.data_ptr<float>(), L.post_norm.data_ptr<float>(), B, dim, eps_, h.data_ptr<float>());
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
  // q/k norm and rotation, the new k/v into the cache, then each row's heads over its slots -> [B, H D].
  torch::Tensor attend(torch::Tensor& qkv, const Layer& L, torch::Tensor& kc, torch::Tensor& vc,
                       const torch::Tensor& cos, const torch::Tensor& sin, const int64_t* lp) {
    const int64_t B = qkv.size(0), D = D_, H = H_, Hkv = Hkv_, W = qkv.size(1);
    float* p = qkv.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t head = 0; head < H + Hkv; ++head) {
        float* hp = p + b * W + head * D;
        const auto& norm = head < H ? L.q_norm : L.k_norm;
        if (norm) rms_norm(hp, norm->data_ptr<float>(), 1, D, eps_, hp);
        rotate(hp, cos.data_ptr<float>() + b * D, sin.data_ptr<float>() + b * D, D);
      }
    float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
    const int64_t s0 = kc.stride(0), s1 = kc.stride(1), s2 = kc.stride(2);
    const int64_t t0 = vc.stride(0), t1 = vc.stride(1), t2 = vc.stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < Hkv; ++g) {
        std::copy_n(p + b * W + (H + g) * D, D, kp + b * s0 + g * s1 + lp[b] * s2);
        std::copy_n(p + b * W + (H + Hkv + g) * D, D, vp + b * t0 + g * t1 + lp[b] * t2);
      }
    auto out = torch::empty({B, H * D}, qkv.options());
    float* op = out.data_ptr<float>();
    const float scale = static_cast<float>(scale_);
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> w;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, head = i % H, g = head / (H / Hkv), S = lp[b] + 1;
        const float* q = p + b * W + head * D;
        const float* k = kp + b * s0 + g * s1;
        const float* v = vp + b * t0 + g * t1;
        w.resize(S);
        float top = -INFINITY;
        for (int64_t s = 0; s < S; ++s) {
          w[s] = dot(q, k + s * s2, D) * scale;
          top = std::max(top, w[s]);
        }
        float total = 0.f;
        for (int64_t s = 0; s < S; ++s) total += (w[s] = std::exp(w[s] - top));
        float* o = op + b * H * D + head * D;
        std::fill_n(o, D, 0.f);
        for (int64_t s = 0; s < S; ++s) {
          const float pw = w[s] / total;
          for (int64_t d = 0; d < D; ++d) o[d] += pw * v[s * t2 + d];
        }
      }
    });
    return out;
  }

  int64_t H_, Hkv_, D_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

void bind_decoder(pybind11::module& m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &Decoder::add_layer)
      .def("step", &Decoder::step);
}

}  // namespace sputnik
