// The component plan of one overlapped forward+backward pair (DeepSeek-V3's order).
//
// A stage of `num_layers` MoE layers is split into components: attention and the
// experts MLP on the compute stream, dispatch and combine on the communication stream.
// The forward half walks the layers up, the backward half walks them down, and the
// plan interleaves the two so that every all-to-all of one micro-batch is in flight
// while computation of the other runs. Communication appears as an `issue` step
// (started asynchronously, with the compute steps it should run under) and a `wait`
// step placed just before the first consumer of its result.
#pragma once

#include <string>
#include <vector>

namespace dpx {

enum class Component : int { kAttn = 0, kMlp, kDispatch, kCombine };
enum class Pass : int { kF = 0, kB, kW };  // forward, input gradients, weight gradients
enum class StepKind : int { kCompute = 0, kIssue, kWait };

struct OverlapStep {
  StepKind kind = StepKind::kCompute;
  Component component = Component::kAttn;
  Pass pass = Pass::kF;
  int layer = 0;
  std::vector<int> under;  // issue steps: indices of the compute steps that run while it is in flight

  bool is_comm() const { return component == Component::kDispatch || component == Component::kCombine; }
  bool operator==(const OverlapStep& o) const;
};

// `attn.F0`, `issue dispatch.F0`, `wait dispatch.F0` (component.pass then layer).
std::string to_string(const OverlapStep& s);
// The text form with each issue's partners: `issue dispatch.F0 under mlp.B1`.
std::string describe(const std::vector<OverlapStep>& steps, int index);

// The plan for a pair of stages with `num_layers` layers each (1 <= num_layers <= 4096).
std::vector<OverlapStep> overlap_plan(int num_layers);

// Every violated rule, in plain words; empty when the plan is sound: each component and
// each issue/wait exactly once, inputs ready before use, waits after their issues and
// before their consumers, partners between issue and wait, each communication paired
// with computation of the other micro-batch.
std::vector<std::string> validate_overlap_plan(const std::vector<OverlapStep>& steps, int num_layers);

}  // namespace dpx
