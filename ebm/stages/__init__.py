"""Pipeline stage entry points (``python -m ebm.stages.<family> <stage>``), run by DVC.

Importing this package is how each stage process starts, before its module loads torch, so it is where
the process-level OpenMP setting is chosen (:mod:`ebm.runtime`); the library itself does no I/O on import.
"""

from ebm.runtime import configure_openmp

configure_openmp()
