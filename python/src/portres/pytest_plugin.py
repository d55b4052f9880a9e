"""pytest fixtures with reserved ports (loaded by pytest through the ``pytest11`` entry point).

- ``portres_port``: one free TCP port, reserved for the test (``exclude`` mode: the test binds it
  itself; the kernel never hands it out as an ephemeral port, and no other portres client gets
  it).
- ``portres_ports``: a function ``portres_ports(n)`` giving ``n`` consecutive ports the same way.
- ``portres_listener``: a listening TCP ``socket.socket`` on a held port (``.getsockname()[1]``
  is its port).

Everything a test reserved is released at its end, and when its process dies. Each process
(each ``pytest-xdist`` worker) has one connection to the daemon (``portres_client``, session
scoped), found as ``portres.connect()`` finds it.
"""

import pytest

import portres


@pytest.fixture(scope="session")
def portres_client():
    """This process's connection to the daemon."""
    client = portres.connect()
    yield client
    client.close()


@pytest.fixture
def portres_ports(portres_client):
    """``portres_ports(n, protocol="tcp")``: n consecutive reserved ports (a list)."""
    made = []

    def reserve(n=1, protocol="tcp"):
        r = portres_client.acquire(protocol, count=n, mode="exclude")
        made.append(r)
        return r.ports

    yield reserve
    for r in made:
        r.release()


@pytest.fixture
def portres_port(portres_ports):
    """One reserved TCP port (the test binds it itself)."""
    return portres_ports(1)[0]


@pytest.fixture
def portres_listener(portres_client):
    """A listening TCP socket on a held port, closed and released after the test."""
    r = portres_client.acquire("tcp", count=1, mode="hold")
    sock = r.listen(r.start)
    yield sock
    sock.close()
    r.release()
