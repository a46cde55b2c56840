// The Python module dpo_fast._C: importing it loads this shared library, whose static
// initializers register the dpo_fast_C operators (ops.cpp, cpu/, cuda_glue.cpp).
#include <torch/extension.h>

#include <string>

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpo_fast compiled kernels; the operators live in torch.ops.dpo_fast_C";
  m.def(
      "cpu_capability", []() { return std::string(dpo_fast::cpu_kernels_capability()); },
      "Vector ISA the CPU kernels were compiled for: 'avx512', 'avx2' or 'default'.");
  m.def(
      "cuda_built",
      []() {
#ifdef DPO_FAST_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this extension.");
}
