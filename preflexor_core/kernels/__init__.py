"""Kernel dispatch (filled in by the kernels module)."""
