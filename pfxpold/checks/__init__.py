"""
The check types that ship with pfxpold, one module each.

C{BUILTIN_CHECKS} maps the name used as C{type = "..."} in the
configuration to the dotted path of the check's factory. Modules are
imported only when a configuration names them, so C{twistd --help} and a
configuration without LDAP never import ldaptor.

Libraries only some checks need come with pfxpold's extras
(C{pip install 'pfxpold[ldap]'}); when one is missing, L{missing_extra}
turns the ImportError into the one line an administrator needs.
"""

from __future__ import annotations

from typing import Any, Optional

BUILTIN_CHECKS: dict[str, str] = {
    "demo": "pfxpold.checks.demo.DemoCheck",
    "file": "pfxpold.checks.file.FileCheck",
    "sql": "pfxpold.checks.sql.SQLCheck",
    "ldap": "pfxpold.checks.ldap.LDAPCheck",
    "dnsbl": "pfxpold.checks.dnsbl.DNSBLCheck",
    "spf": "pfxpold.checks.spf.SPFCheck",
    "http": "pfxpold.checks.http.HTTPCheck",
    "quota": "pfxpold.checks.quota.QuotaCheck",
    "greylist": "pfxpold.checks.greylist.GreylistCheck",
    "rules": "pfxpold.checks.rules.RulesCheck",
}

#: Optional libraries by top-level module name: the distribution pip
#: installs, and the pfxpold extra that brings it (pyproject.toml's optional-dependencies).
OPTIONAL_LIBRARIES: dict[str, tuple[str, str]] = {
    "ldaptor": ("ldaptor", "ldap"),
    "psycopg": ("psycopg", "postgresql"),
    "pymysql": ("PyMySQL", "mysql"),
    "OpenSSL": ("pyOpenSSL", "http"),
    "service_identity": ("service_identity", "http"),
    "prometheus_client": ("prometheus_client", "metrics"),
    "spf": ("pyspf", "spf"),
    # pyspf imports dnspython, or pydns (module DNS) when it is missing.
    "dns": ("dnspython", "spf"),
    "DNS": ("dnspython", "spf"),
}


class MissingExtraError(LookupError):
    """
    A check type (or other feature) needs a library that is not installed;
    the message names it and the extra to install, e.g. C{needs ldaptor:
    pip install 'pfxpold[ldap]'}.
    """


def extra_advice(module: str, extra: Optional[str] = None) -> str:
    """
    @param extra: the extra to name, when not the library's usual one (the
        C{ldap} extra brings pyOpenSSL too, for C{tls:} servers).
    @return: the advice for the missing optional library whose top-level
        module is C{module} (a key of L{OPTIONAL_LIBRARIES}).
    """
    distribution, usual_extra = OPTIONAL_LIBRARIES[module]
    return f"needs {distribution}: pip install 'pfxpold[{extra or usual_extra}]'"


def missing_extra(error: ImportError) -> Optional[MissingExtraError]:
    """
    @return: a L{MissingExtraError} when C{error} is the import of one of
        the L{OPTIONAL_LIBRARIES} failing, else L{None} (a user's module
        failing to import is reported as it is).
    """
    module = (error.name or "").partition(".")[0]
    if module not in OPTIONAL_LIBRARIES:
        return None
    return MissingExtraError(extra_advice(module))


def require_tls(extra: str) -> Any:
    """
    Import Twisted's TLS support, which needs pyOpenSSL and
    service_identity: only checks that speak TLS need them, and import
    them here, when configured to.

    @param extra: the extra that brings them for the calling check.
    @return: the module L{twisted.internet.ssl}.
    @raise MissingExtraError: when they are not installed.
    """
    try:
        # service_identity: without it Twisted checks host names only
        # loosely; require it rather than verify less.
        import OpenSSL  # noqa: F401
        import service_identity  # noqa: F401
        from twisted.internet import ssl
    except ImportError as e:
        module = (e.name or "").partition(".")[0]
        if module in OPTIONAL_LIBRARIES:
            raise MissingExtraError(extra_advice(module, extra)) from None
        raise MissingExtraError(
            f"needs TLS support ({e}): pip install 'pfxpold[{extra}]'"
        ) from None
    return ssl
