#!/usr/bin/env python3
"""A portres client in 30 lines of Python, written from docs/protocol.md.

usage: raw_client.py SOCKET 'REQUEST-JSON' ['REQUEST-JSON' ...] [--wait]
Sends the handshake, then each request (an "id" is added), and prints each reply as one JSON
line. With --wait, it then keeps the connection (the session) open until stdin closes. Used by
the test suite to act as a separate process.
"""
import json
import socket
import struct
import sys


def send(sock, msg):
    body = json.dumps(msg).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)


def recv(sock):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("daemon closed the connection")
            buf += chunk
        return buf
    (length,) = struct.unpack("<I", exactly(4))
    return json.loads(exactly(length))


sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
send(sock, {"protocol": "portres", "version": 1, "client": "raw_client.py"})
hello = recv(sock)
assert "welcome" in hello, hello
args = sys.argv[2:]
wait = args[-1:] == ["--wait"]
if wait:
    args = args[:-1]
for i, req in enumerate(args, start=1):
    msg = json.loads(req)
    msg["id"] = i
    send(sock, msg)
    print(json.dumps(recv(sock)), flush=True)
if wait:
    sys.stdin.read()
