"""
The interfaces that checks and the daemon meet at.
"""

from zope.interface import Attribute, Interface


class ICheck(Interface):
    """
    One policy check: looks at a request and says what to do with it.

    A check type is any callable that takes a L{pfxpold.config.CheckOptions}
    (the check's table from the configuration file) and returns a provider
    of this interface. A check that also provides
    L{twisted.application.service.IService} is started and stopped with the
    daemon: open connections or start timers in C{startService}, not in the
    constructor, so that C{--check-config} never touches a backend.
    """

    def check(request):
        """
        Decide on one request.

        @param request: the request.
        @type request: L{pfxpold.request.PolicyRequest}

        @return: an L{pfxpold.action.Action} or an action string (C{"DUNNO"}
            to let the next check decide), or a Deferred that fires with
            either; C{async def} methods are fine too. A failure, a timeout
            or an invalid action is handled by the check's C{on_error}
            setting.
        """


class IPolicyDecider(Interface):
    """
    What the protocol asks for an answer: the check chain, in the daemon.
    """

    deadline = Attribute("Seconds a request may take before it is abandoned.")

    def decide(request):
        """
        Decide on one request.

        @return: a L{pfxpold.chain.Decision}, or a Deferred that fires with
            one. It never fails.
        """


class IDecisionListener(Interface):
    """
    A check that wants to know what was finally answered: a quota counts
    only mail the whole chain let through, a greylist records only triplets
    that were deferred. The chain calls every listener once per request,
    after the decision, whichever check made it (or none).
    """

    def decided(request, action):
        """
        The chain answered C{request} with C{action}.

        @param request: the request.
        @type request: L{pfxpold.request.PolicyRequest}
        @param action: the L{pfxpold.action.Action} sent, or L{None} when no
            reply was sent.
        @return: ignored; errors are logged and never change the answer.
        """
