"""
The twistd dropin: makes C{twistd pfxpold} available. The tap module is
imported only when pfxpold runs, so C{twistd --help} stays light.
"""

from twisted.application.service import ServiceMaker

pfxpold = ServiceMaker(
    "pfxpold",
    "pfxpold.tap",
    "pfxpold, the Postfix extensible policy daemon",
    "pfxpold",
)
