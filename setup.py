"""Build hook: what pyproject.toml cannot say.

* ``cffi_modules``: the C core (dma/build_core.py) is built by cffi's hook.
* ``packages``: the folders stay flat (daemon/, dma/ ...) but install under
  the ``pyvirtiofsd`` namespace, so every folder below them is listed here,
  data folders too (daemon/data, dma/src ...): setuptools ships a folder's
  files only from a listed package, and warns about one it is not told of.
  The data files themselves are named in pyproject.toml's package-data.
"""

from setuptools import find_namespace_packages, setup

TOP = ("bench", "daemon", "dma", "vm")


def packages() -> list[str]:
    found = []
    for top in TOP:
        found.append(f"pyvirtiofsd.{top}")
        below = find_namespace_packages(where=top, exclude=["__pycache__", "*.__pycache__"])
        found += [f"pyvirtiofsd.{top}.{name}" for name in below]
    return found


setup(
    cffi_modules=["dma/build_core.py:ffibuilder"],
    packages=packages(),
    package_dir={f"pyvirtiofsd.{top}": top for top in TOP},
)
