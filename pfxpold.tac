# Run pfxpold from a tac file: twistd -ny pfxpold.tac
#
# The configuration file comes from the PFXPOLD_CONFIG environment variable
# (no variable: the demo check), and PFXPOLD_PORT may name the listening
# endpoint(s), separated by spaces. Everything else is the same service that
# `twistd pfxpold` builds.
import os

from twisted.application.service import Application

from pfxpold.tap import Options, makeService

arguments = []
if os.environ.get("PFXPOLD_CONFIG"):
    arguments += ["--config", os.environ["PFXPOLD_CONFIG"]]
for port in os.environ.get("PFXPOLD_PORT", "").split():
    arguments += ["--port", port]

options = Options()
options.parseOptions(arguments)
application = Application("pfxpold")
makeService(options).setServiceParent(application)
