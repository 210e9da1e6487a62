"""
The Redis store through Sentinel where everything wants a password: the
servers' C{default} user has one and pfxpold logs in as an ACL user allowed
only its keys and commands (C{username}, C{password_file}); the sentinels
want one too, and pfxpold asks them as an ACL user of their own allowed
only to ask for the master and hear of failovers (C{sentinel_username},
C{sentinel_password_file}). Counting works, and a failover is followed.
"""

from __future__ import annotations

import os

from tests.integration.redis_groups import (
    MASTER_NAME,
    GroupCredentials,
    counted,
    redis_cli,
    running_sentinel_group,
    wait_until,
)
from tests.integration.support import running_daemon
from tests.integration.test_state_stores import ask, poll, quota_config, unique

ON_ERROR = "451 4.3.0 quota store unavailable"


def test_acl_users_on_servers_and_sentinels(tmp_path: os.PathLike) -> None:
    """
    Without a login the servers and the sentinels refuse; with the store's
    C{username}/C{password_file} and C{sentinel_username}/
    C{sentinel_password_file}, pfxpold finds the master, counts to the
    limit as its ACL user, and after C{SENTINEL FAILOVER} counts on the new
    master (its sentinel user may subscribe to the announcements). With a
    wrong sentinel password no master is found: on_error, and the reason
    logged.
    """
    credentials = GroupCredentials()
    directory = os.fspath(tmp_path)
    with running_sentinel_group(tmp_path, credentials) as group:
        sentinel = group.sentinels[0].port
        old = group.master_port()
        asked = redis_cli(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME, check=False)
        assert "NOAUTH" in asked, asked
        assert "NOAUTH" in redis_cli(old, "GET", "x", check=False)
        # The ACL users may do only what pfxpold does.
        assert "NOPERM" in redis_cli(
            old, "--user", credentials.user, "--pass", credentials.password,
            "--no-auth-warning", "GET", "elsewhere", check=False,
        )  # fmt: skip
        assert "NOPERM" in redis_cli(
            sentinel, "--user", credentials.sentinel_user, "--pass", credentials.sentinel_password,
            "--no-auth-warning", "SENTINEL", "FAILOVER", MASTER_NAME, check=False,
        )  # fmt: skip

        secrets = {}
        for name, value in (
            ("redis.secret", credentials.password),
            ("sentinel.secret", credentials.sentinel_password),
        ):
            secrets[name] = os.path.join(directory, name)
            with open(secrets[name], "w") as f:
                f.write(value + "\n")
        listed = ", ".join(f'"{address}"' for address in group.sentinel_addresses)
        store = (
            '[stores.main]\ntype = "redis"\n'
            f'sentinels = [{listed}]\nmaster_name = "{MASTER_NAME}"\n'
            f'username = "{credentials.user}"\npassword_file = "{secrets["redis.secret"]}"\n'
            f'sentinel_username = "{credentials.sentinel_user}"\n'
            f'sentinel_password_file = "{secrets["sentinel.secret"]}"\n'
            "timeout = 1.0\n"
        )
        user = unique("acl")
        admin = credentials.admin_password
        with running_daemon(tmp_path, quota_config(store, 3)) as daemon:
            assert [ask(daemon, user) for _ in range(4)] == ["OK"] * 3 + [
                "REJECT 5.7.1 quota day of 3 reached"
            ]
            assert counted(old, user, admin) == 3
            group.cli(sentinel, "SENTINEL", "FAILOVER", MASTER_NAME)
            wait_until(lambda: group.master_port() != old, 20, "the failover")
            new = group.master_port()
            # Heard through the sentinel user's subscription.
            assert poll(lambda: "the sentinels switched the master" in daemon.log(), 20)
            assert poll(lambda: ask(daemon, unique("acl-probe")) == "OK", 20)
            after = unique("acl-after")
            assert [ask(daemon, after) for _ in range(4)] == ["OK"] * 3 + [
                "REJECT 5.7.1 quota day of 3 reached"
            ]
            assert counted(new, after, admin) == 3
            log = daemon.log()
        assert "authentication failed" not in log and "NOPERM" not in log, log[-3000:]

        with open(secrets["sentinel.secret"], "w") as f:
            f.write("wrong\n")
        with running_daemon(tmp_path, quota_config(store, 3)) as daemon:
            assert poll(lambda: "no sentinel named the master" in daemon.log(), 20)
            assert ask(daemon, unique("acl")) == ON_ERROR
            log = daemon.log()
        assert "WRONGPASS" in log, log[-3000:]
