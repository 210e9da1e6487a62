"""
Request values that check templates (LDAP filters, SOAP envelopes) may
name: every attribute Postfix sends, plus the parts pfxpold derives from
them.
"""

from __future__ import annotations

from pfxpold.request import PolicyRequest

#: Names that are not Postfix attributes but parts of them.
DERIVED = ("sender_domain", "sender_local_part", "recipient_domain", "recipient_local_part")


def template_value(request: PolicyRequest, name: str) -> str:
    """
    @return: the attribute C{name} of C{request}, or the derived value of
        that name (C{sender_domain} is lowercased), or C{""}.
    """
    if name in DERIVED:
        return getattr(request, name)
    return request.get(name, "")
