"""Shared pytest setup for the CPU suite."""
import os

# Triton kernels run on CPU only in Triton's interpreter; the flag must be set before triton is
# imported anywhere in this process. It only matters where a test forces PREFLEXOR_KERNELS=triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
