"""A suite of servers on test ports, for the collision test: PORTRES_SUITE_FIXTURE=probe swaps
the reserved port for the usual probe-and-release one (bind port 0, read it, close)."""

import os
import socket

import pytest


@pytest.fixture
def server_port(request):
    if os.environ.get("PORTRES_SUITE_FIXTURE") == "probe":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port
    return request.getfixturevalue("portres_port")
