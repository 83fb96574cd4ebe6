"""Metrics as local `evaluate` modules: `evaluate.load("eval/metrics/<name>")` (no Hub needed).

Each folder holds one self-contained module whose plain functions are what the rest of `eval/` calls, so the
numbers a user gets through `evaluate` and the ones in our reports come from the same code.
"""
