// Python entry points of fastdw._C that call ops directly (csrc/python_entry.cpp).
#pragma once
#include <Python.h>

namespace fastdw {
extern PyMethodDef python_entry_methods[];
}  // namespace fastdw
