"""Can the namespace testbed run here?  One answer for the demo, the CLI and the tests."""
from __future__ import annotations

import os
import shutil


def netns_unavailable_reason() -> str | None:
    """Why network-namespace work cannot run on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed (tools/install-deps.sh)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    return None
