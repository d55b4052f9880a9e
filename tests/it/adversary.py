#!/usr/bin/env python3
"""A process that tries to take reserved ports, for the enforcement tests.

Run inside the daemon's network namespace (nsenter), as any uid.

  adversary.py matrix PROTO PORT [PORT...]
      Tries every way to bind each port: addresses 0.0.0.0, 127.0.0.1, ::, ::1, ::ffff:127.0.0.1,
      10.99.99.99 (IP_FREEBIND), with no option, SO_REUSEADDR, SO_REUSEPORT, both, and
      SO_BINDTODEVICE=lo. Prints a JSON list of the binds that succeeded (should be []).

  adversary.py loop PROTO PORT
      Binds PORT in a tight loop, cycling through those ways, until stdin closes; prints
      {"attempts": N, "stolen": M} (M should be 0). Prints "started" first.

  adversary.py intrude PROTO
      Asks the kernel for automatic ports (bind(port 0), connect() autobind, IPv4 and IPv6) in a
      loop, keeping the last hundred sockets open, until stdin closes; prints
      {"sockets": N}. Prints "started" first.

  adversary.py loopmany PROTO:PORT [PROTO:PORT ...]
      Binds every port in a tight loop (0.0.0.0 and :: dual-stack; plain, SO_REUSEADDR,
      SO_REUSEPORT, both), until stdin closes. Prints "started" first, then
      {"rounds": N, "attempts": N, "stolen": ["PROTO [ADDR]:PORT OPTION", ...]} (should be empty).

  adversary.py sysctl PORT [PORT ...]
      Reads net.ipv4.ip_local_reserved_ports in a tight loop until stdin closes and counts the
      reads that miss any of the ports. Prints "started" first, then
      {"reads": N, "missing_reads": M, "missing": [PORT, ...]} (M should be 0).

  adversary.py storm PROTO LOW HIGH COUNT
      Sets ip_local_port_range to LOW HIGH (needs root in the namespace) and asks the kernel for
      COUNT automatic ports per way: bind(port 0) and connect() autobind, IPv4 and IPv6, keeping
      each socket until the next round. Prints a JSON object of way -> sorted distinct ports got.
"""
import json
import socket
import sys

SO_BINDTODEVICE = 25
IP_FREEBIND = 15
ADDRS = [
    (socket.AF_INET, "0.0.0.0"),
    (socket.AF_INET, "127.0.0.1"),
    (socket.AF_INET6, "::"),
    (socket.AF_INET6, "::1"),
    (socket.AF_INET6, "::ffff:127.0.0.1"),
    (socket.AF_INET, "10.99.99.99"),
]
OPTIONS = ["none", "reuseaddr", "reuseport", "both", "bindtodevice"]


def sock_type(proto):
    return socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM


def try_bind(proto, family, addr, option, port):
    s = socket.socket(family, sock_type(proto))
    try:
        if option in ("reuseaddr", "both", "bindtodevice"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if option in ("reuseport", "both", "bindtodevice"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if option == "bindtodevice":
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, b"lo")
            except PermissionError:
                pass  # needs CAP_NET_RAW: the unprivileged adversary tries without it
        if addr == "10.99.99.99":
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6 and addr == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def matrix(proto, ports):
    won = []
    for port in ports:
        for family, addr in ADDRS:
            for option in OPTIONS:
                if try_bind(proto, family, addr, option, port):
                    won.append(f"{proto} [{addr}]:{port} {option}")
    print(json.dumps(won))


def until_stdin_closes():
    import threading

    stop = threading.Event()

    def watch():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    print("started", flush=True)
    return stop


def loop(proto, port):
    stop = until_stdin_closes()
    ways = [(f, a, o) for f, a in ADDRS[:4] for o in OPTIONS[:4]]
    attempts = stolen = 0
    while not stop.is_set():
        for family, addr, option in ways:
            attempts += 1
            if try_bind(proto, family, addr, option, port):
                stolen += 1
    print(json.dumps({"attempts": attempts, "stolen": stolen}), flush=True)


def loopmany(targets):
    ports = [(t.split(":")[0], int(t.split(":")[1])) for t in targets]
    ways = [(f, a, o) for f, a in (ADDRS[0], ADDRS[2]) for o in OPTIONS[:4]]
    stop = until_stdin_closes()
    rounds = attempts = 0
    stolen = []
    while not stop.is_set():
        rounds += 1
        for proto, port in ports:
            for family, addr, option in ways:
                attempts += 1
                if try_bind(proto, family, addr, option, port):
                    stolen.append(f"{proto} [{addr}]:{port} {option}")
    print(json.dumps({"rounds": rounds, "attempts": attempts, "stolen": stolen[:50]}), flush=True)


def parse_ports(text):
    out = set()
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def sysctl(ports):
    want = set(int(p) for p in ports)
    stop = until_stdin_closes()
    reads = missing_reads = 0
    missing = set()
    while not stop.is_set():
        with open("/proc/sys/net/ipv4/ip_local_reserved_ports") as f:
            gone = want - parse_ports(f.read())
        reads += 1
        if gone:
            missing_reads += 1
            missing |= gone
    print(json.dumps({"reads": reads, "missing_reads": missing_reads,
                      "missing": sorted(missing)[:50]}), flush=True)


def storm(proto, low, high, count):
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{low} {high}\n")
    got = {}
    # Something to connect to, outside the range.
    if proto == "tcp":
        server4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server4.bind(("127.0.0.1", 9))
        server4.listen(4096)
        server6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        server6.bind(("::1", 9))
        server6.listen(4096)
    ways = {
        "bind4": (socket.AF_INET, lambda s: s.bind(("0.0.0.0", 0))),
        "bind6": (socket.AF_INET6, lambda s: s.bind(("::", 0))),
        "connect4": (socket.AF_INET, lambda s: s.connect(("127.0.0.1", 9))),
        "connect6": (socket.AF_INET6, lambda s: s.connect(("::1", 9))),
    }
    for name, (family, action) in ways.items():
        ports = set()
        held = []
        for _ in range(count):
            s = socket.socket(family, sock_type(proto))
            try:
                action(s)
                ports.add(s.getsockname()[1])
                held.append(s)
            except OSError:
                s.close()
                # The range is used up: let go and go on.
                for h in held:
                    h.close()
                held = []
        for h in held:
            h.close()
        got[name] = sorted(ports)
    print(json.dumps(got))


def intrude(proto):
    import threading
    from collections import deque

    stop = threading.Event()

    def watch():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    if proto == "tcp":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 39999))
        server.listen(4096)
    print("started", flush=True)
    held = deque()
    made = 0
    while not stop.is_set():
        for family, action in (
            (socket.AF_INET, lambda s: s.bind(("0.0.0.0", 0))),
            (socket.AF_INET6, lambda s: s.bind(("::", 0))),
            (socket.AF_INET, lambda s: s.connect(("127.0.0.1", 39999))),
        ):
            s = socket.socket(family, sock_type(proto))
            try:
                action(s)
                made += 1
                held.append(s)
            except OSError:
                s.close()
            while len(held) > 100:
                held.popleft().close()
            if proto == "tcp":
                try:
                    server.setblocking(False)
                    while True:
                        server.accept()[0].close()
                except OSError:
                    pass
    print(json.dumps({"sockets": made}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "loopmany":
        loopmany(sys.argv[2:])
        sys.exit(0)
    if sys.argv[1] == "sysctl":
        sysctl(sys.argv[2:])
        sys.exit(0)
    mode, proto = sys.argv[1], sys.argv[2]
    args = [int(a) for a in sys.argv[3:]]
    if mode == "matrix":
        matrix(proto, args)
    elif mode == "loop":
        loop(proto, args[0])
    elif mode == "intrude":
        intrude(proto)
    elif mode == "storm":
        storm(proto, args[0], args[1], args[2])
