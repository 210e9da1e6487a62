"""
A throwaway OpenLDAP slapd for the ldap check's integration tests: a plain
slapd.conf with the mdb backend in a temporary directory, data loaded with
slapadd, run in the foreground on a loopback port and stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Optional
from urllib.parse import quote

from tests.integration.support import free_port, require_program, stop_process, wait_for_port

SUFFIX = "dc=example,dc=com"
BIND_DN = f"cn=pfxpold,{SUFFIX}"
BIND_PASSWORD = "pfxpold-secret"

CONFIG = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args

database mdb
maxsize 10485760
suffix "{suffix}"
rootdn "cn=admin,{suffix}"
rootpw admin-secret
directory {directory}/db
# Anonymous clients may only bind: a search finds something only when the
# check has bound as cn=pfxpold (by password, or by a SASL identity that an
# authz-regexp maps to it).
access to * by dn.exact="cn=pfxpold,{suffix}" read by anonymous auth
"""

DATA = f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: {BIND_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: pfxpold
userPassword: {BIND_PASSWORD}

dn: uid=alice,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: Example
mail: alice@example.com
description: OK known sender

dn: uid=bob,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: Example
mail: bob@example.com

dn: uid=carol,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: Example
mail: carol@example.com
description: REJECT one value
description: DUNNO another value

dn: uid=mallory,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: mallory
cn: Mallory
sn: Example
mail: *)(uid=*
description: REJECT literal star sender
"""


class Slapd:
    """
    One slapd process on 127.0.0.1:C{port}, with its data in C{directory}.
    """

    def __init__(
        self,
        directory: str,
        tls: Optional[tuple[str, str]] = None,
        ca_file: Optional[str] = None,
        security: Optional[str] = None,
        ldapi: bool = False,
        authz_regexps: Sequence[tuple[str, str]] = (),
    ) -> None:
        """
        @param tls: the certificate and key files; with them slapd also
            listens for LDAPS on C{tls_port}, and accepts STARTTLS on
            C{port}.
        @param ca_file: the CA that signs client certificates; slapd then
            asks clients for one (C{TLSVerifyClient try}), for SASL
            EXTERNAL over TLS.
        @param security: slapd's C{security} factors, e.g. C{ssf=1}: the
            server then refuses binds and searches over plain TCP.
        @param ldapi: listen on a unix socket too, at C{ldapi_path}, where
            SASL EXTERNAL sees the client's uid and gid.
        @param authz_regexps: C{authz-regexp} rules (pattern, DN), mapping
            SASL identities to entries.
        """
        self.slapd = require_program("/usr/sbin/slapd", "slapd")
        self.directory = directory
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.process: Optional[subprocess.Popen] = None
        #: A short directory of its own for the socket: a unix socket's
        #: path must fit in 108 bytes, which pytest's tmp_path may not.
        self._socket_directory = tempfile.mkdtemp(prefix="slapd-") if ldapi else None
        self.ldapi_path = (
            os.path.join(self._socket_directory, "ldapi") if self._socket_directory else None
        )
        self.config = os.path.join(directory, "slapd.conf")
        os.makedirs(os.path.join(directory, "db"), exist_ok=True)
        with open(self.config, "w") as f:
            if tls:
                f.write(f"TLSCertificateFile {tls[0]}\nTLSCertificateKeyFile {tls[1]}\n")
            if ca_file:
                f.write(f"TLSCACertificateFile {ca_file}\nTLSVerifyClient try\n")
            if security:
                f.write(f"security {security}\n")
            for pattern, replacement in authz_regexps:
                f.write(f'authz-regexp "{pattern}" "{replacement}"\n')
            f.write(CONFIG.format(directory=directory, suffix=SUFFIX))
        ldif = os.path.join(directory, "data.ldif")
        with open(ldif, "w") as f:
            f.write(DATA)
        slapadd = require_program("/usr/sbin/slapadd", "slapd")
        subprocess.run(
            [slapadd, "-f", self.config, "-l", ldif], check=True, capture_output=True, timeout=30
        )

    @property
    def url(self) -> str:
        urls = f"ldap://127.0.0.1:{self.port}/"
        if self.tls_port:
            urls += f" ldaps://127.0.0.1:{self.tls_port}/"
        if self.ldapi_path:
            urls += f" {self.ldapi_url}"
        return urls

    @property
    def ldapi_url(self) -> str:
        assert self.ldapi_path is not None
        return "ldapi://" + quote(self.ldapi_path, safe="")

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.slapd, "-d", "0", "-f", self.config, "-h", self.url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, process=self.process)
        if self.tls_port:
            wait_for_port(self.tls_port, process=self.process)
        if self.ldapi_path:
            wait_for_path(self.ldapi_path, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10, wake=True)
        self.process = None

    def remove(self) -> None:
        """Stop slapd and remove the socket's directory."""
        self.stop()
        if self._socket_directory is not None:
            shutil.rmtree(self._socket_directory, ignore_errors=True)
            self._socket_directory = None

    def pause(self) -> None:
        """Freeze slapd: it keeps its socket open and answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def wait_for_path(path: str, process: subprocess.Popen, timeout: float = 15.0) -> None:
    """
    Wait until C{process} has made the unix socket C{path}.

    @raise RuntimeError: when it does not within C{timeout}, or exits first.
    """
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise RuntimeError(f"slapd exited with {process.returncode} before making {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"slapd made no {path} within {timeout}s")
        time.sleep(0.02)
