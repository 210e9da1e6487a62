"""
SPF (RFC 7208) for the C{spf} check: the evaluation, fed answers that
twisted.names fetched (L{pfxpold.spf.evaluate}), and the C{Received-SPF}
header field (L{pfxpold.spf.header}).

Why pyspf, and how it is driven without blocking
================================================

pyspf (C{spf.py}, the library Debian's postfix-policyd-spf-python runs,
PSF licence) is synchronous and asks the DNS itself. It can nonetheless be
I{fed answers}, which is what this package does, for these reasons found
in its source (2.0.14):

  - Every DNS question it asks goes through one module-level function,
    C{spf.DNSLookup(name, qtype, strict, timeout)}, which returns the
    records as C{((name, type), value)} pairs. It is pyspf's own seam: its
    test suite (C{test/testspf.py}) replaces it to feed zone data, and the
    library picks pydns or dnspython through it.
  - All the state of an evaluation lives on its C{spf.query} object: the
    per-query DNS cache, the lookup and void-lookup counters, the macro
    variables. An evaluation can therefore be run again from the start,
    and comes to the same questions in the same order.

So an evaluation runs synchronously, on the reactor thread, against the
answers fetched so far. The first question without an answer stops it (or,
where pyspf swallows every exception, is noted and its result discarded);
the question is asked through twisted.names, and the evaluation starts
over with one more answer. The RFC's limits (10 DNS mechanisms and
modifiers, 2 void lookups, 10 MX and 10 PTR names) are pyspf's, counted
afresh in each run; pfxpold bounds the number of runs too.

Writing an evaluator of our own (macro expansion, the mechanisms, the
modifiers, the limits) would repeat pyspf's 2,000 lines, which pass the
RFC 7208 test suite, with new bugs. The costs of the approach: a question
re-runs the evaluation so far (microseconds per mechanism; at most some
tens of runs, each bounded by the limits), and pyspf's internals are
reached only through the documented C{DNSLookup} seam and C{query}'s
public C{check}, C{mechanism} and C{ident} attributes.
"""
