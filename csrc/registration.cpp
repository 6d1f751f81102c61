// The ldeq_fast operator library.  Each fused op declares its schema with TORCH_LIBRARY_FRAGMENT in
// its own source file and registers CPU / CUDA kernels with TORCH_LIBRARY_IMPL, so torch.compile,
// CUDA graphs and torch.library.opcheck all see the same ops as eager code.
#include <torch/extension.h>

TORCH_LIBRARY(ldeq_fast, m) {}

namespace {
bool compiled_with_cuda() {
#ifdef LDEQ_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ldeq_fast native kernels (ops are registered under torch.ops.ldeq_fast)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were built");
}
