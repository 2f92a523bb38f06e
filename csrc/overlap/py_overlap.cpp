// Python bindings of the component plan.
#include <pybind11/operators.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "overlap/component_plan.h"

namespace dpx {

void register_overlap(pybind11::module_& m) {
  namespace py = pybind11;
  py::enum_<Component>(m, "Component")
      .value("ATTN", Component::kAttn).value("MLP", Component::kMlp)
      .value("DISPATCH", Component::kDispatch).value("COMBINE", Component::kCombine)
      .value("SHARED", Component::kShared).value("PROLOGUE", Component::kPrologue)
      .value("EPILOGUE", Component::kEpilogue);
  py::enum_<Pass>(m, "Pass")
      .value("FORWARD", Pass::kForward)
      .value("BACKWARD_INPUT", Pass::kBackwardInput)
      .value("WEIGHT", Pass::kWeight);
  py::enum_<StepKind>(m, "StepKind")
      .value("COMPUTE", StepKind::kCompute).value("ISSUE", StepKind::kIssue).value("WAIT", StepKind::kWait);
  py::class_<RunSpec>(m, "RunSpec")
      .def(py::init([](bool backward, int num_layers, bool prologue, bool epilogue, bool shared) {
             return RunSpec{backward, num_layers, prologue, epilogue, shared};
           }),
           py::arg("backward"), py::arg("num_layers"), py::arg("prologue") = false, py::arg("epilogue") = false,
           py::arg("shared") = false)
      .def_readwrite("backward", &RunSpec::backward)
      .def_readwrite("num_layers", &RunSpec::num_layers)
      .def_readwrite("prologue", &RunSpec::prologue)
      .def_readwrite("epilogue", &RunSpec::epilogue)
      .def_readwrite("shared", &RunSpec::shared)
      .def("__repr__", [](const RunSpec& r) {
        return std::string("RunSpec(") + (r.backward ? "backward" : "forward") + ", layers=" +
               std::to_string(r.num_layers) + (r.prologue ? ", prologue" : "") + (r.epilogue ? ", epilogue" : "") +
               (r.shared ? ", shared" : "") + ")";
      });
  const PlanCosts defaults;  // the one place the default costs are written is overlap/steps.h
  py::class_<PlanCosts>(m, "PlanCosts")
      .def(py::init([](double attn, double mlp, double shared, double prologue, double epilogue, double comm) {
             return PlanCosts{attn, mlp, shared, prologue, epilogue, comm};
           }),
           py::arg("attn") = defaults.attn, py::arg("mlp") = defaults.mlp, py::arg("shared") = defaults.shared,
           py::arg("prologue") = defaults.prologue, py::arg("epilogue") = defaults.epilogue,
           py::arg("comm") = defaults.comm)
      .def_readwrite("attn", &PlanCosts::attn)
      .def_readwrite("mlp", &PlanCosts::mlp)
      .def_readwrite("shared", &PlanCosts::shared)
      .def_readwrite("prologue", &PlanCosts::prologue)
      .def_readwrite("epilogue", &PlanCosts::epilogue)
      .def_readwrite("comm", &PlanCosts::comm);
  py::class_<OverlapStep>(m, "OverlapStep")
      .def(py::init([](StepKind k, Component c, Pass p, int layer, std::vector<int> under, int run) {
             return OverlapStep{k, c, p, run < 0 ? (p == Pass::kForward ? 0 : 1) : run, layer, std::move(under)};
           }),
           py::arg("kind"), py::arg("component"), py::arg("pass_"), py::arg("layer"),
           py::arg("under") = std::vector<int>{}, py::arg("run") = -1)
      .def_readwrite("kind", &OverlapStep::kind)
      .def_readwrite("component", &OverlapStep::component)
      .def_readwrite("pass_", &OverlapStep::pass)
      .def_readwrite("run", &OverlapStep::run)
      .def_readwrite("layer", &OverlapStep::layer)
      .def_readwrite("under", &OverlapStep::under)
      .def_property_readonly("is_comm", &OverlapStep::is_comm)
      .def(py::self == py::self)
      .def("__str__", [](const OverlapStep& s) { return to_string(s, s.run > 1 || (s.pass == Pass::kForward) != (s.run == 0)); })
      .def("__repr__", [](const OverlapStep& s) { return "OverlapStep(" + to_string(s, true) + ")"; });
  m.def("overlap_plan", &overlap_plan, py::arg("runs"), py::arg("costs") = PlanCosts{}, py::arg("max_in_flight") = 2,
        "Steps of the runs interleaved on one compute stream (list schedule, exchanges as early as possible).");
  m.def("deepseek_plan", &deepseek_plan, py::arg("num_layers"),
        "DeepSeek-V3's per-layer order for a forward and a backward run of num_layers layers.");
  m.def("validate_overlap_plan", &validate_overlap_plan, py::arg("steps"), py::arg("runs"),
        py::arg("max_in_flight") = 0, "Every rule the component plan breaks (empty list: sound).");
  m.def("exposed_comm", &exposed_comm, py::arg("steps"), py::arg("runs"), py::arg("costs") = PlanCosts{},
        "Time the compute stream waits for exchanges under the plan's cost model.");
  m.def("describe_overlap_step", &describe, py::arg("steps"), py::arg("index"),
        "Text of step `index` with its partners: 'issue dispatch.F0 under mlp.B1'.");
}

}  // namespace dpx
