"""
Tests for L{pfxpold.expiries}: many timeouts under one timer.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.expiries import Expiries


class ExpiriesTests(SynchronousTestCase):
    """
    Keys expire their queue's duration after they are added, in order, on
    one timer that is cancelled when nothing is left.
    """

    def setUp(self):
        self.clock = Clock()
        self.expiries = Expiries(self.clock)
        self.expired = []
        self.short = self.expiries.queue(2.0, lambda key: self.expired.append(("short", key)))
        self.long = self.expiries.queue(5.0, lambda key: self.expired.append(("long", key)))

    def times(self):
        return [call.getTime() for call in self.clock.getDelayedCalls()]

    def test_expire_in_order(self):
        """Keys expire at their own time, each once, in the order added."""
        self.expiries.add(self.short, "a")
        self.clock.advance(1.0)
        self.expiries.add(self.short, "b")
        self.expiries.add(self.long, "c")
        self.clock.advance(0.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [("short", "a")])
        self.clock.advance(1.0)
        self.assertEqual(self.expired, [("short", "a"), ("short", "b")])
        self.clock.advance(3.0)
        self.assertEqual(self.expired, [("short", "a"), ("short", "b"), ("long", "c")])
        self.assertEqual(len(self.expiries), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_timer(self):
        """Many keys hold one timer, due at the first of them."""
        for number in range(100):
            self.expiries.add(self.long, number)
            self.clock.advance(0.01)
        self.expiries.add(self.short, "soon")
        [due] = self.times()
        self.assertAlmostEqual(due, 2.0 + 1.0)
        self.assertEqual(len(self.expiries), 101)

    def test_discarded_never_expire(self):
        """A discarded key does not expire; the timer goes when nothing is left."""
        self.expiries.add(self.short, "a")
        self.expiries.add(self.long, "b")
        self.expiries.discard(self.short, "a")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.expiries.discard(self.long, "b")
        self.expiries.discard(self.long, "never added")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.expired, [])

    def test_timer_moves_on(self):
        """A timer left for a discarded key fires harmlessly and waits for the next."""
        self.expiries.add(self.short, "a")
        self.clock.advance(1.0)
        self.expiries.add(self.long, "b")
        self.expiries.discard(self.short, "a")
        self.clock.advance(1.0)
        self.assertEqual(self.expired, [])
        self.assertEqual(self.times(), [6.0])
        self.clock.advance(4.0)
        self.assertEqual(self.expired, [("long", "b")])

    def test_added_while_expiring(self):
        """A key added by an expiry callback gets its own full duration."""
        again = self.expiries.queue(1.0, lambda key: self.expiries.add(self.short, key + "'"))
        self.expiries.add(again, "a")
        self.clock.advance(1.0)
        self.assertEqual(self.expired, [])
        self.clock.advance(1.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [("short", "a'")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_same_time_in_queue_order(self):
        """Keys due at once expire in the order of their queues' creation."""
        self.expiries.add(self.long, "late")
        self.clock.advance(3.0)
        self.expiries.add(self.short, "early")
        self.clock.advance(2.0)
        self.assertEqual(self.expired, [("short", "early"), ("long", "late")])

    def test_rounding(self):
        """
        A key expires when its timer fires, even when the delay the timer
        was set with, added to the clock, comes out a rounding error short
        of the key's due time.
        """
        long = self.expiries.queue(4.83, lambda key: self.expired.append(("4.83", key)))
        quick = self.expiries.queue(0.23, lambda key: self.expired.append(("0.23", key)))
        self.clock.advance(1.29)
        self.expiries.add(long, "a")
        self.expiries.add(quick, "b")
        self.clock.advance(0.23)
        self.assertEqual(self.expired, [("0.23", "b")])
        [call] = self.clock.getDelayedCalls()
        self.clock.advance(call.getTime() - self.clock.seconds())
        self.assertEqual(self.expired, [("0.23", "b"), ("4.83", "a")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failing_expiry(self):
        """
        An expiry callback that raises is logged; the keys after it still
        expire, and the timer is set for the ones not due yet.
        """

        def broken(key):
            raise RuntimeError("broken " + key)

        failing = self.expiries.queue(1.0, broken)
        self.expiries.add(failing, "a")
        self.expiries.add(self.short, "b")
        self.expiries.add(self.long, "c")
        self.clock.advance(2.0)
        self.assertEqual(self.expired, [("short", "b")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(3.0)
        self.assertEqual(self.expired, [("short", "b"), ("long", "c")])
