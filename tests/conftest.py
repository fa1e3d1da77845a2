"""Shared fixtures.

`fp` runs a test against both fast-path implementations: the Cython extension and its
pure-Python twin.  The extension must be built (``make build``); a missing extension is
a failure, not a skip, so CI cannot go green on the reference alone.
"""
import importlib

import pytest

from hypernat.lab.preflight import netns_unavailable_reason


@pytest.fixture(params=["cython", "python"])
def fp(request):
    if request.param == "cython":
        return importlib.import_module("hypernat._fastpath")
    return importlib.import_module("hypernat.fastpath_py")


def pytest_collection_modifyitems(config, items):
    reason = netns_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)
