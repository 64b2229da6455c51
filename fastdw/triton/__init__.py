"""Triton kernels of every fastdw op, registered as ``fastdw::triton_<op>`` with
``torch.library.triton_op`` (one file per op, the same names as in fastdw/ops and csrc/cpu).

Importing this package imports ``triton``; fastdw imports it only when the ``triton`` backend is
used or reported (``fastdw._backend._load_triton``), never on ``import fastdw``. With
``TRITON_INTERPRET=1`` set before that import, the kernels run on CPU tensors through Triton's
interpreter, which is how they are tested without a GPU.
"""

from triton.runtime.interpreter import InterpretedFunction

from fastdw.triton import channel_shuffle, dwconv_bn_act, se_scale  # noqa: F401  (importing defines the ops)

INTERPRETED = isinstance(dwconv_bn_act._dw_forward_kernel, InterpretedFunction)
"""True when the kernels were built for the interpreter (they then take CPU tensors, not CUDA)."""

__all__ = ["INTERPRETED"]
