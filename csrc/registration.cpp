// The ldeq_fast operator library.  Each fused op's schema is defined in Python (ldeq_fast/ops/<op>.py, with its
// CUDA kernel in Triton); the C++ sources register its CPU kernel with TORCH_LIBRARY_IMPL(ldeq_fast, CPU, m),
// so eager code, autograd, torch.compile and torch.library.opcheck all see one op per fused op.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ldeq_fast CPU kernels (registered for the ops torch.ops.ldeq_fast.*)";
}
