"""
Shadow checks and parallel checks in a real pfxpold daemon: a shadow file
check's verdicts are logged beside unchanged answers, a slow shadow web
lookup never delays an answer, and a parallel chain answers as the
sequential one would; the request log and /metrics show shadow verdicts
apart, a shadow quota's counts in SQLite are its own, and the one-word
switch to enforce with a reload makes it decide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time

from tests.integration.support import REPOSITORY, free_port, running_daemon, wait_for_port
from tests.integration.test_admin import admin
from tests.integration.test_http import start_web_server
from tests.integration.test_lookup_file import REJECT, SCANNER
from tests.integration.test_metrics import scrape

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


APART_CONFIG = """
[server]
default_action = "DUNNO"

[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"

[stores.default]
type = "sqlite"
path = "state.sqlite3"

[[check]]
name = "new-acl"
type = "file"
map = "new.map"
lookup = ["client_address"]
mode = "shadow"

[[check]]
name = "watch"
type = "quota"
mode = "{watch_mode}"
key = ["sender"]
unit = "recipients"
stage = "RCPT"
limits = [{{ period = "sliding", seconds = 3600, max = 1 }}]
action = "DEFER 4.7.1 watch quota"

[[check]]
name = "quota"
type = "quota"
key = ["sender"]
unit = "recipients"
stage = "RCPT"
limits = [{{ period = "sliding", seconds = 3600, max = 2 }}]
action = "DEFER 4.7.1 quota exceeded"
"""


def rcpt(client_address: str, recipient: str, sender: str = "alice@example.org") -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": client_address,
        "sender": sender,
        "recipient": recipient,
        "recipient_count": "0",
        "instance": recipient,
    }


def test_shadow_apart_then_enforced(tmp_path):
    """
    In a daemon with metrics and a SQLite store: the request lines end
    with the shadow verdicts, /metrics counts them apart from the real
    verdicts, a shadow quota counts under keys of its own (the enforcing
    quota's counts are its own), and after the one-word switch to enforce
    and a reload, the former shadow quota decides, from fresh counts.
    """
    (tmp_path / "new.map").write_text("192.0.2.66 REJECT new rule\n")
    metrics_port = free_port()
    config = APART_CONFIG.format(metrics_port=metrics_port, watch_mode="shadow")
    with running_daemon(tmp_path, config) as daemon:
        wait_for_port(metrics_port, process=daemon.process)
        with daemon.client() as client:
            answers = [
                client.ask(rcpt("192.0.2.66", "one@example.com")),
                client.ask(rcpt("192.0.2.1", "two@example.com")),
                client.ask(rcpt("192.0.2.1", "three@example.com")),
            ]
        # The enforcing quota alone decides: 2 allowed, the third refused.
        assert answers == ["DUNNO", "DUNNO", "DEFER 4.7.1 quota exceeded"]
        log = wait_for(daemon, "to <three@example.com> at RCPT")
        assert "shadow check new-acl would have answered REJECT new rule, answered DUNNO" in log
        assert log.count("shadow check watch would have answered DEFER 4.7.1 watch quota") == 2
        # The request's own line (written in batches) ends with them.
        log = wait_for(daemon, " shadow new-acl=REJECT new rule")
        [line] = [line for line in log.splitlines() if " shadow new-acl=REJECT new rule" in line]
        assert " to=<one@example.com> " in line and ": DUNNO (default, " in line, line

        samples = scrape(metrics_port)
        shadow = {
            (labels["check"], labels["action"], labels["differs"]): count
            for labels, count in (
                (dict(items), count)
                for items, count in samples["pfxpold_shadow_verdicts_total"].items()
            )
            if count
        }
        assert shadow == {
            ("new-acl", "REJECT", "true"): 1,
            ("new-acl", "DUNNO", "false"): 2,
            ("watch", "DUNNO", "false"): 1,
            ("watch", "DEFER", "true"): 2,
        }
        real = {dict(labels)["check"] for labels in samples["pfxpold_check_verdicts_total"]}
        assert "quota" in real and not real & {"new-acl", "watch"}, real

        # The state is apart: the shadow quota counted one (it would have
        # refused the rest), the enforcing one two, under other keys.
        path = str(tmp_path / "admin.toml")
        (tmp_path / "admin.toml").write_text(config)
        shown = {}
        for name in ("watch", "quota"):
            result = admin(
                path, "--json", "quota", "show", "--check", name, "--sender", "alice@example.org"
            )
            assert result.returncode == 0, result.stderr
            [limit] = json.loads(result.stdout)["limits"]
            shown[name] = limit["count"]
        assert shown == {"watch": 1, "quota": 2}
        with sqlite3.connect(str(tmp_path / "state.sqlite3")) as database:
            keys = [row[0] for row in database.execute("SELECT key FROM counters")]
        assert any(key.startswith("quota:{shadow:watch:") for key in keys), keys
        assert any(key.startswith("quota:{quota:") for key in keys), keys

        # One word, and a reload.
        config_path = next(tmp_path.glob("pfxpold-*.toml"))
        switched = APART_CONFIG.format(metrics_port=metrics_port, watch_mode="enforce")
        config_path.write_text(switched)
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(daemon, "reloaded ")
        with daemon.client() as client:
            # Fresh counts: watch, now enforcing and first, lets alice's
            # next recipient through (the shadow's count of her is not
            # its), and the enforcing quota refuses it as before.
            assert client.ask(rcpt("192.0.2.1", "four@example.com")) == (
                "DEFER 4.7.1 quota exceeded"
            )
            # And watch decides: bob's second recipient is over its 1.
            bob = "bob@example.org"
            assert client.ask(rcpt("192.0.2.1", "five@example.com", bob)) == "DUNNO"
            assert client.ask(rcpt("192.0.2.1", "six@example.com", bob)) == (
                "DEFER 4.7.1 watch quota"
            )
