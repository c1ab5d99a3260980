// Operator registry of the preflexor extension (`preflexor_core._C`): the TORCH_LIBRARY schemas of
// every op, their CPU kernels, their CUDA kernels when built with PREFLEXOR_WITH_CUDA, and the empty
// Python module init so that `import preflexor_core._C` loads the library and registers the ops.
// Autograd formulas and fake (meta) kernels are registered from Python in preflexor_core/llm/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "ops.h"

TORCH_LIBRARY(preflexor, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd)"
      " -> (Tensor grad_x, Tensor grad_weight)");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  m.def("rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor grad_q_in, Tensor grad_k_in)");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seeds) -> Tensor");
  // CPU ISA paths (cpu_isa.h): 0 generic, 1 avx2, 2 avx512; the native level, the active one, lowering it.
  m.def("cpu_isa_native() -> int", &preflexor::cpu_isa_native_op);
  m.def("cpu_isa_active() -> int", &preflexor::cpu_isa_active_op);
  m.def("set_cpu_isa(int level) -> int", &preflexor::set_cpu_isa_op);
  // CPU decode (decode_cpu.cpp): the small-M product, one decode step (every CPU, on its ISA path).
  m.def("decode_matmul(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def(
      "decode_step(Tensor x, Tensor lengths, Tensor cos, Tensor sin, Tensor[] norms, Tensor[] mats,"
      " Tensor[] scales, Tensor(a!) k_cache, Tensor(b!) v_cache, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(preflexor, CPU, m) {
  m.impl("rms_norm_forward", &preflexor::rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &preflexor::rms_norm_backward_cpu);
  m.impl("rope", &preflexor::rope_cpu);
  m.impl("rope_backward", &preflexor::rope_backward_cpu);
  m.impl("sample", &preflexor::sample_cpu);
  m.impl("decode_matmul", &preflexor::decode_matmul_cpu);
  m.impl("decode_step", &preflexor::decode_step_cpu);
}

// decode_step with oneDNN-packed weights among its arguments dispatches to the MkldnnCPU key.
TORCH_LIBRARY_IMPL(preflexor, MkldnnCPU, m) { m.impl("decode_step", &preflexor::decode_step_cpu); }

#ifdef PREFLEXOR_WITH_CUDA
TORCH_LIBRARY_IMPL(preflexor, CUDA, m) {
  m.impl("rms_norm_forward", &preflexor::rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &preflexor::rms_norm_backward_cuda);
  m.impl("rope", &preflexor::rope_cuda);
  m.impl("rope_backward", &preflexor::rope_backward_cuda);
  m.impl("sample", &preflexor::sample_cuda);
}
#endif

// `import preflexor_core._C` only needs a module object; the ops live in torch.ops.preflexor.
static struct PyModuleDef preflexor_module = {PyModuleDef_HEAD_INIT, "_C", "preflexor compiled ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&preflexor_module); }
