/* Multicast receiver for the relay benchmark (bench/relay/ compiles and runs it).
 *
 * Joins the groups on one interface with one socket, reads with recvmmsg and checks every
 * datagram written by bench/gen.c (same run id): loss (sequences never seen), duplicates,
 * reordering (a sequence lower than the highest already seen in its group) and one-way latency.
 * All namespaces share CLOCK_REALTIME, so latency = receive time - send stamp, where the
 * receive time is CLOCK_REALTIME read right after recvmmsg returns (what an application sees).
 * The kernel's own arrival stamp (SO_TIMESTAMPNS) is reported too ("kernel" latency: the path
 * without the receiver's wake-up). SO_RXQ_OVFL tells whether this socket dropped anything,
 * which would make the receiver, not the path under test, the cause of a loss.
 *
 * Stops when --count unique datagrams arrived, when nothing arrived for --idle-ms after the
 * first datagram, at --timeout-ms, or on SIGTERM/SIGINT. With --until-all-groups it stops as
 * soon as every group delivered one datagram of any run (a readiness probe).
 *
 * Prints one line of "key value" pairs (see print_result).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define MAX_GROUPS 64
#define BATCH 64
#define BUFSIZE 2048
#define HEADER 24
#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get_u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double percentile(const int64_t *sorted, long long n, double q) {
    if (n == 0) return -1;
    long long idx = (long long)(q * (double)(n - 1) + 0.5);
    if (idx >= n) idx = n - 1;
    return (double)sorted[idx] / 1e3;
}

static void usage(void) {
    fprintf(stderr,
            "usage: recv --iface ADDR --groups G1,G2,.. --port P [--count N] [--run-id ID]\n"
            "            [--idle-ms MS] [--timeout-ms MS] [--until-all-groups]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *iface = NULL, *groups_arg = NULL;
    int port = 0, probe = 0;
    long long count = 0, idle_ms = 1000, timeout_ms = 60000;
    uint32_t run_id = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--until-all-groups")) {
            probe = 1;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--iface")) iface = v;
        else if (!strcmp(a, "--groups")) groups_arg = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--count")) count = atoll(v);
        else if (!strcmp(a, "--run-id")) run_id = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--idle-ms")) idle_ms = atoll(v);
        else if (!strcmp(a, "--timeout-ms")) timeout_ms = atoll(v);
        else usage();
    }
    if (!iface || !groups_arg || port <= 0) usage();
    if (!probe && count <= 0) usage();

    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    int one = 1, rcvbuf = 64 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one));
    struct timeval tv = {.tv_sec = 0, .tv_usec = 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct sockaddr_in bind_addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(fd, (struct sockaddr *)&bind_addr, sizeof(bind_addr))) {
        perror("bind");
        return 1;
    }
    struct in_addr ifaddr;
    if (inet_pton(AF_INET, iface, &ifaddr) != 1) usage();
    int ngroups = 0;
    char *groups = strdup(groups_arg);
    for (char *tok = strtok(groups, ","); tok; tok = strtok(NULL, ",")) {
        struct ip_mreq mreq;
        if (ngroups == MAX_GROUPS || inet_pton(AF_INET, tok, &mreq.imr_multiaddr) != 1) usage();
        mreq.imr_interface = ifaddr;
        if (setsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mreq, sizeof(mreq))) {
            perror("IP_ADD_MEMBERSHIP");
            return 1;
        }
        ngroups++;
    }
    printf("ready\n");
    fflush(stdout);

    long long cap = probe ? 1 : count;
    unsigned char *seen = calloc((size_t)cap + 1, 1);
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)cap);
    int64_t *klat = malloc(sizeof(int64_t) * (size_t)cap);
    uint64_t last_seq[MAX_GROUPS] = {0};
    int group_seen[MAX_GROUPS] = {0};
    long long unique = 0, dups = 0, reorder = 0, foreign = 0, bad = 0, nlat = 0, nklat = 0;
    long long bytes = 0;
    uint32_t drops = 0;

    static unsigned char bufs[BATCH][BUFSIZE];
    static char ctrl[BATCH][256];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = BUFSIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    int64_t started = now_ns(CLOCK_MONOTONIC), last_rx = 0, first_rx_real = 0, last_rx_real = 0;
    int done = 0;
    while (!stop_flag && !done) {
        for (int i = 0; i < BATCH; i++) {
            msgs[i].msg_hdr.msg_control = ctrl[i];
            msgs[i].msg_hdr.msg_controllen = sizeof(ctrl[i]);
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        int64_t mono = now_ns(CLOCK_MONOTONIC);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                perror("recvmmsg");
                return 1;
            }
            if (mono - started > timeout_ms * 1000000LL) break;
            if (last_rx && mono - last_rx > idle_ms * 1000000LL) break;
            continue;
        }
        int64_t real = now_ns(CLOCK_REALTIME);
        last_rx = mono;
        if (!first_rx_real) first_rx_real = real;
        last_rx_real = real;
        for (int i = 0; i < n; i++) {
            unsigned len = msgs[i].msg_len;
            const unsigned char *p = bufs[i];
            int64_t kstamp = 0;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c;
                 c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
                if (c->cmsg_level != SOL_SOCKET) continue;
                if (c->cmsg_type == SO_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(c), sizeof(ts));
                    kstamp = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
                } else if (c->cmsg_type == SO_RXQ_OVFL) {
                    memcpy(&drops, CMSG_DATA(c), sizeof(drops));
                }
            }
            if (len < HEADER) {
                bad++;
                continue;
            }
            uint64_t seq = get_u64(p);
            int64_t sent_at = (int64_t)get_u64(p + 8);
            uint32_t rid = get_u32(p + 16);
            uint16_t g = get_u16(p + 20);
            uint16_t size = get_u16(p + 22);
            if (g >= MAX_GROUPS || size != len) {
                bad++;
                continue;
            }
            if (probe) {
                if (!group_seen[g]) {
                    group_seen[g] = 1;
                    unique++;
                }
                if (unique >= ngroups) done = 1;
                continue;
            }
            if (rid != run_id) {
                foreign++;
                continue;
            }
            if (seq == 0 || seq > (uint64_t)count) {
                bad++;
                continue;
            }
            if (seen[seq]) {
                dups++;
                continue;
            }
            seen[seq] = 1;
            unique++;
            bytes += len;
            if (seq < last_seq[g]) reorder++;
            else last_seq[g] = seq;
            lat[nlat++] = real - sent_at;
            if (kstamp) klat[nklat++] = kstamp - sent_at;
        }
        if (!probe && unique >= count) done = 1;
    }
    if (probe) {
        printf("probe groups %lld of %d\n", unique, ngroups);
        return unique >= ngroups ? 0 : 3;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_us = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
                    (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    qsort(lat, (size_t)nlat, sizeof(int64_t), cmp_i64);
    qsort(klat, (size_t)nklat, sizeof(int64_t), cmp_i64);
    printf("received %lld bytes %lld dup %lld reorder %lld foreign %lld bad %lld drops %u"
           " p50_us %.1f p99_us %.1f p999_us %.1f max_us %.1f"
           " k_p50_us %.1f k_p99_us %.1f k_p999_us %.1f k_max_us %.1f span_s %.6f"
           " cpu_us_per_dgram %.2f\n",
           unique, bytes, dups, reorder, foreign, bad, drops, percentile(lat, nlat, 0.5),
           percentile(lat, nlat, 0.99), percentile(lat, nlat, 0.999),
           percentile(lat, nlat, 1.0), percentile(klat, nklat, 0.5),
           percentile(klat, nklat, 0.99), percentile(klat, nklat, 0.999),
           percentile(klat, nklat, 1.0), (double)(last_rx_real - first_rx_real) / 1e9,
           unique ? cpu_us / (double)unique : 0.0);
    return 0;
}
