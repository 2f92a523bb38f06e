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
  py::class_<PlanIssue>(m, "PlanIssue", "Why a plan is unsound: the broken rule and the first offending action.")
      .def_readonly("rule", &PlanIssue::rule)
      .def_readonly("rank", &PlanIssue::rank)
      .def_readonly("step", &PlanIssue::step)
      .def_readonly("token", &PlanIssue::token)
      .def_readonly("message", &PlanIssue::message)
      .def("__repr__", [](const PlanIssue& i) {
        return "PlanIssue(rule='" + i.rule + "', rank=" + std::to_string(i.rank) + ", step=" +
               std::to_string(i.step) + ", token='" + i.token + "')";
      });
  m.def(
      "check_plan",
      [](const Plan& plan) -> py::object {
        try {
          validate(plan);
        } catch (const PlanError& e) {
          return py::cast(PlanIssue{e.rule, e.rank, e.step, e.token, e.what()});
        }
        return py::none();
      },
      py::arg("plan"),
      "validate() as data: None for a sound plan, else the PlanIssue (rule, rank, step, token, message) of the "
      "first offending action (rank and step -1 when the rule names none).");

  py::class_<TimedAction>(m, "TimedAction", "When a compute action of a rank ran in a simulation.")
      .def_readonly("step", &TimedAction::step, "index into plan.actions[rank]")
      .def_readonly("start", &TimedAction::start)
      .def_readonly("end", &TimedAction::end)
      .def("__repr__", [](const TimedAction& t) {
        return "TimedAction(step=" + std::to_string(t.step) + ", start=" + std::to_string(t.start) +
               ", end=" + std::to_string(t.end) + ")";
      });

  py::class_<SimResult>(m, "SimResult")
      .def_readonly("makespan", &SimResult::makespan)
      .def_readonly("timeline", &SimResult::timeline, "Per rank: the TimedAction of each compute action.")
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
