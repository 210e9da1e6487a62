"""
The C{sql} check in a real pfxpold daemon against a real SQLite database
and a real PostgreSQL server: the relay-ACL samples of examples/, hostile
senders, a database restart, a database that is down, and one that does not
answer at all.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest

from pfxpold.query import build_request, make_parser, query
from tests.integration.deployment import readme_block
from tests.integration.support import REPOSITORY, running_daemon

EXAMPLES = os.path.join(REPOSITORY, "examples")
REJECT = (
    "REJECT Sorry, this combination of sender and originating system does not match"
    " any of my policies."
)
DEFER = "DEFER Transient internal error. Please try again later."
ALLOWED = {
    "client_address": "192.0.2.10",
    "client_name": "unknown",
    "sender": "scanner@example.com",
}
UNKNOWN = {
    "client_address": "198.51.100.7",
    "client_name": "unknown",
    "sender": "scanner@example.com",
}

#: Senders that would change the query if they were put into its text.
HOSTILE_SENDERS = [
    "x'; DROP TABLE relay_acl; --@example.com",
    "scanner@example.com' OR '1'='1",
    "' OR 1=1 --",
    "\\'; DELETE FROM relay_acl; --@example.com",
    'a\\"b@example.com',
    "%s%%s%(sender)s@example.com",
    ":sender@example.com",
    "$1$$@example.com",
    "ünï©ødé@exämple.com",
    "scanner@example.com\x00",
    "\x00'; DROP TABLE relay_acl; --",
    # Allowed by every row if a backslash were taken to escape the quote
    # where the server does not (MySQL's NO_BACKSLASH_ESCAPES).
    "\\')) OR 1=1 -- @example.com",
    "\\'/**/OR/**/'1'='1@example.com",
    "scanner@example.com\\' # comment",
]


def example(name: str) -> str:
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return f.read()


def replaced(text: str, *pairs: tuple[str, str]) -> str:
    """
    C{text} with each C{(old, new)} replaced; each C{old} must be there.
    """
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    return text


def make_sqlite_database(path: str) -> None:
    connection = sqlite3.connect(path)
    connection.executescript(example("relay-acl.sql"))
    connection.close()


def sqlite_rows(path: str) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT count(*) FROM relay_acl").fetchone()[0]
    finally:
        connection.close()


def sqlite_config(tmp_path) -> str:
    """
    examples/relay-acl-sqlite.toml beside a database made as its comment
    says.
    """
    make_sqlite_database(os.path.join(tmp_path, "relay-acl.sqlite"))
    return example("relay-acl-sqlite.toml")


def uncached(text: str) -> str:
    """
    An example's configuration C{text} with its cache TTLs set to 0.
    """
    return replaced(
        text,
        ("cache_positive_ttl = 60.0", "cache_positive_ttl = 0.0"),
        ("cache_negative_ttl = 10.0", "cache_negative_ttl = 0.0"),
    )


def postgresql_config(server, port: int = 0, cache: bool = False) -> str:
    """
    examples/relay-acl-postgresql.toml pointed at the test server, with
    shorter timeouts, and without its cache unless C{cache}.
    """
    text = replaced(
        example("relay-acl-postgresql.toml"),
        ("host=127.0.0.1 port=5432 dbname=pfxpold user=pfxpold", server.conninfo(port=port)),
        ("query_timeout = 3.0", "query_timeout = 1.5"),
        ("connect_timeout = 3.0", "connect_timeout = 2.0"),
        ("timeout = 5.0", "timeout = 3.0"),
        ("pool_size = 4", "pool_size = 3"),
    )
    return text if cache else uncached(text)


def readme_answers() -> list[tuple[list[str], str]]:
    """
    The README's relay-ACL requests (C{pfxpold-query} command lines) and
    the answers it shows under them.
    """
    lines = readme_block("relay-acl-answers").splitlines()
    assert len(lines) % 2 == 0 and lines, lines
    answers = []
    for command, answer in zip(lines[::2], lines[1::2], strict=True):
        arguments = shlex.split(command)
        assert arguments[0] == "pfxpold-query" and answer.startswith("# "), (command, answer)
        answers.append((arguments[1:], answer[2:]))
    return answers


def check_readme_answers(port: int) -> None:
    """
    Ask the daemon on C{port} the README's relay-ACL requests as
    C{pfxpold-query} builds them; each gets the answer the README shows.
    """
    for arguments, answer in readme_answers():
        parsed = make_parser().parse_args(arguments + ["--server", f"127.0.0.1:{port}"])
        assert query(parsed.server, build_request(parsed), 10.0) == answer, arguments


def ask_until(client, request, expected: str, timeout: float = 20.0) -> list[str]:
    """
    Ask C{request} until the answer is C{expected}, within C{timeout}.

    @return: every answer seen.
    """
    deadline = time.monotonic() + timeout
    answers = []
    while True:
        answers.append(client.ask(request))
        if answers[-1] == expected:
            return answers
        assert time.monotonic() < deadline, answers
        time.sleep(0.1)


def test_sqlite_relay_acl(tmp_path):
    """
    The SQLite sample answers the relay-ACL scenario: the README's
    answers; allowed pairs OK (address, domain, host name, IPv6,
    IPv4-mapped), others the REJECT.
    """
    with running_daemon(tmp_path, sqlite_config(tmp_path)) as daemon, daemon.client() as client:
        check_readme_answers(daemon.port)
        assert client.ask(ALLOWED) == "OK"
        assert client.ask({**ALLOWED, "sender": "Scanner@EXAMPLE.com"}) == "OK"
        assert client.ask({**ALLOWED, "client_address": "::ffff:192.0.2.10"}) == "OK"
        assert client.ask(UNKNOWN) == REJECT
        assert client.ask({**ALLOWED, "sender": "other@example.com"}) == REJECT
        assert (
            client.ask({**UNKNOWN, "client_address": "192.0.2.33", "sender": "x@Example.Com"})
            == "OK"
        )
        assert (
            client.ask(
                {**UNKNOWN, "client_address": "2001:DB8:10:0::33", "sender": "y@example.com"}
            )
            == "OK"
        )
        named = {
            **UNKNOWN,
            "client_name": "bulk.MAIL.example.com",
            "sender": "newsletter@example.com",
        }
        assert client.ask(named) == "OK"


def test_sqlite_hostile_senders(tmp_path):
    """
    Senders full of quotes, comments, backslashes, placeholders, NUL and
    non-ASCII are bound, never interpreted: none is allowed, the table is
    intact, and the daemon goes on answering.
    """
    with running_daemon(tmp_path, sqlite_config(tmp_path)) as daemon, daemon.client() as client:
        for sender in HOSTILE_SENDERS:
            assert client.ask({**ALLOWED, "sender": sender}) == REJECT, sender
        assert client.ask(ALLOWED) == "OK"
    assert sqlite_rows(os.path.join(tmp_path, "relay-acl.sqlite")) == 4


def test_sqlite_missing_database(tmp_path):
    """
    A database file that is not there stops the daemon from starting, in
    one line naming the file, check and key, rather than answering the
    on_error DEFER to every request; and it is not created empty (which
    would reject every sender).
    """
    with pytest.raises(RuntimeError) as failed:
        with running_daemon(tmp_path, example("relay-acl-sqlite.toml")):
            pass
    database = os.path.join(tmp_path, "relay-acl.sqlite")
    assert f"check 'relay-acl': key 'database': {database} does not exist" in str(failed.value)
    assert not os.path.exists(database)


def test_postgresql_relay_acl(tmp_path, lookup_postgresql):
    """
    The PostgreSQL sample answers the relay-ACL scenario from a real
    server: the README's answers, and more.
    """
    config = postgresql_config(lookup_postgresql, cache=True)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        check_readme_answers(daemon.port)
        assert client.ask(ALLOWED) == "OK"
        assert client.ask(ALLOWED) == "OK"
        assert client.ask(UNKNOWN) == REJECT
        assert (
            client.ask({**UNKNOWN, "client_address": "192.0.2.33", "sender": "x@example.com"})
            == "OK"
        )
        assert (
            client.ask({**UNKNOWN, "client_address": "2001:db8:10::33", "sender": "x@example.com"})
            == "OK"
        )
        named = {
            **UNKNOWN,
            "client_name": "bulk.mail.example.com",
            "sender": "newsletter@example.com",
        }
        assert client.ask(named) == "OK"


def test_postgresql_hostile_senders(tmp_path, lookup_postgresql):
    """
    Hostile senders are bound as values: none is allowed, the table is
    intact; a NUL (which PostgreSQL text cannot hold) is not looked up at
    all and answers not_found, as with SQLite.
    """
    with (
        running_daemon(tmp_path, postgresql_config(lookup_postgresql)) as daemon,
        daemon.client() as client,
    ):
        for sender in HOSTILE_SENDERS:
            assert client.ask({**ALLOWED, "sender": sender}) == REJECT, sender
        assert client.ask(ALLOWED) == "OK"
    assert lookup_postgresql.execute("SELECT count(*) FROM relay_acl") == [(4,)]


def test_postgresql_restart(tmp_path, lookup_postgresql):
    """
    After the server restarts, every pooled connection is replaced and its
    query retried: no request sees an error.
    """
    config = postgresql_config(lookup_postgresql)
    with running_daemon(tmp_path, config) as daemon:
        clients = [daemon.client() for _ in range(3)]
        try:
            # Concurrent requests open several pooled connections.
            for _ in range(5):
                answers = ask_all(clients, ALLOWED)
                assert answers == ["OK"] * 3
            assert len(lookup_postgresql.backend_pids()) >= 1
            lookup_postgresql.restart()
            for _ in range(5):
                assert ask_all(clients, ALLOWED) == ["OK"] * 3
                assert ask_all(clients, UNKNOWN) == [REJECT] * 3
        finally:
            for client in clients:
                client.close()
    assert "reconnected" in daemon.log()


def ask_all(clients, request) -> list:
    """
    Send C{request} on every client at once, then read every answer.
    """
    from tests.integration.support import encode_request, read_reply

    for client in clients:
        client.sock.sendall(encode_request(request))
    answers = []
    for client in clients:
        reply = read_reply(client.sock)
        answers.append(None if reply is None else reply[len(b"action=") : -2].decode())
    return answers


def test_postgresql_down(tmp_path, lookup_postgresql):
    """
    While the server is down requests get the on_error DEFER; once it is
    back, answers are right again.
    """
    config = postgresql_config(lookup_postgresql)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == "OK"
        lookup_postgresql.stop()
        try:
            assert client.ask(ALLOWED) == DEFER
            assert client.ask(UNKNOWN) == DEFER
        finally:
            lookup_postgresql.start()
        ask_until(client, ALLOWED, "OK")
        assert client.ask(UNKNOWN) == REJECT


def test_postgresql_not_answering(tmp_path, lookup_postgresql):
    """
    A server that stops answering (postmaster and pfxpold's backends
    SIGSTOPped) gives the DEFER within the check's timeout, even for more
    requests than there are pool threads; after SIGCONT the pool is not
    stuck and answers come back.
    """
    config = postgresql_config(lookup_postgresql)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == "OK"
        stopped = [lookup_postgresql.process.pid] + lookup_postgresql.backend_pids()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            # pool_size is 3: five lookups in a row would block them all.
            for _ in range(5):
                assert client.ask(ALLOWED) == DEFER
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        ask_until(client, ALLOWED, "OK")
        assert client.ask(UNKNOWN) == REJECT
        assert "timed out" in daemon.log()
    # twistd ends by re-raising SIGTERM; a daemon stuck on its pool would be
    # SIGKILLed by Daemon.stop.
    assert daemon.process.returncode == -signal.SIGTERM


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """
    A TCP port on 127.0.0.1 that accepts connections and never says a
    word.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        server.close()


def test_postgresql_silent_server(tmp_path, lookup_postgresql, silent_listener):
    """
    A "database" that accepts connections and never answers gives the
    DEFER within the check's timeout, every time, and the daemon still
    stops cleanly.
    """
    config = postgresql_config(lookup_postgresql, port=silent_listener)
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        for _ in range(3):
            assert client.ask(ALLOWED) == DEFER
    # twistd ends by re-raising SIGTERM; a daemon stuck on its pool would be
    # SIGKILLed by Daemon.stop.
    assert daemon.process.returncode == -signal.SIGTERM


SLOW_SQLITE = """
[[check]]
name = "slow"
type = "sql"
database = "relay-acl.sqlite"
# A sender of slow@example.com makes the query count for ever.
query = '''
    SELECT CASE WHEN :sender = 'slow@example.com'
           THEN (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)
                 SELECT count(*) FROM c)
           ELSE 'OK' END
'''
query_timeout = 1.0
timeout = 5.0
on_error = "DEFER Transient internal error. Please try again later."
"""


def test_sqlite_runaway_query_interrupted(tmp_path):
    """
    A query that runs past query_timeout is interrupted: the request gets
    the DEFER, and the single SQLite connection answers the next one.
    """
    make_sqlite_database(os.path.join(tmp_path, "relay-acl.sqlite"))
    with running_daemon(tmp_path, SLOW_SQLITE) as daemon, daemon.client() as client:
        assert client.ask({"sender": "fast@example.com"}) == "OK"
        for _ in range(2):
            assert client.ask({"sender": "slow@example.com"}) == DEFER
            assert client.ask({"sender": "fast@example.com"}) == "OK"


def test_postgresql_casts_percent_and_actions(tmp_path, lookup_postgresql):
    """
    A query with a ::inet cast on a derived value, a literal %, and the
    action in the first column answers from the most specific network.
    """
    lookup_postgresql.execute(
        "CREATE TABLE IF NOT EXISTS client_networks (network cidr PRIMARY KEY, action text);"
        "DELETE FROM client_networks;"
        "INSERT INTO client_networks VALUES"
        " ('192.0.2.0/24', 'REJECT whole network'), ('192.0.2.128/25', 'DEFER_IF_PERMIT half'),"
        " ('2001:db8::/32', 'OK v6 100%')"
    )
    config = f'''
[[check]]
name = "networks"
type = "sql"
driver = "postgresql"
conninfo = "{lookup_postgresql.conninfo()}"
query = """
    SELECT action FROM client_networks
     WHERE :client_ip::inet <<= network AND :sender LIKE '%@%'  -- :not_a_parameter
     ORDER BY masklen(network) DESC LIMIT 1
"""
not_found = "DUNNO"
'''
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        sender = {"sender": "a@example.com"}
        assert client.ask({**sender, "client_address": "192.0.2.1"}) == "REJECT whole network"
        assert (
            client.ask({**sender, "client_address": "::ffff:192.0.2.200"}) == "DEFER_IF_PERMIT half"
        )
        assert client.ask({**sender, "client_address": "2001:db8::25"}) == "OK v6 100%"
        assert client.ask({**sender, "client_address": "198.51.100.1"}) == "DUNNO"
        assert client.ask({"sender": "no-at-sign", "client_address": "192.0.2.1"}) == "DUNNO"
        assert client.ask({**sender, "client_address": "unknown"}) == "DUNNO"


def mariadb_config(
    server, port: int = 0, user: str = "pfxpold", cache: bool = False, **options: str
) -> str:
    """
    examples/relay-acl-mysql.toml as shipped but for the MariaDB test
    server's address and port, its C{user} account (C{options} in the URL's
    query) and its password file; without its cache unless C{cache}.
    """
    text = replaced(
        example("relay-acl-mysql.toml"),
        (
            'url = "mysql://pfxpold@127.0.0.1:3306/pfxpold"',
            f'url = "{server.url(port=port or None, user=user, **options)}"',
        ),
        ('password_file = "relay-acl-mysql.secret"', f'password_file = "{server.password_file}"'),
    )
    return text if cache else uncached(text)


def test_mariadb_example_is_the_readme_one():
    """
    The README's MySQL steps are the example's: the same commands make the
    database (the ones the test server's database is made with), the
    README's TOML block is the example's check, and the sample secret is a
    placeholder.
    """
    from tests.integration.lookup_mariadb import CREATE_DATABASE

    steps = readme_block("relay-acl-mysql-steps").splitlines()
    shipped = example("relay-acl-mysql.toml")
    assert steps[:2] == [f'mariadb -e "{CREATE_DATABASE}"', "mariadb pfxpold < relay-acl.sql"]
    for step in steps:
        assert f"#   {step}\n" in shipped, step
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    check = shipped[shipped.index("[[check]]") :]
    assert f"```toml\n{check}```\n" in readme
    assert example("relay-acl-mysql.secret") == "change-me\n"


def test_mariadb_readme_steps_as_printed(tmp_path):
    """
    The README's MySQL steps, run as printed by a shell in a copy of
    examples/ on a server with no pfxpold account yet (C{mariadb} being
    Debian's client as the administrator), make a database and an account
    that examples/relay-acl-mysql.toml, with only its port changed, reads
    with the password the steps put in from relay-acl-mysql.secret.
    """
    import secrets
    import shutil
    import subprocess

    from tests.integration.lookup_mariadb import MariaDBServer

    steps = readme_block("relay-acl-mysql-steps").splitlines()
    assert steps[-1] == "twistd -n pfxpold --config relay-acl-mysql.toml"
    server = MariaDBServer(accounts=False)
    try:
        server.start()
        shutil.copy(os.path.join(EXAMPLES, "relay-acl.sql"), tmp_path)
        # Letters, digits, - and _: the README says the step puts the
        # password between SQL quotes.
        password = secrets.token_urlsafe(18)
        (tmp_path / "relay-acl-mysql.secret").write_text(password + "\n")
        client = (
            f"/usr/bin/mariadb --no-defaults --socket={shlex.quote(server.socket)}"
            f" --user={shlex.quote(server.admin)}"
        )
        script = f'set -e\nmariadb() {{ {client} "$@"; }}\n' + "\n".join(steps[:-1]) + "\n"
        ran = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, ran.stderr
        config = replaced(
            example("relay-acl-mysql.toml"),
            ("@127.0.0.1:3306/", f"@127.0.0.1:{server.port}/"),
        )
        with running_daemon(tmp_path, uncached(config)) as daemon:
            check_readme_answers(daemon.port)
        # The account reads the database and nothing else.
        grants = server.execute("SHOW GRANTS FOR pfxpold@'127.0.0.1'", None)
        assert [row[0].split(" IDENTIFIED")[0] for row in grants] == [
            "GRANT USAGE ON *.* TO `pfxpold`@`127.0.0.1`",
            "GRANT SELECT ON `pfxpold`.* TO `pfxpold`@`127.0.0.1`",
        ]
    finally:
        server.cleanup()


def test_mariadb_relay_acl(tmp_path, lookup_mariadb):
    """
    examples/relay-acl-mysql.toml as shipped (its cache too), with the
    table loaded from examples/relay-acl.sql by the mariadb client, gives
    the README's answers from a real MariaDB server, and more.
    """
    with (
        running_daemon(tmp_path, mariadb_config(lookup_mariadb, cache=True)) as daemon,
        daemon.client() as client,
    ):
        check_readme_answers(daemon.port)
        assert client.ask(ALLOWED) == "OK"
        assert client.ask({**ALLOWED, "client_address": "::ffff:192.0.2.10"}) == "OK"
        assert client.ask(UNKNOWN) == REJECT
        # Exact, as on SQLite and PostgreSQL: accents are not folded.
        assert client.ask({**ALLOWED, "sender": "scännér@example.com"}) == REJECT


def test_mariadb_hostile_senders(tmp_path, lookup_mariadb):
    """Hostile senders are escaped values, never SQL: none allowed, the table intact."""
    with (
        running_daemon(tmp_path, mariadb_config(lookup_mariadb)) as daemon,
        daemon.client() as client,
    ):
        for sender in HOSTILE_SENDERS:
            assert client.ask({**ALLOWED, "sender": sender}) == REJECT, sender
        assert client.ask(ALLOWED) == "OK"
    assert lookup_mariadb.execute("SELECT count(*) FROM relay_acl") == [(4,)]


@pytest.fixture
def no_backslash_escapes(lookup_mariadb) -> Iterator[None]:
    """
    The MariaDB test server in C{sql_mode} C{NO_BACKSLASH_ESCAPES} (a
    backslash is an ordinary character in quoted text) for new sessions,
    restored afterwards.
    """
    [(mode,)] = lookup_mariadb.execute("SELECT @@GLOBAL.sql_mode")
    lookup_mariadb.execute(
        "SET GLOBAL sql_mode = %s", params=(",".join([mode, "NO_BACKSLASH_ESCAPES"]).strip(","),)
    )
    try:
        yield
    finally:
        lookup_mariadb.execute("SET GLOBAL sql_mode = %s", params=(mode,))


MODE_CHECK = """
[[check]]
name = "mode"
type = "sql"
{settings}
query = "SELECT 'OK backslashes are plain' FROM DUAL WHERE @@SESSION.sql_mode LIKE '%NO_BACKSLASH_ESCAPES%'"
not_found = "REJECT backslashes escape"
"""


#: The relay ACL as a key-list query: hostile values in lists and ranks.
KEY_LIST_CHECK = """
[[check]]
name = "keys"
type = "sql"
{settings}
query = '''
    SELECT concat('OK ', address) FROM relay_acl
     WHERE origin IN (:client_address_keys) AND address IN (:sender_keys, :sender_at_domain_keys)
     ORDER BY :sender_keys_rank(address), :sender_at_domain_keys_rank(address)
     LIMIT 1
'''
"""


def test_mariadb_hostile_senders_no_backslash_escapes(
    tmp_path, lookup_mariadb, no_backslash_escapes
):
    """
    With sql_mode NO_BACKSLASH_ESCAPES (which pfxpold's sessions do get),
    the hostile senders are still values, never SQL: none is allowed,
    neither by the relay ACL nor by a key-list query (values in lists and
    in ranks), and the table is unchanged.
    """
    rows = lookup_mariadb.execute("SELECT origin, address FROM relay_acl ORDER BY 1, 2")
    mode = MODE_CHECK.format(settings=lookup_mariadb.settings())
    with running_daemon(tmp_path, mode) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == "OK backslashes are plain"
    with (
        running_daemon(tmp_path, mariadb_config(lookup_mariadb)) as daemon,
        daemon.client() as client,
    ):
        for sender in HOSTILE_SENDERS:
            assert client.ask({**ALLOWED, "sender": sender}) == REJECT, sender
            assert client.ask({**UNKNOWN, "sender": sender}) == REJECT, sender
        assert client.ask(ALLOWED) == "OK"
    keys = KEY_LIST_CHECK.format(settings=lookup_mariadb.settings())
    with running_daemon(tmp_path, keys) as daemon, daemon.client() as client:
        for sender in HOSTILE_SENDERS:
            assert client.ask({**ALLOWED, "sender": sender}) == "DUNNO", sender
        assert client.ask(ALLOWED) == "OK scanner@example.com"
    assert lookup_mariadb.execute("SELECT origin, address FROM relay_acl ORDER BY 1, 2") == rows
    assert len(rows) == 4


#: A small table of networks and parent domains. Each more specific row
#: sorts after a less specific one that also matches (in the primary key's
#: order too), so that only the query's ORDER BY finds the right one.
KEY_LIST_ROWS = [
    ("192.0.2.0/24", "REJECT network"),
    ("192.0.2.10", "OK host"),
    ("192.0.2.128/25", "DEFER_IF_PERMIT upper half"),
    ("2001:db8::/32", "DEFER_IF_PERMIT v6"),
    ("2001:db8:1::/48", "REJECT v6 site"),
    ("example.com", "REJECT domain"),
    ("mail.example.com", "OK mail domain"),
]


def readme_client_access() -> str:
    """
    The README's key-list example (the TOML block after its
    C{client-access} comment), as printed.
    """
    with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = re.search(r"<!-- client-access[: ].*?-->\n```toml\n(.*?)```\n", text, re.S)
    assert found is not None, "README.md has no TOML block after <!-- client-access -->"
    return found.group(1)


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mysql"])
def test_key_lists(tmp_path, request, database):
    """
    The README's key-list query, as printed (only the database it names
    changed for PostgreSQL and MariaDB), matches network rows and
    parent-domain rows of one table, the most specific first, on SQLite,
    PostgreSQL and MariaDB alike.
    """
    create = (
        "CREATE TABLE client_access (origin VARCHAR(255) PRIMARY KEY, action VARCHAR(255) NOT NULL)"
    )
    config = readme_client_access()
    if database == "sqlite":
        connection = sqlite3.connect(os.path.join(tmp_path, "client-access.sqlite"))
        connection.execute(create)
        connection.executemany("INSERT INTO client_access VALUES (?, ?)", KEY_LIST_ROWS)
        connection.commit()
        connection.close()
    else:
        server = request.getfixturevalue(f"lookup_{'mariadb' if database == 'mysql' else database}")
        server.execute("DROP TABLE IF EXISTS client_access")
        server.execute(create)
        for row in KEY_LIST_ROWS:
            server.execute("INSERT INTO client_access VALUES (%s, %s)", params=row)
        if database == "postgresql":
            where = f'driver = "postgresql"\nconninfo = "{server.conninfo()}"\n'
        else:
            where = server.settings()
        config = replaced(config, ('database = "client-access.sqlite"\n', where))
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        other = {"sender": "a@other.example.org"}
        assert client.ask({**other, "client_address": "192.0.2.10"}) == "OK host"
        assert client.ask({**other, "client_address": "::ffff:192.0.2.11"}) == "REJECT network"
        assert (
            client.ask({**other, "client_address": "192.0.2.200"}) == "DEFER_IF_PERMIT upper half"
        )
        assert client.ask({**other, "client_address": "2001:db8:2::5"}) == "DEFER_IF_PERMIT v6"
        assert client.ask({**other, "client_address": "2001:DB8:1::5"}) == "REJECT v6 site"
        elsewhere = {"client_address": "10.0.0.1"}
        assert client.ask({**elsewhere, "sender": "x@Example.com"}) == "REJECT domain"
        assert client.ask({**elsewhere, "sender": "x@www.example.com"}) == "REJECT domain"
        assert client.ask({**elsewhere, "sender": "x@a.mail.example.com"}) == "OK mail domain"
        assert client.ask({**elsewhere, "sender": "x@mail.example.com"}) == "OK mail domain"
        # A client row wins over a domain row.
        assert client.ask({"client_address": "192.0.2.10", "sender": "x@example.com"}) == "OK host"
        assert client.ask({**other, "client_address": "10.0.0.1"}) == "DUNNO"
        assert client.ask({**other, "client_address": "unknown"}) == "DUNNO"
        assert client.ask({"client_address": "10.0.0.1", "sender": ""}) == "DUNNO"


def test_mariadb_unreachable(tmp_path, lookup_mariadb, silent_listener):
    """A MySQL server that never answers gives the on_error DEFER, and the daemon stops."""
    config = replaced(
        mariadb_config(lookup_mariadb, port=silent_listener), ("timeout = 5.0", "timeout = 3.0")
    )
    with running_daemon(tmp_path, config) as daemon, daemon.client() as client:
        assert client.ask(ALLOWED) == DEFER
    assert daemon.process.returncode == -signal.SIGTERM
