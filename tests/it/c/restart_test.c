/* Live restore from C: acquire a reservation, print its first port, wait for a line on stdin
 * (the test restarts the daemon meanwhile), then associate and bind a socket from the same
 * reservation (the library reconnects and re-attaches by itself) and release it. Prints "ok".
 */
#define PORTRES_WINSOCK_NAMES
#include <portres.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    WSADATA wsa;
    WSAStartup(MAKEWORD(2, 2), &wsa);
    SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
    INET_PORT_RANGE range = {htons(0), 2};
    INET_PORT_RESERVATION_INSTANCE reservation;
    DWORD bytes = 0;
    if (WSAIoctl(s, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &reservation,
                 sizeof reservation, &bytes, NULL, NULL) == SOCKET_ERROR) {
        fprintf(stderr, "acquire failed: %d\n", WSAGetLastError());
        return 1;
    }
    printf("%u\n", ntohs(reservation.Reservation.StartPort));
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    SOCKET listener = socket(AF_INET, SOCK_STREAM, 0);
    INET_PORT_RESERVATION_TOKEN token = {reservation.Token};
    if (WSAIoctl(listener, SIO_ASSOCIATE_PORT_RESERVATION, &token, sizeof token, NULL, 0, &bytes,
                 NULL, NULL) == SOCKET_ERROR) {
        fprintf(stderr, "associate after the restart failed: %d\n", WSAGetLastError());
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = reservation.Reservation.StartPort;
    if (bind(listener, (SOCKADDR *)&addr, sizeof addr) == SOCKET_ERROR) {
        fprintf(stderr, "bind after the restart failed: %d\n", WSAGetLastError());
        return 1;
    }
    closesocket(listener);
    if (WSAIoctl(s, SIO_RELEASE_PORT_RESERVATION, &token, sizeof token, NULL, 0, &bytes, NULL,
                 NULL) == SOCKET_ERROR) {
        fprintf(stderr, "release after the restart failed: %d\n", WSAGetLastError());
        return 1;
    }
    printf("ok\n");
    closesocket(s);
    WSACleanup();
    return 0;
}
