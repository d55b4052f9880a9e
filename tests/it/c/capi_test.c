/* The C ABI from C: every error path of WSAIoctl and portres_bind, acquire/associate/release,
 * options kept across portres_bind, closesocket ending reservations, the persistent functions,
 * and calls from several threads. Written as Winsock code (PORTRES_WINSOCK_NAMES).
 * usage: capi_test UDP_PORT PERSISTENT_PORT     (run against a daemon with PORTRES_SOCKET) */
#define PORTRES_WINSOCK_NAMES
#include <portres.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(cond, what)                                                                     \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            failures++;                                                                       \
            fprintf(stderr, "FAIL line %d: %s (last error %d, errno %d)\n", __LINE__, what,   \
                    WSAGetLastError(), errno);                                                \
        }                                                                                     \
    } while (0)

static uint16_t local_port(SOCKET s) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(s, (SOCKADDR *)&ss, &len) != 0) return 0;
    if (ss.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

static int getopt_int(SOCKET s, int level, int name) {
    int v = -1;
    socklen_t len = sizeof v;
    getsockopt(s, level, name, &v, &len);
    return v;
}

static int ioctl_fails_with(SOCKET s, DWORD code, void *in, DWORD in_len, void *out, DWORD out_len,
                            int expect) {
    DWORD n = 77;
    int rc = WSAIoctl(s, code, in, in_len, out, out_len, &n, NULL, NULL);
    return rc == SOCKET_ERROR && WSAGetLastError() == expect && n == 0;
}

static void *worker(void *arg) {
    (void)arg;
    for (int i = 0; i < 25; i++) {
        SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
        INET_PORT_RANGE r = {htons(0), 2};
        INET_PORT_RESERVATION_INSTANCE inst;
        DWORD n;
        if (WSAIoctl(s, SIO_ACQUIRE_PORT_RESERVATION, &r, sizeof r, &inst, sizeof inst, &n, NULL,
                     NULL) != 0) {
            return (void *)1;
        }
        INET_PORT_RESERVATION_TOKEN t = {inst.Token};
        if (WSAIoctl(s, SIO_RELEASE_PORT_RESERVATION, &t, sizeof t, NULL, 0, &n, NULL, NULL) != 0) {
            return (void *)2;
        }
        closesocket(s);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    uint16_t udp_port = (uint16_t)atoi(argv[1]);
    uint16_t persistent_port = (uint16_t)atoi(argv[2]);
    WSADATA wsa;
    CHECK(WSAStartup(MAKEWORD(2, 2), &wsa) == 0, "WSAStartup");

    SOCKET s = socket(AF_INET6, SOCK_STREAM, 0);
    INET_PORT_RANGE range = {htons(0), 4};
    INET_PORT_RESERVATION_INSTANCE inst;
    char overlapped[32];
    DWORD n = 0;

    /* Error paths. */
    CHECK(ioctl_fails_with(s, 0x12345678u, &range, sizeof range, &inst, sizeof inst, WSAEINVAL),
          "unknown code");
    CHECK(ioctl_fails_with(s, SIO_ACQUIRE_PORT_RESERVATION, &range, 3, &inst, sizeof inst, WSAEINVAL),
          "input too small");
    CHECK(ioctl_fails_with(s, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &inst, 15, WSAEINVAL),
          "output too small");
    CHECK(ioctl_fails_with(s, SIO_ACQUIRE_PORT_RESERVATION, NULL, sizeof range, &inst, sizeof inst, WSAEFAULT),
          "NULL input");
    CHECK(ioctl_fails_with(s, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, NULL, sizeof inst, WSAEFAULT),
          "NULL output");
    CHECK(WSAIoctl(s, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &inst, sizeof inst, NULL, NULL, NULL) == SOCKET_ERROR
              && WSAGetLastError() == WSAEFAULT,
          "NULL bytes_returned");
    INET_PORT_RESERVATION_TOKEN small = {1};
    CHECK(ioctl_fails_with(s, SIO_RELEASE_PORT_RESERVATION, &small, 4, NULL, 0, WSAEINVAL),
          "token input too small");
    int file = open("/dev/null", O_RDONLY);
    CHECK(ioctl_fails_with(file, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &inst, sizeof inst, WSAENOTSOCK),
          "not a socket");
    close(file);
    CHECK(ioctl_fails_with(9999, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &inst, sizeof inst, WSAENOTSOCK),
          "not a descriptor");
    SOCKET unix_sock = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(ioctl_fails_with(unix_sock, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &inst, sizeof inst, WSAEOPNOTSUPP),
          "not TCP or UDP");
    closesocket(unix_sock);
    INET_PORT_RANGE zero = {htons(0), 0};
    CHECK(ioctl_fails_with(s, SIO_ACQUIRE_PORT_RESERVATION, &zero, sizeof zero, &inst, sizeof inst, WSAEINVAL),
          "count 0");

    /* Acquire (overlapped accepted, completes synchronously). */
    CHECK(WSAIoctl(s, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &inst, sizeof inst, &n, overlapped, NULL) == 0,
          "acquire");
    CHECK(n == 16, "acquire returns 16 bytes");
    CHECK(inst.Token != INVALID_PORT_RESERVATION_TOKEN && inst.Reservation.NumberOfPorts == 4, "instance");
    uint16_t first = ntohs(inst.Reservation.StartPort);

    /* The acquiring socket itself is associated and bound, keeping its options. */
    int one = 1, bufsize = 50000;
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof bufsize);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    int rcvbuf_before = getopt_int(s, SOL_SOCKET, SO_RCVBUF);
    INET_PORT_RESERVATION_TOKEN tok = {inst.Token};
    CHECK(WSAIoctl(s, SIO_ASSOCIATE_PORT_RESERVATION, &tok, sizeof tok, NULL, 0, &n, NULL, NULL) == 0 && n == 0,
          "associate");
    SOCKET before = s;
    struct sockaddr_in6 any6;
    memset(&any6, 0, sizeof any6);
    any6.sin6_family = AF_INET6;
    any6.sin6_addr = in6addr_any;
    CHECK(bind(s, (SOCKADDR *)&any6, sizeof any6) == 0, "bind port 0 from the reservation");
    CHECK(s == before, "same descriptor number");
    CHECK(local_port(s) == first, "lowest port of the block");
    CHECK((fcntl(s, F_GETFL) & O_NONBLOCK) != 0, "O_NONBLOCK kept");
    CHECK(getopt_int(s, IPPROTO_TCP, TCP_NODELAY) == 1, "TCP_NODELAY kept");
    CHECK(getopt_int(s, SOL_SOCKET, SO_KEEPALIVE) == 1, "SO_KEEPALIVE kept");
    CHECK(getopt_int(s, SOL_SOCKET, SO_RCVBUF) == rcvbuf_before, "SO_RCVBUF kept");
    CHECK(getopt_int(s, IPPROTO_IPV6, IPV6_V6ONLY) == 1, "IPV6_V6ONLY kept");
    CHECK(listen(s, 4) == 0, "listen after bind");

    /* A second socket: an explicit port of the block on loopback. */
    SOCKET s2 = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(WSAIoctl(s2, SIO_ASSOCIATE_PORT_RESERVATION, &tok, sizeof tok, NULL, 0, &n, NULL, NULL) == 0, "associate 2");
    struct sockaddr_in lo;
    memset(&lo, 0, sizeof lo);
    lo.sin_family = AF_INET;
    lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lo.sin_port = htons(first + 2);
    CHECK(bind(s2, (SOCKADDR *)&lo, sizeof lo) == 0, "bind an explicit port");
    CHECK(local_port(s2) == first + 2, "explicit port");
    SOCKET s3 = socket(AF_INET, SOCK_STREAM, 0);
    WSAIoctl(s3, SIO_ASSOCIATE_PORT_RESERVATION, &tok, sizeof tok, NULL, 0, &n, NULL, NULL);
    CHECK(bind(s3, (SOCKADDR *)&lo, sizeof lo) == SOCKET_ERROR && WSAGetLastError() == WSAEADDRINUSE
              && errno == EADDRINUSE,
          "explicit port taken");
    lo.sin_port = htons(first + 10);
    CHECK(bind(s3, (SOCKADDR *)&lo, sizeof lo) == SOCKET_ERROR && WSAGetLastError() == WSAEINVAL,
          "port outside the block");
    SOCKET u = socket(AF_INET, SOCK_DGRAM, 0);
    WSAIoctl(u, SIO_ASSOCIATE_PORT_RESERVATION, &tok, sizeof tok, NULL, 0, &n, NULL, NULL);
    lo.sin_port = 0;
    CHECK(bind(u, (SOCKADDR *)&lo, sizeof lo) == SOCKET_ERROR && WSAGetLastError() == WSAEINVAL,
          "UDP socket from a TCP reservation");
    INET_PORT_RESERVATION_TOKEN unknown = {12345};
    SOCKET s4 = socket(AF_INET, SOCK_STREAM, 0);
    WSAIoctl(s4, SIO_ASSOCIATE_PORT_RESERVATION, &unknown, sizeof unknown, NULL, 0, &n, NULL, NULL);
    CHECK(bind(s4, (SOCKADDR *)&lo, sizeof lo) == SOCKET_ERROR && WSAGetLastError() == WSAEINVAL,
          "unknown token at bind");
    SOCKET plain = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(bind(plain, (SOCKADDR *)&lo, sizeof lo) == 0 && local_port(plain) != 0, "unassociated bind");

    /* Release. */
    CHECK(ioctl_fails_with(s, SIO_RELEASE_PORT_RESERVATION, &unknown, sizeof unknown, NULL, 0, WSAEINVAL),
          "release an unknown token");
    INET_PORT_RESERVATION_TOKEN zero_tok = {0};
    CHECK(ioctl_fails_with(s, SIO_RELEASE_PORT_RESERVATION, &zero_tok, sizeof zero_tok, NULL, 0, WSAEINVAL),
          "release token 0");
    SOCKET t = socket(AF_INET, SOCK_DGRAM, 0);
    INET_PORT_RANGE fixed = {htons(udp_port), 2};
    INET_PORT_RESERVATION_INSTANCE inst2;
    CHECK(WSAIoctl(t, SIO_ACQUIRE_PORT_RESERVATION, &fixed, sizeof fixed, &inst2, sizeof inst2, &n, NULL, NULL) == 0,
          "acquire a specific UDP block");
    CHECK(inst2.Reservation.StartPort == htons(udp_port), "StartPort in network order");
    CHECK(ioctl_fails_with(t, SIO_ACQUIRE_PORT_RESERVATION, &fixed, sizeof fixed, &inst2, sizeof inst2, WSAEADDRINUSE),
          "overlapping block");
    INET_PORT_RESERVATION_TOKEN tok2 = {inst2.Token};
    CHECK(WSAIoctl(t, SIO_RELEASE_PORT_RESERVATION, &tok2, sizeof tok2, NULL, 0, &n, NULL, NULL) == 0 && n == 0,
          "release");
    CHECK(ioctl_fails_with(t, SIO_RELEASE_PORT_RESERVATION, &tok2, sizeof tok2, NULL, 0, WSAEINVAL),
          "release twice");

    /* closesocket ends the reservations acquired on the socket. */
    CHECK(WSAIoctl(t, SIO_ACQUIRE_PORT_RESERVATION, &fixed, sizeof fixed, &inst2, sizeof inst2, &n, NULL, NULL) == 0,
          "acquire again");
    CHECK(closesocket(t) == 0, "closesocket");
    SOCKET t2 = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK(WSAIoctl(t2, SIO_ACQUIRE_PORT_RESERVATION, &fixed, sizeof fixed, &inst2, sizeof inst2, &n, NULL, NULL) == 0,
          "the block is free after closesocket");

    /* Persistent functions, StartPort in network order. */
    ULONG64 token = 0, found = 0;
    CHECK(CreatePersistentTcpPortReservation(htons(persistent_port), 10, &token) == NO_ERROR && token != 0, "create");
    CHECK(LookupPersistentTcpPortReservation(htons(persistent_port), 10, &found) == NO_ERROR && found == token, "lookup");
    CHECK(LookupPersistentUdpPortReservation(htons(persistent_port), 10, &found) == ERROR_NOT_FOUND, "lookup udp");
    CHECK(CreatePersistentTcpPortReservation(htons(persistent_port + 5), 1, &found) == ERROR_SHARING_VIOLATION, "overlap");
    CHECK(CreatePersistentTcpPortReservation(0, 1, &found) == ERROR_INVALID_PARAMETER, "start 0");
    CHECK(CreatePersistentTcpPortReservation(htons(persistent_port), 1, NULL) == ERROR_INVALID_PARAMETER, "NULL token");
    CHECK(DeletePersistentTcpPortReservation(htons(persistent_port), 10) == NO_ERROR, "delete");
    CHECK(DeletePersistentTcpPortReservation(htons(persistent_port), 10) == ERROR_NOT_FOUND, "delete twice");

    /* Several threads at once. */
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) pthread_create(&threads[i], NULL, worker, NULL);
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(threads[i], &r);
        CHECK(r == NULL, "worker thread");
    }

    CHECK(WSACleanup() == 0, "WSACleanup");
    printf("%d failures\n", failures);
    return failures != 0;
}
