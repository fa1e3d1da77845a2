"""Shared fixtures.

`fp` runs a test against both fast-path implementations: the Cython extension and its
pure-Python twin.  The extension must be built (``make build``); a missing extension is
a failure, not a skip, so CI cannot go green on the reference alone.
"""
import importlib
import os
import shutil

import pytest


@pytest.fixture(params=["cython", "python"])
def fp(request):
    if request.param == "cython":
        return importlib.import_module("hypernat._fastpath")
    return importlib.import_module("hypernat.fastpath_py")


def netns_unavailable_reason():
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if not os.path.exists("/proc/self/ns/net"):
        return "kernel without network namespaces"
    return None


def pytest_collection_modifyitems(config, items):
    reason = netns_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)
