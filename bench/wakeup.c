/* What this host charges for the things a relay does per datagram besides copying it: a
 * syscall, and a thread put to sleep and woken again (bench/wakeup.py runs it and prints
 * medians).
 *
 *   wakeup syscall COUNT             getppid COUNT times: the cost of entering the kernel
 *   wakeup pingpong COUNT CPU0 CPU1 [timed]
 *                                    two threads pass a byte back and forth over two pipes
 *                                    COUNT times, pinned to CPU0 and CPU1 (the same CPU or two):
 *                                    every pass puts one thread to sleep and wakes the other,
 *                                    as a relay's capture and emit threads wake each other per
 *                                    datagram at low rates. `timed`: each wait is a ppoll with
 *                                    a timeout (a kernel timer armed and cancelled per wait, as
 *                                    relayd's timed waits)
 *
 * Prints one line of key=value pairs: ns per syscall; or, per pass (one wake-up each), the
 * wall time and the process's CPU time (both threads). */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

struct side {
    int in, out, cpu, timed;
    long count;
};

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

/* Wait until `fd` is readable, then take the byte. */
static int take(int fd, int timed) {
    char byte;
    if (timed) {
        struct pollfd p = {fd, POLLIN, 0};
        struct timespec timeout = {1, 0}; /* never reached: the timer is armed and cancelled */
        if (ppoll(&p, 1, &timeout, NULL) != 1) return -1;
    }
    return read(fd, &byte, 1) == 1 ? 0 : -1;
}

static void *bounce(void *arg) {
    struct side *s = arg;
    if (pin(s->cpu) != 0) return (void *)1;
    for (long i = 0; i < s->count; i++)
        if (take(s->in, s->timed) != 0 || write(s->out, "x", 1) != 1) return (void *)1;
    return NULL;
}

static int pingpong(long count, int cpu0, int cpu1, int timed) {
    int there[2], back[2];
    if (pipe(there) != 0 || pipe(back) != 0) return perror("pipe"), 1;
    struct side peer = {there[0], back[1], cpu1, timed, count};
    if (pin(cpu0) != 0) return fprintf(stderr, "wakeup: cannot pin to CPU %d\n", cpu0), 1;
    pthread_t thread;
    if (pthread_create(&thread, NULL, bounce, &peer) != 0) return perror("pthread_create"), 1;
    int64_t cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID), start = now_ns(CLOCK_MONOTONIC);
    for (long i = 0; i < count; i++)
        if (write(there[1], "x", 1) != 1 || take(back[0], timed) != 0) return perror("pass"), 1;
    int64_t wall = now_ns(CLOCK_MONOTONIC) - start;
    cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu;
    void *failed;
    pthread_join(thread, &failed);
    if (failed) return fprintf(stderr, "wakeup: the peer thread failed\n"), 1;
    /* two passes per round trip, one wake-up each */
    printf("wall_us=%.3f cpu_us=%.3f\n", (double)wall / 1e3 / (2.0 * (double)count),
           (double)cpu / 1e3 / (2.0 * (double)count));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "syscall") == 0) {
        long count = atol(argv[2]);
        int64_t start = now_ns(CLOCK_MONOTONIC);
        for (long i = 0; i < count; i++) syscall(SYS_getppid);
        printf("ns=%.1f\n", (double)(now_ns(CLOCK_MONOTONIC) - start) / (double)count);
        return 0;
    }
    if (argc >= 5 && strcmp(argv[1], "pingpong") == 0)
        return pingpong(atol(argv[2]), atoi(argv[3]), atoi(argv[4]),
                        argc >= 6 && strcmp(argv[5], "timed") == 0);
    fprintf(stderr, "usage: wakeup syscall COUNT | wakeup pingpong COUNT CPU0 CPU1 [timed]\n");
    return 2;
}
