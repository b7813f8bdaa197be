"""Builds lmq's optional per-token kernel (lmq/constraints/_kernel.c); the rest of the
package is declared in pyproject.toml. Without a working C compiler the build goes on
and lmq uses the numpy fallback (lmq/constraints/token_choice.py)."""

import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "lmq.constraints._kernel", ["lmq/constraints/_kernel.c"],
    depends=["lmq/constraints/_kernel_loops.h", "lmq/constraints/_kernel_avx512.h",
             "lmq/constraints/_kernel_dfa.h", "lmq/constraints/_kernel_options.h"], optional=True,
    extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=gnu11", "-Wno-psabi"])])
