"""Shared machinery, written once: validation, the optimizer base class and the wrapper contract."""
