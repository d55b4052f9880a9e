"""The Python client against a real daemon (PORTRES_SOCKET), run by the integration suite."""

import os
import socket

import pytest

import portres


@pytest.fixture
def client():
    c = portres.connect()
    yield c
    c.close()


def test_acquire_release_and_show(client):
    r = client.acquire("tcp", count=3)
    assert r.count == 3 and r.mode == "hold"
    assert r.ports == [r.start, r.start + 1, r.start + 2]
    rows = client.show(ports=(r.start, r.start))
    assert [row["start"] for row in rows] == [r.start]
    assert rows[0]["owner"]["pid"] == os.getpid()
    r.release()
    assert client.show(ports=(r.start, r.start)) == []


def test_acquire_at_and_conflicts_raise_named_errors(client):
    r = client.acquire_at("udp", 47000, 2)
    other = portres.connect()
    with pytest.raises(portres.AddressInUse) as e:
        other.acquire_at("udp", 47001, 1)
    assert e.value.code == "AddressInUse"
    assert e.value.windows_code == 10048
    assert "47001" in e.value.message
    with pytest.raises(portres.InvalidArgument):
        other.acquire_at("tcp", 65535, 2)
    other.close()
    r.release()


def test_associate_returns_a_real_listening_socket(client):
    r = client.acquire("tcp", count=2)
    s = r.listen(r.start + 1)
    assert isinstance(s, socket.socket)
    assert s.getsockname()[1] == r.start + 1
    c = socket.create_connection(("127.0.0.1", r.start + 1))
    conn, _ = s.accept()
    conn.sendall(b"hi")
    assert c.recv(2) == b"hi"
    for x in (c, conn, s):
        x.close()
    u = client.acquire("udp", count=1)
    d = u.udp_socket(u.start)
    assert d.type == socket.SOCK_DGRAM and d.getsockname()[1] == u.start
    d.close()
    r.release()
    u.release()


def test_who_and_status(client):
    r = client.acquire("tcp", count=1)
    who = client.who(r.start)
    assert who["reservation"]["start"] == r.start
    assert any("placeholder" in (s.get("role") or "") for s in who["sockets"])
    status = client.status()
    assert status["counts"]["runtime"] >= 1
    assert {l["name"] for l in status["layers"]} >= {"hold", "exclude"}
    r.release()


def test_persistent_create_lookup_delete(client):
    token = client.create_persistent("tcp", 47500, 2, mode="hold")
    assert client.lookup_persistent("tcp", 47500, 2) == token
    client.delete_persistent("tcp", 47500, 2)
    with pytest.raises(portres.NotFound):
        client.lookup_persistent("tcp", 47500, 2)


def test_metrics_and_apply(client):
    text = client.metrics()
    # Present with no reservation at all: 0, not missing.
    assert 'portres_reservations{kind="runtime",mode="hold",protocol="tcp"} 0' in text
    shown = client.apply(dry_run=True)
    assert {"changes", "added", "changed", "removed", "digest", "applied"} <= set(shown)
    assert shown["applied"] is False


def test_a_foreign_token_is_refused(client):
    with pytest.raises(portres.PortresError) as e:
        client.release("12345")
    assert e.value.code in ("NotFound", "InvalidArgument", "AccessDenied")


def test_no_daemon_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRES_AUTOSTART", "0")
    with pytest.raises(portres.ConnectError) as e:
        portres.connect(str(tmp_path / "none.sock"))
    assert "none.sock" in str(e.value) and "PORTRES_SOCKET" in str(e.value)
    # No daemon ever ran: not even its directory exists.
    with pytest.raises(portres.ConnectError) as e:
        portres.connect(str(tmp_path / "never" / "portres.sock"))
    assert "PORTRES_SOCKET" in str(e.value)


def test_a_closed_client_says_so(client):
    client.close()
    with pytest.raises(portres.ConnectError):
        client.status()


def test_the_plugin_fixtures(portres_port, portres_ports, portres_listener, portres_client):
    s = socket.socket()
    s.bind(("127.0.0.1", portres_port))
    s.close()
    block = portres_ports(4)
    assert block == list(range(block[0], block[0] + 4))
    port = portres_listener.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    c.close()
    mine = [r["start"] for r in portres_client.show()]
    assert portres_port in mine and block[0] in mine and port in mine
