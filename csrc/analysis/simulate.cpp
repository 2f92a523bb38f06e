#include "analysis/simulate.h"

#include <algorithm>
#include <stdexcept>

#include "analysis/validate.h"

namespace dpx {

SimResult simulate(const Plan& plan, const Costs& costs, const SimOptions& opts) {
  costs.check();
  opts.check(plan.ranks);
  validate(plan);
  const CommLinks links = link_comm(plan);
  Execution ex = execute(plan, links, costs, opts);
  if (!ex.finished)  // unreachable for a validated plan: eager_comm only drops constraints
    throw std::logic_error("simulation of a validated plan did not finish");
  const int R = plan.ranks;
  SimResult res;
  res.timeline = std::move(ex.timeline);
  res.busy.assign(R, 0.0);
  res.peak_activations.assign(R, 0);
  for (int r = 0; r < R; ++r) {
    res.makespan = std::max(res.makespan, ex.finish[r] + (opts.tail.empty() ? 0.0 : opts.tail[r]));
    int live = 0, peak = 0;
    for (const TimedAction& ta : res.timeline[r]) {
      res.busy[r] += ta.end - ta.start;
      // A forward's activations live from its start until the end of its backward; an
      // overlapped pair holds its forward's and its backward's at once.
      const ActionType t = plan.actions[r][ta.step].type;
      if (t == ActionType::kForward || t == ActionType::kForwardBackward) peak = std::max(peak, ++live);
      if (t == ActionType::kBackward || t == ActionType::kBackwardInput || t == ActionType::kForwardBackward) --live;
    }
    res.peak_activations[r] = peak;
  }
  res.bubble.resize(R);
  for (int r = 0; r < R; ++r) res.bubble[r] = res.makespan - res.busy[r];
  return res;
}

}  // namespace dpx
