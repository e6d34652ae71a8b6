/* Paced multicast generator for the relay benchmark (bench/relay/ compiles and runs it).
 *
 * Every datagram starts with a 24-byte little-endian header the receiver (bench/recv.c) reads:
 *   u64 sequence (1, 2, 3, ... across all groups), u64 send time (CLOCK_REALTIME ns, taken
 *   just before the send call), u32 run id, u16 group index, u16 payload size.
 *
 * Shapes:
 *   fixed   SIZE-byte payloads, group round robin, datagram i due at start + i / RATE;
 *           whatever is due is sent at once (up to 64), so a late wake-up catches up without
 *           changing the average rate.
 *   bursty  bursts of BURST datagrams sent back to back, burst k due at start + k * BURST /
 *           RATE; sizes drawn from a Deribit-like distribution (median 153 B, p99 about
 *           1330 B, max 1458 B), groups drawn at random.
 *
 * Each datagram is sent with its own sendto and stamped right before it, so the stamp is the
 * datagram's own send time even inside a burst (with sendmmsg the last of 50 datagrams would
 * leave some 100 us after a stamp shared by the batch).
 *
 * Waiting: clock_nanosleep (timer slack 1 ns) until the next due time, spinning only for the
 * last few microseconds, so the generator leaves the shared cores to the relay.
 *
 * Prints one line: "sent N elapsed_s E max_late_us L batches B cpu_us_per_dgram C" (C: the
 * generator's own CPU time per datagram, which on a veth includes the receiving side's kernel
 * work: the packet is delivered in the sender's context).
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
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define MAX_GROUPS 64
#define MAX_BATCH 64
#define MAX_SIZE 1458
#define HEADER 24
#define SPIN_NS 8000

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint64_t rng_next(void) {
    /* xorshift64*: deterministic, good enough for sizes and group choice */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static double rng_unit(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }

/* Deribit-like payload sizes: the common sizes of the sample and their shares (percent), then
 * a long tail split in two uniform bands so that p99 lands near 1330 bytes. */
static const int common_sizes[] = {153, 52, 75, 220, 327, 24, 428, 345};
static const double common_share[] = {62.0, 9.0, 7.0, 7.0, 4.4, 2.4, 0.8, 0.7};
#define TAIL_LOW_SHARE 5.47 /* uniform 446..1300 */
/* the rest (about 1.23 %): uniform 1300..1458 */

static int bursty_size(void) {
    double u = rng_unit() * 100.0;
    size_t n = sizeof(common_sizes) / sizeof(common_sizes[0]);
    for (size_t i = 0; i < n; i++) {
        if (u < common_share[i]) return common_sizes[i];
        u -= common_share[i];
    }
    if (u < TAIL_LOW_SHARE) return 446 + (int)(rng_unit() * (1300 - 446 + 1));
    return 1300 + (int)(rng_unit() * (MAX_SIZE - 1300 + 1));
}

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void usage(void) {
    fprintf(stderr,
            "usage: gen --iface ADDR --groups G1,G2,.. --port P --rate R --count N\n"
            "           [--shape fixed|bursty] [--size B] [--burst N] [--run-id ID] [--ttl T]\n");
    exit(2);
}

static void wait_until(int64_t due_mono) {
    for (;;) {
        int64_t left = due_mono - now_ns(CLOCK_MONOTONIC);
        if (left <= 0 || stop_flag) return;
        if (left > SPIN_NS) {
            int64_t target = due_mono - SPIN_NS / 2;
            struct timespec ts = {.tv_sec = target / 1000000000LL,
                                  .tv_nsec = target % 1000000000LL};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
    }
}

int main(int argc, char **argv) {
    const char *iface = NULL, *groups_arg = NULL, *shape = "fixed";
    int port = 0, size = 160, burst = 50, ttl = 1;
    double rate = 0;
    long long count = 0;
    uint32_t run_id = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--iface")) iface = v;
        else if (!strcmp(a, "--groups")) groups_arg = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--count")) count = atoll(v);
        else if (!strcmp(a, "--shape")) shape = v;
        else if (!strcmp(a, "--size")) size = atoi(v);
        else if (!strcmp(a, "--burst")) burst = atoi(v);
        else if (!strcmp(a, "--run-id")) run_id = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--ttl")) ttl = atoi(v);
        else usage();
    }
    int bursty = !strcmp(shape, "bursty");
    if (!iface || !groups_arg || port <= 0 || rate <= 0 || count <= 0) usage();
    if (!bursty && strcmp(shape, "fixed")) usage();
    if (size < HEADER || size > MAX_SIZE || burst < 1 || burst > MAX_BATCH) usage();

    struct sockaddr_in dests[MAX_GROUPS];
    int ngroups = 0;
    char *groups = strdup(groups_arg);
    for (char *tok = strtok(groups, ","); tok; tok = strtok(NULL, ",")) {
        if (ngroups == MAX_GROUPS) usage();
        memset(&dests[ngroups], 0, sizeof(dests[0]));
        dests[ngroups].sin_family = AF_INET;
        dests[ngroups].sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, tok, &dests[ngroups].sin_addr) != 1) usage();
        ngroups++;
    }
    if (ngroups == 0) usage();

    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    struct in_addr ifaddr;
    if (inet_pton(AF_INET, iface, &ifaddr) != 1) usage();
    unsigned char ttl_byte = (unsigned char)ttl, loop = 0;
    int sndbuf = 8 << 20;
    if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &ifaddr, sizeof(ifaddr)) ||
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl_byte, 1) ||
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &loop, 1)) {
        perror("setsockopt");
        return 1;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)))
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));

    static unsigned char buf[MAX_SIZE];
    memset(buf, 0xA5, sizeof(buf));

    double interval_ns = (bursty ? burst : 1) * 1e9 / rate;
    long long sent = 0, batches = 0, slot = 0;
    int64_t max_late = 0;
    int64_t start = now_ns(CLOCK_MONOTONIC) + 1000000; /* 1 ms to settle */
    while (sent < count && !stop_flag) {
        int64_t due = start + (int64_t)(slot * interval_ns);
        wait_until(due);
        int64_t now = now_ns(CLOCK_MONOTONIC);
        if (now - due > max_late) max_late = now - due;
        int n;
        if (bursty) {
            n = burst;
            slot++;
        } else {
            /* every datagram due by now, at most one batch */
            long long due_slots = (long long)((now - start) / interval_ns) + 1;
            n = (int)(due_slots - slot);
            if (n < 1) n = 1;
            if (n > MAX_BATCH) n = MAX_BATCH;
            slot += n;
        }
        if (n > count - sent) n = (int)(count - sent);
        int done = 0;
        for (int i = 0; i < n && !stop_flag; i++) {
            uint64_t seq = (uint64_t)(sent + i + 1);
            int g = bursty ? (int)(rng_next() % (uint64_t)ngroups) : (int)((seq - 1) % ngroups);
            int len = bursty ? bursty_size() : size;
            if (len < HEADER) len = HEADER;
            put_u64(buf, seq);
            put_u32(buf + 16, run_id);
            put_u16(buf + 20, (uint16_t)g);
            put_u16(buf + 22, (uint16_t)len);
            put_u64(buf + 8, (uint64_t)now_ns(CLOCK_REALTIME));
            while (sendto(fd, buf, (size_t)len, 0, (struct sockaddr *)&dests[g],
                          sizeof(dests[g])) < 0) {
                if (errno != EINTR && errno != ENOBUFS && errno != EAGAIN) {
                    perror("sendto");
                    return 1;
                }
                if (stop_flag) break;
            }
            done++;
        }
        sent += done;
        batches++;
    }
    double elapsed = (double)(now_ns(CLOCK_MONOTONIC) - start) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_us = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
                    (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    printf("sent %lld elapsed_s %.6f max_late_us %.1f batches %lld cpu_us_per_dgram %.2f\n",
           sent, elapsed, (double)max_late / 1e3, batches, sent ? cpu_us / (double)sent : 0.0);
    return 0;
}
