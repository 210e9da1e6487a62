"""
Packaging for pfxpold: the project's metadata and dependencies are in
pyproject.toml; this file says which packages ship. The twistd dropin lives
in twisted/plugins/, which is shipped as part of the twisted.plugins
namespace (it has no __init__.py).
"""

from setuptools import find_packages, setup

setup(
    # pfxpold.fixtures (data only, no __init__.py) is named so that
    # setuptools ships it on purpose instead of warning that it may drop it.
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"])
    + ["pfxpold.fixtures", "twisted.plugins"],
    package_data={
        "pfxpold": ["py.typed"],
        "pfxpold.fixtures": ["*.txt"],
        "twisted.plugins": ["pfxpold_plugin.py"],
    },
    include_package_data=True,
)
