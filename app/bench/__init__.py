"""Benchmarks (`python -m app.bench step|accuracy|graph|knn`): one module per benchmark, results
as JSON and PNG through `results.write_result`. See `__main__` for the command line.

Nothing is imported here: `python -m app.bench.graph` and `python -m app.bench.step` run under
mpirun as programs of their own, and product code must not import the benchmarks.
"""
