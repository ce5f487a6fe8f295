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
