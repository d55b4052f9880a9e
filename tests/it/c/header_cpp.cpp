// The header compiles as C++ too, with the Winsock names.
#define PORTRES_WINSOCK_NAMES
#include <portres.h>
static_assert(sizeof(INET_PORT_RESERVATION_INSTANCE) == 16, "instance");
int main() {
    INET_PORT_RANGE r = {0, 1};
    WSADATA w;
    return (WSAStartup(MAKEWORD(2, 2), &w) == 0 && r.NumberOfPorts == 1) ? 0 : 1;
}
