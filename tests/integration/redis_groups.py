"""
Groups of Redis servers for integration tests, on free loopback ports: a
master with a replica watched by three sentinels (optionally behind
passwords and ACL users, see L{GroupCredentials}), and a three-master Redis
Cluster; either over TLS only when given L{RedisTLS}. Every process is
ours, stopped by PID even when a test fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Optional

from tests.integration.redis_server import RedisServer, RedisTLS
from tests.integration.support import free_port, require_program, stop_process, wait_for_port

#: The name examples/quota-redis-sentinel.toml gives the master, so that
#: the example runs against the group with only its addresses changed.
MASTER_NAME = "pfxpold"
#: Sentinel timings tuned low, so that a failover takes a second or two.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000


def redis_cli(
    port: int,
    *arguments: str,
    check: bool = True,
    password: Optional[str] = None,
    tls: Optional[RedisTLS] = None,
) -> str:
    """
    Run C{redis-cli} against the server (or sentinel) on C{port}, as the
    C{default} user with C{password} if given, over C{tls} if given.

    @return: its output, stripped.
    """
    cli = require_program("/usr/bin/redis-cli", "redis-tools")
    environment = dict(os.environ)
    environment.pop("REDISCLI_AUTH", None)
    if password is not None:
        # Not on the command line, where redis-cli warns about it.
        environment["REDISCLI_AUTH"] = password
    result = subprocess.run(
        [
            cli,
            *(tls.cli_arguments() if tls else ()),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(arguments)}: {result.stdout}{result.stderr}")
    return result.stdout.strip()


def counted(
    port: int, user: str, password: Optional[str] = None, tls: Optional[RedisTLS] = None
) -> int:
    """
    What the Redis on C{port} has counted for C{user}'s daily quota (the
    quota tests' C{key = ["sasl_username"]}), over its day windows.
    """
    keys = redis_cli(
        port,
        "--scan",
        "--pattern",
        f"pfxpold:quota:{{quota:{user}}}:day:*",
        password=password,
        tls=tls,
    )
    return sum(
        int(redis_cli(port, "GET", key, password=password, tls=tls) or 0) for key in keys.split()
    )


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    """
    Poll C{condition} (a callable) until it is true.

    @raise AssertionError: when it is not within C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except RuntimeError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class GroupCredentials:
    """
    Passwords and ACL users for a sentinel group: the servers' and the
    sentinels' C{default} user needs C{admin_password} (the sentinels, the
    replica and the tests' redis-cli use it); pfxpold logs in to the
    servers as C{user} and to the sentinels as C{sentinel_user}, each
    allowed only what pfxpold sends.
    """

    admin_password: str = "admin-secret"
    user: str = "pfx"
    password: str = "pfx-secret"
    #: The ACL rules of C{user} on the servers: its keys, and the commands
    #: of pfxpold's scripts, its admin operations and its connection set-up
    #: (ROLE: is this server still the master?).
    rules: tuple[str, ...] = (
        "~pfxpold:*",
        "resetchannels",
        "-@all",
        "+@read",
        "+@write",
        "+@scripting",
        "+@connection",
        "+role",
    )
    sentinel_user: str = "pfx-sentinel"
    sentinel_password: str = "pfx-sentinel-secret"
    #: The ACL rules of C{sentinel_user} on the sentinels: ask for the
    #: master, hear of failovers.
    sentinel_rules: tuple[str, ...] = (
        "&*",
        "-@all",
        "+@connection",
        "+subscribe",
        "+sentinel|get-master-addr-by-name",
    )

    def server_arguments(self) -> tuple[str, ...]:
        """redis-server's arguments for the users and the replica's login."""
        return (
            "--requirepass", self.admin_password,
            "--masterauth", self.admin_password,
            "--user", self.user, "on", f">{self.password}", *self.rules,
        )  # fmt: skip

    def sentinel_lines(self) -> str:
        """A sentinel's configuration for the passwords and users."""
        rules = " ".join(self.sentinel_rules)
        return (
            f"requirepass {self.admin_password}\n"
            f"sentinel sentinel-pass {self.admin_password}\n"
            f"sentinel auth-pass {MASTER_NAME} {self.admin_password}\n"
            f"user {self.sentinel_user} on >{self.sentinel_password} {rules}\n"
        )


class Sentinel:
    """
    One redis-sentinel process we started.
    """

    def __init__(
        self,
        directory: str,
        master_port: int,
        credentials: Optional[GroupCredentials] = None,
        tls: Optional[RedisTLS] = None,
    ) -> None:
        self.program = require_program("/usr/bin/redis-sentinel", "redis-sentinel")
        self.port = free_port()
        self.directory = directory
        self.config = os.path.join(directory, f"sentinel-{self.port}.conf")
        with open(self.config, "w") as f:
            f.write(
                (f"port {self.port}\n" if tls is None else tls.config_lines(self.port))
                + "bind 127.0.0.1\n"
                f"dir {directory}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                + (credentials.sentinel_lines() if credentials is not None else "")
            )
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(os.path.join(self.directory, f"sentinel-{self.port}.log"), "ab")
        self.process = subprocess.Popen(
            [self.program, self.config], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, 10)


class SentinelGroup:
    """
    A master, a replica and three sentinels.

    @ivar servers: the two Redis servers (either may be the master).
    @ivar credentials: the passwords and users, if the group has them.
    @ivar tls: its TLS, if it speaks only TLS.
    """

    def __init__(
        self,
        directory: str,
        credentials: Optional[GroupCredentials] = None,
        tls: Optional[RedisTLS] = None,
    ) -> None:
        self.directory = directory
        self.credentials = credentials
        self.tls = tls
        self.servers: list[RedisServer] = []
        self.sentinels: list[Sentinel] = []

    def cli(self, port: int, *arguments: str) -> str:
        """L{redis_cli} on a server or sentinel of the group, as its admin."""
        password = self.credentials.admin_password if self.credentials is not None else None
        return redis_cli(port, *arguments, password=password, tls=self.tls)

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]

    def master_port(self) -> int:
        """The port of the master, as the first live sentinel sees it."""
        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            reply = self.cli(
                sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
            ).split()
            if len(reply) == 2:
                return int(reply[1])
        raise RuntimeError("no sentinel names the master")

    def server(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """
        Wait until every sentinel agrees on the master, sees the other two
        sentinels and a replica that is in sync: a failover can then be
        made.
        """

        def healthy() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                fields = self.cli(sentinel.port, "SENTINEL", "MASTER", MASTER_NAME).split("\n")
                master = dict(zip(fields[::2], fields[1::2], strict=False))
                if master.get("num-other-sentinels") != "2" or master.get("num-slaves") != "1":
                    return False
                if "s_down" in master.get("flags", "") or "o_down" in master.get("flags", ""):
                    return False
                replica = self.cli(sentinel.port, "SENTINEL", "REPLICAS", MASTER_NAME)
                if (
                    "master_link_down" in replica
                    or "s_down" in replica
                    or "disconnected" in replica
                ):
                    return False
                ports.add(master["port"])
            if len(ports) != 1:
                return False
            port = int(ports.pop())
            info = self.cli(port, "INFO", "replication")
            return "role:master" in info and "state=online" in info

        wait_until(healthy, timeout, "a healthy sentinel group")


@contextmanager
def running_sentinel_group(
    directory: os.PathLike,
    credentials: Optional[GroupCredentials] = None,
    tls: Optional[RedisTLS] = None,
) -> Iterator[SentinelGroup]:
    """
    A master, a replica and three sentinels for the block, then stopped;
    with C{credentials}, every one of them wants a password; with C{tls},
    every one of them speaks only TLS, to clients and to each other.
    """
    path = os.fspath(directory)
    group = SentinelGroup(path, credentials, tls)
    secured = credentials.server_arguments() if credentials is not None else ()
    with ExitStack() as stack:
        master = RedisServer(path, extra_args=secured, tls=tls)
        stack.callback(master.stop)
        master.start()
        replica = RedisServer(
            path, extra_args=(*secured, "--replicaof", "127.0.0.1", str(master.port)), tls=tls
        )
        stack.callback(replica.stop)
        replica.start()
        group.servers = [master, replica]
        for _ in range(3):
            sentinel = Sentinel(path, master.port, credentials, tls)
            stack.callback(sentinel.stop)
            sentinel.start()
            group.sentinels.append(sentinel)
        group.wait_healthy()
        yield group


class Cluster:
    """
    A Redis Cluster of three masters (no replicas) on loopback ports.

    @ivar tls: its TLS, if it speaks only TLS.
    """

    def __init__(self, directory: str, tls: Optional[RedisTLS] = None) -> None:
        self.directory = directory
        self.tls = tls
        self.servers: list[RedisServer] = []

    def cli(self, port: int, *arguments: str) -> str:
        """L{redis_cli} on a node of the cluster."""
        return redis_cli(port, *arguments, tls=self.tls)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{server.port}" for server in self.servers]

    def node_ids(self) -> dict[int, str]:
        """Each node's ID, by port."""
        found = {}
        for line in self.cli(self.servers[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            found[port] = fields[0]
        return found

    def slot_owner(self, slot: int) -> int:
        """The port of the master that holds C{slot}."""
        for line in self.cli(self.servers[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                if part.startswith("["):
                    continue
                first, _, last = part.partition("-")
                if int(first) <= slot <= int(last or first):
                    return port
        raise RuntimeError(f"nobody holds slot {slot}")

    def migrate_slot(
        self, slot: int, target: int, phase: Callable[[str], None] = lambda name: None
    ) -> int:
        """
        Move C{slot} to the master on port C{target} as C{redis-cli
        --cluster reshard} does, calling C{phase} at each step so that a
        test lets its traffic meet it: C{"migrating"} (the source answers
        C{ASK} for keys it no longer has, C{TRYAGAIN} for some of a
        command's keys), C{"keys moved"} (every key is on the target, the
        slot still the source's: C{ASK} for all), C{"moved"} (every master
        says the target has it: C{MOVED}).

        @return: how many keys were moved.
        """
        ids = self.node_ids()
        source = self.slot_owner(slot)
        assert source != target, (slot, source)
        self.cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source])
        self.cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target])
        phase("migrating")
        # Keys are written to the target (ASK) meanwhile: move in batches
        # until none is left.
        moved = 0
        for _ in range(1000):
            keys = self.cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            if not keys:
                break
            self.cli(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
            moved += len(keys)
        phase("keys moved")
        # The target first, then the source, as Redis documents it: the
        # other way round, for a moment the source says MOVED to the
        # target and the target, still importing, MOVED back.
        others = [server.port for server in self.servers if server.port not in (source, target)]
        for port in (target, source, *others):
            self.cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target])
        phase("moved")
        return moved


def cluster_port() -> int:
    """
    A free port whose cluster bus port (10000 above) is free and valid.
    """
    while True:
        port = free_port()
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextmanager
def running_cluster(directory: os.PathLike, tls: Optional[RedisTLS] = None) -> Iterator[Cluster]:
    """
    Three cluster-enabled redis-servers joined into one cluster with
    C{redis-cli --cluster create}, for the block, then stopped; with
    C{tls}, speaking only TLS, their cluster bus included.
    """
    path = os.fspath(directory)
    cluster = Cluster(path, tls)
    with ExitStack() as stack:
        for _ in range(3):
            port = cluster_port()
            server = RedisServer(
                path,
                port,
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    os.path.join(path, f"nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    *(("--tls-cluster", "yes") if tls is not None else ()),
                ),
                tls=tls,
            )
            stack.callback(server.stop)
            server.start()
            cluster.servers.append(server)
        cli = require_program("/usr/bin/redis-cli", "redis-tools")
        result = subprocess.run(
            [
                cli,
                *(tls.cli_arguments() if tls is not None else ()),
                "--cluster",
                "create",
                *cluster.addresses,
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create: {result.stdout}{result.stderr}")

        def agreed() -> bool:
            return all(
                "cluster_state:ok" in cluster.cli(server.port, "CLUSTER", "INFO")
                for server in cluster.servers
            )

        wait_until(agreed, 30, "the cluster to be ok")
        yield cluster
