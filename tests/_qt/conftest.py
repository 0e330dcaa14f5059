"""GUI tests: import triton before any OpenGL context exists.

napari's canvas on Mesa (llvmpipe under Xvfb) maps Mesa's libLLVM; importing triton's own LLVM
after that crashes the process. The plugin guards itself (``session.avoid_triton_llvm_clash``, run
when a model loads), but other test modules in the same pytest process (core fine-tuning builds
torch optimisers, which import triton) may run after a GUI test: importing triton first, while it is
still safe, keeps the whole suite order-independent.
"""

from __future__ import annotations

import importlib.util
import sys

if sys.platform.startswith("linux") and "triton" not in sys.modules:
    try:
        if importlib.util.find_spec("triton") is not None:
            import triton  # noqa: F401
    except ImportError:
        pass
