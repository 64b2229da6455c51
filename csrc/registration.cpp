// The schema of every fastdw op, defined once. Devices add kernels with TORCH_LIBRARY_IMPL in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu. Importing fastdw._C runs these registrars; the module
// itself carries two helpers to inspect and cap the CPU instruction set (used by tests) and the
// direct entry points of csrc/python_entry.cpp.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "python_entry.h"

TORCH_LIBRARY(fastdw, m) {
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? mean, Tensor? var, bool training, float eps, int[2] stride, int[2] padding, "
      "int[2] dilation, str activation, int shuffle_groups=1) -> (Tensor, Tensor, Tensor)");
  // out (optional): the forward's output. The CPU kernels take the training backward's BatchNorm
  // sums from it for relu / relu6 (csrc/cpu/dwconv_bn_act.cpp: sums_from_output); without it, or
  // elsewhere, the conv is recomputed. The gradients are the same either way (up to rounding).
  m.def(
      "dwconv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor? mean, Tensor? var, bool training, float eps, int[2] stride, "
      "int[2] padding, int[2] dilation, str activation, bool[5] output_mask, int shuffle_groups=1, "
      "Tensor? out=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // BatchNorm2d's running-statistics update from a training-mode dwconv_bn_act's batch mean and
  // biased variance of `count` values per channel (csrc/bn_running_update.cpp).
  m.def(
      "bn_running_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
      "Tensor mean, Tensor var, float factor, int count) -> ()");
  // Squeeze-and-Excitation: returns (x * gate(fc2(act(fc1(mean_hw(x))))), mean_hw(x) as [N, C]).
  m.def(
      "se_scale(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "str activation, str gate) -> (Tensor, Tensor)");
  m.def(
      "se_scale_backward(Tensor grad_out, Tensor x, Tensor pooled, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias, str activation, str gate, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Channel shuffle; its backward is channel_shuffle(grad, C / groups).
  m.def("channel_shuffle(Tensor x, int groups) -> Tensor");
  // channel_shuffle(cat([a, b], 1), 2) in one pass; backward splits even and odd channels.
  m.def("concat_shuffle(Tensor a, Tensor b) -> Tensor");
  m.def("concat_shuffle_backward(Tensor grad_out) -> (Tensor, Tensor)");
}

namespace {
PyObject* py_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastdw::cpu::cpu_capability());
}
PyObject* py_set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  if (!fastdw::cpu::set_cpu_capability(name)) {
    PyErr_Format(PyExc_ValueError, "fastdw: CPU capability '%s' is unknown or not supported by this CPU", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}
PyMethodDef methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS, "Instruction set used by the CPU kernels."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O, "Use 'default', 'avx2' or 'avx512' kernels."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastdw compiled kernels", -1, methods};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module && PyModule_AddFunctions(module, fastdw::python_entry_methods) < 0) Py_CLEAR(module);
  return module;
}
