#!/usr/bin/env python3
"""A stranger that tries, during a daemon restart, to find reserved ports unprotected.

Run inside the daemon's network namespace (nsenter).

  stranger.py bind PROTO:PORT [PROTO:PORT ...]
      As any uid: binds each port in a tight loop, by number, on 0.0.0.0 and :: (dual-stack),
      plain and with SO_REUSEADDR and SO_REUSEPORT, until stdin closes. Prints "started" first,
      then {"rounds": N, "attempts": N, "stolen": ["PROTO:PORT way", ...]} (should be empty).

  stranger.py sysctl PORT [PORT ...]
      Reads net.ipv4.ip_local_reserved_ports in a tight loop until stdin closes, and counts the
      reads that miss any of the ports. Prints "started" first, then
      {"reads": N, "missing_reads": M, "missing": [PORT, ...]} (M should be 0).
"""
import json
import socket
import sys
import threading

stop = threading.Event()


def watch_stdin():
    sys.stdin.read()
    stop.set()


WAYS = [
    (socket.AF_INET, "0.0.0.0", "none"),
    (socket.AF_INET6, "::", "none"),
    (socket.AF_INET, "0.0.0.0", "reuseaddr"),
    (socket.AF_INET6, "::", "reuseport"),
]


def try_bind(proto, family, addr, option, port):
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    try:
        if option == "reuseaddr":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if option == "reuseport":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def bind(targets):
    ports = [(t.split(":")[0], int(t.split(":")[1])) for t in targets]
    rounds = attempts = 0
    stolen = []
    while not stop.is_set():
        rounds += 1
        for proto, port in ports:
            for family, addr, option in WAYS:
                attempts += 1
                if try_bind(proto, family, addr, option, port):
                    stolen.append(f"{proto}:{port} [{addr}] {option}")
    print(json.dumps({"rounds": rounds, "attempts": attempts, "stolen": stolen[:50]}), flush=True)


def parse(text):
    out = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return out


def sysctl(ports):
    want = set(int(p) for p in ports)
    reads = missing_reads = 0
    missing = set()
    while not stop.is_set():
        with open("/proc/sys/net/ipv4/ip_local_reserved_ports") as f:
            have = parse(f.read())
        reads += 1
        gone = want - have
        if gone:
            missing_reads += 1
            missing |= gone
    print(json.dumps({"reads": reads, "missing_reads": missing_reads, "missing": sorted(missing)[:50]}), flush=True)


threading.Thread(target=watch_stdin, daemon=True).start()
print("started", flush=True)
if sys.argv[1] == "bind":
    bind(sys.argv[2:])
else:
    sysctl(sys.argv[2:])
