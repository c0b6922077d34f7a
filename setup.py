"""Build script: the pure-Python package always, the compiled extension ``pof_fast._C`` when possible.

``kernels/`` ships as the subpackage ``pof_fast.kernels`` (never as a top-level ``kernels``).
"""
from setuptools import setup


def extensions():
    """Compiled extension modules and the build command that makes them (filled by the csrc build)."""
    return [], {}


ext_modules, cmdclass = extensions()

setup(
    packages=["pof_fast", "pof_fast.cli", "pof_fast.kernels"],
    package_dir={"pof_fast": "pof_fast", "pof_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
