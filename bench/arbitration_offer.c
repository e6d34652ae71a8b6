/* The C arbiter's own cost per offer (run by `python -m bench.arbitration_emit`): two copies
 * of in-order Deribit packets (8-byte headers, 160-byte bodies, 64 channels over 4 ports)
 * offered alternately, each offer as the emit pump makes it (the lock, a CLOCK_MONOTONIC read,
 * arb_offer), so half are duplicates. Prints CPU ns (process time) per offer. */
#include "../relayd/_fastpath.c"

#include <stdio.h>

int main(int argc, char **argv) {
    long offers = argc > 1 ? atol(argv[1]) : 4000000;
    struct rd_arb_config cfg = {0};
    cfg.mode = ARB_MODE_DERIBIT;
    cfg.layout = ARB_LAYOUT_FRAME_V1;
    cfg.max_channels = 4096;
    cfg.max_held = 4096;
    cfg.max_held_bytes = 16 << 20;
    cfg.content_entries = 1 << 17;
    cfg.hold_timeout = 0.05;
    cfg.stale_horizon = 60;
    cfg.content_window = 2;
    struct rd_arb *a = rd_arb_new(&cfg);
    if (!a) return 1;
    uint8_t p[168];
    memset(p, 'x', sizeof p);
    uint16_t body = 160;
    memcpy(p, &body, 2);
    int64_t t0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    for (long i = 0; i < offers / 2; i++) {
        uint16_t channel = (uint16_t)(i % 64);
        uint32_t seq = (uint32_t)(i / 64 + 1);
        memcpy(p + 2, &channel, 2);
        memcpy(p + 4, &seq, 4);
        for (uint64_t source = 0; source < 2; source++) {
            pthread_mutex_lock(&a->lock);
            double now = (double)now_ns(CLOCK_MONOTONIC) / 1e9;
            arb_offer(a, source, source + 1, (uint64_t)i + 1, 0xEF6F6F01u,
                      (uint16_t)(6100 + channel % 4), p, sizeof p, now);
            pthread_mutex_unlock(&a->lock);
        }
    }
    int64_t t1 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    printf("%.1f ns per offer over %ld offers (%lu sent, %lu duplicates)\n",
           (double)(t1 - t0) / (double)offers, offers, (unsigned long)a->stats.sent,
           (unsigned long)a->stats.duplicates);
    rd_arb_free(a);
    return 0;
}
