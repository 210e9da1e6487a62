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

    How long a decision may take is the decider's own business (the check
    chain's C{deadline}); the protocol waits for it, answers in order, and
    cancels nothing.
    """

    def decide(request):
        """
        Decide on one request.

        @return: a L{pfxpold.chain.Decision}, at once when the decider has
            one, or a Deferred that fires with one. It never fails.
        """


class IDecisionListener(Interface):
    """
    A check that wants to know what was finally answered: a quota counts
    only mail the whole chain let through, whichever check after it decided.
    The chain calls every listener once per request, after the decision,
    whichever check made it (or none). (The greylist needs none: it records
    a triplet in the store operation that decides its own, decisive,
    answer.)
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


class IStateStore(Interface):
    """
    Where stateful checks (quotas, greylisting) keep their counters and
    triplets: in memory, in an SQLite file, or in a Redis server that several
    pfxpold daemons share.

    Every operation is atomic in the store itself: two requests racing on
    the same key, in one daemon or in two daemons sharing a Redis, can never
    both see room for one last message. Times are POSIX timestamps passed in
    by the caller (from its reactor), never read from the store's own clock,
    so that tests drive them with a L{twisted.internet.task.Clock}.

    A store that is unreachable fails the operation's Deferred (within its
    own C{timeout}); it never hangs.
    """

    name = Attribute("The store's name in the configuration, for logs.")

    def consume(counters, amount, now, once=None):
        """
        Add C{amount} to every counter if, and only if, no counter's limit
        would be passed; otherwise change nothing.

        With C{once}, a message's mark: when the store holds it (live), the
        message was counted already and nothing is added (the result is
        C{repeated}); else the mark is set in the same atomic step as the
        addition, and only when the addition is made.

        @param counters: the counters to check and add to.
        @type counters: sequence of L{pfxpold.state.Counter}
        @param amount: what to add (a message, its recipients, its bytes).
        @type amount: L{int}
        @param now: the current time.
        @type now: L{float}
        @param once: the message's mark, or L{None} to count without one.
        @type once: L{pfxpold.state.Once}

        @return: a Deferred that fires with a L{pfxpold.state.Consumption}:
            whether the amount was added, and each counter's total (after
            the addition when it was made, before it otherwise).
        """

    def release(counters, amount, now, once=None):
        """
        Take back C{amount} from the counters of an earlier successful
        L{consume} (the mail was finally refused by another check). A
        counter never goes below zero.

        With C{once}, the count is taken back only when the store still
        holds that mark, and the mark is removed in the same atomic step:
        two releases of one message take it back once.

        @return: a Deferred that fires with L{None}.
        """

    def greylist(triplet, client, now, delay, retry_window, lifetime, whitelist_after, clear=None):
        """
        Record an attempt of the greylisting C{triplet} and say what it is.

        @param triplet: the key of (client network, sender, recipient).
        @type triplet: L{str}
        @param client: the key of the client network, for auto-whitelisting.
        @type client: L{str}
        @param delay: seconds a triplet must wait after its first attempt.
        @param retry_window: seconds after the first attempt within which a
            retry passes; later, the triplet starts over.
        @param lifetime: seconds a passed triplet (and an auto-whitelisted
            client) is remembered after its last attempt.
        @param whitelist_after: passed triplets after which the client is
            whitelisted; C{0} to never auto-whitelist.

        @param clear: the triplet in clear (a L{pfxpold.state.Triplet}),
            kept with a new entry for L{greylist_entries}; L{None} keeps
            nothing.

        @return: a Deferred that fires with a L{pfxpold.state.GreylistState}.
        """

    def expire(now):
        """
        Forget entries that expired before C{now}. Stores whose entries
        expire by themselves (Redis) do nothing.

        @return: a Deferred that fires with the number of entries removed.
        """

    # What pfxpold-admin asks; the daemon's hot path never calls these.

    def counters(keys, now):
        """
        Read counter keys.

        @param keys: the keys (a counter's C{read_keys}).
        @type keys: sequence of L{str}
        @return: a Deferred that fires with a L{dict} from each key that is
            live at C{now} to its L{pfxpold.state.CounterValue}.
        """

    def reset(keys):
        """
        Forget counter keys.

        @return: a Deferred that fires with the number of keys removed.
        """

    def reset_prefix(prefix):
        """
        Forget every counter whose key starts with C{prefix} (every count
        of one quota check).

        @return: a Deferred that fires with the number of keys removed.
        """

    def greylist_entries(prefix, now, network=None, sender=None, recipient=None):
        """
        The live greylisting entries whose key starts with C{prefix} and
        whose clear triplet has the given parts (any part given as L{None}
        matches everything; entries without a clear triplet match only
        when no part is given).

        @return: a Deferred that fires with a L{list} of
            L{pfxpold.state.GreylistEntry}, oldest first.
        """

    def delete_greylist(keys):
        """
        Forget greylisting entries (triplets or auto-whitelisted clients)
        by key.

        @return: a Deferred that fires with the number of entries removed.
        """

    def whitelist_add(entry):
        """
        Add (or replace) a L{pfxpold.state.WhitelistEntry} of the store's
        run-time whitelist, which every greylist check on the store
        honours.

        @return: a Deferred that fires with L{None}.
        """

    def whitelist_remove(kind, value):
        """
        Remove a run-time whitelist entry.

        @return: a Deferred that fires with whether there was one.
        """

    def whitelist_list():
        """
        @return: a Deferred that fires with the run-time whitelist: a
            L{list} of L{pfxpold.state.WhitelistEntry} by kind and value.
        """

    # Per-message memory of the rules check.

    def set_mark(key, mark, expires_at):
        """
        Remember C{mark} under C{key} (a message) until C{expires_at}; a
        mark set again lives until the later time.

        @return: a Deferred that fires with L{None}.
        """

    def marks(key, now):
        """
        @return: a Deferred that fires with the L{frozenset} of marks
            under C{key} that are live at C{now}.
        """


class IExplainable(Interface):
    """
    A check that can say, step by step, how it reached its verdict: the
    offline explain (C{pfxpold-explain}) prints these lines under the
    check's name.
    """

    def explain(request):
        """
        Decide on C{request} as L{ICheck.check} does, and say how.

        @param request: the request.
        @type request: L{pfxpold.request.PolicyRequest}
        @return: a list of C{(step, matched, detail)} tuples in the order
            they were evaluated (a rule's name; whether it matched; the
            first condition that did not hold, or what it answered), or a
            Deferred that fires with one.
        """


class IConfigWarnings(Interface):
    """
    A check that can find mistakes in its own configuration that are not
    errors (a rule no request can reach, an attribute no request has):
    C{--check-config} prints them as warnings.
    """

    def config_warnings():
        """
        @return: a list of one-line warnings (each naming the rule or key),
            empty when there is nothing to say.
        """


class IUsesChecks(Interface):
    """
    A check that uses other checks of its configuration (a rules check
    applying a quota check's limit). While it uses some, it is built anew
    at every reload, never kept, so that it never holds a check of another
    configuration.
    """

    uses = Attribute("The names of the checks it uses (a collection, maybe empty).")

    def link(checks):
        """
        Find the checks it uses, once every check of the configuration is
        built.

        @param checks: every check of the configuration, by name.
        @raise pfxpold.config.ConfigError: when one it names is missing or
            unfit.
        """


class IPossibleActions(Interface):
    """
    A check that can say which answers it may give, and at which stages,
    so that C{--check-config} can warn about an answer Postfix would not
    honour where the check runs (L{pfxpold.stages}).
    """

    def possible_actions():
        """
        @return: an iterable of L{pfxpold.stages.Possible}: each verb the
            check may answer, the C{protocol_state} values it may answer it
            at (L{None}: any), and where it is written.
        """
