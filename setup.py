"""
Packaging for pfxpold. The twistd dropin lives in twisted/plugins/, which
is shipped as part of the twisted.plugins namespace (it has no __init__.py).
"""

from setuptools import find_packages, setup

setup(
    name="pfxpold",
    version="0.1.0",
    description="pfxpold, the Postfix extensible policy daemon, on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
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
    install_requires=[
        "Twisted>=23.10",
        "zope.interface>=6",
    ],
    extras_require={
        "ldap": ["ldaptor>=21.2"],
        "postgresql": ["psycopg[binary]>=3.1"],
        # The Redis store speaks RESP itself (pfxpold/state/resp.py): no
        # client library. The extra stays so that "pfxpold[redis]" installs.
        "redis": [],
        "bench": ["matplotlib>=3.5"],
        # [metrics]: Prometheus's /metrics page (pfxpold/metrics.py).
        "metrics": ["prometheus_client>=0.20"],
        # twisted.web Agent; [tls] brings pyOpenSSL and service_identity so
        # that https:// certificates are verified.
        "http": ["Twisted[tls]>=23.10"],
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "build",
            "hypothesis>=6",
            "Twisted[tls]>=23.10",
        ],
    },
    entry_points={
        "console_scripts": [
            "pfxpold-query = pfxpold.query:main",
            "pfxpold-admin = pfxpold.admin:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Topic :: Communications :: Email :: Mail Transport Agents",
        "Programming Language :: Python :: 3",
    ],
)
