// The steps of a component plan (what one compute stream does, in order, when the runs of
// overlapped chunks interleave; see component_plan.h) and their text form.
#pragma once

#include <string>
#include <vector>

namespace dpx {

enum class Component : int { kAttn = 0, kMlp, kDispatch, kCombine, kShared, kPrologue, kEpilogue };
enum class Pass : int { kForward = 0, kBackwardInput, kWeight };  // forward, input gradients, weight gradients
enum class StepKind : int { kCompute = 0, kIssue, kWait };

// One chunk walked through the components.
struct RunSpec {
  bool backward = false;
  int num_layers = 1;
  bool prologue = false;  // compute before layer 0 (forward) / after it (backward)
  bool epilogue = false;  // compute after the last layer (forward) / before it (backward)
  bool shared = false;    // the layers' shared experts are components of their own
};

struct OverlapStep {
  StepKind kind = StepKind::kCompute;
  Component component = Component::kAttn;
  Pass pass = Pass::kForward;
  int run = 0;
  int layer = 0;
  std::vector<int> under;  // issue steps: indices of the compute steps that run while it is in flight

  bool is_comm() const { return component == Component::kDispatch || component == Component::kCombine; }
  bool operator==(const OverlapStep& o) const;
};

// Relative costs the scheduler plans with (compute per pass; B and W cost the F figure).
struct PlanCosts {
  double attn = 1.0, mlp = 1.0, shared = 0.5, prologue = 1.0, epilogue = 1.0;
  double comm = 1.0;  // duration of one exchange
};

// `attn.F0`, `issue dispatch.B1`, `wait combine.F0`; with several runs, `r1:attn.B0`.
std::string to_string(const OverlapStep& s, bool with_run);
// The text form with each issue's partners: `issue dispatch.F0 under mlp.B1`.
std::string describe(const std::vector<OverlapStep>& steps, int index);

}  // namespace dpx
