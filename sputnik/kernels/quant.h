// What quant.cpp (the block-format products) and decode.cpp (the decode step over them) share.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace sputnik {

// x [N, K] float32 times several block-format weights -> [N, sum of their rows], outputs side by side.
torch::Tensor qmatmul_cat(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> qtypes, int64_t path);

// Adds the Decoder class (decode.cpp) to the extension module.
void bind_decoder(pybind11::module& m);

}  // namespace sputnik
