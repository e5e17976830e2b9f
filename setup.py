"""The package's one C extension (the rest of the build is in pyproject.toml): the exact merge's fused epilogue,
``peftfx/rounding.py``. Optional: without a C compiler the package installs, and torch's ops run that epilogue."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("peftfx._round", ["peftfx/_round.c"], extra_compile_args=["-O3"], optional=True)])
