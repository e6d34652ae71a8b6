/* The cost of one multicast send from C, three ways (bench/sendpath.py runs it in the
 * generator namespace): sendto on one socket, send on a socket connected to each group, and
 * sendmmsg in batches of 8. Payloads are stamped like bench/sendpath.py's (sequence, send time,
 * run id 7, group, size) so bench/recv.c counts them. Prints the rate and CPU per datagram.
 *
 * usage: sendpath sendto|connected|sendmmsg COUNT IFACE_ADDR PORT GROUP1 GROUP2 GROUP3 GROUP4
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#define SIZE 160
#define GROUPS 4
#define BATCH 8

static int sender(const char *iface) {
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    struct in_addr addr;
    int zero = 0, buffer = 8 << 20;
    if (sock < 0 || !inet_aton(iface, &addr)) return -1;
    setsockopt(sock, IPPROTO_IP, IP_MULTICAST_IF, &addr, sizeof addr);
    setsockopt(sock, IPPROTO_IP, IP_MULTICAST_LOOP, &zero, sizeof zero);
    setsockopt(sock, SOL_SOCKET, SO_SNDBUFFORCE, &buffer, sizeof buffer);
    return sock;
}

static void stamp(uint8_t *payload, uint64_t seq, int group) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    uint32_t run = 7;
    uint16_t g = (uint16_t)group, size = SIZE;
    memcpy(payload, &seq, 8); /* little-endian, as struct "<QQIHH" */
    memcpy(payload + 8, &ns, 8);
    memcpy(payload + 16, &run, 4);
    memcpy(payload + 20, &g, 2);
    memcpy(payload + 22, &size, 2);
}

static double cpu_us(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e6 +
           (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec);
}

int main(int argc, char **argv) {
    if (argc != 5 + GROUPS) {
        fprintf(stderr, "usage: sendpath sendto|connected|sendmmsg COUNT IFACE PORT G1 G2 G3 G4\n");
        return 2;
    }
    const char *way = argv[1];
    long count = atol(argv[2]);
    int shared = sender(argv[3]), connected[GROUPS];
    struct sockaddr_in dest[GROUPS];
    for (int i = 0; i < GROUPS; i++) {
        memset(&dest[i], 0, sizeof dest[i]);
        dest[i].sin_family = AF_INET;
        dest[i].sin_port = htons((uint16_t)atoi(argv[4]));
        if (!inet_aton(argv[5 + i], &dest[i].sin_addr)) return 2;
        connected[i] = sender(argv[3]);
        if (connect(connected[i], (struct sockaddr *)&dest[i], sizeof dest[i]) < 0) return 1;
    }
    if (shared < 0) return 1;
    static uint8_t payloads[BATCH][SIZE];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct timespec t0, t1;
    double cpu0 = cpu_us();
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long seq = 1; seq <= count;) {
        if (!strcmp(way, "sendmmsg")) {
            int n = 0;
            for (; n < BATCH && seq + n <= count; n++) {
                int g = (int)((seq + n) % GROUPS);
                stamp(payloads[n], (uint64_t)(seq + n), g);
                iov[n] = (struct iovec){payloads[n], SIZE};
                memset(&msgs[n], 0, sizeof msgs[n]);
                msgs[n].msg_hdr.msg_iov = &iov[n];
                msgs[n].msg_hdr.msg_iovlen = 1;
                msgs[n].msg_hdr.msg_name = &dest[g];
                msgs[n].msg_hdr.msg_namelen = sizeof dest[g];
            }
            for (int done = 0; done < n;) {
                int sent = sendmmsg(shared, msgs + done, (unsigned)(n - done), 0);
                if (sent > 0) done += sent;
            }
            seq += n;
        } else {
            int g = (int)(seq % GROUPS);
            stamp(payloads[0], (uint64_t)seq, g);
            if (!strcmp(way, "connected")) {
                while (send(connected[g], payloads[0], SIZE, 0) < 0) {
                }
            } else {
                while (sendto(shared, payloads[0], SIZE, 0, (struct sockaddr *)&dest[g],
                              sizeof dest[g]) < 0) {
                }
            }
            seq++;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double elapsed = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("C %-9s %6.0fk/s  CPU %5.2f µs/dgram\n", way, (double)count / elapsed / 1000,
           (cpu_us() - cpu0) / (double)count);
    return 0;
}
