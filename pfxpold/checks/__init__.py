"""
The check types that ship with pfxpold, one module each.

C{BUILTIN_CHECKS} maps the name used as C{type = "..."} in the
configuration to the dotted path of the check's factory. Modules are
imported only when a configuration names them, so C{twistd --help} and a
configuration without LDAP never import ldaptor.
"""

BUILTIN_CHECKS: dict[str, str] = {
    "demo": "pfxpold.checks.demo.DemoCheck",
    "file": "pfxpold.checks.file.FileCheck",
    "sql": "pfxpold.checks.sql.SQLCheck",
    "ldap": "pfxpold.checks.ldap.LDAPCheck",
    "dnsbl": "pfxpold.checks.dnsbl.DNSBLCheck",
    "http": "pfxpold.checks.http.HTTPCheck",
    "quota": "pfxpold.checks.quota.QuotaCheck",
    "greylist": "pfxpold.checks.greylist.GreylistCheck",
}
