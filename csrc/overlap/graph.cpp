#include "overlap/graph.h"

#include <map>
#include <stdexcept>
#include <string>

namespace dpx {

Key key_of(Component c, Pass p, int run, int layer) {
  return {static_cast<int>(c), static_cast<int>(p), run, layer};
}
Key key_of(const Op& o) { return key_of(o.component, o.pass, o.run, o.layer); }
Key key_of(const OverlapStep& s) { return key_of(s.component, s.pass, s.run, s.layer); }

int shape_of(Component c, Pass p) {
  return (c == Component::kDispatch) == (p == Pass::kForward) ? 0 : 1;
}

namespace {

class OpBuilder {
 public:
  OpBuilder(std::vector<Op>& ops, int run, const PlanCosts& costs) : ops_(ops), run_(run), costs_(costs) {}

  int add(bool comm, Component c, Pass p, int layer, std::vector<int> deps) {
    ops_.push_back(Op{comm, c, p, run_, layer, comm ? costs_.comm : cost(c), std::move(deps)});
    return static_cast<int>(ops_.size()) - 1;
  }

 private:
  double cost(Component c) const {
    switch (c) {
      case Component::kAttn: return costs_.attn;
      case Component::kMlp: return costs_.mlp;
      case Component::kShared: return costs_.shared;
      case Component::kPrologue: return costs_.prologue;
      case Component::kEpilogue: return costs_.epilogue;
      default: return costs_.comm;
    }
  }
  std::vector<Op>& ops_;
  int run_;
  const PlanCosts& costs_;
};

void add_forward(std::vector<Op>& ops, int r, const RunSpec& s, const PlanCosts& costs) {
  const auto A = Component::kAttn, M = Component::kMlp, D = Component::kDispatch, K = Component::kCombine;
  const auto S = Component::kShared;
  const auto F = Pass::kForward;
  OpBuilder b(ops, r, costs);
  std::vector<int> in;
  if (s.prologue) in.push_back(b.add(false, Component::kPrologue, F, 0, {}));
  for (int l = 0; l < s.num_layers; ++l) {
    const int attn = b.add(false, A, F, l, in);
    const int dispatch = b.add(true, D, F, l, {attn});
    const int shared = s.shared ? b.add(false, S, F, l, {attn}) : -1;
    const int mlp = b.add(false, M, F, l, {dispatch});
    in = {b.add(true, K, F, l, {mlp})};
    if (shared >= 0) in.push_back(shared);  // the layer's output sums shared and routed experts
  }
  if (s.epilogue) b.add(false, Component::kEpilogue, F, 0, in);
}

void add_backward(std::vector<Op>& ops, int r, const RunSpec& s, const PlanCosts& costs) {
  const auto A = Component::kAttn, M = Component::kMlp, D = Component::kDispatch, K = Component::kCombine;
  const auto S = Component::kShared;
  const auto B = Pass::kBackwardInput, W = Pass::kWeight;
  OpBuilder b(ops, r, costs);
  std::vector<int> in;  // what produces the gradient of the current layer's output
  if (s.epilogue) in.push_back(b.add(false, Component::kEpilogue, B, 0, {}));
  for (int l = s.num_layers - 1; l >= 0; --l) {
    const int combine = b.add(true, K, B, l, in);
    const int shared = s.shared ? b.add(false, S, B, l, in) : -1;
    const int mlp = b.add(false, M, B, l, {combine});
    const int dispatch = b.add(true, D, B, l, {mlp});
    b.add(false, M, W, l, {mlp});
    std::vector<int> attn_in = {dispatch};
    if (shared >= 0) attn_in.push_back(shared);
    const int attn = b.add(false, A, B, l, attn_in);
    b.add(false, A, W, l, {attn});
    if (shared >= 0) b.add(false, S, W, l, {shared});
    in = {attn};
  }
  if (s.prologue) b.add(false, Component::kPrologue, B, 0, in);
}

}  // namespace

std::vector<Op> build_ops(const std::vector<RunSpec>& runs, const PlanCosts& costs) {
  if (runs.empty()) throw std::invalid_argument("overlap_plan: needs at least one run");
  std::vector<Op> ops;
  for (size_t r = 0; r < runs.size(); ++r) {
    const RunSpec& s = runs[r];
    if (s.num_layers < 1 || s.num_layers > 4096)
      throw std::invalid_argument("overlap_plan: num_layers must be in [1, 4096], got " +
                                  std::to_string(s.num_layers) + " (run " + std::to_string(r) + ")");
    if (s.backward) add_backward(ops, static_cast<int>(r), s, costs);
    else add_forward(ops, static_cast<int>(r), s, costs);
  }
  return ops;
}

OverlapStep step_of(StepKind k, const Op& o) {
  OverlapStep s;
  s.kind = k;
  s.component = o.component;
  s.pass = o.pass;
  s.run = o.run;
  s.layer = o.layer;
  return s;
}

void fill_partners(std::vector<OverlapStep>& steps) {
  std::map<Key, int> open;
  for (int i = 0; i < static_cast<int>(steps.size()); ++i) {
    if (steps[i].kind == StepKind::kIssue) {
      steps[i].under.clear();
      open[key_of(steps[i])] = i;
    } else if (steps[i].kind == StepKind::kWait) {
      auto it = open.find(key_of(steps[i]));
      if (it == open.end()) continue;
      for (int j = it->second + 1; j < i; ++j)
        if (steps[j].kind == StepKind::kCompute) steps[it->second].under.push_back(j);
      open.erase(it);
    }
  }
}

bool several_runs(const std::vector<OverlapStep>& steps) {
  for (const OverlapStep& s : steps)
    if ((s.pass == Pass::kForward) != (s.run == 0) || s.run > 1) return true;
  return false;
}

}  // namespace dpx
