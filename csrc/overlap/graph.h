// The components of runs as a dependency graph: what the generator, the DeepSeek reference,
// the checker and the cost model of component plans share. Internal to csrc/overlap/.
#pragma once

#include <tuple>
#include <vector>

#include "overlap/steps.h"

namespace dpx {

// One component of one run, with the ops it needs first (compute ops: executed; exchanges: waited).
struct Op {
  bool comm = false;
  Component component = Component::kAttn;
  Pass pass = Pass::kForward;
  int run = 0, layer = 0;
  double cost = 0.0;
  std::vector<int> deps;
};

using Key = std::tuple<int, int, int, int>;  // component, pass, run, layer
Key key_of(Component c, Pass p, int run, int layer);
Key key_of(const Op& o);
Key key_of(const OverlapStep& s);

// 0: dispatch-shaped (tokens to the experts' ranks), 1: combine-shaped.
int shape_of(Component c, Pass p);

// Every component of every run with its dependencies and cost; throws std::invalid_argument
// for no runs or a number of layers outside [1, 4096].
std::vector<Op> build_ops(const std::vector<RunSpec>& runs, const PlanCosts& costs);

// The step of kind `k` of op `o`.
OverlapStep step_of(StepKind k, const Op& o);

// Fill each issue's `under`: the compute steps between it and its wait.
void fill_partners(std::vector<OverlapStep>& steps);

// Run names are needed unless the plan is a forward run 0 paired with a backward run 1.
bool several_runs(const std::vector<OverlapStep>& steps);

}  // namespace dpx
