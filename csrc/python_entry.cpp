// Direct Python entry points into the dispatcher for ops whose whole cost is a few microseconds, so
// that the call itself shows: fastdw._C.channel_shuffle(x, groups).
//
// A whole call at [1, 24, 4, 4] (1 thread) took 1.9 us through torch.ops (OpOverload.__call__,
// boxed arguments) against 1.2 us for torch.nn.functional.channel_shuffle, a generated binding;
// through this entry, 1.1 us. It unpacks its two arguments itself and calls the op through its
// typed dispatcher handle, so autograd (csrc/autograd.cpp), the Python dispatch keys (modes such
// as FakeTensorMode or make_fx) and the device kernels all still apply. It covers only the plain case and returns None for anything
// else, which the Python caller then takes the full, checked path for:
//   * x not exactly a torch.Tensor (a subclass may override __torch_function__) or a
//     __torch_function__ mode active; groups not exactly an int (a bool is refused);
//   * x not a float32 / float64 CPU tensor;
//   * the op rejecting the arguments. The op checks every argument before it computes anything
//     (csrc/common/checks.h), so nothing was written; the checked path raises the named error.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>

#include "python_entry.h"

namespace fastdw {
namespace {

// The plain-tensor part of the conditions above.
bool plain_cpu_float(PyObject* obj) {
  if (!THPVariable_CheckExact(obj) || at::impl::torch_function_mode_enabled()) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  const auto dtype = t.scalar_type();
  return t.is_cpu() && (dtype == at::kFloat || dtype == at::kDouble);
}

PyObject* py_channel_shuffle(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyLong_CheckExact(args[1]) || !plain_cpu_float(args[0])) Py_RETURN_NONE;
  int overflow = 0;
  const long long groups = PyLong_AsLongLongAndOverflow(args[1], &overflow);
  if (overflow != 0) Py_RETURN_NONE;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastdw::channel_shuffle", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  at::Tensor out;
  bool rejected = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    out = op.call(x, groups);
  } catch (const std::exception&) {  // c10::Error and anything else: the checked path says why
    rejected = true;
  }
  Py_END_ALLOW_THREADS
  if (rejected) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(out));
}

}  // namespace

PyMethodDef python_entry_methods[] = {
    {"channel_shuffle", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_channel_shuffle)),
     METH_FASTCALL,
     "channel_shuffle(x, groups) -> Tensor or None: fastdw::channel_shuffle through the dispatcher for a "
     "plain float CPU tensor and an int; None where the caller must take the checked path."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fastdw
