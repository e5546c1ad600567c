// The pybind11 module p2p_engine._native; each tenant registers itself here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_aligner(py::module_& m);

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native helpers of p2p_engine";
    register_aligner(m);
}
