#include "overlap/deepseek.h"

#include <stdexcept>
#include <string>

#include "overlap/graph.h"

namespace dpx {

std::vector<OverlapStep> deepseek_plan(int num_layers) {
  if (num_layers < 1 || num_layers > 4096)
    throw std::invalid_argument("deepseek_plan: num_layers must be in [1, 4096], got " + std::to_string(num_layers));
  const auto C = StepKind::kCompute, I = StepKind::kIssue, Wt = StepKind::kWait;
  const auto A = Component::kAttn, M = Component::kMlp, D = Component::kDispatch, K = Component::kCombine;
  const auto F = Pass::kForward, B = Pass::kBackwardInput, W = Pass::kWeight;
  struct Slot {
    StepKind kind;
    Component component;
    Pass pass;
    int layer_back;  // layer of the step: the forward's f minus this (the backward's layer for B and W)
  };
  // One pair of layers: forward layer f with backward layer b (DeepSeek-V3's order).
  static const Slot kPair[] = {{I, K, B, 0}, {Wt, K, F, 1}, {C, A, F, 0}, {I, D, F, 0}, {Wt, K, B, 0},
                               {C, M, B, 0}, {I, D, B, 0}, {C, M, W, 0}, {Wt, D, F, 0}, {C, M, F, 0},
                               {I, K, F, 0}, {Wt, D, B, 0}, {C, A, B, 0}, {C, A, W, 0}};
  std::vector<OverlapStep> out;
  auto push = [&](StepKind k, Component c, Pass p, int l) { out.push_back(OverlapStep{k, c, p, p == F ? 0 : 1, l, {}}); };
  for (int i = 0; i < num_layers; ++i) {
    const int f = i, b = num_layers - 1 - i;
    for (const Slot& s : kPair) {
      if (s.pass != F) push(s.kind, s.component, s.pass, b);
      else if (f - s.layer_back >= 0) push(s.kind, s.component, s.pass, f - s.layer_back);
    }
  }
  push(Wt, K, F, num_layers - 1);
  fill_partners(out);
  return out;
}

}  // namespace dpx
