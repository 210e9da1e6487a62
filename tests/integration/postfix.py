"""
A private, real Postfix for end-to-end tests.

C{running_postfix(policy_port)} starts Debian's Postfix master from its own
main.cf and master.cf in a temporary directory: smtpd on a free port of
127.0.0.1, every delivery discarded, no DNS (peer name lookups off, no DNS
in delivery), XCLIENT allowed from loopback so a test can present any
client address, name and SASL login, and C{check_policy_service} pointing at
pfxpold at RCPT and END-OF-MESSAGE. Each smtpd serves one SMTP session
(C{max_use = 1}), so every session opens a fresh policy connection: a test
may stop and start pfxpold between sessions.

Example::

    with running_daemon(tmp_path, config) as daemon, \\
            running_postfix(daemon.port) as postfix:
        result = postfix.send("alice@example.com", ["bob@example.net"],
                              client_address="192.0.2.10", login="joe")
        assert result.rcpt == [(250, "2.1.5 Ok")]
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from tests.integration.support import free_port, require_program, stop_process, wait_for_port

MASTER = "/usr/lib/postfix/sbin/master"

_MASTER_CF = """\
{smtp_address} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class Transaction:
    """
    What the SMTP server answered in one session.

    @ivar mail: the reply to MAIL FROM, C{(code, text)}.
    @ivar rcpt: the replies to each RCPT TO, in order.
    @ivar data: the final reply to DATA (after the message), or L{None}
        when no recipient was accepted.
    @ivar queue_id: the queue id from the final reply, if queued.
    """

    mail: tuple[int, str]
    rcpt: list[tuple[int, str]] = field(default_factory=list)
    data: Optional[tuple[int, str]] = None

    @property
    def queue_id(self) -> Optional[str]:
        if self.data and self.data[0] == 250 and "queued as " in self.data[1]:
            return self.data[1].rsplit("queued as ", 1)[1].strip()
        return None


class Postfix:
    """
    A running private Postfix.

    @ivar smtp_port: where its smtpd listens on 127.0.0.1.
    @ivar directory: its configuration, queue and log live here.
    """

    def __init__(self, directory: str, smtp_port: int, process: subprocess.Popen) -> None:
        self.directory = directory
        self.smtp_port = smtp_port
        self.process = process

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "maillog")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """
        Wait until C{text} appears in the mail log; return the log.

        @raise AssertionError: when it does not within C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the Postfix log:\n{self.log()[-3000:]}")

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        client_address: Optional[str] = None,
        client_name: Optional[str] = None,
        helo: str = "client.example.com",
        login: Optional[str] = None,
        body: bytes = b"Subject: pfxpold test\r\n\r\nHello.\r\n",
        timeout: float = 30.0,
        mail_options: Sequence[str] = (),
    ) -> Transaction:
        """
        One SMTP session: EHLO, optional XCLIENT (client address, name,
        SASL login), MAIL FROM (with C{mail_options} such as
        C{"SIZE=20000000"}), RCPT TO each recipient, and DATA when any
        recipient was accepted. Error replies are recorded, not raised.
        """
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=timeout) as smtp:
            smtp.ehlo(helo)
            attributes = []
            if client_address is not None:
                # XCLIENT wants IPv6 addresses tagged, as in SMTP address literals.
                tag = "IPV6:" if ":" in client_address else ""
                attributes.append(f"ADDR={tag}{client_address}")
            if client_name is not None:
                attributes.append(f"NAME={client_name}")
            if login is not None:
                attributes.append(f"LOGIN={login}")
            if attributes:
                code, text = smtp.docmd("XCLIENT", " ".join(attributes))
                assert code == 220, (code, text)
                smtp.ehlo(helo)
            code, text = smtp.mail(sender, list(mail_options))
            transaction = Transaction(mail=(code, text.decode()))
            if code != 250:
                return transaction
            for recipient in recipients:
                code, text = smtp.rcpt(recipient)
                transaction.rcpt.append((code, text.decode()))
            if any(code == 250 for code, _ in transaction.rcpt):
                try:
                    code, text = smtp.data(body)
                except smtplib.SMTPDataError as e:
                    code, text = e.smtp_code, e.smtp_error
                transaction.data = (code, text.decode() if isinstance(text, bytes) else text)
            return transaction

    def held(self) -> list[str]:
        """
        The queue ids in Postfix's hold queue.
        """
        return sorted(os.listdir(os.path.join(self.directory, "spool", "hold")))

    @property
    def process_group(self) -> int:
        """
        The process group of this instance: the master runs in a session
        of its own, so the group is the master and every daemon it forks
        (qmgr, pickup, smtpd, cleanup...), and nothing else.
        """
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> None:
        """
        Stop every process of this instance: SIGTERM to the master we
        started (by its PID), which stops its daemons; then SIGKILL to
        whatever of its process group is left (a daemon the master did not
        wait for, or all of them when the master had to be killed), and
        return only once none is left, so that no qmgr outlives its spool.

        @raise RuntimeError: when some process of the group survives even
            SIGKILL for C{timeout} seconds.
        """
        group = self.process_group
        stop_process(self.process, timeout)
        deadline = time.monotonic() + 2.0
        while group_members(group) and time.monotonic() < deadline:
            # The master sent its daemons SIGTERM as it exited.
            time.sleep(0.05)
        deadline = time.monotonic() + timeout
        while group_members(group):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix processes {group_members(group)} survive SIGKILL")
            time.sleep(0.05)


def group_members(group: int) -> list[int]:
    """
    The PIDs of the live processes (not zombies, which are gone but for
    their exit status) in process group C{group}, from C{/proc}.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry))
    return sorted(members)


def _main_cf(directory: str, policy: str, overrides: Mapping[str, str]) -> str:
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": os.path.join(directory, "spool"),
        "data_directory": os.path.join(directory, "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "mx.test.example",
        "mydomain": "test.example",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "all",
        "mynetworks": "127.0.0.0/8",
        "mydestination": "",
        "relay_domains": "static:all",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        # Tests never send a DNS query to the machine's resolver.
        "smtpd_peername_lookup": "no",
        "disable_dns_lookups": "yes",
        "smtp_dns_support_level": "disabled",
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        # Nothing is ever delivered.
        "default_transport": "discard:",
        "local_transport": "discard:",
        "relay_transport": "discard:",
        "virtual_transport": "discard:",
        "maillog_file": os.path.join(directory, "maillog"),
        "maillog_file_prefixes": directory,
        # One SMTP session per smtpd: a fresh policy connection each time.
        "max_use": "1",
        "smtpd_relay_restrictions": "reject_unauth_destination",
        "smtpd_recipient_restrictions": f"check_policy_service {policy}, permit",
        "smtpd_end_of_data_restrictions": f"check_policy_service {policy}",
        "smtpd_policy_service_timeout": "20s",
    }
    settings.update(overrides)
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


@contextmanager
def running_postfix(
    policy_port: Optional[int] = None,
    policy: Optional[str] = None,
    **overrides: str,
) -> Iterator[Postfix]:
    """
    Run a private Postfix for the duration of the block.

    @param policy_port: pfxpold's port on 127.0.0.1, or
    @param policy: a whole policy service name (C{inet:...}, C{unix:...}).
    @param overrides: main.cf settings to add or replace, e.g.
        C{smtpd_end_of_data_restrictions=""}.
    """
    require_program(MASTER, "postfix")
    require_program("postfix", "postfix")
    if policy is None:
        policy = f"inet:127.0.0.1:{policy_port}"
    # Postfix's daemons run as the postfix user and must reach the queue:
    # pytest's tmp_path is private to root, so use a directory of our own.
    directory = tempfile.mkdtemp(prefix="pfxpold-postfix-")
    os.chmod(directory, 0o755)
    smtp_port = free_port()
    try:
        os.makedirs(os.path.join(directory, "etc"))
        os.makedirs(os.path.join(directory, "spool"), mode=0o755)
        os.makedirs(os.path.join(directory, "data"))
        shutil.chown(os.path.join(directory, "data"), "postfix")
        with open(os.path.join(directory, "etc", "main.cf"), "w") as f:
            f.write(_main_cf(directory, policy, overrides))
        with open(os.path.join(directory, "etc", "master.cf"), "w") as f:
            f.write(_MASTER_CF.format(smtp_address=f"127.0.0.1:{smtp_port}"))
        configuration = os.path.join(directory, "etc")
        # "postfix check" creates the queue directories with the right owners.
        subprocess.run(["postfix", "-c", configuration, "check"], check=True, capture_output=True)
        environment = dict(os.environ, MAIL_CONFIG=configuration)
        process = subprocess.Popen(
            [MASTER, "-c", configuration, "-d"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session and process group: Postfix.stop can then find
            # every process of this instance, and only those.
            start_new_session=True,
        )
        postfix = Postfix(directory, smtp_port, process)
        try:
            wait_for_port(smtp_port, process=process)
            yield postfix
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
