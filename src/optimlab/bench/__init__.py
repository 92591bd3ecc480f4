"""``optimlab bench``: optimizers side by side on real workloads, tuned fairly, reported as a person would want.

Pieces: ``workloads`` (data + model + loss + metric + target + budget), ``runner`` (one trial), ``plan``
(which trials a suite needs: tuning grid, then seeds), ``store`` (the crash-safe record of finished trials),
``report`` (figures, tables, performance profiles, claims) and ``cli``.
"""
