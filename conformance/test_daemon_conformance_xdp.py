"""The daemon conformance suite (test_daemon_conformance.py) again, with the
daemon on ``--inbound-hook=xdp``: both hooks pass the same checks (enrolment,
CHECK after damage, remote clients v4/v6, withdrawal and cleanup)."""
from test_daemon_conformance import *  # noqa: F401,F403  (the tests themselves)

#: read by the daemon_world fixture (conftest.py)
DAEMON_ARGS = ("--inbound-hook=xdp",)
