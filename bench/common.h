/* What the benchmarks' C programs share: stop on SIGTERM/SIGINT, and a clock in ns (inline, so
 * a program that uses one of them only is not warned about the other). */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <signal.h>
#include <stdint.h>
#include <time.h>

static volatile sig_atomic_t stop_flag;

static inline void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static inline int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
