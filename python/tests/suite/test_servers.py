"""100 tests, each starting a server on its fixture port (after a short start-up, as real
servers take) and talking to it."""

import socket
import time

import pytest


@pytest.mark.parametrize("n", range(100))
def test_server_on_its_port(server_port, n):
    time.sleep(0.05)  # the server under test starting up
    srv = socket.socket()
    srv.bind(("127.0.0.1", server_port))
    srv.listen()
    c = socket.create_connection(("127.0.0.1", server_port))
    conn, _ = srv.accept()
    conn.sendall(b"%d" % n)
    assert c.recv(8) == b"%d" % n
    for s in (c, conn, srv):
        s.close()
