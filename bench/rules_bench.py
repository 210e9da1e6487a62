"""
The rule set of the C{rules-1000} benchmark scenario: 1,000 rules of the
kinds a relay's rule set holds (blocked client networks, sender domains
and addresses, unknown recipients, bad HELO names, dynamic-looking client
names as regular expressions, size limits at END-OF-MESSAGE), written as a
C{rules} check, and an independent model of them (a plain first-match scan
in Python) that gives the answer each request must get.

The rules are drawn from the same population as the requests
(L{bench.run.Population}), so that many requests match one.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any

#: The dynamic-looking client names; the last matches clients 1300-1399 of
#: the population, so regex rules answer some requests too.
REGEXES = [
    r"^(dsl|dyn|dhcp|ppp|pool)[-.0-9]",
    r"\.dynamic\.",
    r"^[0-9]+-[0-9]+-[0-9]+-[0-9]+\.",
    r"\.(adsl|cable|dialup)\.",
    r"^host[0-9]+\.broadband\.",
    r"\.pppoe\.",
    r"^ip[0-9a-f]{8}\.",
    r"\.res\.",
    r"^(cpe|customer)-[0-9]",
    r"^mx13[0-9]{2}\.client",
]


class _Model:
    """One rule as data: a TOML condition, its action, and a predicate."""

    def __init__(self, name: str, condition: str, action: str, test: Callable[[dict], bool]):
        self.name = name
        self.condition = condition
        self.action = action
        self.test = test


def _client_address(index: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + 1 + index * 37))


def _in(network: ipaddress.IPv4Network) -> Callable[[dict], bool]:
    return lambda request: ipaddress.IPv4Address(request["client_address"]) in network


def build_rules(senders: int, sender_domains: int, clients: int, recipients: int) -> list[_Model]:
    """
    The 1,000 rules, in order.
    """
    rules: list[_Model] = []
    for number, pattern in enumerate(REGEXES):
        compiled = re.compile(pattern, re.IGNORECASE)
        rules.append(
            _Model(
                f"dynamic {number}",
                f"{{ client_name = {{ regex = {json.dumps(pattern)} }} }}",
                f"DEFER_IF_PERMIT dynamic client name {number}",
                lambda request, compiled=compiled: compiled.search(request["client_name"])
                is not None,
            )
        )
    for index in range(3, clients, 7)[:280]:
        network = ipaddress.ip_network(f"{_client_address(index)}/28", strict=False)
        rules.append(
            _Model(
                f"client network {index}",
                f'{{ client_address = "{network}" }}',
                f"REJECT client network {index} blocked",
                _in(network),
            )
        )
    for index in range(0, sender_domains, 3)[:300]:
        domain = f"s{index}.example.com"
        action = "OK" if index % 2 else f"REJECT sender domain {index} blocked"
        rules.append(
            _Model(
                f"sender domain {index}",
                f'{{ sender_domain = "{domain}" }}',
                action,
                lambda request, domain=domain: request["sender"].lower().endswith("@" + domain),
            )
        )
    for index in range(1, senders, 250)[:20]:
        sender = f"user{index}@s{index % sender_domains}.example.com"
        rules.append(
            _Model(
                f"sender {index}",
                f'{{ sender = "{sender}" }}',
                f"REJECT sender {index} blocked",
                lambda request, sender=sender: request["sender"].lower() == sender,
            )
        )
    for index in range(0, recipients, 15)[:200]:
        recipient = f"rcpt{index}@d{index % 200}.example.org"
        rules.append(
            _Model(
                f"recipient {index}",
                f'{{ recipient = "{recipient}" }}',
                "REJECT 5.1.1 <{recipient}>: unknown user",
                lambda request, recipient=recipient: request["recipient"].lower() == recipient,
            )
        )
    for index in range(170):
        name = f"bad{index}.helo.example"
        rules.append(
            _Model(
                f"helo {index}",
                f'{{ helo_name = "{name}" }}',
                f"REJECT bad HELO {index}",
                lambda request, name=name: request["helo_name"].lower() == name,
            )
        )
    for number, index in enumerate(range(5, clients, 100)[:20]):
        network = ipaddress.ip_network(f"{_client_address(index)}/26", strict=False)
        limit = 100000 + number * 1000
        rules.append(
            _Model(
                f"size limit {index}",
                f'{{ protocol_state = "END-OF-MESSAGE", client_address = "{network}",'
                f" size = {{ gt = {limit} }} }}",
                f"REJECT 5.3.4 at most {limit} bytes from {network}",
                lambda request, network=network, limit=limit: request["protocol_state"]
                == "END-OF-MESSAGE"
                and ipaddress.IPv4Address(request["client_address"]) in network
                and int(request["size"]) > limit,
            )
        )
    assert len(rules) == 1000, len(rules)
    return rules


def write_rules(path: str, rules: list[_Model]) -> None:
    """
    Write C{rules} as a C{rules} check's table (appended to a configuration).
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n[[check]]\nname = "rules"\ntype = "rules"\n')
        for rule in rules:
            f.write(
                f"\n[[check.rule]]\nname = {json.dumps(rule.name)}\n"
                f"if = {rule.condition}\naction = {json.dumps(rule.action)}\n"
            )


def expectation(rules: list[_Model]) -> Callable[[dict[str, Any]], list[str]]:
    """
    The answer of the first rule that matches, as a plain scan finds it.
    """

    def expect(request: dict[str, Any]) -> list[str]:
        for rule in rules:
            if rule.test(request):
                return [rule.action.replace("{recipient}", request["recipient"])]
        return ["DUNNO"]

    return expect
