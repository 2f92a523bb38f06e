#include "overlap/component_plan.h"

#include <algorithm>
#include <deque>
#include <map>
#include <stdexcept>
#include <tuple>

namespace dpx {

namespace {

const char* const kComponentNames[] = {"attn", "mlp", "dispatch", "combine", "shared", "prologue", "epilogue"};
const char* const kPassNames[] = {"F", "B", "W"};

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
Key key_of(Component c, Pass p, int run, int layer) {
  return {static_cast<int>(c), static_cast<int>(p), run, layer};
}
Key key_of(const Op& o) { return key_of(o.component, o.pass, o.run, o.layer); }
Key key_of(const OverlapStep& s) { return key_of(s.component, s.pass, s.run, s.layer); }

// 0: dispatch-shaped (tokens to the experts' ranks), 1: combine-shaped.
int shape_of(Component c, Pass p) {
  return (c == Component::kDispatch) == (p == Pass::kForward) ? 0 : 1;
}

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

// Fill each issue's `under`: the compute steps between it and its wait.
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

}  // namespace

bool OverlapStep::operator==(const OverlapStep& o) const {
  return kind == o.kind && component == o.component && pass == o.pass && run == o.run && layer == o.layer &&
         under == o.under;
}

std::string to_string(const OverlapStep& s, bool with_run) {
  std::string it = std::string(kComponentNames[static_cast<int>(s.component)]) + "." +
                   kPassNames[static_cast<int>(s.pass)];
  if (s.component != Component::kPrologue && s.component != Component::kEpilogue) it += std::to_string(s.layer);
  if (with_run) it = "r" + std::to_string(s.run) + ":" + it;
  switch (s.kind) {
    case StepKind::kIssue: return "issue " + it;
    case StepKind::kWait: return "wait " + it;
    default: return it;
  }
}

namespace {
// Run names are needed unless the plan is a forward run 0 paired with a backward run 1.
bool several_runs(const std::vector<OverlapStep>& steps) {
  for (const OverlapStep& s : steps)
    if ((s.pass == Pass::kForward) != (s.run == 0) || s.run > 1) return true;
  return false;
}
}  // namespace

std::string describe(const std::vector<OverlapStep>& steps, int index) {
  const bool runs = several_runs(steps);
  const OverlapStep& s = steps.at(index);
  std::string out = to_string(s, runs);
  if (!s.under.empty()) {
    out += " under";
    for (size_t i = 0; i < s.under.size(); ++i) {
      int u = s.under[i];
      out += (i ? ", " : " ") + (u >= 0 && u < static_cast<int>(steps.size()) ? to_string(steps[u], runs) : "?");
    }
  }
  return out;
}

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
