"""
A throwaway OpenLDAP slapd for the ldap check's integration tests: a plain
slapd.conf with the mdb backend in a temporary directory, data loaded with
slapadd, run in the foreground on a loopback port and stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional

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
# check has bound as cn=pfxpold.
access to * by users read by anonymous auth
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

    def __init__(self, directory: str, tls: Optional[tuple[str, str]] = None) -> None:
        """
        @param tls: the certificate and key files; with them slapd also
            listens for LDAPS on C{tls_port}.
        """
        self.slapd = require_program("/usr/sbin/slapd", "slapd")
        self.directory = directory
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.process: Optional[subprocess.Popen] = None
        self.config = os.path.join(directory, "slapd.conf")
        os.makedirs(os.path.join(directory, "db"), exist_ok=True)
        with open(self.config, "w") as f:
            if tls:
                f.write(f"TLSCertificateFile {tls[0]}\nTLSCertificateKeyFile {tls[1]}\n")
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
        return urls

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.slapd, "-d", "0", "-f", self.config, "-h", self.url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, process=self.process)
        if self.tls_port:
            wait_for_port(self.tls_port, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10, wake=True)
        self.process = None

    def pause(self) -> None:
        """Freeze slapd: it keeps its socket open and answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
