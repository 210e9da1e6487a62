"""
One SPF evaluation (RFC 7208 C{check_host()}) by pyspf, fed answers that
twisted.names fetched: see L{pfxpold.spf} for why and how.

L{Feeder} holds the answers of one evaluation and installs itself as
pyspf's C{DNSLookup} while pyspf runs (a L{contextvars.ContextVar}, so
only the evaluation in progress on this thread sees them; pyspf used by
anything else in the process asks the DNS as it always did). L{evaluate}
runs pyspf, fetches what it lacked, and runs it again.
"""

from __future__ import annotations

import contextvars
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import spf as pyspf
from twisted.logger import Logger

from pfxpold.escape import escape

_log = Logger()

#: The record types pyspf asks for.
RECORD_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME")

#: How many times one evaluation may be run (each run but the last stops
#: at a question not answered yet). The RFC's limits keep an honest
#: evaluation far below: 10 mechanisms, each with at most 10 MX or PTR
#: names to resolve, are answered in fewer rounds because the addresses of
#: MX and PTR names are fetched together (see L{evaluate}).
MAX_RUNS = 60

#: One question: (name lowercased without the trailing dot, record type).
Question = tuple[str, str]


class TemporaryFailure:
    """
    The DNS did not answer a question (timeout, SERVFAIL, refused): pyspf
    turns it into a C{temperror}.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


#: What a question got: pyspf's C{((name, type), value)} pairs (empty for
#: NXDOMAIN or no data), or the reason it got nothing.
Answer = Union[tuple[tuple[tuple[str, str], Any], ...], TemporaryFailure]


class _NotYetAsked(Exception):
    """
    pyspf asked a question the feeder has no answer for yet.
    """


@dataclass
class Outcome:
    """
    What an evaluation found.

    @ivar result: one of C{pass fail softfail neutral none temperror
        permerror}.
    @ivar explanation: pyspf's text: the domain's C{exp=} explanation or
        the default for a fail, the error for C{temperror} and
        C{permerror}. Comes from DNS: escape or clean it before use.
    @ivar mechanism: the mechanism that matched, if any.
    @ivar runs: how many times pyspf ran.
    """

    result: str
    explanation: str
    mechanism: Optional[str]
    runs: int = 1


def question(name: str, record_type: str) -> Question:
    name = str(name)
    if name.endswith("."):
        name = name[:-1]
    return name.lower(), record_type


class Feeder:
    """
    The answers of one evaluation, and the questions it still lacks.
    """

    def __init__(self, cached: Optional[Callable[[Question], Optional[Answer]]] = None) -> None:
        """
        @param cached: gives the answer to a question at once when it has
            one (a cache), else L{None}: a warm evaluation runs once.
        """
        self.answers: dict[Question, Answer] = {}
        self.missing: list[Question] = []
        self._cached = cached

    def lookup(self, name: str, record_type: str) -> Any:
        key = question(name, record_type)
        answer = self.answers.get(key)
        if answer is None and self._cached is not None:
            answer = self._cached(key)
            if answer is not None:
                self.answers[key] = answer
        if answer is None:
            if key not in self.missing:
                self.missing.append(key)
            raise _NotYetAsked(key)
        if isinstance(answer, TemporaryFailure):
            raise pyspf.TempError(f"DNS {answer.reason}")
        return list(answer)


# Kept on the pyspf module itself, so that this module imported a second
# time (a test that forgets it) shares the hook rather than wrapping it.
_FEEDER: contextvars.ContextVar[Optional[Feeder]] = getattr(
    pyspf, "_pfxpold_feeder", None
) or contextvars.ContextVar("pfxpold_spf_feeder", default=None)
_ORIGINAL_LOOKUP = getattr(pyspf, "_pfxpold_original_lookup", pyspf.DNSLookup)


def _fed_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    feeder = _FEEDER.get()
    if feeder is None:
        return _ORIGINAL_LOOKUP(name, qtype, strict, timeout)
    return feeder.lookup(name, qtype)


if not hasattr(pyspf, "_pfxpold_original_lookup"):
    pyspf._pfxpold_feeder = _FEEDER
    pyspf._pfxpold_original_lookup = _ORIGINAL_LOOKUP
    pyspf.DNSLookup = _fed_lookup


def run_once(
    feeder: Feeder, client_address: str, sender: str, helo: str, receiver: str, now: float
) -> Outcome:
    """
    Run pyspf once on the answers C{feeder} holds. When
    C{feeder.missing} is not empty afterwards, the outcome is meaningless:
    fetch those questions and run again.
    """
    token = _FEEDER.set(feeder)
    try:
        query = pyspf.query(
            i=client_address, s=sender, h=helo, receiver=receiver, strict=True, querytime=0
        )
        # %{t}: the reactor's time, not the wall clock.
        query.t = str(int(now))
        result, _, explanation = query.check()
        mechanism = query.mechanism
    except _NotYetAsked:
        return Outcome("temperror", "not all answers fetched", None)
    except Exception as e:
        # pyspf raises AssertionError at its recursion limit in strict
        # mode; a bug in it must not take the request down either.
        _log.warn(
            "pyspf failed on {sender} from {client} ({error}); counted as permerror",
            sender=escape(sender),
            client=escape(client_address),
            error=escape(repr(e)),
        )
        return Outcome("permerror", "SPF evaluation failed", None)
    finally:
        _FEEDER.reset(token)
    if result == "ambiguous":  # only in pyspf's harsh mode, which we never use
        result = "permerror"
    return Outcome(
        str(result), str(explanation or ""), mechanism if isinstance(mechanism, str) else None
    )


async def evaluate(
    client_address: str,
    sender: str,
    helo: str,
    receiver: str,
    ask: Callable[[Question], Awaitable[Answer]],
    now: Callable[[], float],
    deadline: Optional[float] = None,
    cached: Optional[Callable[[Question], Optional[Answer]]] = None,
) -> Outcome:
    """
    RFC 7208's C{check_host()} for C{sender} (C{""} for the HELO
    identity, which pyspf checks as C{postmaster@helo}), the DNS asked
    through C{ask}.

    @param ask: fetches one question; never fails (a failure is a
        L{TemporaryFailure}).
    @param now: the clock.
    @param deadline: when C{now()} passes it, the evaluation ends with
        C{temperror} (RFC 7208 section 4.6.4 allows a time limit).
    @param cached: answers known without asking (see L{Feeder}).
    """
    feeder = Feeder(cached)
    for run in range(1, MAX_RUNS + 1):
        outcome = run_once(feeder, client_address, sender, helo, receiver, now())
        if not feeder.missing:
            outcome.runs = run
            return outcome
        if deadline is not None and now() >= deadline:
            return Outcome("temperror", "SPF evaluation took too long", None, run)
        wanted = list(feeder.missing)
        feeder.missing.clear()
        answers = [await ask(key) for key in wanted]
        for key, answer in zip(wanted, answers, strict=True):
            feeder.answers[key] = answer
        # The addresses of every MX or PTR name are asked together:
        # pyspf would ask for them one run at a time.
        follow = [
            question(name, "AAAA" if ":" in client_address else "A")
            for key, answer in zip(wanted, answers, strict=True)
            if key[1] in ("MX", "PTR") and not isinstance(answer, TemporaryFailure)
            for name in _names_in(answer, key[1])[: pyspf.MAX_MX]
        ]
        follow = [key for key in dict.fromkeys(follow) if key not in feeder.answers]
        if follow:
            fetched = [ask(key) for key in follow]
            for key, pending in zip(follow, fetched, strict=True):
                feeder.answers[key] = await pending
    _log.warn(
        "SPF evaluation of {sender} from {client} needed more than {runs} runs; temperror",
        sender=escape(sender),
        client=escape(client_address),
        runs=MAX_RUNS,
    )
    return Outcome("temperror", "too many DNS questions", None, MAX_RUNS)


def _names_in(answer: Answer, record_type: str) -> list[str]:
    if isinstance(answer, TemporaryFailure):
        return []
    names = []
    for (_, kind), value in answer:
        if kind == record_type == "MX":
            names.append(str(value[1]))
        elif kind == record_type == "PTR":
            names.append(str(value))
    return names


def pairs_from_records(
    records: list[Any], record_type: str
) -> tuple[tuple[tuple[str, str], Any], ...]:
    """
    twisted.names answer records as pyspf's C{((name, type), value)}
    pairs: A and AAAA as address text, MX as C{(preference, name)}, PTR
    and CNAME as a name, TXT and SPF as the tuple of their strings (bytes).
    Records of other types are left out.
    """
    from twisted.names import dns

    pairs: list[tuple[tuple[str, str], Any]] = []
    for record in records:
        name = record.name.name.decode("ascii", "replace")
        kind = record.type
        payload = record.payload
        if kind == dns.A:
            pairs.append(((name, "A"), payload.dottedQuad()))
        elif kind == dns.AAAA:
            pairs.append(((name, "AAAA"), socket.inet_ntop(socket.AF_INET6, payload.address)))
        elif kind == dns.MX:
            pairs.append(
                ((name, "MX"), (payload.preference, payload.name.name.decode("ascii", "replace")))
            )
        elif kind == dns.PTR:
            pairs.append(((name, "PTR"), payload.name.name.decode("ascii", "replace")))
        elif kind == dns.CNAME:
            pairs.append(((name, "CNAME"), payload.name.name.decode("ascii", "replace")))
        elif kind in (dns.TXT, dns.SPF):
            pairs.append(((name, "TXT" if kind == dns.TXT else "SPF"), tuple(payload.data)))
    return tuple(pairs)
