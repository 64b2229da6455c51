"""Triton kernels of every fastdw op, registered as ``fastdw::triton_<op>`` with
``torch.library.triton_op``. Importing this package imports ``triton``; fastdw imports it only when
the ``triton`` backend is used or reported (fastdw.ops._triton.ensure_loaded, fastdw.backends()).
With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (how they are tested without a GPU).
"""

from fastdw.triton import dwconv_bn_act  # noqa: F401  (defines the ops)
