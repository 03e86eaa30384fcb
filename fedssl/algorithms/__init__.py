"""Federated algorithms, one module each.

A module here registers its algorithms in `ALGORITHMS` (fedssl.algorithms.base) and,
where it has keys of its own, its config section in
`fedssl.config.schema.ALGORITHM_SECTIONS`; both registries import every module of
this package, and those other packages declare in the `fedssl.algorithms` entry
point group, so adding an algorithm is adding its module (and a recipe).
"""
