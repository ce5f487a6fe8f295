"""bitsack.kernels: quantizers, packed formats, kernel backends, error bounds, tensor I/O.

Modules (import them directly; this package imports nothing so that ``formats`` stays
importable without torch, for the solver):

- ``formats``    — ``PackFormat``, ``pack``/``unpack``, ``packed_nbytes`` (no torch needed)
- ``hessian``    — ``Hessian``: the running ``2XXᵀ/n`` every stage accumulates the same way
- ``quantizers`` — ``rtn_quantize``, ``GPTQ``, ``fake_quantize``, ``get_quantizer``
- ``packed``     — ``Segment``, ``PackedLinear``, ``PackedEmbedding``
- ``backends``   — ``cpu`` (default) / ``torch`` / ``reference`` / ``cupy`` kernel backends
- ``cpu_build``  — compile (cached) and load the C++ CPU kernels of ``kernels/cpu``
- ``bounds``     — a priori error bounds of the backends and of RTN
- ``io``         — safetensors files written atomically, checked on load
- ``cuda_build`` — NVRTC compilation and CuPy loading of ``kernels/cuda/*.cu``
- ``emulate``    — NumPy ports of the CUDA kernels' indexing, for CPU tests
"""

# This folder is also reachable as a top-level ``kernels`` whenever the repository root is on
# sys.path (``python -m pytest`` or ``python -c`` run from the root, a notebook started there).
# transformers imports the Hugging Face distribution named ``kernels`` when it is installed
# (transformers 5.x depends on it), and would get this folder instead and fail on import. So
# when imported under that name, this module hands the name over to the installed package: a
# module may replace itself in ``sys.modules`` while it is imported, and the import returns
# the replacement. With no such package installed, the name stays unresolved (ImportError).
if __name__ == "kernels":
    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        del sys.modules["kernels"]
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ "
                                      "folder is bitsack.kernels)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
