"""A busy port: a listener on 127.0.0.1:PORT and N established connections to it.

Usage: busy_port.py PORT N

The accepted sockets (whose local port is PORT) are spread over server processes and the
client sockets over client processes, at most 10,000 descriptors each (the open-file limit here
is 20,000 per process); clients connect from 127.0.0.2-127.0.0.9 so that more than one
ephemeral range's worth of connections fits. Prints "ready" once every connection is accepted,
and keeps them until its standard input closes.
"""
import os
import signal
import socket
import sys

PER_PROCESS = 10_000


def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    shares = [min(PER_PROCESS, n - i) for i in range(0, n, PER_PROCESS)]
    done_r, done_w = os.pipe()
    children = []
    for k, share in enumerate(shares):
        pid = os.fork()
        if pid == 0:  # a server: accepts its share
            os.close(done_r)
            kept = []
            for _ in range(share):
                conn, _ = listener.accept()
                kept.append(conn)
            os.write(done_w, b"s")
            signal.pause()
            os._exit(0)
        children.append(pid)
    for k, share in enumerate(shares):
        pid = os.fork()
        if pid == 0:  # a client: connects its share
            os.close(done_r)
            kept = []
            src = "127.0.0.%d" % (2 + k % 8)
            for _ in range(share):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                c.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
                c.bind((src, 0))
                c.connect(("127.0.0.1", port))
                kept.append(c)
            os.write(done_w, b"c")
            signal.pause()
            os._exit(0)
        children.append(pid)
    os.close(done_w)
    got = 0
    while got < 2 * len(shares):
        b = os.read(done_r, 64)
        if not b:
            sys.exit("a helper process died")
        got += len(b)
    print("ready", flush=True)
    sys.stdin.read()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


main()
