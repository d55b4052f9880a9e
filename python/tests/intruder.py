"""Keeps grabbing ephemeral ports (bind to port 0, in the kernel's ip_local_port_range) and
letting them go, as a busy machine's outgoing connections do; prints "ready", runs until killed."""

import collections
import socket
import sys

held = collections.deque()
print("ready", flush=True)
while True:
    try:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    except OSError:
        pass
    if len(held) > 4000:
        held.popleft().close()
