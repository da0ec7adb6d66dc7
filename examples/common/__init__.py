"""Helpers shared by the examples: RNG state capture for exact resume, atomic checkpoint writes, result tables,
and scikit-learn's bundled digits (the data of every ``--preset tiny``)."""
