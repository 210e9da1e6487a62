"""
Tests for the twistd dropin, C{twisted/plugins/pfxpold_plugin.py}.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import pfxpold.tap


class DropinTests(SynchronousTestCase):
    """
    twistd finds pfxpold through Twisted's plugin system.
    """

    def find(self):
        from twisted import plugins

        found = [
            maker for maker in getPlugins(IServiceMaker, plugins) if maker.tapname == "pfxpold"
        ]
        self.assertEqual(len(found), 1, "the pfxpold dropin is not found exactly once")
        return found[0]

    def test_found(self):
        """getPlugins(IServiceMaker) finds a verified pfxpold service maker."""
        maker = self.find()
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertTrue(verifyObject(IPlugin, maker))
        self.assertEqual(maker.tapname, "pfxpold")
        self.assertIn("policy", maker.description)

    def test_options_and_service_maker(self):
        """Its options are pfxpold.tap.Options and it makes the service with tap.makeService."""
        maker = self.find()
        self.assertIs(maker.options, pfxpold.tap.Options)
        self.assertEqual(maker.module, "pfxpold.tap")
        self.assertIs(maker.makeService, pfxpold.tap.makeService)

    def test_dropin_is_lazy(self):
        """The dropin module itself imports neither pfxpold.tap nor the reactor."""
        import ast
        import os

        from twisted import plugins

        path = next(
            os.path.join(directory, "pfxpold_plugin.py")
            for directory in plugins.__path__
            if os.path.exists(os.path.join(directory, "pfxpold_plugin.py"))
        )
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        self.assertEqual(imported, {"twisted.application.service"})
