"""
Shadow checks and parallel checks in a real pfxpold daemon: a shadow file
check's verdicts are logged beside unchanged answers, a slow shadow web
lookup never delays an answer, and a parallel chain answers as the
sequential one would.
"""

from __future__ import annotations

import os
import shutil
import time

from tests.integration.support import REPOSITORY, running_daemon
from tests.integration.test_http import start_web_server
from tests.integration.test_lookup_file import REJECT, SCANNER

CONFIG = """
[server]
parallel = true
default_action = "DUNNO"

[[check]]
name = "slow-web"
type = "http"
url = "http://127.0.0.1:{web}/slow"
shadow = true
timeout = 5.0

[[check]]
name = "web"
type = "http"
url = "http://127.0.0.1:{web}/json"
action_field = "result.action"
on_error = "DEFER_IF_PERMIT web failed"

[[check]]
name = "new-acl"
type = "file"
map = "new.map"
lookup = ["client_address"]
shadow = true

[[check]]
name = "relay-acl"
type = "file"
map = "relay-acl.map"
lookup = ["client_address", "client_name"]
pair_with = ["sender"]
not_found = "{reject}"
"""


def wait_for(daemon, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)
    return daemon.log()


def test_shadow_and_parallel(tmp_path):
    """
    The answers are the enforcing checks', sent at once although a shadow
    lookup takes 3 s; the shadow verdicts are logged, the differing ones
    as "would have answered".
    """
    shutil.copy(
        os.path.join(REPOSITORY, "examples", "relay-acl.map"),
        os.path.join(tmp_path, "relay-acl.map"),
    )
    with open(os.path.join(tmp_path, "new.map"), "w", encoding="utf-8") as f:
        f.write("192.0.2.10 REJECT scanner retired\n")
    web, port = start_web_server()
    try:
        config = CONFIG.format(web=port, reject=REJECT)
        with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
            started = time.monotonic()
            assert client.ask(SCANNER) == "OK"
            assert time.monotonic() - started < 2.0
            assert client.ask({**SCANNER, "client_address": "192.0.2.11"}) == REJECT
            assert client.ask({**SCANNER, "sender": "bad@example.com"}) == (
                "REJECT bad sender bad@example.com"
            )
            log = wait_for(daemon, "shadow check slow-web would have answered OK slow")
            assert (
                "shadow check new-acl would have answered REJECT scanner retired, answered OK"
                in log
            )
            # Not reached: the web check refused before it.
            assert log.count("shadow check new-acl") == 2, log
    finally:
        web.kill()
        web.wait()
