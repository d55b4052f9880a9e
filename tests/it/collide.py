#!/usr/bin/env python3
"""A worker that gets a port and binds it, over and over, for the collision test.

usage: collide.py portres SOCKET ROUNDS   (the port comes from portres: a wildcard reservation)
       collide.py probe ROUNDS            (probe-and-release: bind port 0, close, bind it again)
Binds each port as a TCP listener on [::] (no SO_REUSEADDR) and counts the binds that fail
because someone else took the port. A request portres refuses because no port is free right now
is retried and counted apart. Prints {"rounds": N, "collisions": M, "busy": B}.
"""
import json
import socket
import struct
import sys


def frame(sock, msg):
    body = json.dumps(msg).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    (n,) = struct.unpack("<I", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return json.loads(body)


def bind_listener(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        s.bind(("::", port))
        s.listen()
        return s, False
    except OSError:
        s.close()
        return None, True


mode = sys.argv[1]
collisions = rounds = busy = 0
if mode == "portres":
    daemon = socket.socket(socket.AF_UNIX)
    daemon.connect(sys.argv[2])
    daemon_rounds = int(sys.argv[3])
    frame(daemon, {"protocol": "portres", "version": 1})
    busy = 0
    for i in range(daemon_rounds):
        while True:
            r = frame(daemon, {"id": 1, "op": "acquire", "protocol": "tcp", "start": 0,
                               "count": 1, "mode": "exclude"})
            if "ok" in r:
                break
            assert r["error"]["code"] == "NoBufferSpace", r
            busy += 1
        port, token = r["ok"]["start"], r["ok"]["token"]
        s, collided = bind_listener(port)
        collisions += collided
        rounds += 1
        if s:
            s.close()
        frame(daemon, {"id": 2, "op": "release", "token": token})
else:
    for _ in range(int(sys.argv[2])):
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
        probe.close()
        s, collided = bind_listener(port)
        collisions += collided
        rounds += 1
        if s:
            s.close()
print(json.dumps({"rounds": rounds, "collisions": collisions, "busy": busy}))
