"""
Checks used by the Postfix end-to-end tests, loaded by dotted path the way a
user's own check is.
"""

import json

from zope.interface import implementer

from pfxpold.interfaces import ICheck


@implementer(ICheck)
class SenderRules:
    """
    Answers the action configured for the sender's local part at the
    configured stage, e.g. C{rules = {"reject" = "REJECT Go away"}}; every
    other sender gets DUNNO.
    """

    def __init__(self, options):
        self.rules = options.table("rules")
        self.stage = options.string("stage", "RCPT")

    def check(self, request):
        if request.protocol_state == self.stage:
            return self.rules.get(request.sender_local_part, "DUNNO")
        return "DUNNO"


@implementer(ICheck)
class Recorder:
    """
    Appends every request it sees to a JSON-lines file, and says DUNNO.
    """

    def __init__(self, options):
        self.path = options.path("path")

    def check(self, request):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(request)) + "\n")
        return "DUNNO"
