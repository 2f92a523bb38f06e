// The component plan of overlapped chunks: how the compute and communication of several
// runs (forward or backward chunks of MoE stages) interleave on one compute stream.
//
// A stage of MoE layers is split into components: attention (with the router), shared
// experts and the experts MLP run on the compute stream; dispatch and combine are
// exchanges, issued asynchronously and waited for just before their first consumer. A
// run is one chunk walked through those components: a forward (layers up) or a backward
// (layers down, its weight gradients as separate W steps), optionally with a prologue
// (embedding-like work before the first layer) and an epilogue (norm and head after the
// last). A plan interleaves two or more runs so that each exchange of one is in flight
// while another computes: a DualPipe forward+backward pair (DeepSeek-V3, Figure 4), or two
// halves of one micro-batch (two-batch overlap) where a chunk has no partner.
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

// The plan of `runs` (1 <= runs, 1 <= layers <= 4096 each): a list schedule on one compute
// stream that issues every exchange as soon as its inputs exist, runs the ready computation
// with the longest remaining path first, and waits just before a consumer. At most
// `max_in_flight` exchanges of each shape (dispatch-shaped: dispatch F, combine B;
// combine-shaped: combine F, dispatch B) are in flight at once.
std::vector<OverlapStep> overlap_plan(const std::vector<RunSpec>& runs, const PlanCosts& costs, int max_in_flight);

// DeepSeek-V3's published per-layer order for a forward run and a backward run of
// `num_layers` layers each (no prologue, epilogue or separate shared experts).
std::vector<OverlapStep> deepseek_plan(int num_layers);

// Every violated rule, in plain words; empty when the plan is sound: each component and
// each issue/wait of every run exactly once, inputs ready before use, waits after their
// issues and before their consumers, partners between issue and wait, at most
// `max_in_flight` exchanges of a shape in flight (0: no limit).
std::vector<std::string> validate_overlap_plan(const std::vector<OverlapStep>& steps,
                                               const std::vector<RunSpec>& runs, int max_in_flight);

// Time the compute stream waits for exchanges when `steps` run with `costs` (exchanges
// in flight concurrently, each taking costs.comm).
double exposed_comm(const std::vector<OverlapStep>& steps, const std::vector<RunSpec>& runs, const PlanCosts& costs);

}  // namespace dpx
