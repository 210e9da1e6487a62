"""
chroot for real: C{twistd --chroot JAIL --uid nobody --gid nogroup
pfxpold} loads its configuration and imports every check module before
twistd changes root, so it answers from inside a jail that holds nothing
but C{dev/null}, C{etc/passwd} and C{etc/group}.

Two layouts, both in the README's "Running it in production":

  - the jail is Postfix's queue directory and pfxpold listens on
    C{unix:/private/pfxpold} inside it, which Postfix's smtpd (user
    postfix, working directory the queue directory) reaches as
    C{unix:private/pfxpold};
  - the jail is pfxpold's own directory and pfxpold listens on TCP.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.integration.certificates import make_certificates
from tests.integration.deployment import (
    SERVICE_GROUP,
    SERVICE_USER,
    SYSTEM_PYTHON,
    build_jail,
    listening_on,
    log_says,
    read_file,
    require_root,
    running_twistd,
    wait_until,
    world_readable_directory,
)
from tests.integration.dns_ports import running_dns_server
from tests.integration.slapd import BIND_DN, BIND_PASSWORD, SUFFIX, Slapd
from tests.integration.support import IN_CI, REPOSITORY, PolicyClient, free_port, require_program

DEMO_ANSWERS = {"OK (you win!)", "DUNNO (you lose!)"}

#: A user's own check module, imported by dotted path from the
#: configuration. NetworkCheck imports what it needs at module top, as
#: checks must; LazyImportCheck imports a module only when a request comes,
#: which cannot work inside the jail: it shows the jail is real.
USER_CHECKS = '''\
"""Checks of a (pretend) site package, for the chroot test."""

import ipaddress

from zope.interface import implementer

from pfxpold.interfaces import ICheck


@implementer(ICheck)
class NetworkCheck:
    def __init__(self, options):
        self.networks = [ipaddress.ip_network(n) for n in options.strings("networks")]

    def check(self, request):
        if any(request.client_ip in network for network in self.networks):
            return "OK known network"
        return "DUNNO"


@implementer(ICheck)
class LazyImportCheck:
    def __init__(self, options):
        pass

    def check(self, request):
        import colorsys  # noqa: F401 - too late: the jail has no standard library

        return "REJECT colorsys was importable inside the jail"
'''

JAIL_CONFIG = """\
[server]
default_action = "DUNNO"

[[check]]
name = "networks"
type = "site_checks:NetworkCheck"
networks = ["192.0.2.0/24"]

[[check]]
name = "lazy"
type = "site_checks:LazyImportCheck"
on_error = "DEFER_IF_PERMIT lazy import failed"
"""


def _require_jail_prerequisites(installation) -> None:
    require_root()
    require_program(SYSTEM_PYTHON, "python3")
    assert installation.base_python == SYSTEM_PYTHON


def _postfix_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postfix")
    except KeyError:
        message = "no postfix user: install Debian's postfix (scripts/setup-test-env)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def jailed_arguments(work: str, jail: str, config_path: str, port: int) -> list[str]:
    """
    twistd's arguments for pfxpold in the foreground, logging to
    C{work}/pfxpold.log, chrooted to C{jail} as the service user, with the
    configuration at C{config_path}, on 127.0.0.1:C{port}.
    """
    return [
        "-n",
        "--pidfile=",
        f"--logfile={work}/pfxpold.log",
        "--chroot",
        jail,
        "--uid",
        SERVICE_USER,
        "--gid",
        SERVICE_GROUP,
        "pfxpold",
        "--config",
        config_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
    ]


def test_jail_is_the_postfix_queue_directory(pfxpold_installation, tmp_path):
    """
    Chrooted into a directory laid out like Postfix's queue directory and
    listening on unix:/private/pfxpold, pfxpold answers the postfix user
    who connects to private/pfxpold relative to that directory, as smtpd
    does; it answers again after a restart, whose socket the first run
    (already nobody when it stopped) could not remove.
    """
    _require_jail_prerequisites(pfxpold_installation)
    postfix = _postfix_user()
    work = world_readable_directory(str(tmp_path), "work")
    queue = build_jail(os.path.join(work, "spool-postfix"))
    private = os.path.join(queue, "private")
    os.mkdir(private, 0o700)
    os.chown(private, postfix.pw_uid, 0)
    socket_path = os.path.join(private, "pfxpold")
    config_path = os.path.join(work, "pfxpold.toml")
    with open(config_path, "w", encoding="utf-8") as config:
        config.write('[[check]]\nname = "coin"\ntype = "demo"\n')
    arguments = [
        "-n",
        "--pidfile=",
        "--chroot",
        queue,
        "--uid",
        SERVICE_USER,
        "--gid",
        SERVICE_GROUP,
        "pfxpold",
        "--config",
        config_path,
        "--port",
        "unix:/private/pfxpold",
    ]
    answers = []
    for run in range(2):
        log_path = f"{work}/pfxpold-{run}.log"
        with running_twistd(
            pfxpold_installation,
            work,
            [f"--logfile={log_path}", *arguments],
            log_says(log_path, "pfxpold serving on"),
        ) as twistd:
            assert os.readlink(f"/proc/{twistd.pid}/root") == queue
            assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
            asked = pfxpold_installation.run(
                [
                    "pfxpold-query",
                    "--server",
                    "unix:private/pfxpold",
                    "--sender",
                    f"run{run}@example.com",
                ],
                cwd=queue,
                user=postfix.pw_uid,
                group=postfix.pw_gid,
                extra_groups=[],
            )
            assert asked.returncode == 0, asked.stderr
            answers.append(asked.stdout.strip())
        # Stopped as nobody, it could not unlink its socket from private/
        # (postfix's, mode 0700); the next start (as root, with the unix
        # endpoint's default lockfile) replaces the stale socket.
        assert os.path.exists(socket_path)
    assert set(answers) <= DEMO_ANSWERS and len(answers) == 2
    assert "from=<run0@example.com>" in read_file(f"{work}/pfxpold-0.log")
    assert "from=<run1@example.com>" in read_file(f"{work}/pfxpold-1.log")


def test_dotted_path_check_in_its_own_jail(pfxpold_installation, tmp_path):
    """
    Chrooted into a bare jail, a configuration naming a user's check by
    dotted path (found on PYTHONPATH outside the jail) answers: the check's
    module and its imports were loaded in makeService, before the chroot.
    A check that imports a module only when a request comes fails inside
    the jail, and the chain answers its on_error action: the jail is real.
    """
    _require_jail_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    site = world_readable_directory(work, "site")
    with open(os.path.join(site, "site_checks.py"), "w", encoding="utf-8") as module:
        module.write(textwrap.dedent(USER_CHECKS))
    config_path = os.path.join(work, "pfxpold.toml")
    with open(config_path, "w", encoding="utf-8") as config:
        config.write(JAIL_CONFIG)
    jail = build_jail(os.path.join(work, "jail"))
    port = free_port()
    arguments = jailed_arguments(work, jail, config_path, port)
    with (
        running_twistd(
            pfxpold_installation,
            work,
            arguments,
            listening_on(port),
            extra_environment={"PYTHONPATH": site},
        ) as twistd,
        PolicyClient(port) as client,
    ):
        assert os.readlink(f"/proc/{twistd.pid}/root") == jail
        known = client.ask({"client_address": "192.0.2.7", "sender": "a@example.com"})
        lazy = client.ask({"client_address": "198.51.100.1", "sender": "b@example.com"})
        again = client.ask({"client_address": "192.0.2.8", "sender": "c@example.com"})
    assert (known, lazy, again) == (
        "OK known network",
        "DEFER_IF_PERMIT lazy import failed",
        "OK known network",
    )
    log = read_file(f"{work}/pfxpold.log")
    assert "No module named 'colorsys'" in log


DNSBL_CONFIG = """\
[[check]]
name = "dnsbl"
type = "dnsbl"
on_error = "DEFER_IF_PERMIT DNS lists unavailable"
resolvers = ["127.0.0.1:{port}"]
query_timeout = 2.0

[[check.lists]]
zone = "bl.test"
"""


@pytest.fixture
def bl_test_dns_server(tmp_path) -> Iterator[int]:
    """
    The dnsbl tests' DNS server (tests/integration/dns_server.py) as a
    subprocess on a port of 127.0.0.1 free for UDP and TCP, serving
    127.0.0.2 as listed in bl.test; stopped by its PID.

    @return: its port.
    """
    zones = {"records": {"2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["jailed lookup"]}}}
    with running_dns_server("dns_server.py", zones, str(tmp_path / "zones.json")) as server:
        yield server.ports[0]


def test_builtin_dnsbl_check_in_a_jail(pfxpold_installation, tmp_path, bl_test_dns_server):
    """
    A built-in check with a network backend works from inside the jail:
    the dnsbl check, asking a DNS server on loopback, rejects a listed
    client with the TXT reason and passes an unlisted one, so nothing it
    needs at query time is imported lazily.
    """
    _require_jail_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    config_path = os.path.join(work, "pfxpold.toml")
    with open(config_path, "w", encoding="utf-8") as config:
        config.write(DNSBL_CONFIG.format(port=bl_test_dns_server))
    jail = build_jail(os.path.join(work, "jail"))
    port = free_port()
    arguments = jailed_arguments(work, jail, config_path, port)
    with (
        running_twistd(pfxpold_installation, work, arguments, listening_on(port)) as twistd,
        PolicyClient(port) as client,
    ):
        assert os.readlink(f"/proc/{twistd.pid}/root") == jail
        listed = client.ask({"client_address": "127.0.0.2", "sender": "a@example.com"})
        unlisted = client.ask({"client_address": "192.0.2.1", "sender": "b@example.com"})
    assert (listed, unlisted) == ("REJECT jailed lookup", "DUNNO")


LDAP_CONFIG = """\
[[check]]
name = "ldap"
type = "ldap"
on_error = "DEFER_IF_PERMIT directory unavailable"
server = "tcp:127.0.0.1:{port}"
bind_dn = "{bind_dn}"
bind_password_file = "{secret}"
base = "ou=people,{suffix}"
filter = "(mail={{sender}})"
attribute = "description"
"""

HTTP_CONFIG = """\
[[check]]
name = "rest"
type = "http"
on_error = "DEFER_IF_PERMIT policy service unavailable"
url = "https://127.0.0.1:{port}/json"
action_field = "result.action"
ca_file = "{ca_file}"
"""


def test_builtin_http_check_over_tls_in_a_jail(pfxpold_installation, tmp_path):
    """
    The built-in http check asks an HTTPS service on loopback, verified
    with the CA in ca_file, from inside the jail: TLS, certificate
    verification and HTTP all work after the chroot.
    """
    _require_jail_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    ca_file, server_pem = make_certificates(work)
    web_port = free_port()
    web_server = subprocess.Popen(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "http_server.py"),
            str(web_port),
            server_pem,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert web_server.stdout.readline().strip() == b"READY", web_server.stderr.read()
        config_path = os.path.join(work, "pfxpold.toml")
        with open(config_path, "w", encoding="utf-8") as config:
            config.write(HTTP_CONFIG.format(port=web_port, ca_file=ca_file))
        jail = build_jail(os.path.join(work, "jail"))
        port = free_port()
        arguments = jailed_arguments(work, jail, config_path, port)
        with (
            running_twistd(pfxpold_installation, work, arguments, listening_on(port)) as twistd,
            PolicyClient(port) as client,
        ):
            assert os.readlink(f"/proc/{twistd.pid}/root") == jail
            bad = client.ask({"client_address": "192.0.2.1", "sender": "bad@example.org"})
            good = client.ask({"client_address": "192.0.2.1", "sender": "good@example.org"})
    finally:
        web_server.terminate()
        web_server.wait(10)
    assert (bad, good) == ("REJECT bad sender bad@example.org", "DUNNO"), read_file(
        f"{work}/pfxpold.log"
    )


def test_builtin_ldap_check_in_a_jail(pfxpold_installation, tmp_path):
    """
    The built-in ldap check, bound as a service account whose password
    file lies outside the jail, searches a real slapd on loopback from
    inside the jail: ldaptor and its connection service work after the
    chroot.
    """
    _require_jail_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    slapd = Slapd(os.path.join(work, "slapd"))
    slapd.start()
    try:
        secret = os.path.join(work, "ldap.secret")
        with open(secret, "w", encoding="utf-8") as f:
            f.write(BIND_PASSWORD + "\n")
        config_path = os.path.join(work, "pfxpold.toml")
        with open(config_path, "w", encoding="utf-8") as config:
            config.write(
                LDAP_CONFIG.format(port=slapd.port, bind_dn=BIND_DN, secret=secret, suffix=SUFFIX)
            )
        jail = build_jail(os.path.join(work, "jail"))
        port = free_port()
        arguments = jailed_arguments(work, jail, config_path, port)
        with (
            running_twistd(pfxpold_installation, work, arguments, listening_on(port)) as twistd,
            PolicyClient(port) as client,
        ):
            assert os.readlink(f"/proc/{twistd.pid}/root") == jail
            known = client.ask({"client_address": "192.0.2.1", "sender": "alice@example.com"})
            other = client.ask({"client_address": "192.0.2.1", "sender": "bob@example.com"})
    finally:
        slapd.stop()
    assert (known, other) == ("OK known sender", "DUNNO"), read_file(f"{work}/pfxpold.log")


def _relay_acl_examples(directory: str) -> str:
    """
    Copy examples/ to C{directory}/examples and make the SQLite database
    the example describes beside it.

    @return: the copy's path.
    """
    examples = os.path.join(directory, "examples")
    shutil.copytree(os.path.join(REPOSITORY, "examples"), examples)
    database = sqlite3.connect(os.path.join(examples, "relay-acl.sqlite"))
    with open(os.path.join(examples, "relay-acl.sql"), encoding="utf-8") as sql:
        database.executescript(sql.read())
    database.close()
    return examples


def _see_jail_path_inside(jail: str) -> None:
    """
    Make the jail's own path valid inside the jail too: JAIL/JAIL is a
    symbolic link to /, so a file under JAIL has the same absolute name
    before the chroot (when the configuration is read) and after it (when
    a check opens it).
    """
    inner = os.path.join(jail, jail.lstrip("/"))
    os.makedirs(os.path.dirname(inner), mode=0o755, exist_ok=True)
    os.symlink("/", inner)


@pytest.mark.parametrize(
    ("example", "data_in_jail", "known_answer"),
    [
        ("relay-acl-file.toml", True, "OK"),
        ("relay-acl-sqlite.toml", True, "OK"),
        ("relay-acl-sqlite.toml", False, "DEFER Transient internal error. Please try again later."),
    ],
    ids=["file-map-in-jail", "sqlite-in-jail", "sqlite-outside-jail"],
)
def test_relay_acl_example_in_a_jail(
    pfxpold_installation, tmp_path, example, data_in_jail, known_answer
):
    """
    The README's relay-ACL examples run chrooted. With the example
    directory inside the jail, under the jail's own path made valid inside
    it (JAIL/JAIL -> /), the access map and the SQLite database answer, and
    a changed map is re-read from inside the jail. A database outside the
    jail cannot be opened after the chroot: the check fails closed with its
    on_error answer and the log says why.
    """
    _require_jail_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    jail = build_jail(os.path.join(work, "jail"))
    if data_in_jail:
        _see_jail_path_inside(jail)
        examples = _relay_acl_examples(world_readable_directory(jail, "data"))
    else:
        examples = _relay_acl_examples(work)
    port = free_port()
    log_path = f"{work}/pfxpold.log"
    arguments = jailed_arguments(work, jail, os.path.join(examples, example), port)
    newcomer = {"client_address": "198.51.100.7", "sender": "new@example.com"}
    with (
        running_twistd(pfxpold_installation, work, arguments, listening_on(port)) as twistd,
        PolicyClient(port) as client,
    ):
        assert os.readlink(f"/proc/{twistd.pid}/root") == jail
        known = client.ask({"client_address": "192.0.2.10", "sender": "scanner@example.com"})
        unknown = client.ask(newcomer)
        if example == "relay-acl-file.toml":
            # A new version written beside the map and renamed into place,
            # as the example says; re-read within reload_interval (5 s).
            map_path = os.path.join(examples, "relay-acl.map")
            with open(map_path, encoding="utf-8") as f:
                text = f.read()
            with open(map_path + ".new", "w", encoding="utf-8") as f:
                f.write(text + "198.51.100.7  new@example.com  OK\n")
            os.chmod(map_path + ".new", 0o644)
            os.rename(map_path + ".new", map_path)
            wait_until(lambda: client.ask(newcomer) == "OK", timeout=20, what="map re-read")
    log = read_file(log_path)
    assert known == known_answer, log
    if data_in_jail:
        assert unknown.startswith("REJECT Sorry"), log
    else:
        assert "unable to open database file" in log


def test_outside_the_jail_the_lazy_check_works(pfxpold_installation, tmp_path):
    """
    The control for the test above: the same configuration without
    --chroot answers the lazy check's own action, so the failure inside the
    jail comes from the jail and not from the check.
    """
    work = world_readable_directory(str(tmp_path), "work")
    site = world_readable_directory(work, "site")
    with open(os.path.join(site, "site_checks.py"), "w", encoding="utf-8") as module:
        module.write(textwrap.dedent(USER_CHECKS))
    config_path = os.path.join(work, "pfxpold.toml")
    with open(config_path, "w", encoding="utf-8") as config:
        config.write(JAIL_CONFIG)
    port = free_port()
    arguments = ["-n", "--pidfile=", f"--logfile={work}/pfxpold.log", "pfxpold"]
    arguments += ["--config", config_path, "--port", f"tcp:{port}:interface=127.0.0.1"]
    with (
        running_twistd(
            pfxpold_installation,
            work,
            arguments,
            listening_on(port),
            extra_environment={"PYTHONPATH": site},
        ),
        PolicyClient(port) as client,
    ):
        lazy = client.ask({"client_address": "198.51.100.1", "sender": "b@example.com"})
    assert lazy == "REJECT colorsys was importable inside the jail"


@pytest.mark.parametrize(
    ("missing", "complaint"),
    [
        ("etc/passwd", "getpwuid(): uid not found"),
        ("dev/null", "No such file or directory: '/dev/null'"),
    ],
)
def test_jail_without_a_required_file_fails_at_start(
    pfxpold_installation, tmp_path, missing, complaint
):
    """
    The jail's contents are needed, and missing ones fail loudly at start
    rather than later: without etc/passwd, twistd's --uid cannot look up
    the user inside the chroot (initgroups); without dev/null, Twisted
    cannot open its reserve file descriptor when it starts listening.
    """
    _require_jail_prerequisites(pfxpold_installation)
    work = world_readable_directory(str(tmp_path), "work")
    jail = build_jail(os.path.join(work, "jail"))
    os.remove(os.path.join(jail, missing))
    result = pfxpold_installation.run(
        [
            "twistd",
            "-n",
            "--pidfile=",
            "--logfile=-",
            "--chroot",
            jail,
            "--uid",
            SERVICE_USER,
            "--gid",
            SERVICE_GROUP,
            "pfxpold",
            "--port",
            f"tcp:{free_port()}:interface=127.0.0.1",
        ],
        cwd=work,
    )
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr
