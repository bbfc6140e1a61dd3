"""Testing support for snapdriver backends: the conformance suite and real-filesystem helpers.

``pytest`` loads :mod:`snapdriver.testing.plugin` automatically once snapdriver is installed, so a
backend's test module needs only::

    from snapdriver.testing import Conformance

    class TestMine(Conformance):
        backend = "mine"
"""

from snapdriver.testing.conformance import Conformance, Plugin, random_content
from snapdriver.testing.process import PluginProcess

__all__ = ["Conformance", "Plugin", "PluginProcess", "random_content"]
