#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "analysis/simulate.h"
#include "analysis/validate.h"

namespace py = pybind11;

namespace dpx {

void register_analysis(py::module_& m) {
  m.def("validate", &validate, py::arg("plan"),
        "Check that a plan is sound (matching communication, no deadlock, inputs present, every micro-batch "
        "once); raises ValueError naming the broken rule and the first offending action, with the failing "
        "cells marked in a rank-by-step grid.");
  m.def(
      "check_plan",
      [](const Plan& plan) -> py::object {
        try {
          validate(plan);
        } catch (const PlanError& e) {
          return py::make_tuple(e.rule, e.rank, e.step, e.token, std::string(e.what()));
        }
        return py::none();
      },
      py::arg("plan"),
      "validate() as data: None for a sound plan, else (rule, rank, step, token, message) of the first "
      "offending action (rank and step -1 when the rule names none).");

  py::class_<SimResult>(m, "SimResult")
      .def_readonly("makespan", &SimResult::makespan)
      .def_property_readonly("timeline", [](const SimResult& s) {
        std::vector<std::vector<std::tuple<int, double, double>>> out(s.timeline.size());
        for (size_t r = 0; r < s.timeline.size(); ++r)
          for (const auto& t : s.timeline[r]) out[r].emplace_back(t.step, t.start, t.end);
        return out;
      }, "Per rank: (index into plan.actions[rank], start, end) of each compute action.")
      .def_readonly("busy", &SimResult::busy)
      .def_readonly("bubble", &SimResult::bubble)
      .def_readonly("peak_activations", &SimResult::peak_activations);

  m.def(
      "simulate",
      [](const Plan& plan, const Costs& costs, bool eager_comm, std::vector<double> start, std::vector<double> tail) {
        SimOptions opts;
        opts.eager_comm = eager_comm;
        opts.start = std::move(start);
        opts.tail = std::move(tail);
        return simulate(plan, costs, opts);
      },
      py::arg("plan"), py::arg("costs"), py::kw_only(), py::arg("eager_comm") = false,
      py::arg("start") = std::vector<double>(), py::arg("tail") = std::vector<double>(),
      "Validate then simulate a plan under the given costs. eager_comm: sends never block and a receive "
      "completes P2P after the sender posts (the gloo runtime); otherwise a wait is a rendezvous. start/tail: "
      "per-rank time before the program begins and after its last action (empty: zeros).");
}

}  // namespace dpx
