#include "overlap/check.h"

#include <exception>
#include <map>
#include <utility>

#include "overlap/graph.h"

namespace dpx {

std::vector<std::string> validate_overlap_plan(const std::vector<OverlapStep>& steps,
                                               const std::vector<RunSpec>& runs, int max_in_flight) {
  std::vector<std::string> errors;
  std::vector<Op> ops;
  try {
    ops = build_ops(runs, PlanCosts{});
  } catch (const std::exception& e) {
    errors.push_back(e.what());
    return errors;
  }
  std::map<Key, int> op_of;
  for (int i = 0; i < static_cast<int>(ops.size()); ++i) op_of[key_of(ops[i])] = i;
  const int n = static_cast<int>(steps.size());
  const bool several = several_runs(steps);
  auto name = [&](int i) { return "step " + std::to_string(i) + " '" + to_string(steps[i], several) + "'"; };
  std::map<std::pair<int, int>, int> at;  // (op, kind) -> step
  for (int i = 0; i < n; ++i) {
    const OverlapStep& s = steps[i];
    auto it = op_of.find(key_of(s));
    if (it == op_of.end()) {
      errors.push_back(name(i) + ": no such component in run " + std::to_string(s.run) + " (runs: " +
                       std::to_string(runs.size()) + ")");
      continue;
    }
    const Op& o = ops[it->second];
    if (s.kind == StepKind::kCompute && o.comm) errors.push_back(name(i) + ": communication must be issued and waited");
    if (s.kind != StepKind::kCompute && !o.comm) errors.push_back(name(i) + ": computation cannot be issued or waited");
    if (s.kind != StepKind::kIssue && !s.under.empty()) errors.push_back(name(i) + ": only issue steps run under computation");
    if (!at.emplace(std::make_pair(it->second, static_cast<int>(s.kind)), i).second)
      errors.push_back(name(i) + ": appears twice");
  }
  if (!errors.empty()) return errors;
  for (const Op& o : ops) {
    const int id = op_of[key_of(o)];
    for (StepKind k : o.comm ? std::vector<StepKind>{StepKind::kIssue, StepKind::kWait}
                             : std::vector<StepKind>{StepKind::kCompute})
      if (!at.count({id, static_cast<int>(k)})) {
        OverlapStep s = step_of(k, o);
        errors.push_back("missing '" + to_string(s, several) + "'");
      }
  }
  if (!errors.empty()) return errors;
  auto pos = [&](int op, StepKind k) { return at[{op, static_cast<int>(k)}]; };
  for (int id = 0; id < static_cast<int>(ops.size()); ++id) {
    const Op& o = ops[id];
    const int mine = pos(id, o.comm ? StepKind::kIssue : StepKind::kCompute);
    for (int d : o.deps) {
      const int before = pos(d, ops[d].comm ? StepKind::kWait : StepKind::kCompute);
      const int producer = ops[d].comm && o.comm ? pos(d, StepKind::kIssue) : before;
      if (producer >= mine)
        errors.push_back(name(mine) + " runs before " + name(producer) + " that it depends on");
    }
    if (o.comm && pos(id, StepKind::kWait) < mine)
      errors.push_back(name(pos(id, StepKind::kWait)) + " runs before " + name(mine) + " that it depends on");
  }
  int open[2] = {0, 0};
  for (int i = 0; i < n; ++i) {
    const OverlapStep& s = steps[i];
    if (s.kind == StepKind::kIssue) {
      const int wait = pos(op_of[key_of(s)], StepKind::kWait);
      for (int u : s.under)
        if (u <= i || u >= wait || steps[u].kind != StepKind::kCompute)
          errors.push_back(name(i) + ": partner " + std::to_string(u) + " is not a computation between its issue and its wait");
      int& q = open[shape_of(s.component, s.pass)];
      if (++q > max_in_flight && max_in_flight > 0)
        errors.push_back(name(i) + ": more than " + std::to_string(max_in_flight) + " exchanges of its shape in flight");
    } else if (s.kind == StepKind::kWait) {
      --open[shape_of(s.component, s.pass)];
    }
  }
  return errors;
}

}  // namespace dpx
