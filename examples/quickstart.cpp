// The README's example: causal attention with GRAPE-M (learned frequencies), built as a test.
#include <grape/attention.hpp>
#include <iostream>

int main() {
  grape::HeadShape shape{/*heads=*/4, /*head_dim=*/32, /*model_dim=*/128};
  auto enc = grape::make_encoding("grape-m", shape, grape::PeOptions{{"pairing", "half"}});
  auto q = torch::randn({2, 16, 4, 32}), k = torch::randn({2, 16, 4, 32}), v = torch::randn({2, 16, 4, 32});
  auto state = enc->initial_state(/*batch=*/2);
  auto y = grape::reference_attention(*enc, q, k, v, /*x=*/{}, state);  // [2,16,4,32]
  y.sum().backward();                                                   // gradients reach the frequencies
  auto grad = enc->named_parameters()["lambda"].grad();
  std::cout << "output " << y.sizes() << ", |d loss / d lambda| = " << grad.norm().item<double>() << "\n";
  return (y.sizes() == torch::IntArrayRef{2, 16, 4, 32} && grad.norm().item<double>() > 0) ? 0 : 1;
}
