"""
A private syslog socket for the benchmark's C{-syslog} scenarios, so that
pfxpold's mail-facility observer (C{PFXPOLD_SYSLOG_SOCKET}) never writes
to the machine's real syslog during a run.

Usage: C{python3 bench/syslog_sink.py SOCKET_PATH OUTPUT_FILE}: binds a
datagram socket at SOCKET_PATH (as C{/dev/log} is) and appends each message
received to OUTPUT_FILE, one a line, until SIGTERM. Its CPU is not the
daemon's: the benchmark counts only the daemon's processes, as journald's
or rsyslog's CPU would not be pfxpold's either.
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def main() -> None:
    path, output = sys.argv[1], sys.argv[2]
    if os.path.exists(path):
        os.unlink(path)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # Room for bursts (the daemon writes a second's lines at once), as
    # journald asks for its own socket.
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    receiver.bind(path)
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(0))
    # Written out whenever nothing came for a moment, so that start-up
    # lines can be waited for, and in large writes under load.
    receiver.settimeout(0.2)
    with open(output, "ab", buffering=1 << 20) as f:
        try:
            while True:
                try:
                    f.write(receiver.recv(65536) + b"\n")
                except TimeoutError:
                    f.flush()
        finally:
            receiver.close()
            os.unlink(path)


if __name__ == "__main__":
    main()
