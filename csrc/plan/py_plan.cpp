#include <pybind11/operators.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "plan/action.h"
#include "plan/costs.h"

namespace py = pybind11;

namespace dpx {

void register_plan(py::module_& m) {
  py::enum_<ActionType>(m, "ActionType")
      .value("FORWARD", ActionType::kForward)
      .value("BACKWARD", ActionType::kBackward)
      .value("BACKWARD_INPUT", ActionType::kBackwardInput)
      .value("WEIGHT", ActionType::kWeight)
      .value("FORWARD_BACKWARD", ActionType::kForwardBackward)
      .value("RECV_FORWARD", ActionType::kRecvForward)
      .value("RECV_BACKWARD", ActionType::kRecvBackward)
      .value("SEND_FORWARD", ActionType::kSendForward)
      .value("SEND_BACKWARD", ActionType::kSendBackward)
      .value("WAIT", ActionType::kWait);

  py::class_<Action>(m, "Action")
      .def(py::init<>())
      .def_readwrite("type", &Action::type)
      .def_readwrite("module", &Action::module)
      .def_readwrite("mb", &Action::mb)
      .def_readwrite("module2", &Action::module2)
      .def_readwrite("mb2", &Action::mb2)
      .def_readwrite("peer", &Action::peer)
      .def_property_readonly("is_compute", &Action::is_compute)
      .def_property_readonly("is_comm", &Action::is_comm)
      .def(py::self == py::self)
      .def("__str__", [](const Action& a) { return to_string(a); })
      .def("__repr__", [](const Action& a) { return "Action(" + to_string(a) + ")"; })
      .def_static("parse", &parse_action, py::arg("text"));

  py::class_<StageInfo>(m, "StageInfo")
      .def_readonly("stage", &StageInfo::stage)
      .def_readonly("pipeline", &StageInfo::pipeline)
      .def_readonly("prev_rank", &StageInfo::prev_rank)
      .def_readonly("prev_module", &StageInfo::prev_module)
      .def_readonly("next_rank", &StageInfo::next_rank)
      .def_readonly("next_module", &StageInfo::next_module)
      .def("__repr__", [](const StageInfo& s) {
        return "StageInfo(stage=" + std::to_string(s.stage) + ", pipeline=" + std::to_string(s.pipeline) +
               ", prev=(" + std::to_string(s.prev_rank) + "," + std::to_string(s.prev_module) + "), next=(" +
               std::to_string(s.next_rank) + "," + std::to_string(s.next_module) + "))";
      });

  py::class_<Plan>(m, "Plan")
      .def(py::init<>())
      .def_readwrite("schedule", &Plan::schedule)
      .def_readwrite("ranks", &Plan::ranks)
      .def_readwrite("chunks", &Plan::chunks)
      .def_readwrite("num_modules", &Plan::num_modules)
      .def_readwrite("mbs_per_module", &Plan::mbs_per_module)
      .def_readwrite("stages", &Plan::stages)
      .def_readwrite("actions", &Plan::actions)
      .def("trace", [](const Plan& p) {
        std::vector<std::vector<std::string>> out;
        for (const auto& acts : p.actions) out.push_back(trace(acts));
        return out;
      }, "Per-rank compute tokens (shared/spec/schedule-trace.md).")
      .def("forward_only", &forward_only, "The plan with backward work removed (for torch.no_grad()).");

  const Costs defaults;  // the one place the default costs are written is plan/costs.h
  py::class_<Costs>(m, "Costs", "Durations of the actions of a plan (the defaults are the cost model's).")
      .def(py::init([](double F, double B, double W, double FB, double P2P, double overhead) {
             Costs c{F, B, W, FB, P2P, overhead};
             c.check();
             return c;
           }),
           py::arg("F") = defaults.F, py::arg("B") = defaults.B, py::arg("W") = defaults.W, py::arg("FB") = defaults.FB,
           py::arg("P2P") = defaults.P2P, py::arg("overhead") = defaults.overhead)
      .def_readonly("F", &Costs::F)
      .def_readonly("B", &Costs::B)
      .def_readonly("W", &Costs::W)
      .def_readonly("FB", &Costs::FB)
      .def_readonly("P2P", &Costs::P2P)
      .def_readonly("overhead", &Costs::overhead)
      .def("of", &Costs::of, py::arg("action"), "The duration the simulator charges for a compute action.")
      .def("__repr__", [](const Costs& c) {
        return "Costs(F=" + std::to_string(c.F) + ", B=" + std::to_string(c.B) + ", W=" + std::to_string(c.W) +
               ", FB=" + std::to_string(c.FB) + ", P2P=" + std::to_string(c.P2P) +
               ", overhead=" + std::to_string(c.overhead) + ")";
      });
}

}  // namespace dpx
