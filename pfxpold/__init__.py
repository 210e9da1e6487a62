"""
pfxpold: the Postfix extensible policy daemon.

Postfix's smtpd asks a policy server what to do with each SMTP transaction;
pfxpold answers by running a configurable chain of checks.
"""

__version__ = "0.1.0"
