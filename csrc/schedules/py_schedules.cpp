#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "schedules/schedules.h"

namespace py = pybind11;

namespace dpx {

void register_schedules(py::module_& m) {
  m.def("schedule_names", &schedule_names, "Schedule names accepted by make_plan.");
  m.def("make_plan", &make_plan, py::arg("name"), py::arg("ranks"), py::arg("chunks"),
        "Generate the full plan of a schedule; raises ValueError for impossible sizes.");
}

}  // namespace dpx
