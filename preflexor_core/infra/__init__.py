"""Infrastructure every room may use; it imports nothing else of the project.

``errors`` (the project's error base, one-line CLI errors, ``--device`` checks), ``io`` (atomic file and
directory writes, crash recovery, the one JSONL reader, output-path checks), ``rundir`` (run-folder
markers and the writer lock), ``env`` (every environment variable, read in one place), ``cli`` (config
dataclasses -> argparse options, the option sections all CLIs share, presets).
"""
