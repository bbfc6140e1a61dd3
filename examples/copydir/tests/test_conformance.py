"""The whole conformance suite for the example backend: one class."""

from snapdriver.testing import Conformance


class TestCopyDir(Conformance):
    backend = "copydir"
