/*
 * portres.h — Windows port reservations on Linux: the C ABI of portres.
 *
 * Link with -lportres (libportres.so or libportres.a from `cargo build --release`). The library
 * talks to the portres daemon: PORTRES_SOCKET names its socket; otherwise the system daemon
 * (/run/portres/portres.sock) or, for other users, a per-user daemon that is started on first use
 * unless PORTRES_AUTOSTART=0.
 *
 * Self-contained, C99 and C++. Every function is safe to call from several threads, and no Rust
 * panic crosses into C.
 *
 * With `#define PORTRES_WINSOCK_NAMES` before including this header, the usual Winsock names
 * (SOCKET, INVALID_SOCKET, SOCKET_ERROR, WSADATA, MAKEWORD, WSAStartup, WSACleanup, closesocket,
 * bind, SOCKADDR, ADDRESS_FAMILY, USHORT, ULONG, DWORD, LPDWORD, LPVOID, ULONG64, PULONG64) map
 * onto these, so Winsock code compiles unchanged.
 */
#ifndef PORTRES_H
#define PORTRES_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Types ---------------------------------------------------------------------------------- */

/* Windows aligns 64-bit members to 8 bytes everywhere; so do these types (also on i386). */
#if defined(__GNUC__) || defined(__clang__)
#define PORTRES_ALIGN8 __attribute__((aligned(8)))
#else
#define PORTRES_ALIGN8
#endif

/** A block of ports: StartPort in network byte order (htons), NumberOfPorts in host order. */
typedef struct INET_PORT_RANGE {
    uint16_t StartPort;     /**< first port, network byte order */
    uint16_t NumberOfPorts; /**< number of ports, host order */
} INET_PORT_RANGE;

/** Windows' other name for INET_PORT_RANGE. */
typedef INET_PORT_RANGE INET_PORT_RESERVATION;

/** A reservation's token (8 bytes, 8-aligned as on Windows). */
typedef struct INET_PORT_RESERVATION_TOKEN {
    uint64_t Token; /**< the token; 0 is INVALID_PORT_RESERVATION_TOKEN */
} PORTRES_ALIGN8 INET_PORT_RESERVATION_TOKEN;

/** What SIO_ACQUIRE_PORT_RESERVATION returns: the granted block and its token (16 bytes). */
typedef struct INET_PORT_RESERVATION_INSTANCE {
    INET_PORT_RANGE Reservation; /**< the granted block (StartPort in network byte order) */
    uint64_t Token PORTRES_ALIGN8; /**< its token, at offset 8 */
} INET_PORT_RESERVATION_INSTANCE;

/* Layouts are those of Windows (checked at compile time; C99 has no _Static_assert). */
#define PORTRES_STATIC_ASSERT(cond, name) typedef char portres_assert_##name[(cond) ? 1 : -1]
PORTRES_STATIC_ASSERT(sizeof(INET_PORT_RANGE) == 4, range_size);
PORTRES_STATIC_ASSERT(sizeof(INET_PORT_RESERVATION_TOKEN) == 8, token_size);
PORTRES_STATIC_ASSERT(sizeof(INET_PORT_RESERVATION_INSTANCE) == 16, instance_size);
PORTRES_STATIC_ASSERT(offsetof(INET_PORT_RESERVATION_INSTANCE, Token) == 8, token_offset);

/* ---- Constants ------------------------------------------------------------------------------ */

/** The invalid token. */
#define INVALID_PORT_RESERVATION_TOKEN ((uint64_t)0)

/** WSAIoctl: acquire a runtime reservation. In: INET_PORT_RANGE (StartPort 0: any block).
 *  Out: INET_PORT_RESERVATION_INSTANCE. The reservation belongs to the socket: it ends on
 *  portres_closesocket(s), on SIO_RELEASE_PORT_RESERVATION, or when the process exits. */
#define SIO_ACQUIRE_PORT_RESERVATION 0x98000064u
/** WSAIoctl: release a runtime reservation of this process. In: INET_PORT_RESERVATION_TOKEN. */
#define SIO_RELEASE_PORT_RESERVATION 0x98000065u
/** WSAIoctl: the socket's next portres_bind() takes its port from the reservation.
 *  In: INET_PORT_RESERVATION_TOKEN (runtime token of this process, or a persistent token the
 *  caller may use). Issue it before portres_bind(). */
#define SIO_ASSOCIATE_PORT_RESERVATION 0x98000066u

/** Win32 results of the persistent functions. */
#define NO_ERROR 0u                     /**< success */
#define ERROR_ACCESS_DENIED 5u          /**< the caller is not an administrator */
#define ERROR_SHARING_VIOLATION 32u     /**< overlaps a reservation, or a port is in use */
#define ERROR_INVALID_PARAMETER 87u     /**< StartPort 0, NumberOfPorts 0, past 65535, NULL Token */
#define ERROR_SERVICE_NOT_ACTIVE 1062u  /**< no portres daemon could be reached */
#define ERROR_NOT_FOUND 1168u           /**< no persistent reservation with exactly that block */
#define ERROR_INTERNAL_ERROR 1359u      /**< anything else (see the daemon's log) */

/** Winsock results (WSAGetLastError after SOCKET_ERROR). */
#define PORTRES_SOCKET_ERROR (-1)   /**< the failure return of WSAIoctl, portres_bind */
#define WSAEACCES 10013             /**< runtime token of another process; persistent token not allowed */
#define WSAEFAULT 10014             /**< a NULL buffer or lpcbBytesReturned */
#define WSAEINVAL 10022             /**< unknown code, buffer too small, bad or ended token, port outside the block */
#define WSAENOTSOCK 10038           /**< s is not a socket */
#define WSAEOPNOTSUPP 10045         /**< s is not a TCP or UDP socket */
#define WSAEAFNOSUPPORT 10047       /**< the address family differs from the socket's */
#define WSAEADDRINUSE 10048         /**< block overlaps another or a port is in use; no free port left */
#define WSAEADDRNOTAVAIL 10049      /**< not a local address */
#define WSAENETDOWN 10050           /**< no portres daemon could be reached */
#define WSAENOBUFS 10055            /**< no free block of that size; per-user quota; daemon failure */

/* ---- Functions ------------------------------------------------------------------------------ */

/** WSAIoctl for the three port-reservation codes (s is a file descriptor). Buffer sizes are
 *  checked (too small: WSAEINVAL, *bytes_returned = 0); s not a socket: WSAENOTSOCK; not TCP or
 *  UDP: WSAEOPNOTSUPP; unknown code: WSAEINVAL; NULL buffers or bytes_returned: WSAEFAULT.
 *  overlapped and completion are accepted and ignored: the call completes synchronously.
 *  Returns 0 (with *bytes_returned = 16 for acquire, 0 otherwise) or PORTRES_SOCKET_ERROR. */
int WSAIoctl(int s, uint32_t code, void *in_buf, uint32_t in_len, void *out_buf, uint32_t out_len,
             uint32_t *bytes_returned, void *overlapped, void *completion);

/** The Winsock code of this thread's last failed call. */
int WSAGetLastError(void);

/** Sets this thread's last error code. */
void WSASetLastError(int code);

/** bind(2) that honours SIO_ASSOCIATE_PORT_RESERVATION on s: port 0 gives a free port of the
 *  reservation, an explicit port inside it gives that port. s keeps its descriptor number and
 *  getsockname(s) reports the reserved port. These options set on s before the bind still hold
 *  after it: O_NONBLOCK, FD_CLOEXEC, SO_RCVBUF, SO_SNDBUF, SO_KEEPALIVE, SO_LINGER, SO_BROADCAST,
 *  SO_RCVTIMEO, SO_SNDTIMEO, SO_PRIORITY, IP_TOS, IPV6_TCLASS, TCP_NODELAY, TCP_KEEPIDLE,
 *  TCP_KEEPINTVL, TCP_KEEPCNT, and IPV6_V6ONLY; others (SO_REUSEADDR, SO_REUSEPORT,
 *  SO_BINDTODEVICE, SO_MARK, multicast memberships) do not, and are best set after the bind.
 *  Unassociated sockets bind exactly as with bind(2).
 *  Returns 0 or PORTRES_SOCKET_ERROR with errno and WSAGetLastError set. */
int portres_bind(int s, const struct sockaddr *addr, socklen_t addrlen);

/** Closes s; runtime reservations acquired on s end. Returns 0 or PORTRES_SOCKET_ERROR. */
int portres_closesocket(int s);

/** Creates a persistent TCP reservation (administrators); StartPort in network byte order.
 *  Returns NO_ERROR and *Token, or ERROR_INVALID_PARAMETER, ERROR_ACCESS_DENIED,
 *  ERROR_SHARING_VIOLATION, ERROR_SERVICE_NOT_ACTIVE, ERROR_INTERNAL_ERROR. */
uint32_t CreatePersistentTcpPortReservation(uint16_t StartPort, uint16_t NumberOfPorts, uint64_t *Token);
/** The UDP twin of CreatePersistentTcpPortReservation. */
uint32_t CreatePersistentUdpPortReservation(uint16_t StartPort, uint16_t NumberOfPorts, uint64_t *Token);
/** The token of the persistent TCP reservation with exactly this block (anyone may look up).
 *  Returns NO_ERROR, ERROR_INVALID_PARAMETER or ERROR_NOT_FOUND (or as above). */
uint32_t LookupPersistentTcpPortReservation(uint16_t StartPort, uint16_t NumberOfPorts, uint64_t *Token);
/** The UDP twin of LookupPersistentTcpPortReservation. */
uint32_t LookupPersistentUdpPortReservation(uint16_t StartPort, uint16_t NumberOfPorts, uint64_t *Token);
/** Deletes the persistent TCP reservation with exactly this block (administrators).
 *  Returns NO_ERROR, ERROR_INVALID_PARAMETER, ERROR_ACCESS_DENIED or ERROR_NOT_FOUND. */
uint32_t DeletePersistentTcpPortReservation(uint16_t StartPort, uint16_t NumberOfPorts);
/** The UDP twin of DeletePersistentTcpPortReservation. */
uint32_t DeletePersistentUdpPortReservation(uint16_t StartPort, uint16_t NumberOfPorts);

/* ---- Winsock spellings ---------------------------------------------------------------------- */

#ifdef PORTRES_WINSOCK_NAMES
#include <unistd.h>
typedef int SOCKET;                   /**< a socket is a file descriptor */
#define INVALID_SOCKET (-1)           /**< what socket() returns on failure */
#define SOCKET_ERROR PORTRES_SOCKET_ERROR
typedef struct sockaddr SOCKADDR;     /**< struct sockaddr */
typedef sa_family_t ADDRESS_FAMILY;   /**< an address family */
typedef uint16_t USHORT;              /**< 16-bit unsigned */
typedef uint32_t ULONG;               /**< 32-bit unsigned (Windows' ULONG is 32 bits) */
typedef uint32_t DWORD;               /**< 32-bit unsigned */
typedef DWORD *LPDWORD;               /**< pointer to DWORD */
typedef void *LPVOID;                 /**< untyped pointer */
typedef uint64_t ULONG64;             /**< 64-bit unsigned */
typedef ULONG64 *PULONG64;            /**< pointer to ULONG64 */
/** WSADATA: nothing to report on Linux; only its existence matters to callers. */
typedef struct WSADATA { USHORT wVersion; USHORT wHighVersion; } WSADATA;
#define MAKEWORD(a, b) ((USHORT)(((uint8_t)(a)) | ((USHORT)((uint8_t)(b))) << 8))
/** No-op: returns 0. */
static inline int WSAStartup(USHORT version, WSADATA *data) { (void)version; if (data) { data->wVersion = 0x0202; data->wHighVersion = 0x0202; } return 0; }
/** No-op: returns 0. */
static inline int WSACleanup(void) { return 0; }
/* Note: these are macros, so every later use of the names `bind` and `closesocket` (including
 * C++'s std::bind) is renamed; include this header last when that matters. */
#define closesocket portres_closesocket
#define bind portres_bind
#endif

#ifdef __cplusplus
}
#endif

#endif /* PORTRES_H */
