"""
C{pfxpold-query}: send one policy request to a running pfxpold (or any
Postfix policy server) and print the action, to try a rule from the shell.

    pfxpold-query --sender alice@example.com --client-address 192.0.2.1 \\
        --recipient bob@example.net
    pfxpold-query --server unix:/run/pfxpold.sock request.txt
    printf 'sender=a@b.example\\n\\n' | pfxpold-query -
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from importlib import resources
from typing import Optional

# A one-shot command imports only the standard library: no Twisted, no
# pfxpold.testing (trial) or pfxpold.config (the chain, every check type).

#: The options that set one attribute each, and the attribute they set.
_ATTRIBUTE_OPTIONS = (
    "sender",
    "recipient",
    "client_address",
    "client_name",
    "reverse_client_name",
    "helo_name",
    "sasl_username",
    "sasl_method",
    "protocol_state",
    "instance",
    "recipient_count",
    "size",
    "queue_id",
)


def _parse(data: bytes) -> dict[str, str]:
    """
    The attributes of one request's C{name=value} lines (the empty line is
    optional), as L{pfxpold.testing.parse_request} reads them.
    """
    attributes = {}
    for line in data.decode("utf-8").splitlines():
        if line:
            name, _, value = line.partition("=")
            attributes[name] = value
    return attributes


def _template() -> dict[str, str]:
    """
    A Postfix 3.7 RCPT request with every attribute present and unknown,
    the way Postfix sends what it does not know.
    """
    rcpt = resources.files("pfxpold").joinpath("fixtures", "rcpt.txt").read_bytes()
    attributes = {name: "" for name in _parse(rcpt)}
    attributes.update(
        request="smtpd_access_policy",
        protocol_state="RCPT",
        protocol_name="ESMTP",
        client_name="unknown",
        reverse_client_name="unknown",
        recipient_count="0",
        size="0",
        encryption_keysize="0",
        instance=f"{os.getpid():x}.query.0",
    )
    return attributes


def request_attributes(
    arguments: argparse.Namespace, stdin: Optional[bytes] = None
) -> dict[str, str]:
    """
    The attributes of the request the command line describes (the options
    of L{add_request_arguments}): a request file or a Postfix 3.7 RCPT
    template, then the options over it. Shared with C{pfxpold-explain}.

    @raise ValueError: for an attribute that would break the protocol.
    @raise OSError: when the request file cannot be read.
    """
    if arguments.request_file is not None:
        if arguments.request_file == "-":
            data = stdin if stdin is not None else sys.stdin.buffer.read()
        else:
            with open(arguments.request_file, "rb") as f:
                data = f.read()
        attributes = _parse(data)
    else:
        attributes = _template()
    for option in _ATTRIBUTE_OPTIONS:
        value = getattr(arguments, option)
        if value is not None:
            attributes[option] = value
    for pair in arguments.attribute:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"--attribute {pair!r} is not name=value")
        attributes[name] = value
    for name, value in attributes.items():
        if "\n" in name or "\n" in value or "=" in name or not name:
            raise ValueError(f"attribute {name!r} has a newline or a bad name")
    return attributes


def build_request(arguments: argparse.Namespace, stdin: Optional[bytes] = None) -> bytes:
    """
    The request bytes the command line describes.

    @raise ValueError: for an attribute that would break the protocol.
    """
    attributes = request_attributes(arguments, stdin)
    lines = [f"{name}={value}\n" for name, value in attributes.items()]
    return ("".join(lines) + "\n").encode("utf-8")


def _connect(server: str, timeout: float) -> socket.socket:
    if server.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(server[len("unix:") :])
        return sock
    if server.startswith("inet:"):
        server = server[len("inet:") :]
    host, _, port = server.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return socket.create_connection((host, int(port)), timeout=timeout)


def query(server: str, request: bytes, timeout: float = 30.0) -> Optional[str]:
    """
    Send C{request} and read the reply.

    @return: the action (the value after C{action=}), or L{None} when the
        server closed the connection without answering.
    """
    with _connect(server, timeout) as sock:
        sock.sendall(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return None
            reply += chunk
    first = reply.split(b"\n", 1)[0].decode("utf-8", "replace")
    name, _, value = first.partition("=")
    if name != "action":
        raise ValueError(f"the server answered {first!r}, not action=...")
    return value


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Add the options that describe a request (a request file, one option
    per common attribute, C{--attribute}) to C{parser}: C{pfxpold-query}'s
    and C{pfxpold-explain}'s.
    """
    parser.add_argument(
        "request_file",
        nargs="?",
        help="a file of name=value lines (- for standard input); options below override it",
    )
    for option in _ATTRIBUTE_OPTIONS:
        parser.add_argument("--" + option.replace("_", "-"), dest=option, metavar="VALUE")
    parser.add_argument(
        "--attribute",
        "-a",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other attribute; may be repeated",
    )


def make_parser() -> argparse.ArgumentParser:
    """
    The command line of C{pfxpold-query}.
    """
    parser = argparse.ArgumentParser(
        prog="pfxpold-query",
        description="Send one Postfix policy request and print the action.",
    )
    parser.add_argument(
        "--server",
        "-s",
        default="127.0.0.1:9998",
        help="host:port, [ipv6]:port or unix:/path (default: 127.0.0.1:9998)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    add_request_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run C{pfxpold-query}.

    @return: the exit status: 0 with an answer, 1 when the server closed
        the connection without one, 2 when it could not be asked.
    """
    parser = make_parser()
    arguments = parser.parse_args(argv)
    try:
        request = build_request(arguments)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        action = query(arguments.server, request, arguments.timeout)
    except (OSError, ValueError) as e:
        print(f"pfxpold-query: {arguments.server}: {e}", file=sys.stderr)
        return 2
    if action is None:
        print(
            f"pfxpold-query: {arguments.server} closed the connection without an answer",
            file=sys.stderr,
        )
        return 1
    print(action)
    return 0


if __name__ == "__main__":
    sys.exit(main())
