#include "overlap/cost_model.h"

#include <algorithm>
#include <map>
#include <stdexcept>

#include "overlap/graph.h"

namespace dpx {

double exposed_comm(const std::vector<OverlapStep>& steps, const std::vector<RunSpec>& runs, const PlanCosts& costs) {
  const std::vector<Op> ops = build_ops(runs, costs);
  std::map<Key, int> op_of;
  for (int i = 0; i < static_cast<int>(ops.size()); ++i) op_of[key_of(ops[i])] = i;
  std::map<Key, double> issued;
  double t = 0.0, exposed = 0.0;
  for (const OverlapStep& s : steps) {
    auto it = op_of.find(key_of(s));
    if (it == op_of.end()) throw std::invalid_argument("exposed_comm: '" + to_string(s, true) + "' is not in the runs");
    const Op& o = ops[it->second];
    if (s.kind == StepKind::kCompute) {
      t += o.cost;
    } else if (s.kind == StepKind::kIssue) {
      issued[key_of(s)] = t;
    } else {
      const double done = issued.count(key_of(s)) ? issued[key_of(s)] + o.cost : t;
      exposed += std::max(0.0, done - t);
      t = std::max(t, done);
    }
  }
  return exposed;
}

}  // namespace dpx
