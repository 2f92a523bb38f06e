// dualpipe_ext._C: each subsystem registers its own functions.
#include <pybind11/pybind11.h>

namespace dpx {
void register_plan(pybind11::module_& m);
void register_schedules(pybind11::module_& m);
void register_analysis(pybind11::module_& m);
void register_overlap(pybind11::module_& m);
}  // namespace dpx

PYBIND11_MODULE(_C, m) {
  m.doc() = "dualpipe-ext C++ schedule core: action IR, generators, validator, simulator";
  dpx::register_plan(m);
  dpx::register_schedules(m);
  dpx::register_analysis(m);
  dpx::register_overlap(m);
}
