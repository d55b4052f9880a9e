"""A client of the portres daemon, in pure Python (the protocol of docs/protocol.md).

>>> import portres
>>> client = portres.connect()
>>> block = client.acquire("tcp", count=2)
>>> listener = block.listen(block.start)
>>> block.release()

The connection is a session: every runtime reservation made on it ends when it closes (the
``Client`` is closed, or the process exits or is killed).
"""

import json
import os
import socket
import struct
import subprocess
import threading

__all__ = [
    "connect",
    "Client",
    "Reservation",
    "PortresError",
    "InvalidArgument",
    "AddressInUse",
    "NoBufferSpace",
    "QuotaExceeded",
    "AccessDenied",
    "InvalidParameter",
    "SharingViolation",
    "NotFound",
    "MalformedRequest",
    "Internal",
    "ConnectError",
]

PROTOCOL = "portres"
VERSION = 2
MAX_FRAME = 64 * 1024
SYSTEM_SOCKET = "/run/portres/portres.sock"


class PortresError(Exception):
    """A refusal from the daemon: ``code`` (e.g. ``"AddressInUse"``), ``windows_code`` (the
    Winsock code a ported program expects), ``message`` (what was asked, why it failed, what to
    do) and ``conflict`` (who holds the port, when there is one)."""

    code = "Internal"

    def __init__(self, message, windows_code=None, conflict=None, code=None):
        super().__init__(message)
        self.message = message
        self.windows_code = windows_code
        self.conflict = conflict
        if code is not None:
            self.code = code

    def __str__(self):
        return "%s: %s" % (self.code, self.message)


def _error_class(code):
    return type(code, (PortresError,), {"code": code, "__doc__": "The daemon's %s." % code})


InvalidArgument = _error_class("InvalidArgument")
AddressInUse = _error_class("AddressInUse")
NoBufferSpace = _error_class("NoBufferSpace")
QuotaExceeded = _error_class("QuotaExceeded")
AccessDenied = _error_class("AccessDenied")
InvalidParameter = _error_class("InvalidParameter")
SharingViolation = _error_class("SharingViolation")
NotFound = _error_class("NotFound")
MalformedRequest = _error_class("MalformedRequest")
Internal = _error_class("Internal")

_BY_CODE = {
    c.code: c
    for c in (
        InvalidArgument,
        AddressInUse,
        NoBufferSpace,
        QuotaExceeded,
        AccessDenied,
        InvalidParameter,
        SharingViolation,
        NotFound,
        MalformedRequest,
        Internal,
    )
}


class ConnectError(PortresError):
    """No daemon could be reached (or trusted) at the socket; the message says what to do."""

    code = "Connect"


def _refusal(body):
    cls = _BY_CODE.get(body.get("code"), PortresError)
    return cls(
        body.get("message", ""),
        windows_code=body.get("windows_code"),
        conflict=body.get("conflict"),
        code=body.get("code") if cls is PortresError else None,
    )


def _user_socket():
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isabs(run):
        return os.path.join(run, "portres", "portres.sock")
    return "/tmp/portres-%d/portres.sock" % os.geteuid()


def _trusted_uids():
    uids = {0, os.geteuid()}
    who = os.environ.get("PORTRES_DAEMON_USER")
    if who:
        try:
            uids.add(int(who))
        except ValueError:
            import pwd

            try:
                uids.add(pwd.getpwnam(who).pw_uid)
            except KeyError:
                pass
    return uids


def _check_dir(path, trusted):
    """The socket's directory must be a real directory of a trusted user nobody else may
    write (as the Rust client checks): whoever could write it could put another socket
    there."""
    import stat as _stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConnectError(
            "no portres daemon has run here: %s does not exist; start one, or set "
            "PORTRES_SOCKET" % path
        ) from None

    if _stat.S_ISLNK(st.st_mode):
        raise ConnectError("%s is a symbolic link; portres never follows one for its socket" % path)
    if st.st_uid not in trusted or st.st_mode & 0o022:
        raise ConnectError(
            "refusing %s: its directory is owned by uid %d with mode %04o; it must belong to "
            "root or you and be writable by its owner alone" % (path, st.st_uid, st.st_mode & 0o7777)
        )


def _open(path):
    trusted = _trusted_uids()
    directory = os.path.dirname(path) or "."
    _check_dir(directory, trusted)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise ConnectError(
            "cannot reach a portres daemon at %s (%s): start one (`portres daemon`, or the "
            "system service), set PORTRES_SOCKET to the socket of a running one, or let the "
            "`portres` command start one (unset PORTRES_AUTOSTART)" % (path, e.strerror or e)
        ) from None
    pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid not in trusted:
        s.close()
        raise ConnectError(
            "the daemon at %s runs as uid %d, whom this client does not trust (root, you, or "
            "PORTRES_DAEMON_USER)" % (path, uid)
        )
    return s


def _autostart_allowed():
    return os.environ.get("PORTRES_AUTOSTART", "1").strip().lower() not in ("0", "false", "no", "off")


def connect(path=None):
    """Connects to a daemon, found as the Rust client finds it: ``path``; ``PORTRES_SOCKET``;
    for root the system socket; otherwise the system socket if a daemon answers there, else the
    user's own (``$XDG_RUNTIME_DIR/portres/portres.sock``). When nobody answers on the user's
    socket and autostart is allowed, the ``portres`` command starts a per-user daemon."""
    if path is None:
        path = os.environ.get("PORTRES_SOCKET") or None
    if path is not None:
        return Client(_connect_or_start(path))
    if os.geteuid() == 0:
        return Client(_connect_or_start(SYSTEM_SOCKET))
    try:
        return Client(_open(SYSTEM_SOCKET))
    except (ConnectError, OSError):
        pass
    return Client(_connect_or_start(_user_socket()))


def _connect_or_start(path):
    try:
        return _open(path)
    except ConnectError:
        if not _autostart_allowed():
            raise
    # The CLI starts a daemon on this socket (and waits until it is ready).
    env = dict(os.environ, PORTRES_SOCKET=path)
    try:
        # Its standard error is the user's: the CLI says there what a per-user daemon it
        # started cannot enforce.
        done = subprocess.run(
            ["portres", "--json", "status"], env=env, stdout=subprocess.PIPE, text=True
        )
    except FileNotFoundError:
        raise ConnectError(
            "no portres daemon answers at %s, and no `portres` command is on PATH to start one; "
            "install portres, or start a daemon and set PORTRES_SOCKET" % path
        ) from None
    if done.returncode != 0:
        raise ConnectError("starting a daemon at %s failed: %s" % (path, done.stdout))
    return _open(path)


class Reservation:
    """A runtime reservation. ``release()`` (or the end of a ``with`` block, or closing the
    client, or the process's exit) ends it."""

    def __init__(self, client, reply):
        self.client = client
        self.token = reply["token"]
        self.protocol = reply["protocol"]
        self.start = reply["start"]
        self.count = reply["count"]
        self.mode = reply["mode"]
        self.live = True

    @property
    def ports(self):
        return list(range(self.start, self.start + self.count))

    def listen(self, port=0, address=None, backlog=None):
        """A listening TCP socket on ``port`` of the block (0: the lowest free one)."""
        return self.client.associate(self.token, "listener", port, address, backlog)

    def tcp_socket(self, port=0, address=None):
        """A bound TCP socket, ready for ``connect()``."""
        return self.client.associate(self.token, "stream", port, address)

    def udp_socket(self, port=0, address=None):
        """A bound UDP socket."""
        return self.client.associate(self.token, "datagram", port, address)

    def release(self):
        if self.live:
            self.live = False
            self.client.release(self.token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return "<portres.Reservation %s %d-%d (%s) token %s>" % (
            self.protocol,
            self.start,
            self.start + self.count - 1,
            self.mode,
            self.token,
        )


class Client:
    """One connection (session) to the daemon. Thread-safe: requests are serialised."""

    def __init__(self, sock):
        self._sock = sock
        self._lock = threading.Lock()
        self._next = 1
        self._fds = []
        self._broken = None
        try:
            self._send({"protocol": PROTOCOL, "version": VERSION, "client": "portres-python"})
            hello = self._recv()
        except BaseException:
            self._sock.close()
            raise
        if "welcome" not in hello:
            self._sock.close()
            raise _refusal(hello.get("error", {}))
        self.daemon = hello["welcome"]

    # --- framing ---

    def _send(self, msg):
        body = json.dumps(msg).encode()
        self._sock.sendall(struct.pack("<I", len(body)) + body)

    def _exactly(self, n):
        buf = b""
        while len(buf) < n:
            data, fds, _flags, _addr = socket.recv_fds(self._sock, n - len(buf), 4)
            for fd in fds:
                # Never inherited by a child this process starts (the port would stay bound).
                os.set_inheritable(fd, False)
            self._fds.extend(fds)
            if not data:
                raise ConnectError("the daemon closed the connection")
            buf += data
        return buf

    def _recv(self):
        (length,) = struct.unpack("<I", self._exactly(4))
        if length > MAX_FRAME:
            raise MalformedRequest("the daemon sent a frame of %d bytes" % length)
        return json.loads(self._exactly(length))

    def call(self, request, stream=False):
        """Sends one request (a dict with ``op``); returns the ``ok`` reply, the rows of a
        streamed one (``stream=True``), or raises the refusal."""
        with self._lock:
            if self._broken:
                raise ConnectError(self._broken)
            try:
                return self._call_locked(request, stream)
            except PortresError as e:
                if isinstance(e, ConnectError):
                    self._break(str(e))
                raise
            except BaseException as e:
                # Mid-frame (an interrupt, a malformed frame): the stream is out of step and
                # every later answer would go to the wrong request. The connection is closed.
                self._break("the connection was abandoned mid-reply (%r); connect again" % (e,))
                raise

    def _break(self, why):
        self._broken = why
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        try:
            self._sock.close()
        except OSError:
            pass

    def _call_locked(self, request, stream):
        rid = self._next
        self._next += 1
        self._fds = []
        self._send(dict(request, id=rid))
        head = self._recv()
        if head.get("id") not in (rid, 0):
            raise MalformedRequest("the daemon answered request %s to request %d" % (head.get("id"), rid))
        if "error" in head:
            if head.get("id") == 0:
                self._break(head["error"].get("message", "the daemon closed the connection"))
            raise _refusal(head["error"])
        reply = head["ok"]
        if self._fds:
            reply = dict(reply, __fds__=self._fds)
            self._fds = []
        if not (stream and reply.get("more")):
            return reply
        rows = []
        while True:
            frame = self._recv()
            if "items" in frame:
                rows.extend(frame["items"])
            elif "end" in frame:
                return reply, rows
            elif "error" in frame:
                raise _refusal(frame["error"])

    def close(self):
        with self._lock:
            self._break("closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- operations ---

    def acquire(self, protocol="tcp", count=1, mode="hold"):
        """Any ``count`` consecutive free ports of the dynamic range."""
        return self.acquire_at(protocol, 0, count, mode)

    def acquire_at(self, protocol, start, count=1, mode="hold"):
        """Ports ``start`` to ``start + count - 1`` (``start`` 0: anywhere)."""
        reply = self.call(
            {"op": "acquire", "protocol": protocol, "start": start, "count": count, "mode": mode}
        )
        return Reservation(self, reply)

    def release(self, token):
        self.call({"op": "release", "token": str(token)})

    def associate(self, token, kind="listener", port=0, address=None, backlog=None):
        """A real ``socket.socket`` bound to ``port`` of the reservation (passed by the daemon
        with SCM_RIGHTS): ``kind`` is ``"listener"``, ``"stream"`` or ``"datagram"``."""
        req = {"op": "associate", "token": str(token), "socket": kind, "port": port}
        if address is not None:
            req["address"] = address
        if backlog is not None:
            req["backlog"] = backlog
        reply = self.call(req)
        fds = reply.pop("__fds__", [])
        if not fds:
            raise Internal("the daemon answered associate without a socket")
        for extra in fds[1:]:
            os.close(extra)
        s = socket.socket(fileno=fds[0])
        return s

    def who(self, port, protocol="tcp", all=False):
        if all:
            out = self.call(
                {"op": "who", "protocol": protocol, "port": port, "all": True, "stream": True},
                stream=True,
            )
            if isinstance(out, tuple):
                head, rows = out
                head["sockets"] = rows
                return head
            return out
        return self.call({"op": "who", "protocol": protocol, "port": port})

    def show(self, protocol=None, ports=None, kind=None, user=None):
        req = {"op": "show", "stream": True}
        if protocol:
            req["protocol"] = protocol
        if ports:
            req["ports"] = list(ports)
        if kind:
            req["kind"] = kind
        if user:
            req["user"] = str(user)
        out = self.call(req, stream=True)
        if isinstance(out, tuple):
            return out[1]
        return out["reservations"]

    def status(self):
        return self.call({"op": "status"})

    def create_persistent(self, protocol, start, count=1, mode="exclude", allow_users=(), allow_groups=()):
        reply = self.call(
            {
                "op": "create_persistent",
                "protocol": protocol,
                "start": start,
                "count": count,
                "mode": mode,
                "allow_users": [str(u) for u in allow_users],
                "allow_groups": [str(g) for g in allow_groups],
            }
        )
        return reply["token"]

    def lookup_persistent(self, protocol, start, count=1):
        return self.call(
            {"op": "lookup_persistent", "protocol": protocol, "start": start, "count": count}
        )["token"]

    def delete_persistent(self, protocol, start, count=1):
        self.call({"op": "delete_persistent", "protocol": protocol, "start": start, "count": count})

    def metrics(self):
        """The daemon's metrics, in the Prometheus text format (anyone may ask)."""
        return self.call({"op": "metrics"})["text"]

    def apply(self, dry_run=False, expect=None):
        """The reservation files of the daemon's reservations_dir against what it holds from
        them (administrators): the difference (a dict: changes, added, changed, removed,
        digest, ...), applied all or nothing unless dry_run, and with expect (a digest) only if
        it is still that difference."""
        request = {"op": "apply", "dry_run": bool(dry_run)}
        if expect is not None:
            request["expect"] = expect
        return self.call(request)
