"""Builds the optional compiled kernels, charrnn/_fused.c; the metadata is in pyproject.toml.

The extension is optional: where it does not compile, charrnn installs without it and runs its
pure-numpy code path (charrnn.cells.accelerated() tells which)."""

import sys

from setuptools import Extension, setup

# IEEE arithmetic without FMA contraction, so that the kernels compute what the numpy code
# computes; -fno-trapping-math only lets GCC vectorize the branch-free float32 tanh.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension("charrnn._fused", ["charrnn/_fused.c"], extra_compile_args=FLAGS, optional=True)
    ]
)
