"""Build hook: setuptools needs ``cffi_modules`` passed to ``setup()``.

All other metadata lives in pyproject.toml.
"""

from setuptools import setup

setup(cffi_modules=["dma/build_core.py:ffibuilder"])
