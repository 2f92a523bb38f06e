"""The multi-process tests' launcher: :func:`dualpipe_ext.launch.run_ranks`, under its old name here.

``run_ranks(fn, world, *args)`` calls ``fn(rank, world, *args)`` in each of ``world`` spawned
processes after ``init_process_group("gloo")`` on a free loopback port, and fails naming the
ranks that raised (with their tracebacks) or did not finish in time.
"""
from dualpipe_ext.launch import LaunchError, free_port, run_ranks  # noqa: F401 - re-exported for the tests
