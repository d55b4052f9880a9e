"""Tries to bind a port every way a program can, and prints what happened, as JSON.

Usage:
  bind_matrix.py PORT          every path: TCP and UDP; 0.0.0.0, 127.0.0.1, ::, ::1,
                               ::ffff:127.0.0.1 (v4-mapped); plain, SO_REUSEADDR, SO_REUSEPORT.
                               Prints {"tcp 0.0.0.0 plain": 0 or errno, ...}.
  bind_matrix.py --one PROTO ADDR PORT
                               one bind; prints its errno (0: bound).
  bind_matrix.py --keep PROTO ADDR PORT
                               binds (TCP: listens), prints "bound" or "errno N", and keeps the
                               socket until standard input closes.
"""
import json
import socket
import sys

ADDRS = ["0.0.0.0", "127.0.0.1", "::", "::1", "::ffff:127.0.0.1"]
OPTS = ["plain", "reuseaddr", "reuseport"]


def bind(proto, addr, port, opt="plain"):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if opt == "reuseaddr":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if opt == "reuseport":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((addr, port))
        if proto == "tcp":
            s.listen(16)
        return 0, s
    except OSError as e:
        s.close()
        return e.errno, None


def main():
    if sys.argv[1] == "--one":
        err, s = bind(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        print(err, flush=True)
        return
    if sys.argv[1] == "--keep":
        err, s = bind(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        print("bound" if err == 0 else f"errno {err}", flush=True)
        sys.stdin.read()
        return
    port = int(sys.argv[1])
    out = {}
    for proto in ["tcp", "udp"]:
        for addr in ADDRS:
            for opt in OPTS:
                err, s = bind(proto, addr, port, opt)
                if s is not None:
                    s.close()
                out[f"{proto} {addr} {opt}"] = err
    print(json.dumps(out), flush=True)


main()
