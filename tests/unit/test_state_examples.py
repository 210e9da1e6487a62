"""
The quota and greylist sample configurations: the files in examples/ load
and build what they say, and the README shows them exactly as shipped.
"""

from __future__ import annotations

import os
import re
import tomllib

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pfxpold.checks.greylist import GreylistCheck
from pfxpold.checks.quota import QuotaCheck
from pfxpold.config import load_configuration, load_document
from pfxpold.state.redis import RedisStore
from pfxpold.state.sqlite import SQLiteStore

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPOSITORY, "examples")


def load(name: str):
    return load_configuration(os.path.join(EXAMPLES, name), Clock())


class StateExampleTests(SynchronousTestCase):
    """
    examples/quota.toml, examples/quota-redis.toml, examples/greylist.toml,
    examples/quota-redis-sentinel.toml, examples/quota-redis-cluster.toml.
    """

    def test_quota_sqlite_default(self) -> None:
        """
        quota.toml counts in the default SQLite store beside the file, with
        the overrides file read.
        """
        configuration = load("quota.toml")
        [entry] = configuration.chain.entries
        self.assertIsInstance(entry.check, QuotaCheck)
        self.assertIsInstance(entry.check.store, SQLiteStore)
        self.assertEqual(entry.check.store.path, os.path.join(EXAMPLES, "pfxpold-state.sqlite3"))
        self.assertEqual(entry.check.overrides["alice"], {"hour": 200, "day": 2000})
        self.assertIsNone(entry.check.overrides["billing-app"])
        self.assertIn(entry.check.store, configuration.services)

    def test_redis_shared(self) -> None:
        """
        quota-redis.toml: the greylist and the quota share one Redis store,
        started once with the daemon.
        """
        configuration = load("quota-redis.toml")
        greylist, quota = (entry.check for entry in configuration.chain.entries)
        self.assertIsInstance(greylist, GreylistCheck)
        self.assertIsInstance(quota, QuotaCheck)
        self.assertIsInstance(quota.store, RedisStore)
        self.assertIs(quota.store, greylist.store)
        self.assertEqual(configuration.services.count(quota.store), 1)

    def test_redis_sentinel_and_cluster(self) -> None:
        """
        quota-redis-sentinel.toml and quota-redis-cluster.toml build Redis
        stores in Sentinel and Cluster mode, shared by their two checks.
        """
        for name, mode in (
            ("quota-redis-sentinel.toml", "sentinel"),
            ("quota-redis-cluster.toml", "cluster"),
        ):
            greylist, quota = (entry.check for entry in load(name).chain.entries)
            self.assertIsInstance(quota.store, RedisStore)
            self.assertEqual(quota.store.settings.mode, mode)
            self.assertIs(quota.store, greylist.store)

    def test_greylist(self) -> None:
        """
        greylist.toml builds a greylist on SQLite with its header.
        """
        [entry] = load("greylist.toml").chain.entries
        self.assertIsInstance(entry.check, GreylistCheck)
        self.assertIsInstance(entry.check.store, SQLiteStore)
        self.assertTrue(entry.check.header)

    def test_readme_matches_examples(self) -> None:
        """
        Every TOML sample in the README's store, quota and greylist sections
        is the end of one of the example files, and loads as pasted.
        """
        with open(os.path.join(REPOSITORY, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        start = readme.index("### State stores")
        end = readme.index("\n## ", start)
        blocks = re.findall(r"```toml\n(.*?)```", readme[start:end], re.DOTALL)
        self.assertEqual(len(blocks), 6)
        examples = {}
        for name in (
            "quota.toml",
            "quota-redis.toml",
            "greylist.toml",
            "quota-redis-sentinel.toml",
            "quota-redis-cluster.toml",
            "quota-redis-degraded.toml",
        ):
            with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
                examples[name] = f.read()
        for block in blocks:
            self.assertTrue(any(text.endswith(block) for text in examples.values()), block[:200])
            configuration = load_document(
                tomllib.loads(block), Clock(), os.path.join(EXAMPLES, "pasted.toml")
            )
            self.assertTrue(configuration.chain.entries)
