"""Compile accel's Triton kernels for real NVIDIA targets on a machine without a GPU.

``standin`` makes the public ops believe they run on a CUDA device (a stand-in Triton driver,
fake CUDA tensors, stand-ins for torch.cuda's device queries and for autograd) and turns
every kernel launch into a compile; ``resources`` reads what the compiled cubin uses and
judges it against the target's limits; ``cases`` is the matrix of model shapes and dtypes
that the ops are called with. ``benchmarks/gpu/compile_check.py`` is the command line.
"""
