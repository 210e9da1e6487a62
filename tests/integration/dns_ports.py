"""
One port number for both UDP and TCP, for the tests' DNS servers
(dns_server.py and spf_dns_server.py, each run as its own process).

A port a test found free for TCP may be taken for UDP (and the other way
round), so asking for "a free port" and handing it to the server makes a
flaky start. Instead the server binds the pair itself: UDP on a port the
system picks, then TCP on the same number, trying another when that one is
taken; it prints the numbers it got on its C{READY} line, and
L{running_dns_server} reads them.

The server scripts import this module as C{dns_ports} (their own
directory is on their path); the tests as C{tests.integration.dns_ports}.
Only L{listen_udp_and_tcp} needs Twisted, and imports it when called.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

#: How many system-picked UDP ports to try before giving up: each fails
#: only when another process holds the same number for TCP.
ATTEMPTS = 50


def listen_udp_and_tcp(reactor: Any, factory: Any, port: int = 0) -> int:
    """
    Serve the DNS C{factory} (a L{twisted.names.server.DNSServerFactory})
    on 127.0.0.1 over UDP and TCP on one port number.

    @param port: that number; C{0}: one free for both, picked here.
    @return: the port number.
    @raise twisted.internet.error.CannotListenError: when C{port} is taken
        for either, or no free pair is found.
    """
    from twisted.internet.error import CannotListenError
    from twisted.names import dns

    last_error: CannotListenError | None = None
    for _ in range(ATTEMPTS if port == 0 else 1):
        udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        number = udp.getHost().port
        try:
            reactor.listenTCP(number, factory, interface="127.0.0.1")
        except CannotListenError as e:
            udp.stopListening()
            last_error = e
            continue
        return number
    assert last_error is not None
    raise last_error


def ready_line(ports: list[int]) -> str:
    """
    What a server prints once it listens: C{READY} and its port numbers.
    """
    return " ".join(["READY"] + [str(port) for port in ports])


class DNSServerProcess:
    """
    A DNS server this test run started.

    @ivar process: its process.
    @ivar ports: the port numbers its C{READY} line gave, in its order.
    """

    def __init__(self, process: subprocess.Popen, ports: list[int]) -> None:
        self.process = process
        self.ports = ports


@contextmanager
def running_dns_server(script: str, config: dict, path: str) -> Iterator[DNSServerProcess]:
    """
    Run the server C{script} (a file name in this directory) with
    C{config} written as JSON to C{path}, until the block ends; it is
    stopped by its PID also when the block fails.

    @raise RuntimeError: when it does not print its C{READY} line.
    """
    from tests.integration.support import stop_process

    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        words = process.stdout.readline().split()
        if not words or words[0] != b"READY":
            stop_process(process)
            raise RuntimeError(f"{script} did not start: {process.stderr.read()!r}")
        yield DNSServerProcess(process, [int(word) for word in words[1:]])
    finally:
        stop_process(process)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
