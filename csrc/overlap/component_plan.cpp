#include "overlap/component_plan.h"

#include <map>
#include <stdexcept>
#include <tuple>

#include <pybind11/operators.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace dpx {

namespace {

const char* const kComponentNames[] = {"attn", "mlp", "dispatch", "combine"};
const char* const kPassNames[] = {"F", "B", "W"};

std::string item(Component c, Pass p, int layer) {
  return std::string(kComponentNames[static_cast<int>(c)]) + "." + kPassNames[static_cast<int>(p)] +
         std::to_string(layer);
}

OverlapStep make(StepKind k, Component c, Pass p, int layer) {
  OverlapStep s;
  s.kind = k;
  s.component = c;
  s.pass = p;
  s.layer = layer;
  return s;
}

using Key = std::tuple<int, int, int, int>;  // kind, component, pass, layer
Key key_of(StepKind k, Component c, Pass p, int layer) {
  return {static_cast<int>(k), static_cast<int>(c), static_cast<int>(p), layer};
}

}  // namespace

bool OverlapStep::operator==(const OverlapStep& o) const {
  return kind == o.kind && component == o.component && pass == o.pass && layer == o.layer && under == o.under;
}

std::string to_string(const OverlapStep& s) {
  const std::string it = item(s.component, s.pass, s.layer);
  switch (s.kind) {
    case StepKind::kIssue: return "issue " + it;
    case StepKind::kWait: return "wait " + it;
    default: return it;
  }
}

std::string describe(const std::vector<OverlapStep>& steps, int index) {
  const OverlapStep& s = steps.at(index);
  std::string out = to_string(s);
  if (!s.under.empty()) {
    out += " under";
    for (size_t i = 0; i < s.under.size(); ++i) {
      int u = s.under[i];
      out += (i ? ", " : " ") + (u >= 0 && u < static_cast<int>(steps.size()) ? to_string(steps[u]) : "?");
    }
  }
  return out;
}

std::vector<OverlapStep> overlap_plan(int num_layers) {
  if (num_layers < 1 || num_layers > 4096)
    throw std::invalid_argument("overlap_plan: num_layers must be in [1, 4096], got " + std::to_string(num_layers));
  const auto C = StepKind::kCompute, I = StepKind::kIssue, Wt = StepKind::kWait;
  const auto A = Component::kAttn, M = Component::kMlp, D = Component::kDispatch, K = Component::kCombine;
  const auto F = Pass::kF, B = Pass::kB, W = Pass::kW;
  std::vector<OverlapStep> out;
  auto push = [&](StepKind k, Component c, Pass p, int l) {
    out.push_back(make(k, c, p, l));
    return static_cast<int>(out.size()) - 1;
  };
  for (int i = 0; i < num_layers; ++i) {
    const int f = i, b = num_layers - 1 - i;  // forward walks up, backward walks down
    const int combine_b = push(I, K, B, b);
    if (f > 0) push(Wt, K, F, f - 1);  // the residual stream of layer f needs layer f-1's combine
    const int attn_f = push(C, A, F, f);
    const int dispatch_f = push(I, D, F, f);
    push(Wt, K, B, b);
    const int mlp_b = push(C, M, B, b);
    const int dispatch_b = push(I, D, B, b);
    const int mlp_w = push(C, M, W, b);
    push(Wt, D, F, f);
    const int mlp_f = push(C, M, F, f);
    const int combine_f = push(I, K, F, f);
    push(Wt, D, B, b);
    const int attn_b = push(C, A, B, b);
    const int attn_w = push(C, A, W, b);
    out[combine_b].under = {attn_f};
    out[dispatch_f].under = {mlp_b};
    out[dispatch_b].under = {mlp_w, mlp_f};
    out[combine_f].under = {attn_b, attn_w};
  }
  push(Wt, K, F, num_layers - 1);  // the stage output
  return out;
}

std::vector<std::string> validate_overlap_plan(const std::vector<OverlapStep>& steps, int num_layers) {
  std::vector<std::string> errors;
  if (num_layers < 1) {
    errors.push_back("num_layers must be positive, got " + std::to_string(num_layers));
    return errors;
  }
  const int n = static_cast<int>(steps.size());
  std::map<Key, int> pos;
  for (int i = 0; i < n; ++i) {
    const OverlapStep& s = steps[i];
    const std::string where = "step " + std::to_string(i) + " '" + to_string(s) + "'";
    if (s.layer < 0 || s.layer >= num_layers) errors.push_back(where + ": layer outside [0, " + std::to_string(num_layers) + ")");
    if (s.kind == StepKind::kCompute && s.is_comm()) errors.push_back(where + ": communication must be issued and waited");
    if (s.kind != StepKind::kCompute && !s.is_comm()) errors.push_back(where + ": computation cannot be issued or waited");
    if (s.is_comm() && s.pass == Pass::kW) errors.push_back(where + ": communication has no weight pass");
    if (s.kind != StepKind::kIssue && !s.under.empty()) errors.push_back(where + ": only issue steps run under computation");
    if (!pos.emplace(key_of(s.kind, s.component, s.pass, s.layer), i).second) errors.push_back(where + ": appears twice");
  }
  if (!errors.empty()) return errors;

  auto at = [&](StepKind k, Component c, Pass p, int l) {
    auto it = pos.find(key_of(k, c, p, l));
    return it == pos.end() ? -1 : it->second;
  };
  const auto C = StepKind::kCompute, I = StepKind::kIssue, Wt = StepKind::kWait;
  const auto A = Component::kAttn, M = Component::kMlp, D = Component::kDispatch, K = Component::kCombine;
  const auto F = Pass::kF, B = Pass::kB, W = Pass::kW;
  struct Want { StepKind k; Component c; Pass p; };
  const Want all[] = {{C, A, F}, {C, A, B}, {C, A, W}, {C, M, F}, {C, M, B}, {C, M, W},
                      {I, D, F}, {Wt, D, F}, {I, K, F}, {Wt, K, F}, {I, D, B}, {Wt, D, B}, {I, K, B}, {Wt, K, B}};
  for (int l = 0; l < num_layers; ++l)
    for (const Want& w : all)
      if (at(w.k, w.c, w.p, l) < 0) {
        OverlapStep s = make(w.k, w.c, w.p, l);
        errors.push_back("missing '" + to_string(s) + "'");
      }
  if (!errors.empty()) return errors;

  // (before, after): `after` consumes what `before` produces or must follow it.
  auto need = [&](StepKind k0, Component c0, Pass p0, int l0, StepKind k1, Component c1, Pass p1, int l1) {
    int a = at(k0, c0, p0, l0), b = at(k1, c1, p1, l1);
    if (a >= b)
      errors.push_back("step " + std::to_string(b) + " '" + to_string(steps[b]) + "' runs before step " +
                       std::to_string(a) + " '" + to_string(steps[a]) + "' that it depends on");
  };
  for (int l = 0; l < num_layers; ++l) {
    if (l > 0) need(Wt, K, F, l - 1, C, A, F, l);
    need(C, A, F, l, I, D, F, l);
    need(I, D, F, l, Wt, D, F, l);
    need(Wt, D, F, l, C, M, F, l);
    need(C, M, F, l, I, K, F, l);
    need(I, K, F, l, Wt, K, F, l);
    if (l + 1 < num_layers) need(C, A, B, l + 1, I, K, B, l);
    need(I, K, B, l, Wt, K, B, l);
    need(Wt, K, B, l, C, M, B, l);
    need(C, M, B, l, I, D, B, l);
    need(C, M, B, l, C, M, W, l);
    need(I, D, B, l, Wt, D, B, l);
    need(Wt, D, B, l, C, A, B, l);
    need(C, A, B, l, C, A, W, l);
  }
  for (int i = 0; i < n; ++i) {
    const OverlapStep& s = steps[i];
    if (s.kind != StepKind::kIssue) continue;
    const int wait = at(Wt, s.component, s.pass, s.layer);
    bool other = false;
    for (int u : s.under) {
      if (u <= i || u >= wait || steps[u].kind != StepKind::kCompute) {
        errors.push_back("step " + std::to_string(i) + " '" + to_string(s) + "': partner " + std::to_string(u) +
                         " is not a computation between its issue and its wait");
        continue;
      }
      other = other || ((s.pass == Pass::kF) != (steps[u].pass == Pass::kF));
    }
    if (!other)
      errors.push_back("step " + std::to_string(i) + " '" + to_string(s) +
                       "' is not paired with computation of the other micro-batch");
  }
  return errors;
}

void register_overlap(pybind11::module_& m) {
  namespace py = pybind11;
  py::enum_<Component>(m, "Component")
      .value("ATTN", Component::kAttn).value("MLP", Component::kMlp)
      .value("DISPATCH", Component::kDispatch).value("COMBINE", Component::kCombine);
  py::enum_<Pass>(m, "Pass").value("F", Pass::kF).value("B", Pass::kB).value("W", Pass::kW);
  py::enum_<StepKind>(m, "StepKind")
      .value("COMPUTE", StepKind::kCompute).value("ISSUE", StepKind::kIssue).value("WAIT", StepKind::kWait);
  py::class_<OverlapStep>(m, "OverlapStep")
      .def(py::init([](StepKind k, Component c, Pass p, int layer, std::vector<int> under) {
             OverlapStep s = make(k, c, p, layer);
             s.under = std::move(under);
             return s;
           }),
           py::arg("kind"), py::arg("component"), py::arg("pass_"), py::arg("layer"),
           py::arg("under") = std::vector<int>{})
      .def_readwrite("kind", &OverlapStep::kind)
      .def_readwrite("component", &OverlapStep::component)
      .def_readwrite("pass_", &OverlapStep::pass)
      .def_readwrite("layer", &OverlapStep::layer)
      .def_readwrite("under", &OverlapStep::under)
      .def_property_readonly("is_comm", &OverlapStep::is_comm)
      .def(py::self == py::self)
      .def("__str__", [](const OverlapStep& s) { return to_string(s); })
      .def("__repr__", [](const OverlapStep& s) { return "OverlapStep(" + to_string(s) + ")"; });
  m.def("overlap_plan", &overlap_plan, py::arg("num_layers"),
        "Component steps of one overlapped forward+backward pair of stages with num_layers MoE layers.");
  m.def("validate_overlap_plan", &validate_overlap_plan, py::arg("steps"), py::arg("num_layers"),
        "Every rule the component plan breaks (empty list: sound).");
  m.def("describe_overlap_step", &describe, py::arg("steps"), py::arg("index"),
        "Text of step `index` with its partners: 'issue dispatch.F0 under mlp.B1'.");
}

}  // namespace dpx
