"""pytest setup for the benchmarks.

Marker ``gpu``: the benchmark measures a CUDA device (it skips without one, or measures the CPU
instead when it has a CPU form). ``make gpu-check`` selects these with ``-m gpu``.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: benchmark that measures a CUDA GPU (selected by make gpu-check)")
