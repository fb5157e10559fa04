"""Per-library benchmark runners.

Each module is executed as ``python -m runners.<lib>`` (cwd = ``benchmarks/``) with the
python of that library's own venv. See ``runners/_base.py`` for the protocol.
"""
