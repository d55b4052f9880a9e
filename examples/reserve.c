/* portres from C, as Winsock code: acquire a reservation, associate a second socket with it,
 * bind that socket with port 0 (it gets a port of the block), print the port, release.
 *
 *   cc -I include examples/reserve.c -L target/release -lportres -o reserve && ./reserve
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
    INET_PORT_RANGE range = {htons(0), 8}; /* any 8 contiguous free ports */
    INET_PORT_RESERVATION_INSTANCE reservation;
    DWORD bytes = 0;
    if (WSAIoctl(s, SIO_ACQUIRE_PORT_RESERVATION, &range, sizeof range, &reservation,
                 sizeof reservation, &bytes, NULL, NULL) == SOCKET_ERROR) {
        fprintf(stderr, "acquire failed: %d\n", WSAGetLastError());
        return 1;
    }
    printf("reserved %u-%u\n", ntohs(reservation.Reservation.StartPort),
           ntohs(reservation.Reservation.StartPort) + reservation.Reservation.NumberOfPorts - 1);

    SOCKET listener = socket(AF_INET, SOCK_STREAM, 0);
    INET_PORT_RESERVATION_TOKEN token = {reservation.Token};
    if (WSAIoctl(listener, SIO_ASSOCIATE_PORT_RESERVATION, &token, sizeof token, NULL, 0, &bytes,
                 NULL, NULL) == SOCKET_ERROR) {
        fprintf(stderr, "associate failed: %d\n", WSAGetLastError());
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = 0; /* any port of the reservation */
    if (bind(listener, (SOCKADDR *)&addr, sizeof addr) == SOCKET_ERROR) {
        fprintf(stderr, "bind failed: %d\n", WSAGetLastError());
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(listener, (SOCKADDR *)&addr, &len);
    printf("bound port %u\n", ntohs(addr.sin_port));

    closesocket(listener);
    if (WSAIoctl(s, SIO_RELEASE_PORT_RESERVATION, &token, sizeof token, NULL, 0, &bytes, NULL,
                 NULL) == SOCKET_ERROR) {
        fprintf(stderr, "release failed: %d\n", WSAGetLastError());
        return 1;
    }
    printf("released\n");
    closesocket(s);
    WSACleanup();
    return 0;
}
