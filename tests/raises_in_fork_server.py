"""A workflow module that cannot be imported in the local backend's fork server (only there):
tests/test_local_backend.py checks that it does not end the fork server. Elsewhere it is the
tiny third workflow (tests/tiny_workflow.py)."""

import os

if "MLWF_DRIVER_MAIN" in os.environ:  # set only while the fork server starts
    raise RuntimeError("this module refuses to be imported in the fork server")

from tests.tiny_workflow import WORKFLOW  # noqa: E402, F401
