#include "overlap/list_schedule.h"

#include <algorithm>
#include <deque>
#include <stdexcept>

#include "overlap/graph.h"

namespace dpx {

std::vector<OverlapStep> overlap_plan(const std::vector<RunSpec>& runs, const PlanCosts& costs, int max_in_flight) {
  const std::vector<Op> ops = build_ops(runs, costs);
  const int n = static_cast<int>(ops.size());
  // longest remaining path from each op to the end of its run (the priority)
  std::vector<std::vector<int>> succ(n);
  for (int i = 0; i < n; ++i)
    for (int d : ops[i].deps) succ[d].push_back(i);
  std::vector<double> rest(n, 0.0);
  for (int i = n - 1; i >= 0; --i) {
    double best = 0.0;
    for (int s : succ[i]) best = std::max(best, rest[s]);
    rest[i] = ops[i].cost + best;
  }
  std::vector<double> issued(n, -1.0);
  std::vector<char> executed(n, 0), waited(n, 0);
  std::deque<int> in_flight[2];
  std::vector<OverlapStep> out;
  double t = 0.0;
  auto wait = [&](int c) {
    out.push_back(step_of(StepKind::kWait, ops[c]));
    t = std::max(t, issued[c] + ops[c].cost);
    waited[c] = 1;
    auto& q = in_flight[shape_of(ops[c].component, ops[c].pass)];
    q.erase(std::find(q.begin(), q.end(), c));
  };
  auto deps_done = [&](const Op& o) {
    for (int d : o.deps)
      if (ops[d].comm ? issued[d] < 0 : !executed[d]) return false;
    return true;
  };
  while (true) {
    for (int i = 0; i < n; ++i) {  // issue every exchange whose inputs exist, within the limit
      if (!ops[i].comm || issued[i] >= 0 || !deps_done(ops[i])) continue;
      auto& q = in_flight[shape_of(ops[i].component, ops[i].pass)];
      if (max_in_flight > 0 && static_cast<int>(q.size()) >= max_in_flight) continue;
      out.push_back(step_of(StepKind::kIssue, ops[i]));
      issued[i] = t;
      q.push_back(i);
    }
    int pick = -1;
    double pick_ready = 0.0;
    for (int i = 0; i < n; ++i) {
      if (ops[i].comm || executed[i] || !deps_done(ops[i])) continue;
      double ready = t;
      for (int d : ops[i].deps)
        if (ops[d].comm && !waited[d]) ready = std::max(ready, issued[d] + ops[d].cost);
      if (pick < 0 || ready < pick_ready - 1e-12 ||
          (ready < pick_ready + 1e-12 && rest[i] > rest[pick] + 1e-12)) {
        pick = i;
        pick_ready = ready;
      }
    }
    if (pick < 0) {
      // blocked by the in-flight limit: wait for the oldest exchange of the blocked shape
      int blocked = -1;
      for (int i = 0; i < n && blocked < 0; ++i)
        if (ops[i].comm && issued[i] < 0 && deps_done(ops[i])) blocked = i;
      if (blocked < 0) break;
      wait(in_flight[shape_of(ops[blocked].component, ops[blocked].pass)].front());
      continue;
    }
    for (int d : ops[pick].deps)
      if (ops[d].comm && !waited[d]) wait(d);
    out.push_back(step_of(StepKind::kCompute, ops[pick]));
    executed[pick] = 1;
    t += ops[pick].cost;
  }
  for (int i = 0; i < n; ++i)
    if (ops[i].comm && issued[i] < 0) throw std::logic_error("overlap_plan: an exchange was never issued");
  std::vector<int> left;
  for (int q = 0; q < 2; ++q)
    for (int c : in_flight[q]) left.push_back(c);
  std::sort(left.begin(), left.end(), [&](int a, int b) { return issued[a] < issued[b] || (issued[a] == issued[b] && a < b); });
  for (int c : left) wait(c);
  fill_partners(out);
  return out;
}

}  // namespace dpx
