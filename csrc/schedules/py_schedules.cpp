#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "schedules/schedules.h"

namespace py = pybind11;

namespace dpx {

void register_schedules(py::module_& m) {
  py::class_<ScheduleInfo>(m, "ScheduleInfo", "A registered schedule: its name and what it needs of a pipeline.")
      .def_readonly("name", &ScheduleInfo::name)
      .def_readonly("summary", &ScheduleInfo::summary)
      .def_readonly("modules_per_rank", &ScheduleInfo::modules_per_rank)
      .def_readonly("stages_per_rank", &ScheduleInfo::stages_per_rank)
      .def_readonly("module1", &ScheduleInfo::module1)
      .def("__repr__", [](const ScheduleInfo& s) { return "ScheduleInfo(" + s.name + ")"; });
  m.def("schedule_names", &schedule_names, "Schedule names accepted by make_plan, in display order.");
  m.def("schedule_info", &schedule_info, py::arg("name"), py::return_value_policy::reference,
        "The registry entry of a schedule; raises ValueError listing the valid names.");
  m.def("make_plan", &make_plan, py::arg("name"), py::arg("ranks"), py::arg("chunks"),
        "Generate the full plan of a schedule; raises ValueError for impossible sizes.");
  m.def("closed_form_bubble", &closed_form_bubble, py::arg("name"), py::arg("ranks"), py::arg("costs") = Costs{},
        "The DualPipe README's bubble of one rank under costs F, B, W and FB; raises ValueError for unknown "
        "schedules or impossible ranks.");
}

}  // namespace dpx
