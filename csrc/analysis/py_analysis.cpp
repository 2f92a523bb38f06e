#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace dpx {

// The validator and simulator register here.
void register_analysis(py::module_& m) { (void)m; }

}  // namespace dpx
