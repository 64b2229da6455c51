"""fastdw's benchmark suite: ``python -m fastdw.bench`` (``make bench``).

Modules: ``timing`` (threads, denormals, interleaved medians), ``engines`` (eager, BN folded,
torch.compile, ONNX Runtime, OpenVINO), ``ops`` (single layers), ``models`` (whole networks),
``report`` (Markdown, JSON, PNG). The method is written down in bench/README.md.
"""
