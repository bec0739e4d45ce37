"""The results schema (results.json, CSV) and what is computed from results: recommendations,
mixed-precision plans, the machine check's drift.
"""
