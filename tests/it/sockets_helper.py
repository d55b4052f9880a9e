#!/usr/bin/env python3
"""Holds one socket of each kind, for the `who` tests; run it in the daemon's namespace.

usage: sockets_helper.py LISTEN_PORT UDP_PORT BOUND_PORT TIME_WAIT_PORT
A TCP listener on [::]:LISTEN_PORT, a UDP socket on 127.0.0.1:UDP_PORT, a TCP socket bound to
0.0.0.0:BOUND_PORT (neither listening nor connected), and a connection on TIME_WAIT_PORT whose
server side closed first (left in TIME_WAIT, held by no process). Prints "ready PID", then keeps
the sockets until stdin closes.
"""
import os
import socket
import sys

lp, up, bp, tp = map(int, sys.argv[1:5])
listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", lp))
listener.listen()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", up))
bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
bound.bind(("0.0.0.0", bp))
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", tp))
server.listen()
client = socket.create_connection(("127.0.0.1", tp))
accepted, _ = server.accept()
accepted.close()  # the server side closes first: it keeps TIME_WAIT on tp
assert client.recv(1) == b""
client.close()
server.close()
print("ready", os.getpid(), flush=True)
sys.stdin.read()
