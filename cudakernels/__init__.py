"""cascada.cudakernels: CuPy kernels, each with a torch reference of the same signature.
Pure functions over tensors; knows nothing of the runtime. (Kernels land with the tensor
and workload issues.)"""

__all__: list[str] = []
