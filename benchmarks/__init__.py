"""Benchmark scripts: each writes JSON (and a PNG) into ``benchmarks/results/``.

Run one from the repository root as a module, e.g. ``python -m benchmarks.serving_throughput
--help``. What the scripts share lives in :mod:`benchmarks.harness` (timing, machine facts,
results) and :mod:`benchmarks.synthetic` (generated images and the tiny model repository,
which the tests use too).
"""
