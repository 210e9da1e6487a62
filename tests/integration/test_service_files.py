"""
The service files in C{contrib/}, checked with the tools that read them:

  - C{systemd-analyze verify} finds nothing to say about the units (with
    the virtualenv path pointing at a real installation), and
    C{systemd-analyze security --offline=yes} rates the service's
    exposure 2.0 or better;
  - the service's C{ExecStart=}, taken from the file and run the way the
    unit runs it (its user, umask, file limit, no new privileges, no
    capabilities), answers, and survives its C{ExecReload=};
  - socket activation as C{pfxpold.socket} and C{/etc/default/pfxpold}
    configure it, with C{systemd-socket-activate} in systemd's place (PID 1
    here need not be systemd);
  - C{logrotate -f} with the shipped configuration moves the request log
    of a running daemon, which goes on in a new file without a signal;
  - why the unit has no C{MemoryDenyWriteExecute=yes}: pyOpenSSL's TLS
    callbacks need writable executable memory.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import resource
import shlex
import shutil
import socket
import subprocess
import tarfile
from collections.abc import Mapping
from typing import Optional

import pytest

from tests.integration.deployment import (
    SERVICE_GROUP,
    SERVICE_USER,
    listening_on,
    log_says,
    read_file,
    running_twistd,
    wait_until,
)
from tests.integration.support import (
    IN_CI,
    REPOSITORY,
    PolicyClient,
    encode_request,
    free_port,
    read_reply,
    require_program,
    running_daemon,
)

CONTRIB = os.path.join(REPOSITORY, "contrib")
SERVICE = os.path.join(CONTRIB, "systemd", "pfxpold.service")
SOCKET = os.path.join(CONTRIB, "systemd", "pfxpold.socket")
DEFAULTS = os.path.join(CONTRIB, "default", "pfxpold")
LOGROTATE = os.path.join(CONTRIB, "logrotate", "pfxpold")

#: Where the README installs pfxpold, and what the units therefore name.
VENV = "/opt/pfxpold"
CONFIG = "/etc/pfxpold/pfxpold.toml"
REQUEST_LOG = "/var/log/pfxpold/requests.log"

DEMO_ANSWERS = {"OK (you win!)", "DUNNO (you lose!)"}
DEMO_CONFIG = '[server]\n\n[[check]]\nname = "demo"\ntype = "demo"\n'


def unit_settings(path: str) -> list[tuple[str, str, str]]:
    """
    The settings of a systemd unit file (or of an environment file, whose
    section is C{""}), in order: C{(section, key, value)}. Comments and
    backslash-continued lines are handled as systemd does.
    """
    settings = []
    section = ""
    pending = ""
    for raw_line in read_file(path).splitlines():
        line = pending + raw_line.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path}: not a setting: {line!r}"
        settings.append((section, key.strip(), value.strip()))
    return settings


def setting(path: str, section: str, key: str) -> str:
    """
    The one value of C{key} in C{section} of the unit file C{path}.
    """
    values = [v for s, k, v in unit_settings(path) if (s, k) == (section, key)]
    assert len(values) == 1, f"{path}: [{section}] {key}= set {len(values)} times"
    return values[0]


def environment_file(path: str) -> dict[str, str]:
    """
    The variables an C{EnvironmentFile=} sets, unquoted as systemd does.
    """
    variables = {}
    for _, key, value in unit_settings(path):
        (variables[key],) = shlex.split(value) or [""]
    return variables


def command_line(value: str, environment: Mapping[str, str]) -> list[str]:
    """
    An C{ExecStart=}-style command line as systemd runs it: words as the
    shell would split them, a word C{$NAME} replaced by the words of the
    variable's value (none when unset or empty).
    """
    assert value[:1] not in "-@:+!", f"command prefixes are not understood here: {value!r}"
    assert "%" not in value, f"specifiers are not understood here: {value!r}"
    words = []
    for word in shlex.split(value):
        match = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if match:
            words.extend(environment.get(match.group(1), "").split())
        else:
            assert "$" not in word, f"only whole-word $NAME is understood here: {word!r}"
            words.append(word)
    return words


def unit_copy(directory: str, path: str, replacements: Mapping[str, str]) -> str:
    """
    Copy the unit file C{path} into C{directory}, with C{replacements}
    made in its text, each of which must occur.

    @return: the copy's path.
    """
    text = read_file(path)
    for old, new in replacements.items():
        assert old in text, f"{path} no longer mentions {old}"
        text = text.replace(old, new)
    copy = os.path.join(directory, os.path.basename(path))
    with open(copy, "w", encoding="utf-8") as f:
        f.write(text)
    return copy


def systemd_analyze(*arguments: str) -> subprocess.CompletedProcess:
    program = require_program("systemd-analyze", "systemd")
    return subprocess.run(
        [program, "--no-pager", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPOSITORY,
    )


def write_config(directory: str, text: str) -> str:
    path = os.path.join(directory, "pfxpold.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def as_the_unit_runs(directory: str) -> list[str]:
    """
    A wrapper giving the command what pfxpold.service gives ExecStart: its
    UMask=, LimitNOFILE=, NoNewPrivileges= and, as root, its User= and
    Group= (the service user of these tests standing in for pfxpold) with
    no supplementary groups and an empty CapabilityBoundingSet=.
    """
    assert setting(SERVICE, "Service", "User") == "pfxpold"
    assert setting(SERVICE, "Service", "Group") == "pfxpold"
    assert setting(SERVICE, "Service", "NoNewPrivileges") == "yes"
    assert setting(SERVICE, "Service", "CapabilityBoundingSet") == ""
    umask = setting(SERVICE, "Service", "UMask")
    files = setting(SERVICE, "Service", "LimitNOFILE")
    setpriv = [require_program("setpriv", "util-linux"), "--no-new-privs"]
    if os.geteuid() == 0:
        setpriv += [
            f"--reuid={SERVICE_USER}",
            f"--regid={SERVICE_GROUP}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]
    # A container may cap the hard limit below the unit's, and deny root
    # raising it (systemd, outside, would set it): the unit's, or that cap.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < int(files):
        files = str(hard)
    prlimit = [require_program("prlimit", "util-linux"), f"--nofile={files}:{files}"]
    return ["/bin/sh", "-c", 'umask "$0" && exec "$@"', umask, *prlimit, *setpriv, "--"]


# systemd-analyze


def test_units_verify_without_a_word(pfxpold_installation, tmp_path):
    """
    systemd-analyze verify, given copies of pfxpold.service and
    pfxpold.socket whose /opt/pfxpold is a real installation, exits 0
    and prints nothing: no error, and no warning either (an unknown or
    misspelt key is only a warning, which the same check catches in a
    copy with one added).
    """
    replacements = {f"{VENV}/bin/twistd": pfxpold_installation.program("twistd")}
    service = unit_copy(str(tmp_path), SERVICE, replacements)
    socket_unit = unit_copy(str(tmp_path), SOCKET, {})
    result = systemd_analyze("verify", service, socket_unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    with open(socket_unit, "a", encoding="utf-8") as f:
        f.write("ListenStreem=127.0.0.1:9999\n")
    misspelt = systemd_analyze("verify", service, socket_unit)
    assert "Unknown key" in misspelt.stdout + misspelt.stderr


def test_security_exposure_is_ok():
    """
    systemd-analyze security --offline=yes rates pfxpold.service's
    exposure 2.0 or better ("OK"), the figure the README states.
    """
    result = systemd_analyze("security", "--offline=yes", SERVICE)
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for pfxpold\.service: (\d+\.\d+) (\w+)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= 2.0, output
    assert match.group(2) == "OK", output
    readme = read_file(os.path.join(REPOSITORY, "README.md"))
    assert f"exposure level {exposure:.1f}" in readme, (
        f"README must state the figure systemd-analyze gives: {exposure:.1f}"
    )


# The service's command lines, run for real


def test_execstart_serves_and_survives_execreload(pfxpold_installation, world_readable_tmp):
    """
    pfxpold.service's ExecStart=, with /etc/default/pfxpold's variables
    (PFXPOLD_OPTIONS naming a free port), run as the unit runs it from an
    unwritable directory: it answers on a persistent connection, logs the
    request to standard output (the journal), and after the unit's
    ExecReload= (SIGHUP: reload the configuration) it is still running
    and answers on the same connection and on a new one.
    """
    port = free_port()
    config = write_config(world_readable_tmp, DEMO_CONFIG)
    environment = environment_file(DEFAULTS)
    assert environment == {"TWISTD_OPTIONS": "", "PFXPOLD_OPTIONS": ""}
    environment["PFXPOLD_OPTIONS"] = f"--port tcp:{port}:interface=127.0.0.1"
    start = command_line(setting(SERVICE, "Service", "ExecStart"), environment)
    assert start[0] == f"{VENV}/bin/twistd"
    assert start[1:3] == ["-n", "--pidfile="]
    assert "--uid" not in start and "--gid" not in start
    start = [config if word == CONFIG else word for word in start]
    with running_twistd(
        pfxpold_installation,
        world_readable_tmp,
        start[1:],
        listening_on(port),
        wrapper=as_the_unit_runs(world_readable_tmp),
    ) as twistd:
        if os.geteuid() == 0:
            with open(f"/proc/{twistd.pid}/status", encoding="ascii") as status:
                assert f"Uid:\t{pwd.getpwnam(SERVICE_USER).pw_uid}\t" in status.read()
        with PolicyClient(port) as client:
            before = client.ask({"sender": "unit@example.com"})
            wait_until(
                lambda: "from=<unit@example.com>" in twistd.output(),
                what="the request line on standard output",
            )
            reload = command_line(
                setting(SERVICE, "Service", "ExecReload"), {"MAINPID": str(twistd.pid)}
            )
            subprocess.run(reload, check=True, timeout=30)
            # Were SIGHUP fatal (twistd's default), the connection would end
            # here, unanswered.
            try:
                after = client.ask({"sender": "reloaded@example.com"})
            except ConnectionError:
                after = None
            assert after is not None, f"ExecReload= stopped pfxpold:\n{twistd.output()}"
        with PolicyClient(port) as client:
            again = client.ask({"sender": "new-connection@example.com"})
        assert twistd.process.poll() is None, twistd.output()
    assert {before, after, again} <= DEMO_ANSWERS, twistd.output()


@pytest.mark.parametrize("domain", ["INET", "UNIX"])
def test_socket_activation(pfxpold_installation, world_readable_tmp, domain):
    """
    pfxpold.socket's ListenStream= (its TCP address with a free port, or
    its commented unix socket in Postfix's spool, in a temporary
    directory), bound by systemd-socket-activate as systemd would, and the
    service started with /etc/default/pfxpold's documented
    PFXPOLD_OPTIONS for it: the request sent to the socket is answered by
    the pfxpold it starts.
    """
    activate = require_program("systemd-socket-activate", "systemd")
    lines = read_file(SOCKET).splitlines()
    if domain == "INET":
        (address,) = [
            v for s, k, v in unit_settings(SOCKET) if (s, k) == ("Socket", "ListenStream")
        ]
        host, _, default_port = address.rpartition(":")
        assert (host, default_port) == ("127.0.0.1", "9998")
        port = free_port()
        listen = f"{host}:{port}"
    else:
        (address,) = [line.split("=", 1)[1] for line in lines if line.startswith("#ListenStream=")]
        assert address == "/var/spool/postfix/private/pfxpold"
        listen = os.path.join(world_readable_tmp, "pfxpold")
    (documented,) = [
        shlex.split(line.split("=", 1)[1])[0]
        for line in read_file(DEFAULTS).splitlines()
        if line.startswith("#PFXPOLD_OPTIONS=") and "systemd:" in line
    ]
    assert documented == "--port systemd:domain=INET:index=0"
    environment = {"TWISTD_OPTIONS": "", "PFXPOLD_OPTIONS": documented.replace("INET", domain)}
    start = command_line(setting(SERVICE, "Service", "ExecStart"), environment)
    config = write_config(world_readable_tmp, DEMO_CONFIG)
    start = [config if word == CONFIG else word for word in start]
    # systemd names each socket (LISTEN_FDNAMES), by default after the
    # socket unit; Twisted ignores sockets without names.
    wrapper = [activate, f"--listen={listen}", "--fdname=pfxpold.socket", "--setenv=LANG=C.UTF-8"]
    with running_twistd(
        pfxpold_installation,
        world_readable_tmp,
        start[1:],
        # systemd-socket-activate binds first, and starts pfxpold on the
        # first connection, as systemd does.
        lambda twistd: log_says(twistd.output_path, f"Listening on {listen} as 3.")(twistd),
        wrapper=wrapper,
    ) as twistd:
        if domain == "INET":
            with PolicyClient(port) as client:
                answer = client.ask({"sender": "activated@example.com"})
        else:
            answer = ask_unix(listen, {"sender": "activated@example.com"})
        assert twistd.process.poll() is None, twistd.output()
        # Request lines are written in batches, within a second.
        wait_until(
            lambda: "from=<activated@example.com>" in twistd.output(),
            what="the request line on standard output",
        )
        output = twistd.output()
    assert answer in DEMO_ANSWERS, output


def ask_unix(path: str, attributes: Mapping[str, str]) -> Optional[str]:
    """
    Ask one request over the unix socket C{path}.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_request(attributes))
        reply = read_reply(sock)
    assert reply is not None and reply.startswith(b"action=")
    return reply[len(b"action=") : -2].decode()


# logrotate


def test_logrotate_moves_the_request_log_of_a_running_daemon(tmp_path):
    """
    logrotate -f with a copy of contrib/logrotate/pfxpold (its path and
    owner made this test's) moves a running daemon's request log to
    requests.log.1 and creates requests.log with mode 0640; with no
    signal, the daemon's next lines land in the new file and the earlier
    ones stay in the rotated one.
    """
    logrotate = shutil.which("logrotate") or require_program("/usr/sbin/logrotate", "logrotate")
    directory = str(tmp_path)
    request_log = os.path.join(directory, "requests.log")
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    config = unit_copy(
        directory,
        LOGROTATE,
        {REQUEST_LOG: request_log, "create 0640 pfxpold adm": f"create 0640 {user} {group}"},
    )
    directives = {
        line.split()[0]
        for line in read_file(config).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    # pfxpold follows the move itself; SIGHUP would reload its configuration.
    assert not directives & {"postrotate", "prerotate", "copytruncate", "sharedscripts"}
    server = f'[server]\nrequest_log = "{request_log}"\n\n[[check]]\nname = "demo"\ntype = "demo"\n'
    with running_daemon(tmp_path, server) as daemon:
        with daemon.client() as client:
            client.ask({"sender": "before@example.com"})
            wait_until(
                lambda: "before@example.com" in read_file(request_log),
                what="the first line in the request log",
            )
            rotate = subprocess.run(
                [logrotate, "-f", "-s", os.path.join(directory, "state"), config],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert rotate.returncode == 0, rotate.stdout + rotate.stderr
            assert os.stat(request_log).st_mode & 0o777 == 0o640
            wait_until(lambda: "reopened" in daemon.log(), what="the daemon reopening its log")
            client.ask({"sender": "after@example.com"})
            wait_until(
                lambda: "after@example.com" in read_file(request_log),
                what="the next line in the new request log",
            )
        assert daemon.process.poll() is None
    rotated = read_file(request_log + ".1")
    current = read_file(request_log)
    assert "from=<before@example.com>" in rotated and "after@example.com" not in rotated
    assert "before@example.com" not in current
    assert not [name for name in os.listdir(directory) if name.endswith(".backup")]


# Why not MemoryDenyWriteExecute=yes


def test_tls_needs_writable_executable_memory(pfxpold_installation, tmp_path):
    """
    The unit leaves out MemoryDenyWriteExecute=yes because, in the
    installed virtualenv, a process that may not map writable executable
    memory (the kernel's PR_SET_MDWE, what systemd's setting enforces)
    cannot make a TLS client connection's options: pyOpenSSL's callbacks
    are cffi callbacks. Should this ever work, the unit can gain the
    setting.
    """
    assert "MemoryDenyWriteExecute" not in {k for _, k, _ in unit_settings(SERVICE)}
    probe = """
import ctypes, sys
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
if sys.argv[1] == "mdwe" and libc.prctl(65, 1, 0, 0, 0) != 0:
    print("no PR_SET_MDWE"); sys.exit(3)
options = optionsForClientTLS("ldap.example.org")
client = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol)).buildProtocol(None)
try:
    client.makeConnection(StringTransport())  # sends the ClientHello
except MemoryError as e:
    print(e); sys.exit(2)
print("TLS works"); sys.exit(0)
"""
    control = pfxpold_installation.run(["python", "-c", probe, "-"], cwd=str(tmp_path))
    assert (control.returncode, control.stdout) == (0, "TLS works\n"), control.stderr
    result = pfxpold_installation.run(["python", "-c", probe, "mdwe"], cwd=str(tmp_path))
    if result.returncode == 3:
        message = "this kernel has no PR_SET_MDWE (Linux 6.3 or newer)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "write+execute memory" in result.stdout


def test_sdist_ships_the_service_files(pfxpold_installation):
    """
    The source distribution carries contrib/ (MANIFEST.in), so that an
    admin installing from it has the units, the options file and the
    logrotate configuration the README's steps copy.
    """
    with tarfile.open(pfxpold_installation.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for path in (SERVICE, SOCKET, DEFAULTS, LOGROTATE):
        assert os.path.relpath(path, REPOSITORY) in names
