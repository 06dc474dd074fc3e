"""The CUDA backend: the same plans as the Triton backend, rendered into CUDA C++ and compiled
by nvcc (issue 17). `printer.py` prints the IR's expressions as `__host__ __device__` functions
whose helpers live in `templates/attncc_expr.cuh`."""
