/* relayd's data plane in C: the per-datagram loops of both feeds, without the GIL.
 *
 * The C leaf of relayd's DataPlane (relayd/datapath.py), loaded with ctypes by
 * relayd/fastpath/, so it does not depend on the Python ABI. Every entry point is called
 * through ctypes.CDLL, which releases the GIL for the length of the call. The rules it applies
 * per datagram (sequence acceptance, destination verdict, ACK coalescing) are specified once,
 * in relayd/session.py (with the size rule), and the differential tests hold this file to them. Python keeps
 * everything but the hot loop: handshake, replay buffer, supervision, health, metrics, and every
 * rare case (a control frame, a malformed frame, a destination seen for the first time, an
 * error). C handles only what it can check completely; anything else goes back to Python with
 * the stream positioned at the frame in question, and the Python decoder gives the verdict.
 *
 * Wire format (docs/PROTOCOL.md): u16 length | u8 type | body, network byte order. DATA is
 * length type flags port group seq ts (26 bytes) + payload.
 *
 * The ABI is defined here once: each struct shared with Python is a list of fields (the
 * RD_*_FIELDS macros) from which both the struct and the layout table rd_layout() are made,
 * and rd_constants() exports the shared constants. relayd/fastpath/abi.py compares its ctypes
 * definitions with both, field by field and value by value, when it loads the library.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define RD_ABI 16

/* Why a call returned (both loops). */
enum {
    RD_STOPPED = 1,    /* the stop pipe became readable */
    RD_EOF = 2,        /* the peer closed the TCP connection */
    RD_RESET = 3,      /* recv failed: err */
    RD_IDLE = 4,       /* nothing received for idle_ns */
    RD_CONTROL = 5,    /* buf[start] is a frame C does not handle: Python decodes it */
    RD_NEED_DEST = 6,  /* buf[start] is DATA for need_key, not in the table yet */
    RD_SEND_ERROR = 7, /* a multicast send failed (err, to need_key); that datagram is consumed */
    RD_SLOW = 8,       /* an ACK or HEARTBEAT could not be written for idle_ns: slow consumer */
    RD_EMPTY = 9,      /* capture: the socket has no more datagrams */
    RD_FULL = 10,      /* capture: the frame buffer has no room for another datagram */
    RD_ERROR = 11,     /* capture: recvmsg or poll failed: err */
    RD_GATED = 12,     /* emit: the gate is closed (lease stale): buf[start] is not emitted */
};

/* A capture connection's claim word (relayd/capture/uplink.py): the connection's fd while a
 * receive thread may write its next batch to it at once (caught up, nothing else to write),
 * RD_CLAIM_CLOSED while it may not, RD_CLAIM_HELD while a thread writes a batch to it. */
enum { RD_CLAIM_CLOSED = -1, RD_CLAIM_HELD = -2 };

/* The destination table's states: session.Destination's values, and empty. */
enum { DEST_EMPTY = 0, DEST_ALLOWED = 1, DEST_DENIED_GROUP = 2, DEST_DENIED_PORT = 3 };

#define DATA_HEADER 26
#define DATA_BODY_MIN 24 /* DATA length field: everything after the length, header included */
#define MAX_PAYLOAD 65507 /* largest UDP payload over IPv4 */
#define TYPE_DATA 0x01
#define TYPE_HEARTBEAT 0x02
#define TYPE_ACK 0x03
#define TYPE_ERROR 0x04
#define TYPE_CHALLENGE 0x10
#define CHALLENGE_LENGTH 23 /* type magic version flags nonce */
#define MAX_ERROR_TEXT 1024
#define LATENCY_BUCKETS 26 /* log2 buckets of 1 us .. 2**25 us, then +Inf (metrics.py) */
#define DEST_SLOTS 1024    /* per connection; cleared when half full */
/* The Deribit layouts (relayd.arbitration.DeribitLayout), for the arbiter and the upstream
 * sequence check alike */
#define SEQ_FRAME_V1 0
#define SEQ_SBE 1
#define SEQ_SNAPSHOT_PORTS 8 /* snapshot ports of the 8-byte layout at most */
#define UP_FRAME_V1 SEQ_FRAME_V1
#define UP_SBE SEQ_SBE
#define UP_MAX_SNAPSHOT_PORTS SEQ_SNAPSHOT_PORTS

/* A/B arbitration (the section "A/B arbitration" below): */
enum { ARB_MODE_NONE = 0, ARB_MODE_CONTENT = 1, ARB_MODE_DERIBIT = 2 };
enum { ARB_LAYOUT_FRAME_V1 = SEQ_FRAME_V1, ARB_LAYOUT_SBE = SEQ_SBE };
/* Verdicts: arbiter.Verdict's, in its order. */
enum {
    ARB_EMIT = 1, ARB_GAP = 2, ARB_RESET = 3, ARB_OVERLAP = 4, ARB_UNSEQUENCED = 5,
    ARB_MALFORMED = 6, ARB_DUPLICATE = 7, ARB_HELD = 8,
};
#define ARB_SOURCES 16        /* sources counted apart (sent_by_source); higher ones share the last */
#define ARB_SNAPSHOT_PORTS SEQ_SNAPSHOT_PORTS
#define ARB_SEND_WAIT_MS 1000 /* a full multicast socket gets this long under the lock */

#define RD_ARB_CONFIG_FIELDS(F)                                                               \
    F(uint64_t, mode, ) F(uint64_t, layout, )                                                  \
    F(uint64_t, max_channels, ) F(uint64_t, max_held, ) F(uint64_t, max_held_bytes, )          \
    F(uint64_t, content_entries, )                                                             \
    F(double, hold_timeout, ) F(double, stale_horizon, ) F(double, content_window, )           \
    F(uint64_t, snapshot_port_count, ) F(uint64_t, snapshot_ports, [ARB_SNAPSHOT_PORTS])

/* arbiter.ArbiterStats' counters (sent_by_source as an array), and gauges; read without the
 * lock (aligned 64-bit words). */
#define RD_ARB_STATS_FIELDS(F)                                                                \
    F(uint64_t, offered, ) F(uint64_t, sent, ) F(uint64_t, duplicates, )                       \
    F(uint64_t, held, ) F(uint64_t, released, ) F(uint64_t, gaps, ) F(uint64_t, missing, )     \
    F(uint64_t, snapshot_gaps, ) F(uint64_t, resets, ) F(uint64_t, overlaps, )                 \
    F(uint64_t, heartbeats, ) F(uint64_t, skipped_heartbeats, ) F(uint64_t, unsequenced, )     \
    F(uint64_t, malformed, ) F(uint64_t, observed, ) F(uint64_t, hold_overflows, )             \
    F(uint64_t, channel_evictions, ) F(uint64_t, content_evictions, )                          \
    F(uint64_t, held_now, ) F(uint64_t, held_bytes, ) F(uint64_t, channels, )                  \
    F(uint64_t, live_sources, ) F(uint64_t, gap_size, )                                        \
    F(uint64_t, sent_by_source, [ARB_SOURCES])

/* One released datagram, as the test entry point hands it out. */
#define RD_ARB_RELEASE_FIELDS(F)                                                              \
    F(uint64_t, source, ) F(uint64_t, group, ) F(uint64_t, port, ) F(uint64_t, gap, )          \
    F(uint64_t, len, )


/* F(type, name, array dimension or nothing): 8-byte fields (or arrays of them) only, so there
 * is no padding to disagree on. */
#define RD_DEST_FIELDS(F)                                                                     \
    F(uint64_t, key, )   /* group << 16 | port */                                              \
    F(uint64_t, state, )                                                                       \
    F(uint64_t, addr, )  /* struct sockaddr_in, IPv4 only: 16 bytes */                         \
    F(uint64_t, addr2, )                                                                       \
    F(int64_t, fd, )     /* a socket connected to this destination (cached route), or -1 */

/* The emit gate of one feed (relayd/emit/observer.py): its pumps may emit a datagram only
 * while CLOCK_MONOTONIC is before open_until_ns, a lease the feed's observer renews after it
 * has drained what other relays sent; a host waking from a freeze finds it stale. */
#define RD_GATE_FIELDS(F)                                                                     \
    F(int64_t, open_until_ns, )

#define RD_EMIT_FIELDS(F)                                                                     \
    /* set by Python before the first call */                                                  \
    F(int64_t, tcp_fd, ) F(int64_t, stop_fd, ) F(int64_t, mcast_fd, )                          \
    F(uint8_t *, buf, )                                                                        \
    F(uint64_t, cap, )                                                                         \
    F(int64_t, idle_ns, )         /* nothing received this long: RD_IDLE; written: RD_SLOW */  \
    F(int64_t, ack_interval_ns, ) /* shortest time between two control frames */               \
    F(int64_t, heartbeat_ns, )    /* a HEARTBEAT after this long without output */             \
    F(uint64_t, max_payload, )    /* larger payloads are dropped (1..MAX_PAYLOAD) */           \
    F(struct rd_arb *, arb, )     /* the feed's arbiter, or NULL (arbitration = "none") */     \
    F(uint64_t, arb_source, )     /* this connection's source number for the arbiter */        \
    F(uint64_t, arb_owner, )      /* its session's owner number there (held: ACKs wait) */     \
    F(int64_t, busy_ns, )         /* latency mode: poll without sleeping this long after data */ \
    F(struct rd_gate *, gate, )   /* NULL: no gate, always open */                             \
    /* the stream: undecoded bytes are buf[start:end] */                                       \
    F(uint64_t, start, ) F(uint64_t, end, )                                                    \
    F(uint64_t, highest, )        /* highest sequence emitted or deliberately skipped */       \
    F(uint64_t, acked, )          /* highest sequence ACKed to the peer, */                    \
    F(uint64_t, acked_any, )      /* ... once this is 1 (0: not even the welcome ACK) */       \
    F(uint64_t, resuming, )       /* 1 until the first DATA: where it resumes, never a gap */  \
    F(int64_t, last_out_ns, )     /* CLOCK_MONOTONIC of the latest control frame written */    \
    F(int64_t, blocked_since_ns, ) /* when the pending control frame found the socket full */  \
    F(uint64_t, out_off, ) F(uint64_t, out_len, ) /* the control frame being written */        \
    F(uint8_t, out, [16])                                                                      \
    F(uint64_t, acks_sent, ) F(uint64_t, heartbeats_sent, )                                    \
    F(uint64_t, clear_dests, )                                                                 \
    /* counters, only ever growing (Python adds their growth to the feed's) */                 \
    F(uint64_t, bytes_in, ) F(uint64_t, frames_in, ) F(uint64_t, datagrams_in, )               \
    F(uint64_t, datagrams_out, ) F(uint64_t, bytes_out, ) F(uint64_t, duplicates, )            \
    F(uint64_t, gaps, ) F(uint64_t, gap_sequences, ) F(uint64_t, send_waits, )                 \
    F(uint64_t, denied_group, ) F(uint64_t, denied_port, ) F(uint64_t, send_errors, )          \
    F(uint64_t, oversize, )       /* allowed, dropped for max_payload (session.oversize) */    \
    F(uint64_t, last_send_ok, )   /* 1 when the latest send succeeded */                       \
    F(uint64_t, last_ts_ns, )     /* capture stamp of the latest datagram emitted */           \
    F(uint64_t, chunk_ts_ns, )    /* ... in the chunk being emitted: observed once it is done */ \
    F(int64_t, last_rx_ns, )      /* CLOCK_MONOTONIC of the latest chunk received */           \
    F(uint64_t, latency, [LATENCY_BUCKETS + 1])                                                \
    F(uint64_t, latency_count, ) F(uint64_t, latency_sum_ns, )                                 \
    /* detail of the latest return */                                                          \
    F(int64_t, err, )                                                                          \
    F(uint64_t, need_key, )                                                                    \
    F(struct rd_dest, dests, [DEST_SLOTS])                                                     \
    F(uint64_t, dest_count, )

#define RD_CAPTURE_FIELDS(F)                                                                  \
    F(int64_t, fd, ) F(int64_t, stop_fd, )                                                     \
    F(uint8_t *, buf, )                                                                        \
    F(uint64_t, cap, )                                                                         \
    F(uint64_t, room, ) /* a batch ends when less than this is left after the last frame */    \
    F(uint64_t, port, )                                                                        \
    F(int64_t, busy_ns, ) /* latency mode: poll without sleeping this long after a batch */    \
    F(int64_t, hold_ns, ) /* a batch written whole stays open this long for more (capture_hold) */ \
    F(int64_t, hold_gap_ns, ) /* ... while wake-ups come closer together than this */           \
    F(struct rd_numbering *, numbering, ) /* the feed's sequence, shared by its sockets */     \
    F(int64_t *, claim, ) /* the connection's claim word (rd_claim_swap), or NULL: never */    \
    F(uint64_t, held, ) /* this socket's thread holds the numbering lock (until the next call) */ \
    F(uint64_t, more, ) /* the last batch was full: the next call does not wait */             \
    F(uint64_t, joined, ) /* counted in the numbering's users (until rd_capture_done) */      \
    F(uint64_t, last_wake, ) /* datagrams the latest wake-up received (1: a low rate) */       \
    F(int64_t, last_wake_ns, ) /* CLOCK_MONOTONIC of the latest wake-up */                     \
    F(int64_t, claimed_fd, ) /* the connection the batch claimed */                            \
    /* out, per batch */                                                                       \
    F(uint64_t, first, ) /* the batch's first sequence number */                                \
    F(uint64_t, claimed, ) /* the batch claimed the connection and was written to it */         \
    F(uint64_t, count, ) F(uint64_t, offset, ) F(uint64_t, payload_bytes, )                    \
    F(uint64_t, sent, )    /* bytes of the batch sent (fewer: the socket is full) */          \
    F(int64_t, send_err, ) /* errno of a failed send, else 0 */                                \
    F(uint64_t, drops, ) F(uint64_t, drops_seen, ) /* SO_RXQ_OVFL: cumulative drop counter */  \
    F(int64_t, err, )                                                                          \
    F(struct rd_upstream *, upstream, ) /* the feed's upstream sequence check, or NULL */

/* The capture side's reader of one TCP connection: what the emit side sends back. */
#define RD_CAPTURE_RX_FIELDS(F)                                                               \
    F(int64_t, tcp_fd, ) F(int64_t, stop_fd, ) F(int64_t, idle_ns, )                           \
    F(uint8_t *, buf, )                                                                        \
    F(uint64_t, cap, )                                                                         \
    F(uint64_t, start, ) F(uint64_t, end, ) /* undecoded bytes are buf[start:end] */           \
    F(uint64_t, acked, ) /* highest ACK received, 0 for none (read by the receive threads) */  \
    F(uint64_t, acks, ) F(uint64_t, heartbeats, ) F(uint64_t, bytes_in, )                      \
    F(int64_t, err, )

/* The capture side's count of the exchange's own sequence numbers (rd_upstream_read). */
#define RD_UPSTREAM_STATS_FIELDS(F)                                                           \
    F(uint64_t, datagrams, ) F(uint64_t, gaps, ) F(uint64_t, missing, )                        \
    F(uint64_t, snapshot_gaps, ) F(uint64_t, duplicates, ) F(uint64_t, resets, )               \
    F(uint64_t, overlaps, ) F(uint64_t, heartbeats, ) F(uint64_t, unsequenced, )               \
    F(uint64_t, malformed, ) F(uint64_t, evictions, ) F(uint64_t, channels, )                  \
    /* the latest gap: where, and how many sequence numbers it skipped */                      \
    F(uint64_t, last_gap_group, ) F(uint64_t, last_gap_port, )                                 \
    F(uint64_t, last_gap_channel, ) F(uint64_t, last_gap_missing, )

/* One channel's counters (rd_upstream_channels), and where its sequence stands. */
#define RD_UPSTREAM_CHANNEL_FIELDS(F)                                                         \
    F(uint64_t, group, ) F(uint64_t, port, ) F(uint64_t, channel, )                            \
    F(uint64_t, snapshot, ) /* 1: a snapshot channel (FRAME_V1 on a snapshot port) */          \
    F(uint64_t, datagrams, ) F(uint64_t, gaps, ) F(uint64_t, missing, )                        \
    F(uint64_t, duplicates, ) F(uint64_t, resets, ) F(uint64_t, overlaps, )                    \
    F(int64_t, next, ) F(int64_t, stamp, ) /* the next sequence expected, sendingTime seen */

struct rd_upstream; /* opaque: rd_upstream_new */
struct rd_numbering; /* opaque: rd_numbering_new */
#define RD_DECLARE(type, name, dim) type name dim;
struct rd_arb; /* opaque: its config and stats are the shared parts */
struct rd_dest { RD_DEST_FIELDS(RD_DECLARE) };
struct rd_gate { RD_GATE_FIELDS(RD_DECLARE) };
struct rd_emit { RD_EMIT_FIELDS(RD_DECLARE) };
struct rd_capture { RD_CAPTURE_FIELDS(RD_DECLARE) };
struct rd_capture_rx { RD_CAPTURE_RX_FIELDS(RD_DECLARE) };
struct rd_arb_config { RD_ARB_CONFIG_FIELDS(RD_DECLARE) };
struct rd_arb_stats { RD_ARB_STATS_FIELDS(RD_DECLARE) };
struct rd_arb_release { RD_ARB_RELEASE_FIELDS(RD_DECLARE) };
struct rd_upstream_stats { RD_UPSTREAM_STATS_FIELDS(RD_DECLARE) };
struct rd_upstream_channel { RD_UPSTREAM_CHANNEL_FIELDS(RD_DECLARE) };

/* The layout table: one row per field of every shared struct, then one per struct (field NULL,
 * its size), then a row of NULLs. */
struct rd_field {
    const char *record, *field;
    uint64_t offset, size;
};
#define RD_ROW(record, type, name, dim) \
    {#record, #name, offsetof(struct record, name), sizeof(((struct record *)0)->name)},
#define RD_DEST_ROW(type, name, dim) RD_ROW(rd_dest, type, name, dim)
#define RD_GATE_ROW(type, name, dim) RD_ROW(rd_gate, type, name, dim)
#define RD_EMIT_ROW(type, name, dim) RD_ROW(rd_emit, type, name, dim)
#define RD_CAPTURE_ROW(type, name, dim) RD_ROW(rd_capture, type, name, dim)
#define RD_CAPTURE_RX_ROW(type, name, dim) RD_ROW(rd_capture_rx, type, name, dim)
#define RD_ARB_CONFIG_ROW(type, name, dim) RD_ROW(rd_arb_config, type, name, dim)
#define RD_ARB_STATS_ROW(type, name, dim) RD_ROW(rd_arb_stats, type, name, dim)
#define RD_ARB_RELEASE_ROW(type, name, dim) RD_ROW(rd_arb_release, type, name, dim)
#define RD_UPSTREAM_STATS_ROW(type, name, dim) RD_ROW(rd_upstream_stats, type, name, dim)
#define RD_UPSTREAM_CHANNEL_ROW(type, name, dim) RD_ROW(rd_upstream_channel, type, name, dim)
#define RD_SIZE_ROW(record) {#record, NULL, 0, sizeof(struct record)},
static const struct rd_field layout[] = {
    RD_DEST_FIELDS(RD_DEST_ROW) RD_EMIT_FIELDS(RD_EMIT_ROW) RD_CAPTURE_FIELDS(RD_CAPTURE_ROW)
    RD_CAPTURE_RX_FIELDS(RD_CAPTURE_RX_ROW)
    RD_UPSTREAM_STATS_FIELDS(RD_UPSTREAM_STATS_ROW)
    RD_UPSTREAM_CHANNEL_FIELDS(RD_UPSTREAM_CHANNEL_ROW)
    RD_SIZE_ROW(rd_dest) RD_SIZE_ROW(rd_emit) RD_SIZE_ROW(rd_capture) RD_SIZE_ROW(rd_capture_rx)
    RD_ARB_CONFIG_FIELDS(RD_ARB_CONFIG_ROW) RD_ARB_STATS_FIELDS(RD_ARB_STATS_ROW)
    RD_ARB_RELEASE_FIELDS(RD_ARB_RELEASE_ROW)
    RD_SIZE_ROW(rd_arb_config) RD_SIZE_ROW(rd_arb_stats) RD_SIZE_ROW(rd_arb_release)
    RD_SIZE_ROW(rd_upstream_stats) RD_SIZE_ROW(rd_upstream_channel)
    RD_GATE_FIELDS(RD_GATE_ROW) RD_SIZE_ROW(rd_gate)
    {NULL, NULL, 0, 0},
};

/* The constants Python must agree with, then a row with a NULL name. */
struct rd_constant {
    const char *name;
    int64_t value;
};
#define RD_CONSTANT(name) {#name, name},
static const struct rd_constant constants[] = {
    RD_CONSTANT(RD_STOPPED) RD_CONSTANT(RD_EOF) RD_CONSTANT(RD_RESET) RD_CONSTANT(RD_IDLE)
    RD_CONSTANT(RD_CONTROL) RD_CONSTANT(RD_NEED_DEST) RD_CONSTANT(RD_SEND_ERROR)
    RD_CONSTANT(RD_SLOW) RD_CONSTANT(RD_EMPTY) RD_CONSTANT(RD_FULL) RD_CONSTANT(RD_ERROR)
    RD_CONSTANT(RD_GATED) RD_CONSTANT(RD_CLAIM_CLOSED) RD_CONSTANT(RD_CLAIM_HELD)
    RD_CONSTANT(DEST_ALLOWED) RD_CONSTANT(DEST_DENIED_GROUP) RD_CONSTANT(DEST_DENIED_PORT)
    RD_CONSTANT(DATA_HEADER) RD_CONSTANT(MAX_PAYLOAD) RD_CONSTANT(LATENCY_BUCKETS)
    RD_CONSTANT(DEST_SLOTS) RD_CONSTANT(MAX_ERROR_TEXT)
    RD_CONSTANT(ARB_MODE_NONE) RD_CONSTANT(ARB_MODE_CONTENT) RD_CONSTANT(ARB_MODE_DERIBIT)
    RD_CONSTANT(ARB_LAYOUT_FRAME_V1) RD_CONSTANT(ARB_LAYOUT_SBE) RD_CONSTANT(ARB_EMIT)
    RD_CONSTANT(ARB_GAP) RD_CONSTANT(ARB_RESET) RD_CONSTANT(ARB_OVERLAP)
    RD_CONSTANT(ARB_UNSEQUENCED) RD_CONSTANT(ARB_MALFORMED) RD_CONSTANT(ARB_DUPLICATE)
    RD_CONSTANT(ARB_HELD) RD_CONSTANT(ARB_SOURCES) RD_CONSTANT(ARB_SNAPSHOT_PORTS)
    RD_CONSTANT(UP_FRAME_V1) RD_CONSTANT(UP_SBE) RD_CONSTANT(UP_MAX_SNAPSHOT_PORTS)
    {NULL, 0},
};

int rd_abi(void) { return RD_ABI; }
const struct rd_field *rd_layout(void) { return layout; }
const struct rd_constant *rd_constants(void) { return constants; }

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* -- timed waits ------------------------------------------------------------------------------
 * A ppoll with a timeout arms a kernel timer and cancels it on every wait, about a microsecond
 * a wait on this VM kind (docs/PERFORMANCE.md). At high rates a data thread waits many times
 * for one deadline (a hold's end, the next ACK), so from the second wait on the same deadline
 * it uses a timerfd of its own, set once for that deadline and polled beside its sockets. A
 * single wait (low rates, the ACK reader's moving idle deadline) keeps ppoll's timeout: a
 * timerfd left set for a deadline given up early would fire later for nothing. The timerfd is
 * closed when the thread exits; without one (timerfd_create failed) ppoll's timeout serves. */

struct thread_timer {
    int fd;       /* -1: none yet, -2: none to be had */
    int set;      /* the timerfd is set to `last` (0: unset, or it fired and was read) */
    int64_t last; /* the CLOCK_MONOTONIC deadline of the latest timed wait */
};
static __thread struct thread_timer thread_timer = {-1, 0, 0};
static pthread_key_t timer_key;
static int timer_key_made;
static pthread_once_t timer_key_once = PTHREAD_ONCE_INIT;

static void timer_close(void *fd_plus_one) { close((int)((intptr_t)fd_plus_one - 1)); }
static void timer_key_make(void) {
    timer_key_made = pthread_key_create(&timer_key, timer_close) == 0;
}

/* This thread's timerfd, made when it first waits twice for one deadline; -1: none. */
static int timer_fd(void) {
    struct thread_timer *t = &thread_timer;
    if (t->fd == -1) {
        t->fd = -2;
        pthread_once(&timer_key_once, timer_key_make);
        int fd = timer_key_made ? timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC) : -1;
        if (fd >= 0 && pthread_setspecific(timer_key, (void *)((intptr_t)fd + 1)) == 0) t->fd = fd;
        else if (fd >= 0) close(fd);
    }
    return t->fd < 0 ? -1 : t->fd;
}

/* Set the thread's timerfd to `deadline` (0: unset it; setting also clears an expiry not read). */
static int timer_set(int fd, int64_t deadline) {
    struct itimerspec when = {{0, 0}, {deadline / 1000000000, deadline % 1000000000}};
    if (timerfd_settime(fd, TFD_TIMER_ABSTIME, &when, NULL) < 0) return -1;
    thread_timer.set = deadline != 0;
    return 0;
}

/* ppoll p[0..n) (room for n + 1 entries) until one is ready or CLOCK_MONOTONIC reaches
 * `deadline` (0: none; at or before `now`: look without sleeping). Returns how many of the n
 * are ready, 0 at the deadline, or -1 (errno). */
static int poll_until(struct pollfd *p, nfds_t n, int64_t deadline, int64_t now) {
    if (!deadline) return ppoll(p, n, NULL, NULL);
    struct thread_timer *t = &thread_timer;
    int64_t left = deadline - now;
    int again = deadline == t->last;
    t->last = deadline;
    int fd = left > 0 && (again || t->set) ? timer_fd() : -1;
    if (fd >= 0 && !again && timer_set(fd, 0) < 0) return -1; /* a deadline given up */
    if (fd < 0 || !again) {
        if (left < 0) left = 0;
        struct timespec timeout = {left / 1000000000, left % 1000000000};
        return ppoll(p, n, &timeout, NULL);
    }
    if (!t->set && timer_set(fd, deadline) < 0) return -1;
    p[n] = (struct pollfd){fd, POLLIN, 0};
    int ready = ppoll(p, n + 1, NULL, NULL);
    if (ready > 0 && p[n].revents) { /* the deadline came (possibly with a socket) */
        uint64_t expirations;
        if (read(fd, &expirations, sizeof expirations) < 0 && errno != EAGAIN) return -1;
        t->set = 0;
        ready--;
    }
    return ready;
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
/* little-endian, as the Deribit headers are */
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) { return (uint32_t)le16(p) | (uint32_t)le16(p + 2) << 16; }
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

/* A 64-bit finaliser: every input bit moves every output bit (the content window's hashes). */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ull;
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ull;
    return x ^ (x >> 32);
}

static struct rd_dest *dest_find(struct rd_emit *s, uint64_t key);

/* The multicast address of key (group << 16 | port, host byte order). */
static void group_address(uint64_t key, struct sockaddr_in *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)(key & 0xFFFF));
    sa->sin_addr.s_addr = htonl((uint32_t)(key >> 16));
}

/* -- Deribit sequence tracking: what the arbiter and the upstream counter share ----------------
 *
 * relayd/arbitration/headers.py (parse) and sequence.py (Channel, ChannelTable, classify),
 * once: the A/B arbiter (below) and the capture side's upstream counter (at the end) keep
 * their channels in a seq_table, each channel a struct whose first member is a seq_channel,
 * and add their own verdicts and counters. Times stay each user's own (the arbiter's seconds
 * as doubles, the upstream counter's nanoseconds), so each decides when a horizon passed. */

__extension__ typedef __int128 seq_t; /* Python's ints: seqNum + messageCount past 2**63 */
/* per datagram: inlined into each caller, the hash lookup and header fields kept in registers */
#define SEQ_HOT static inline __attribute__((always_inline))

/* headers.py: 0 malformed, else 1 with the fields (sequenced: 1, or 0 for SBE packets with no
 * per-packet sequence). */
struct seq_header {
    uint32_t channel;
    seq_t seq;
    uint64_t span;
    int64_t stamp;
    int sequenced, snapshot;
};

SEQ_HOT int seq_parse(uint64_t deribit_layout, const uint64_t *snapshot_ports, uint64_t n_ports,
                      uint16_t port, const uint8_t *p, uint64_t len, struct seq_header *h) {
    if (deribit_layout == SEQ_FRAME_V1) {
        if (len < 8 || le16(p) != len - 8) return 0;
        h->channel = le16(p + 2);
        h->seq = le32(p + 4);
        h->span = 1;
        h->stamp = 0;
        h->sequenced = 1;
        h->snapshot = 0;
        for (uint64_t i = 0; i < n_ports && i < SEQ_SNAPSHOT_PORTS; i++)
            if (snapshot_ports[i] == port) h->snapshot = 1;
        return 1;
    }
    if (len < 24) return 0;
    int64_t seq = (int64_t)le64(p + 8);
    uint64_t type = le16(p + 20), count = le16(p + 22);
    if (seq < 0 || (type & ~(uint64_t)7) || len < 24 + 16 * count) return 0;
    h->stamp = (int64_t)le64(p);
    h->seq = seq;
    h->channel = le32(p + 16);
    h->span = count;
    h->sequenced = type == 1;
    h->snapshot = type != 1 && (type & 2);
    return 1;
}

/* sequence.Channel's sequence state, and its links in the table. */
struct seq_channel {
    struct seq_channel *chain, *older, *newer; /* hash bucket; least recently used first */
    uint64_t key_lo;                            /* port << 32 | channel id */
    uint32_t group;
    int64_t stamp;
    seq_t next; /* with the above in the first 64 bytes: all an in-order datagram reads */
    seq_t floor_previous, floor_current, stale_below;
};

static uint16_t seq_port(const struct seq_channel *c) { return (uint16_t)(c->key_lo >> 32); }
static uint32_t seq_id(const struct seq_channel *c) { return (uint32_t)c->key_lo; }

/* Channel(kind, next, now): nothing before next is expected. */
static void seq_start(struct seq_channel *c, seq_t next, int64_t stamp) {
    c->next = c->floor_current = next;
    c->floor_previous = -1;
    c->stale_below = 0;
    c->stamp = stamp;
}

/* ChannelTable.rotate, once a horizon has passed since the last: twice means the floor of the
 * previous one is stale as well. */
static void seq_rotate(struct seq_channel *c, int twice) {
    c->floor_previous = twice ? c->next : c->floor_current;
    c->floor_current = c->next;
    c->stale_below = 0;
}

/* A reset: the channel starts over at seq. */
static void seq_restart(struct seq_channel *c, seq_t seq, uint64_t count) {
    c->stale_below = c->next;
    c->next = seq + (seq_t)count;
    c->floor_previous = -1;
    c->floor_current = seq;
}

enum seq_event { SEQ_IN_ORDER, SEQ_GAP, SEQ_BEHIND, SEQ_OVERLAP, SEQ_RESET, SEQ_HEARTBEAT };

/* sequence.classify */
SEQ_HOT enum seq_event seq_classify(const struct seq_channel *c, seq_t seq, uint64_t count,
                                    int64_t stamp) {
    seq_t expected = c->next;
    if (count == 0) {
        if (seq > expected) return seq < c->stale_below ? SEQ_BEHIND : SEQ_GAP;
        return stamp > c->stamp ? SEQ_HEARTBEAT : SEQ_BEHIND;
    }
    if (seq == expected) return SEQ_IN_ORDER;
    if (seq > expected) return seq < c->stale_below ? SEQ_BEHIND : SEQ_GAP;
    if (seq + (seq_t)count <= expected) return seq < c->floor_previous ? SEQ_RESET : SEQ_BEHIND;
    return SEQ_OVERLAP;
}

/* ChannelTable's memory: cap channels of size bytes each (a seq_channel first), a hash table
 * over (group, port, channel id), a least-recently-used list. */
struct seq_table {
    uint8_t *slots;
    struct seq_channel **buckets, *oldest, *newest;
    uint64_t size, cap, used, mask;
};

static int seq_table_init(struct seq_table *t, uint64_t cap, uint64_t size) {
    uint64_t buckets = 1;
    while (buckets < 2 * cap) buckets <<= 1;
    memset(t, 0, sizeof *t);
    t->slots = calloc(cap, size);
    t->buckets = calloc(buckets, sizeof *t->buckets);
    if (!t->slots || !t->buckets) {
        free(t->slots);
        free(t->buckets);
        return -1;
    }
    t->size = size;
    t->cap = cap;
    t->mask = buckets - 1;
    return 0;
}

static void seq_table_free(struct seq_table *t) {
    free(t->slots);
    free(t->buckets);
}

static struct seq_channel *seq_slot(const struct seq_table *t, uint64_t i) {
    return (struct seq_channel *)(void *)(t->slots + i * t->size);
}

SEQ_HOT struct seq_channel **seq_bucket(const struct seq_table *t, uint32_t group,
                                        uint64_t key_lo) {
    uint64_t h = (uint64_t)group * 0x9E3779B97F4A7C15ull ^ key_lo * 0xC2B2AE3D27D4EB4Full;
    return &t->buckets[(h ^ h >> 29) & t->mask];
}

static void seq_unlink_lru(struct seq_table *t, struct seq_channel *c) {
    if (c->older) c->older->newer = c->newer; else t->oldest = c->newer;
    if (c->newer) c->newer->older = c->older; else t->newest = c->older;
    c->older = c->newer = NULL;
}

static void seq_push_newest(struct seq_table *t, struct seq_channel *c) {
    c->older = t->newest;
    c->newer = NULL;
    if (t->newest) t->newest->newer = c; else t->oldest = c;
    t->newest = c;
}

/* ChannelTable.get: the channel, most recently used now; or NULL. */
SEQ_HOT struct seq_channel *seq_get(struct seq_table *t, uint32_t group, uint64_t key_lo) {
    struct seq_channel *c = *seq_bucket(t, group, key_lo);
    while (c && (c->group != group || c->key_lo != key_lo)) c = c->chain;
    if (c && c != t->newest) {
        seq_unlink_lru(t, c);
        seq_push_newest(t, c);
    }
    return c;
}

/* The slot for a new channel: a free one, or (*evicted set) the least recently used, out of
 * the table with its contents left for the caller to retire. seq_add then files it. */
static struct seq_channel *seq_take(struct seq_table *t, int *evicted) {
    *evicted = t->used == t->cap;
    if (!*evicted) return seq_slot(t, t->used++);
    struct seq_channel *c = t->oldest, **link = seq_bucket(t, c->group, c->key_lo);
    while (*link != c) link = &(*link)->chain;
    *link = c->chain;
    seq_unlink_lru(t, c);
    return c;
}

static void seq_add(struct seq_table *t, struct seq_channel *c, uint32_t group, uint64_t key_lo) {
    struct seq_channel **head = seq_bucket(t, group, key_lo);
    c->group = group;
    c->key_lo = key_lo;
    c->chain = *head;
    *head = c;
    seq_push_newest(t, c);
}

/* -- A/B arbitration: one arbiter per emit feed, shared by its pump threads ------------------
 *
 * The decisions of relayd/arbitration/arbiter.py (the specification, step for step: the
 * differential tests in tests/test_arbitration_fastpath.py hold this code to it), with bounded
 * memory: a channel table of max_channels (least recently used evicted), held datagrams up to
 * max_held and max_held_bytes (more closes the oldest hole early), a content window of
 * content_entries hashes. Per datagram O(1) on the common path (a hash lookup and a few
 * compares); a datagram behind a hole costs a binary search among its channel's held ones.
 * Times are seconds of CLOCK_MONOTONIC as doubles, as in Python (the same arithmetic, so the
 * same decisions at every boundary). One mutex per arbiter: the pump that takes it decides,
 * sends its datagram and everything released (so each channel goes out in order whichever
 * thread sends), then lets go. */

struct arb_item { /* a held datagram, then released */
    struct arb_item *next; /* in the outbox */
    seq_t seq;
    int64_t stamp;
    uint64_t span, source, gap, len;
    uint64_t owner, frame; /* the capture session and its sequence: ACKs wait for it */
    uint32_t group;
    uint16_t port;
    uint8_t payload[];
};

struct arb_channel {
    struct seq_channel seq; /* first: a slot of the arbiter's seq_table */
    struct arb_channel *hold_prev, *hold_next;
    int snapshot, holding;
    double rotated, held_since;
    struct arb_item **held; /* sorted by seq */
    uint64_t held_n, held_cap;
};

struct arb_seen { uint64_t hash; double at; }; /* at < 0: empty */

struct rd_arb {
    struct rd_arb_stats stats; /* first: Python reads it through rd_arb_stats */
    struct rd_arb_config cfg;
    pthread_mutex_t lock;
    struct seq_table channels;
    struct arb_channel *hold_head, *hold_tail;
    struct arb_item *out_head, *out_tail; /* released, to send in this order */
    struct arb_seen *seen, *order;        /* the content window: hash table, FIFO ring */
    uint64_t seen_mask, seen_count, order_head;
};

static uint64_t arb_hash(uint32_t group, uint16_t port, const uint8_t *p, uint64_t len) {
    uint64_t h = mix64((uint64_t)group << 16 ^ port ^ len << 48), w;
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, p + i, 8);
        h = (h ^ mix64(w + i)) * 0x9E3779B97F4A7C15ull;
    }
    w = 0;
    if (len > i) memcpy(&w, p + i, len - i);
    return mix64(h ^ w ^ (len - i) << 56);
}

/* Drop the oldest entry of the content window (its FIFO and table hold the same hashes). */
static void arb_seen_pop(struct rd_arb *a) {
    uint64_t mask = a->seen_mask, hash = a->order[a->order_head].hash;
    uint64_t i = mix64(hash) & mask;
    while (a->seen[i].at < 0 || a->seen[i].hash != hash) i = (i + 1) & mask;
    /* backward-shift deletion keeps every probe sequence unbroken */
    for (uint64_t j = (i + 1) & mask; a->seen[j].at >= 0; j = (j + 1) & mask) {
        uint64_t home = mix64(a->seen[j].hash) & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            a->seen[i] = a->seen[j];
            i = j;
        }
    }
    a->seen[i].at = -1;
    a->order_head = (a->order_head + 1) % a->cfg.content_entries;
    a->seen_count--;
}

/* ContentWindow.seen: 1 if the datagram was recorded within the window; records it if not. */
static int arb_seen(struct rd_arb *a, uint32_t group, uint16_t port, const uint8_t *p,
                    uint64_t len, double now) {
    uint64_t key = arb_hash(group, port, p, len), mask = a->seen_mask;
    double horizon = now - a->cfg.content_window;
    while (a->seen_count && a->order[a->order_head].at <= horizon) arb_seen_pop(a);
    uint64_t i = mix64(key) & mask;
    for (; a->seen[i].at >= 0; i = (i + 1) & mask)
        if (a->seen[i].hash == key) return 1;
    if (a->seen_count >= a->cfg.content_entries) {
        arb_seen_pop(a);
        a->stats.content_evictions++;
        for (i = mix64(key) & mask; a->seen[i].at >= 0;) i = (i + 1) & mask;
    }
    a->seen[i].hash = key;
    a->seen[i].at = now;
    struct arb_seen *o = &a->order[(a->order_head + a->seen_count) % a->cfg.content_entries];
    o->hash = key;
    o->at = now;
    a->seen_count++;
    return 0;
}

static int arb_parse(const struct rd_arb *a, uint16_t port, const uint8_t *p, uint64_t len,
                     struct seq_header *h) {
    return seq_parse(a->cfg.layout, a->cfg.snapshot_ports, a->cfg.snapshot_port_count, port, p,
                     len, h);
}

/* The arbiter's channel of (group, port << 32 | channel id), most recently used now; or NULL. */
static struct arb_channel *arb_get(struct rd_arb *a, uint32_t group, uint64_t key_lo) {
    return (struct arb_channel *)(void *)seq_get(&a->channels, group, key_lo);
}

static void arb_holding_add(struct rd_arb *a, struct arb_channel *c) {
    c->holding = 1;
    c->hold_prev = a->hold_tail;
    c->hold_next = NULL;
    if (a->hold_tail) a->hold_tail->hold_next = c; else a->hold_head = c;
    a->hold_tail = c;
}

static void arb_holding_remove(struct rd_arb *a, struct arb_channel *c) {
    c->holding = 0;
    if (c->hold_prev) c->hold_prev->hold_next = c->hold_next; else a->hold_head = c->hold_next;
    if (c->hold_next) c->hold_next->hold_prev = c->hold_prev; else a->hold_tail = c->hold_prev;
    c->hold_prev = c->hold_next = NULL;
}

static void arb_count_gap(struct rd_arb *a, const struct arb_channel *c, seq_t missing) {
    a->stats.gaps++;
    a->stats.missing += (uint64_t)missing;
    if (c->snapshot) a->stats.snapshot_gaps++;
}

static void arb_sent(struct rd_arb *a, uint64_t source) {
    a->stats.sent++;
    a->stats.sent_by_source[source < ARB_SOURCES ? source : ARB_SOURCES - 1]++;
}

static seq_t arb_max(seq_t x, seq_t y) { return x > y ? x : y; }
static int64_t arb_max64(int64_t x, int64_t y) { return x > y ? x : y; }

/* Take held[i] out of the channel. */
static struct arb_item *arb_take(struct arb_channel *c, uint64_t i) {
    struct arb_item *item = c->held[i];
    memmove(c->held + i, c->held + i + 1, (c->held_n - i - 1) * sizeof *c->held);
    c->held_n--;
    return item;
}

static void arb_release(struct rd_arb *a, struct arb_item *item, seq_t gap) {
    a->stats.held_now--;
    a->stats.held_bytes -= item->len;
    a->stats.released++;
    arb_sent(a, item->source);
    item->gap = (uint64_t)gap;
    item->next = NULL;
    if (a->out_tail) a->out_tail->next = item; else a->out_head = item;
    a->out_tail = item;
}

/* Index of the held datagram with sequence seq, or held_n. */
static uint64_t arb_find(const struct arb_channel *c, seq_t seq) {
    uint64_t lo = 0, hi = c->held_n;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (c->held[mid]->seq < seq) lo = mid + 1; else hi = mid;
    }
    return lo < c->held_n && c->held[lo]->seq == seq ? lo : c->held_n;
}

/* Arbiter._drain */
static void arb_drain(struct rd_arb *a, struct arb_channel *c, double now) {
    uint64_t released = a->stats.released;
    while (c->held_n) {
        uint64_t i = arb_find(c, c->seq.next);
        struct arb_item *item;
        if (i < c->held_n) {
            item = arb_take(c, i);
        } else {
            if (c->held[0]->seq > c->seq.next) break;
            item = arb_take(c, 0);
            if (item->seq + (seq_t)item->span <= c->seq.next) {
                a->stats.held_now--;
                a->stats.held_bytes -= item->len;
                a->stats.duplicates++;
                free(item);
                continue;
            }
            a->stats.overlaps++;
        }
        c->seq.next = arb_max(c->seq.next, item->seq + (seq_t)item->span);
        c->seq.stamp = arb_max64(c->seq.stamp, item->stamp);
        arb_release(a, item, 0);
    }
    if (!c->held_n && c->holding) arb_holding_remove(a, c);
    else if (c->held_n && a->stats.released != released) c->held_since = now; /* next hole */
}

/* Arbiter._skip_hole */
static void arb_skip_hole(struct rd_arb *a, struct arb_channel *c, double now) {
    struct arb_item *item = arb_take(c, 0);
    seq_t missing = item->seq - c->seq.next;
    arb_count_gap(a, c, missing);
    c->seq.next = item->seq + (seq_t)item->span;
    c->seq.stamp = arb_max64(c->seq.stamp, item->stamp);
    arb_release(a, item, missing);
    c->held_since = now;
    if (c->held_n) arb_drain(a, c, now);
    else if (c->holding) arb_holding_remove(a, c);
}

static void arb_flush(struct rd_arb *a, struct arb_channel *c) {
    while (c->held_n) arb_skip_hole(a, c, c->held_since);
}

/* ChannelTable.add (evicting the least recently used, its held datagrams released first) and
 * Channel(kind, seq, now). */
static struct arb_channel *arb_add(struct rd_arb *a, uint32_t group, uint64_t key_lo,
                                   int snapshot, seq_t seq, int64_t stamp, double now) {
    int evicted;
    struct arb_channel *c = (struct arb_channel *)(void *)seq_take(&a->channels, &evicted);
    if (evicted) {
        a->stats.channel_evictions++;
        a->stats.channels--;
        arb_flush(a, c);
    }
    struct arb_item **held = c->held;
    uint64_t held_cap = c->held_cap;
    memset(c, 0, sizeof *c);
    c->held = held;
    c->held_cap = held_cap;
    c->snapshot = snapshot;
    c->rotated = now;
    seq_start(&c->seq, seq, stamp);
    seq_add(&a->channels, &c->seq, group, key_lo);
    a->stats.channels++;
    return c;
}

/* ChannelTable.rotate */
static void arb_rotate(const struct rd_arb *a, struct arb_channel *c, double now) {
    double elapsed = now - c->rotated, horizon = a->cfg.stale_horizon;
    if (elapsed >= horizon) {
        seq_rotate(&c->seq, !(elapsed < 2 * horizon));
        c->rotated = now;
    }
}

static void arb_restart(struct arb_channel *c, seq_t seq, uint64_t count, double now) {
    seq_restart(&c->seq, seq, count);
    c->rotated = now;
}

static int arb_by_content(struct rd_arb *a, uint64_t source, uint32_t group, uint16_t port,
                          const uint8_t *p, uint64_t len, double now, int verdict) {
    if (arb_seen(a, group, port, p, len, now)) {
        a->stats.duplicates++;
        return ARB_DUPLICATE;
    }
    if (verdict == ARB_UNSEQUENCED) a->stats.unsequenced++;
    arb_sent(a, source);
    return verdict;
}

/* Arbiter._after_hole: seq is past next. */
static int arb_after_hole(struct rd_arb *a, struct arb_channel *c, const struct seq_header *h,
                          uint64_t source, uint64_t owner, uint64_t frame, uint32_t group,
                          uint16_t port, const uint8_t *p, uint64_t len, double now) {
    if (a->cfg.hold_timeout == 0 || a->stats.live_sources < 2) {
        seq_t missing = h->seq - c->seq.next;
        arb_count_gap(a, c, missing);
        a->stats.gap_size = (uint64_t)missing;
        c->seq.next = h->seq + (seq_t)h->span;
        c->seq.stamp = arb_max64(c->seq.stamp, h->stamp);
        if (c->held_n) arb_drain(a, c, now); /* held before the live sources dropped to one */
        arb_sent(a, source);
        return ARB_GAP;
    }
    uint64_t at = c->held_n;
    while (at && c->held[at - 1]->seq > h->seq) at--; /* in order: no step */
    if (at && c->held[at - 1]->seq == h->seq) {
        a->stats.duplicates++;
        return ARB_DUPLICATE;
    }
    struct arb_item *item = malloc(sizeof *item + len);
    if (!item) { /* no memory to hold it: a hole no copy fills, as without a second copy */
        seq_t missing = h->seq - c->seq.next;
        arb_count_gap(a, c, missing);
        a->stats.gap_size = (uint64_t)missing;
        c->seq.next = h->seq + (seq_t)h->span;
        c->seq.stamp = arb_max64(c->seq.stamp, h->stamp);
        arb_sent(a, source);
        return ARB_GAP;
    }
    if (c->held_n == c->held_cap) {
        uint64_t cap = c->held_cap ? 2 * c->held_cap : 8;
        struct arb_item **grown = realloc(c->held, cap * sizeof *grown);
        if (!grown) {
            free(item);
            seq_t missing = h->seq - c->seq.next;
            arb_count_gap(a, c, missing);
            a->stats.gap_size = (uint64_t)missing;
            c->seq.next = h->seq + (seq_t)h->span;
            c->seq.stamp = arb_max64(c->seq.stamp, h->stamp);
            arb_sent(a, source);
            return ARB_GAP;
        }
        c->held = grown;
        c->held_cap = cap;
    }
    memset(item, 0, sizeof *item);
    item->seq = h->seq;
    item->span = h->span;
    item->stamp = h->stamp;
    item->source = source;
    item->owner = owner;
    item->frame = frame;
    item->group = group;
    item->port = port;
    item->len = len;
    memcpy(item->payload, p, len);
    if (!c->holding) {
        c->held_since = now;
        arb_holding_add(a, c);
    }
    memmove(c->held + at + 1, c->held + at, (c->held_n - at) * sizeof *c->held);
    c->held[at] = item;
    c->held_n++;
    a->stats.held_now++;
    a->stats.held_bytes += len;
    a->stats.held++;
    while (a->hold_head && (a->stats.held_now > a->cfg.max_held ||
                            a->stats.held_bytes > a->cfg.max_held_bytes)) {
        a->stats.hold_overflows++;
        struct arb_channel *oldest = a->hold_head;
        for (struct arb_channel *o = oldest->hold_next; o; o = o->hold_next)
            if (o->held_since < oldest->held_since) oldest = o;
        arb_skip_hole(a, oldest, now);
    }
    return ARB_HELD;
}

/* Arbiter.offer (with the lock held). */
static int arb_offer(struct rd_arb *a, uint64_t source, uint64_t owner, uint64_t frame,
                     uint32_t group, uint16_t port, const uint8_t *p, uint64_t len, double now) {
    a->stats.offered++;
    if (a->cfg.mode == ARB_MODE_NONE) {
        arb_sent(a, source);
        return ARB_EMIT;
    }
    if (a->cfg.mode == ARB_MODE_CONTENT)
        return arb_by_content(a, source, group, port, p, len, now, ARB_EMIT);
    struct seq_header h;
    if (!arb_parse(a, port, p, len, &h)) {
        a->stats.malformed++;
        return arb_by_content(a, source, group, port, p, len, now, ARB_MALFORMED);
    }
    if (!h.sequenced) return arb_by_content(a, source, group, port, p, len, now, ARB_UNSEQUENCED);
    uint64_t key_lo = (uint64_t)port << 32 | h.channel;
    struct arb_channel *c = arb_get(a, group, key_lo);
    if (!c) {
        arb_add(a, group, key_lo, h.snapshot, h.seq + (seq_t)h.span, h.stamp, now);
        arb_sent(a, source);
        return ARB_EMIT;
    }
    if (now - c->rotated >= a->cfg.stale_horizon) arb_rotate(a, c, now);
    seq_t expected = c->seq.next, end = h.seq + (seq_t)h.span;
    if (h.span && h.seq < expected && end <= expected && h.seq >= c->seq.floor_previous) {
        a->stats.duplicates++; /* the other copy's datagram, the commonest case */
        return ARB_DUPLICATE;
    }
    enum seq_event event =
        h.span && h.seq == expected ? SEQ_IN_ORDER : seq_classify(&c->seq, h.seq, h.span, h.stamp);
    switch (event) {
    case SEQ_IN_ORDER:
        c->seq.next = end;
        c->seq.stamp = arb_max64(c->seq.stamp, h.stamp);
        if (c->held_n) arb_drain(a, c, now);
        arb_sent(a, source);
        return ARB_EMIT;
    case SEQ_BEHIND:
        a->stats.duplicates++;
        return ARB_DUPLICATE;
    case SEQ_GAP:
        if (h.span == 0 && a->cfg.hold_timeout != 0 && a->stats.live_sources >= 2) {
            a->stats.duplicates++;
            a->stats.skipped_heartbeats++;
            return ARB_DUPLICATE;
        }
        return arb_after_hole(a, c, &h, source, owner, frame, group, port, p, len, now);
    case SEQ_HEARTBEAT:
        c->seq.stamp = h.stamp;
        a->stats.heartbeats++;
        arb_sent(a, source);
        return ARB_EMIT;
    case SEQ_OVERLAP:
        a->stats.overlaps++;
        c->seq.next = end;
        c->seq.stamp = arb_max64(c->seq.stamp, h.stamp);
        if (c->held_n) arb_drain(a, c, now);
        arb_sent(a, source);
        return ARB_OVERLAP;
    default: /* SEQ_RESET: what is held belongs to the old sequence */
        if (c->held_n) arb_flush(a, c);
        a->stats.resets++;
        arb_restart(c, h.seq, h.span, now);
        c->seq.stamp = arb_max64(c->seq.stamp, h.stamp);
        arb_sent(a, source);
        return ARB_RESET;
    }
}

/* Arbiter.observe (with the lock held). */
static void arb_observe(struct rd_arb *a, uint32_t group, uint16_t port, const uint8_t *p,
                        uint64_t len, double now) {
    a->stats.observed++;
    if (a->cfg.mode == ARB_MODE_NONE) return;
    struct seq_header h;
    if (a->cfg.mode != ARB_MODE_DERIBIT || !arb_parse(a, port, p, len, &h) || !h.sequenced) {
        arb_seen(a, group, port, p, len, now);
        return;
    }
    uint64_t key_lo = (uint64_t)port << 32 | h.channel;
    struct arb_channel *c = arb_get(a, group, key_lo);
    if (!c) {
        arb_add(a, group, key_lo, h.snapshot, h.seq + (seq_t)h.span, h.stamp, now);
        return;
    }
    arb_rotate(a, c, now);
    enum seq_event event = seq_classify(&c->seq, h.seq, h.span, h.stamp);
    if (event == SEQ_RESET) {
        if (c->held_n) arb_flush(a, c);
        arb_restart(c, h.seq, h.span, now);
    } else if (event != SEQ_BEHIND) {
        c->seq.next = arb_max(c->seq.next, h.seq + (seq_t)h.span);
    }
    c->seq.stamp = arb_max64(c->seq.stamp, h.stamp);
    if (c->held_n) arb_drain(a, c, now);
}

/* Arbiter.pending_floor (with the lock held): the lowest frame of owner's datagrams held or
 * released and not sent yet, 0 for none (frames start at 1). A scan of what is held, only
 * while something is; the pumps ask once per ACK. */
static uint64_t arb_floor(const struct rd_arb *a, uint64_t owner) {
    uint64_t floor = 0;
    for (const struct arb_channel *c = a->hold_head; c; c = c->hold_next)
        for (uint64_t i = 0; i < c->held_n; i++) {
            const struct arb_item *item = c->held[i];
            if (item->owner == owner && (!floor || item->frame < floor)) floor = item->frame;
        }
    for (const struct arb_item *item = a->out_head; item; item = item->next)
        if (item->owner == owner && (!floor || item->frame < floor)) floor = item->frame;
    return floor;
}

/* Arbiter.next_deadline, or INFINITY when nothing is held. */
static double arb_hold_deadline(const struct rd_arb *a) {
    double oldest = INFINITY;
    for (const struct arb_channel *c = a->hold_head; c; c = c->hold_next)
        if (c->held_since < oldest) oldest = c->held_since;
    return oldest + a->cfg.hold_timeout;
}

/* Arbiter.expire */
static uint64_t arb_expire(struct rd_arb *a, double now) {
    uint64_t before = a->stats.released;
    double limit = now - a->cfg.hold_timeout;
    struct arb_channel *c = a->hold_head;
    while (c) {
        struct arb_channel *after = c->hold_next;
        while (c->held_n && c->held_since <= limit) arb_skip_hole(a, c, now);
        c = after;
    }
    return a->stats.released - before;
}

struct rd_arb *rd_arb_new(const struct rd_arb_config *cfg) {
    if (cfg->mode > ARB_MODE_DERIBIT || cfg->layout > ARB_LAYOUT_SBE || cfg->max_channels < 1 ||
        cfg->max_channels > (1u << 24) || cfg->max_held < 1 || cfg->max_held_bytes < 1 ||
        cfg->content_entries < 1 || cfg->content_entries > (1u << 24) ||
        !(cfg->hold_timeout >= 0) || !(cfg->stale_horizon > 0) || !(cfg->content_window > 0))
        return NULL;
    struct rd_arb *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->cfg = *cfg;
    a->stats.live_sources = 2;
    uint64_t slots = 1;
    while (slots < 2 * cfg->content_entries) slots <<= 1;
    a->seen_mask = slots - 1;
    if (seq_table_init(&a->channels, cfg->max_channels, sizeof(struct arb_channel))) {
        free(a);
        return NULL;
    }
    a->seen = malloc(slots * sizeof *a->seen);
    a->order = malloc(cfg->content_entries * sizeof *a->order);
    if (!a->seen || !a->order || pthread_mutex_init(&a->lock, NULL)) {
        seq_table_free(&a->channels);
        free(a->seen);
        free(a->order);
        free(a);
        return NULL;
    }
    for (uint64_t i = 0; i < slots; i++) a->seen[i].at = -1;
    return a;
}

void rd_arb_free(struct rd_arb *a) {
    if (!a) return;
    for (uint64_t i = 0; i < a->channels.used; i++) {
        struct arb_channel *c = (struct arb_channel *)(void *)seq_slot(&a->channels, i);
        for (uint64_t j = 0; j < c->held_n; j++) free(c->held[j]);
        free(c->held);
    }
    for (struct arb_item *item = a->out_head, *next; item; item = next) {
        next = item->next;
        free(item);
    }
    pthread_mutex_destroy(&a->lock);
    seq_table_free(&a->channels);
    free(a->seen);
    free(a->order);
    free(a);
}

const struct rd_arb_stats *rd_arb_stats(const struct rd_arb *a) { return &a->stats; }

void rd_arb_set_live_sources(struct rd_arb *a, uint64_t count) {
    pthread_mutex_lock(&a->lock);
    a->stats.live_sources = count;
    pthread_mutex_unlock(&a->lock);
}

/* Any thread: a datagram another relay emitted on the feed's groups (the active emitter's
 * observer). now: CLOCK_MONOTONIC seconds. */
void rd_arb_observe(struct rd_arb *a, uint64_t group, uint64_t port, const uint8_t *payload,
                    uint64_t len, double now) {
    pthread_mutex_lock(&a->lock);
    arb_observe(a, (uint32_t)group, (uint16_t)port, payload, len, now);
    pthread_mutex_unlock(&a->lock);
}

/* The specification's calls one by one, for the differential tests (the pumps send what
 * these decide without handing it to Python). */
int rd_arb_offer(struct rd_arb *a, uint64_t source, uint64_t owner, uint64_t frame,
                 uint64_t group, uint64_t port, const uint8_t *payload, uint64_t len, double now) {
    pthread_mutex_lock(&a->lock);
    int verdict =
        arb_offer(a, source, owner, frame, (uint32_t)group, (uint16_t)port, payload, len, now);
    pthread_mutex_unlock(&a->lock);
    return verdict;
}

uint64_t rd_arb_floor(struct rd_arb *a, uint64_t owner) {
    pthread_mutex_lock(&a->lock);
    uint64_t floor = arb_floor(a, owner);
    pthread_mutex_unlock(&a->lock);
    return floor;
}

uint64_t rd_arb_expire(struct rd_arb *a, double now) {
    pthread_mutex_lock(&a->lock);
    uint64_t released = arb_expire(a, now);
    pthread_mutex_unlock(&a->lock);
    return released;
}

double rd_arb_next_deadline(struct rd_arb *a) {
    pthread_mutex_lock(&a->lock);
    double deadline = arb_hold_deadline(a);
    pthread_mutex_unlock(&a->lock);
    return deadline;
}

/* The last capture session ended: no copy can fill a hole any more. Give up every hole and send
 * what that releases (and anything released but not sent) on the feed's shared socket, without
 * waiting; returns how many were sent, *failed how many could not be. */
uint64_t rd_arb_flush(struct rd_arb *a, int64_t mcast_fd, uint64_t *failed) {
    uint64_t sent = 0, bad = 0;
    pthread_mutex_lock(&a->lock);
    arb_expire(a, INFINITY);
    while (a->out_head) {
        struct arb_item *item = a->out_head;
        a->out_head = item->next;
        struct sockaddr_in sa;
        group_address((uint64_t)item->group << 16 | item->port, &sa);
        if (sendto((int)mcast_fd, item->payload, item->len, MSG_DONTWAIT,
                   (const struct sockaddr *)&sa, sizeof sa) >= 0)
            sent++;
        else
            bad++;
        free(item);
    }
    a->out_tail = NULL;
    pthread_mutex_unlock(&a->lock);
    *failed = bad;
    return sent;
}

/* The oldest released datagram not taken yet: 1 (its payload copied to payload, at most cap
 * bytes), or 0 when there is none. */
int rd_arb_take_released(struct rd_arb *a, struct rd_arb_release *out, uint8_t *payload,
                         uint64_t cap) {
    pthread_mutex_lock(&a->lock);
    struct arb_item *item = a->out_head;
    if (item) {
        a->out_head = item->next;
        if (!a->out_head) a->out_tail = NULL;
    }
    pthread_mutex_unlock(&a->lock);
    if (!item) return 0;
    out->source = item->source;
    out->group = item->group;
    out->port = item->port;
    out->gap = item->gap;
    out->len = item->len;
    memcpy(payload, item->payload, item->len < cap ? item->len : cap);
    free(item);
    return 1;
}

/* -- arbitration in the emit pump ------------------------------------------------------------ */

enum send_wait {
    WAIT_UNTIL_WRITABLE, /* until the socket takes more, or the stop pipe says stop */
    WAIT_BOUNDED,        /* ARB_SEND_WAIT_MS at most, then the send fails (a lock is held) */
};
static int send_datagram(struct rd_emit *s, const struct rd_dest *d, uint64_t key,
                         const uint8_t *p, uint64_t len, enum send_wait wait);

/* Send what the arbiter released, in order, until one fails (the rest stays for the next
 * pump to take the lock). 0 or RD_SEND_ERROR. */
static int arb_send_released(struct rd_emit *s, struct rd_arb *a) {
    while (a->out_head) {
        struct arb_item *item = a->out_head;
        a->out_head = item->next;
        if (!a->out_head) a->out_tail = NULL;
        uint64_t key = (uint64_t)item->group << 16 | item->port;
        int failed = send_datagram(s, dest_find(s, key), key, item->payload, item->len,
                                   WAIT_BOUNDED);
        free(item);
        if (failed) return RD_SEND_ERROR;
    }
    return 0;
}

/* The pump's one call per allowed datagram, read_ns the pump's CLOCK_MONOTONIC reading for it:
 * what was released before goes first, then the datagram if the arbiter says so, then what it
 * released. 0 or RD_SEND_ERROR. */
static int arb_emit(struct rd_emit *s, const struct rd_dest *d, uint64_t key, const uint8_t *p,
                    uint64_t len, uint64_t seq, int64_t read_ns) {
    struct rd_arb *a = (struct rd_arb *)s->arb;
    pthread_mutex_lock(&a->lock);
    uint64_t waits = s->send_waits;
    int outcome = arb_send_released(s, a);
    if (s->send_waits != waits) read_ns = now_ns(CLOCK_MONOTONIC); /* stale after a wait */
    double now = (double)read_ns / 1e9;
    int verdict = arb_offer(a, s->arb_source, s->arb_owner, seq, (uint32_t)(key >> 16),
                            (uint16_t)key, p, len, now);
    if (verdict < ARB_DUPLICATE && send_datagram(s, d, key, p, len, WAIT_BOUNDED))
        outcome = RD_SEND_ERROR;
    if (!outcome) outcome = arb_send_released(s, a);
    pthread_mutex_unlock(&a->lock);
    return outcome;
}

/* session.ack_point: how far this connection may acknowledge, not past what the arbiter holds
 * of its session. */
static uint64_t emit_ack_point(struct rd_emit *s) {
    struct rd_arb *a = (struct rd_arb *)s->arb;
    if (!a || (!__atomic_load_n(&a->hold_head, __ATOMIC_RELAXED) &&
               !__atomic_load_n(&a->out_head, __ATOMIC_RELAXED)))
        return s->highest; /* a racy peek: what this session's pump held, it sees */
    pthread_mutex_lock(&a->lock);
    uint64_t floor = arb_floor(a, s->arb_owner);
    pthread_mutex_unlock(&a->lock);
    return floor && floor <= s->highest ? floor - 1 : s->highest;
}

/* When the pump must wake for the arbiter (CLOCK_MONOTONIC ns), INT64_MAX for never. */
static int64_t arb_wake_ns(struct rd_emit *s) {
    struct rd_arb *a = (struct rd_arb *)s->arb;
    if (!__atomic_load_n(&a->hold_head, __ATOMIC_RELAXED) &&
        !__atomic_load_n(&a->out_head, __ATOMIC_RELAXED))
        return INT64_MAX; /* a racy peek: a datagram held meanwhile wakes whoever holds it */
    pthread_mutex_lock(&a->lock);
    double deadline = a->out_head ? -INFINITY : arb_hold_deadline(a);
    pthread_mutex_unlock(&a->lock);
    if (deadline == INFINITY) return INT64_MAX;
    if (deadline == -INFINITY) return 0;
    return (int64_t)(deadline * 1e9) + 1000; /* past the deadline, not a hair before it */
}

/* Expire the holes that are due and send what that releases. 0 or RD_SEND_ERROR. */
static int arb_pump_expire(struct rd_emit *s, int64_t now) {
    struct rd_arb *a = (struct rd_arb *)s->arb;
    pthread_mutex_lock(&a->lock);
    arb_expire(a, (double)now / 1e9);
    int outcome = arb_send_released(s, a);
    pthread_mutex_unlock(&a->lock);
    return outcome;
}

/* -- emit: the destination table (open addressing, one per connection) ---------------------- */

static uint64_t slot_of(uint64_t key) { return (key * 0x9E3779B97F4A7C15ull) >> 54; /* 10 bits */ }

static struct rd_dest *dest_find(struct rd_emit *s, uint64_t key) {
    for (uint64_t i = slot_of(key);; i = (i + 1) & (DEST_SLOTS - 1)) {
        struct rd_dest *d = &s->dests[i];
        if (d->state == DEST_EMPTY || d->key == key) return d;
    }
}

/* Python's verdict for a destination: state DEST_ALLOWED (group and port in host byte order),
 * with a socket connected to it or -1, or one of the DEST_DENIED_* reasons. */
void rd_emit_set_dest(struct rd_emit *s, uint64_t key, uint64_t state, int64_t fd) {
    if (s->dest_count >= DEST_SLOTS / 2) {
        memset(s->dests, 0, sizeof s->dests);
        s->dest_count = 0;
    }
    struct rd_dest *d = dest_find(s, key);
    if (d->state == DEST_EMPTY) s->dest_count++;
    d->key = key;
    struct sockaddr_in sa;
    group_address(key, &sa);
    memcpy(&d->addr, &sa, sizeof sa);
    d->fd = fd;
    d->state = state;
}

/* Capture stamp to now, from the peer's stamp (any u64: a stamp from the future counts 0). */
static void observe_latency(struct rd_emit *s, uint64_t stamp) {
    uint64_t now = (uint64_t)now_ns(CLOCK_REALTIME), ns = now > stamp ? now - stamp : 0;
    unsigned k = 0;
    if (ns) {
        uint64_t us = (ns - 1) / 1000;
        k = us ? 64 - (unsigned)__builtin_clzll(us) : 0; /* bit_length */
    }
    s->latency[k < LATENCY_BUCKETS ? k : LATENCY_BUCKETS]++;
    s->latency_count++;
    s->latency_sum_ns += ns;
}

/* Block until the multicast socket takes more (0) or the stop pipe is readable (1). */
static int wait_writable(int fd, int stop_fd) {
    struct pollfd p[2] = {{fd, POLLOUT, 0}, {stop_fd, POLLIN, 0}};
    for (;;) {
        int n = poll(p, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || p[1].revents) return 1;
        if (p[0].revents) return 0;
    }
}

/* The pump's one send step, for its own datagrams and for those the arbiter released: on d's
 * connected socket when it has one (it skips the route lookup of every sendto:
 * docs/PERFORMANCE.md), else on the shared socket to d's address, or to key's when d is an empty
 * slot (a released datagram this connection has not looked up). A full socket is waited for as
 * `wait` says. 0; RD_STOPPED (not sent); RD_SEND_ERROR (err and need_key set: which socket
 * failed, Python drains its error queue). */
static int send_datagram(struct rd_emit *s, const struct rd_dest *d, uint64_t key,
                         const uint8_t *p, uint64_t len, enum send_wait wait) {
    int connected = d->state == DEST_ALLOWED && d->fd >= 0;
    int fd = connected ? (int)d->fd : (int)s->mcast_fd;
    struct sockaddr_in built;
    const struct sockaddr_in *to = (const struct sockaddr_in *)(const void *)&d->addr;
    if (d->state == DEST_EMPTY) {
        group_address(key, &built);
        to = &built;
    }
    for (int gave_up = 0;;) {
        ssize_t sent = connected ? send(fd, p, len, 0)
                                 : sendto(fd, p, len, 0, (const struct sockaddr *)to, sizeof *to);
        if (sent >= 0) {
            s->datagrams_out++;
            s->bytes_out += len;
            s->last_send_ok = 1;
            return 0;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN && !gave_up) {
            s->send_waits++;
            if (wait == WAIT_UNTIL_WRITABLE) {
                if (wait_writable(fd, (int)s->stop_fd)) return RD_STOPPED;
            } else {
                struct pollfd w = {fd, POLLOUT, 0};
                gave_up = poll(&w, 1, ARB_SEND_WAIT_MS) <= 0;
            }
            continue;
        }
        s->err = errno;
        s->need_key = key;
        s->send_errors++;
        s->last_send_ok = 0;
        return RD_SEND_ERROR;
    }
}

/* Decode and emit every complete frame in buf[start:end]. 0 when all complete frames are
 * done, else the RD_* reason to return with (start at the frame concerned). */
static int emit_frames(struct rd_emit *s) {
    uint8_t *buf = s->buf;
    uint64_t highest = s->highest, start = s->start, last_ts = 0;
    int outcome = 0;
    if (s->clear_dests) {
        s->clear_dests = 0;
        memset(s->dests, 0, sizeof s->dests);
        s->dest_count = 0;
    }
    while (s->end - start >= 3) {
        const uint8_t *f = buf + start;
        uint64_t length = get16(f), size = length + 2;
        uint8_t type = f[2];
        if (type == TYPE_HEARTBEAT && length == 9) {
            if (s->end - start < size) break;
            s->frames_in++;
            start += size;
            continue;
        }
        if (type != TYPE_DATA || length < DATA_BODY_MIN || length > DATA_BODY_MIN + MAX_PAYLOAD) {
            /* A control frame, or a malformed one: Python's decoder decides. An ERROR is
             * handed over whole; anything else is refused from its first 3 bytes. */
            if (type == TYPE_ERROR && length >= 3 && length <= 3 + MAX_ERROR_TEXT &&
                s->end - start < size)
                break;
            outcome = RD_CONTROL;
            break;
        }
        if (s->end - start < size) break;
        if (f[3] != 0) { /* unknown flags */
            outcome = RD_CONTROL;
            break;
        }
        uint64_t port = get16(f + 4), group = get32(f + 6), seq = get64(f + 10);
        uint64_t key = group << 16 | port;
        if (seq <= highest) {
            s->frames_in++;
            s->datagrams_in++;
            s->duplicates++;
            s->resuming = 0;
            start += size;
            continue;
        }
        /* One clock read per datagram serves the gate and the arbiter: the arbiter's hold
         * timeouts (ms) need CLOCK_MONOTONIC; the gate alone (a 0.5 s lease) does with the
         * coarse clock, a few ms behind it and cheaper to read. */
        int64_t read_ns = s->arb ? now_ns(CLOCK_MONOTONIC)
                        : s->gate ? now_ns(CLOCK_MONOTONIC_COARSE) : 0;
        if (s->gate && read_ns >= __atomic_load_n(&s->gate->open_until_ns, __ATOMIC_RELAXED)) {
            outcome = RD_GATED; /* not emitted, not claimed: after the freeze, Python decides */
            break;
        }
        struct rd_dest *d = dest_find(s, key);
        if (d->state == DEST_EMPTY) {
            s->need_key = key;
            outcome = RD_NEED_DEST;
            break;
        }
        if (highest && !s->resuming && seq != highest + 1) { /* session.accept */
            s->gaps++;
            s->gap_sequences += seq - highest - 1;
        }
        uint64_t len = size - DATA_HEADER;
        if (d->state == DEST_ALLOWED && len > s->max_payload) {
            s->oversize++;
        } else if (d->state == DEST_ALLOWED) {
            const uint8_t *p = f + DATA_HEADER;
            outcome = s->arb ? arb_emit(s, d, key, p, len, seq, read_ns) /* A/B: its section */
                             : send_datagram(s, d, key, p, len, WAIT_UNTIL_WRITABLE);
            if (outcome == RD_STOPPED) goto out; /* this datagram was not sent: not claimed */
            last_ts = get64(f + 18);
        } else if (d->state == DEST_DENIED_GROUP) {
            s->denied_group++;
        } else {
            s->denied_port++;
        }
        s->frames_in++;
        s->datagrams_in++;
        highest = seq;
        s->resuming = 0;
        start += size;
        if (outcome) break;
    }
out:
    if (last_ts) s->last_ts_ns = s->chunk_ts_ns = last_ts;
    if (!outcome && s->chunk_ts_ns) { /* once per chunk, from its last datagram */
        observe_latency(s, s->chunk_ts_ns);
        s->chunk_ts_ns = 0;
    }
    s->highest = highest;
    s->start = start;
    return outcome;
}

/* Queue the ACK or HEARTBEAT that is due, if any (nothing is being written). */
static void queue_control(struct rd_emit *s, int64_t now) {
    if (s->out_len || now < s->last_out_ns + s->ack_interval_ns) return;
    uint64_t ackable = emit_ack_point(s);
    if (!s->acked_any || ackable > s->acked) {
        s->out[2] = TYPE_ACK;
        put64(s->out + 3, ackable);
        s->acked = ackable;
        s->acked_any = 1;
        s->acks_sent++;
    } else if (now >= s->last_out_ns + s->heartbeat_ns) {
        s->out[2] = TYPE_HEARTBEAT;
        put64(s->out + 3, (uint64_t)now_ns(CLOCK_REALTIME));
        s->heartbeats_sent++;
    } else {
        return;
    }
    put16(s->out, 9);
    s->out_off = 0;
    s->out_len = 11;
    s->blocked_since_ns = now;
}

/* Write what is left of the control frame. 0, or -1 with err set when the connection broke. */
static int flush_control(struct rd_emit *s, int64_t now) {
    while (s->out_off < s->out_len) {
        ssize_t sent = send((int)s->tcp_fd, s->out + s->out_off, s->out_len - s->out_off,
                            MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            s->err = errno;
            return -1;
        }
        s->out_off += (uint64_t)sent;
    }
    s->out_off = s->out_len = 0;
    s->last_out_ns = now;
    return 0;
}

/* Wait until `deadline` (poll_until: at or before `now`, do not sleep) for the TCP socket
 * (events) or the stop pipe, then receive into buf (room bytes): how many bytes came (> 0); 0
 * when there is nothing to receive yet (the deadline, EINTR, EAGAIN, or the socket is only
 * writable): call again; or -RD_STOPPED, -RD_EOF, -RD_RESET (*err set). Both TCP loops wait
 * this way. */
static int64_t wait_and_recv(int tcp_fd, int stop_fd, short events, int64_t deadline, int64_t now,
                             uint8_t *buf, uint64_t room, int64_t *err) {
    struct pollfd p[3] = {{tcp_fd, events, 0}, {stop_fd, POLLIN, 0}};
    int n = poll_until(p, 2, deadline, now);
    if (n < 0 && errno != EINTR) {
        *err = errno;
        return -RD_RESET;
    }
    if (n <= 0) return 0;
    if (p[1].revents) return -RD_STOPPED;
    if (!(p[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) return 0; /* writable */
    ssize_t got = recv(tcp_fd, buf, room, 0);
    if (got < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        *err = errno;
        return -RD_RESET;
    }
    return got ? got : -RD_EOF;
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The emit data path: poll the TCP socket and the stop pipe, recv, decode, sendto; write the
 * coalesced ACKs (at most one per ack_interval_ns) and the idle HEARTBEATs. Returns when
 * something needs Python (RD_*); call again to go on. */
int rd_emit_pump(struct rd_emit *s) {
    if (s->cap < 2 * (DATA_HEADER + MAX_PAYLOAD) || s->end > s->cap || /* room for 2 frames */
        s->max_payload < 1 || s->max_payload > MAX_PAYLOAD) {
        s->err = EINVAL;
        return RD_RESET;
    }
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + s->idle_ns;
    for (;;) {
        int outcome = emit_frames(s);
        if (outcome) return outcome;
        if (s->start == s->end) s->start = s->end = 0;
        else if (s->cap - s->end < 65536 + 3) { /* keep room for a whole frame */
            memmove(s->buf, s->buf + s->start, s->end - s->start);
            s->end -= s->start;
            s->start = 0;
        }
        for (;;) {
            int64_t now = now_ns(CLOCK_MONOTONIC);
            queue_control(s, now);
            if (s->out_len && flush_control(s, now)) return RD_RESET;
            if (s->out_len && now - s->blocked_since_ns >= s->idle_ns) return RD_SLOW;
            if (now >= deadline) return RD_IDLE;
            int64_t wake = deadline;
            if (s->arb) { /* held datagrams expire on time without traffic */
                int64_t due = arb_wake_ns(s);
                if (due <= now) {
                    int expired = arb_pump_expire(s, now);
                    if (expired) return expired;
                    continue;
                }
                wake = min64(wake, due);
            }
            if (s->out_len) wake = min64(wake, s->blocked_since_ns + s->idle_ns);
            else {
                int64_t next = s->last_out_ns + s->ack_interval_ns;
                if (!s->acked_any || emit_ack_point(s) > s->acked) wake = min64(wake, next);
                /* no sooner than queue_control sends it (a shorter heartbeat_ns spun) */
                int64_t beat = s->heartbeat_ns > s->ack_interval_ns ? s->heartbeat_ns
                                                                    : s->ack_interval_ns;
                wake = min64(wake, s->last_out_ns + beat);
            }
            short events = (short)(POLLIN | (s->out_len ? POLLOUT : 0));
            if (now < s->last_rx_ns + s->busy_ns) wake = now; /* latency mode: do not sleep */
            int64_t got = wait_and_recv((int)s->tcp_fd, (int)s->stop_fd, events, wake, now,
                                        s->buf + s->end, s->cap - s->end, &s->err);
            if (got < 0) return (int)-got;
            if (got == 0) continue; /* nothing yet, or only writable */
            now = now_ns(CLOCK_MONOTONIC);
            deadline = now + s->idle_ns;
            s->last_rx_ns = now;
            s->bytes_in += (uint64_t)got;
            s->end += (uint64_t)got;
            break;
        }
    }
}

/* -- capture ---------------------------------------------------------------------------------- */

void rd_upstream_scan(struct rd_upstream *m, const uint8_t *frames, uint64_t count, int64_t now);

/* A capture feed's sequence, shared by the receive threads of its sockets. A thread holds the
 * lock from receiving a batch until Python has put the batch into the replay buffer (its next
 * rd_capture_next or rd_capture_done), so chunks enter the buffer in sequence order. */
struct rd_numbering {
    pthread_mutex_t lock;
    uint64_t seq;   /* the highest sequence assigned */
    uint64_t users; /* receive threads that have called rd_capture_next (atomic) */
};

/* A numbering whose highest sequence assigned so far is seq. */
struct rd_numbering *rd_numbering_new(uint64_t seq) {
    struct rd_numbering *n = calloc(1, sizeof *n);
    if (n && pthread_mutex_init(&n->lock, NULL) != 0) {
        free(n);
        return NULL;
    }
    if (n) n->seq = seq;
    return n;
}

void rd_numbering_free(struct rd_numbering *n) {
    if (!n) return;
    pthread_mutex_destroy(&n->lock);
    free(n);
}

/* Compare and swap the claim word: `value` when it was `expect`; returns what it was. */
int64_t rd_claim_swap(int64_t *word, int64_t expect, int64_t value) {
    __atomic_compare_exchange_n(word, &expect, value, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expect;
}

/* Block until the socket is readable (0), the stop pipe is (RD_STOPPED), or the deadline
 * (CLOCK_MONOTONIC ns; 0: none) passes (RD_EMPTY). */
static int capture_wait(struct rd_capture *s, int64_t deadline) {
    struct pollfd p[3] = {{(int)s->fd, POLLIN, 0}, {(int)s->stop_fd, POLLIN, 0}};
    /* the clock only when something is timed: not on a plain wait, once per wake-up */
    int timed = s->busy_ns > 0 || deadline;
    int64_t now = timed ? now_ns(CLOCK_MONOTONIC) : 0;
    /* latency mode: poll without sleeping for busy_ns after the last batch, then sleep */
    int64_t spin_until = s->busy_ns > 0 ? now + s->busy_ns : 0;
    for (;;) {
        if (deadline && now >= deadline) return RD_EMPTY;
        int n = poll_until(p, 2, spin_until && now < spin_until ? now : deadline, now);
        if (n < 0 && errno != EINTR) {
            s->err = errno;
            return RD_ERROR;
        }
        if (n > 0 && p[1].revents) return RD_STOPPED;
        if (n > 0 && p[0].revents) return 0;
        if (timed) now = now_ns(CLOCK_MONOTONIC);
    }
}

/* Claim the connection for the batch when the claim word holds its fd (s->claimed, with the
 * fd in s->claimed_fd), unless the batch has already. */
static void capture_claim(struct rd_capture *s) {
    if (s->claimed) return;
    int64_t fd = __atomic_load_n(s->claim, __ATOMIC_ACQUIRE);
    if (fd >= 0 && rd_claim_swap(s->claim, fd, RD_CLAIM_HELD) == fd) {
        s->claimed = 1;
        s->claimed_fd = fd;
    }
}

/* Write buf[s->sent:end] to the claimed connection fd (non-blocking): s->sent grows, a failure
 * other than a full socket is s->send_err. */
static void capture_send(struct rd_capture *s, int64_t fd, uint64_t end) {
    while (s->sent < end && !s->send_err) {
        ssize_t n = send((int)fd, s->buf + s->sent, end - s->sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n >= 0) {
            s->sent += (uint64_t)n;
        } else if (errno != EINTR) {
            if (errno != EAGAIN) s->send_err = errno;
            return;
        }
    }
}

/* Receive every waiting datagram (non-blocking) into buf after the batch so far (s->offset,
 * s->count: numbered from s->first on), until the socket is empty (RD_EMPTY) or the buffer is
 * (RD_FULL); then, when the batch has claimed the connection or the claim word holds its fd
 * (claim it), write what the batch has not written to it. `early` (the last wake-up received
 * one datagram: a low rate): claim and write the first datagram as soon as it is received,
 * before the receive that finds the socket empty. */
static int capture_batch(struct rd_capture *s, int early) {
    uint8_t *buf = s->buf;
    const uint64_t start = s->offset, start_count = s->count;
    uint64_t offset = start, count = start_count, bytes = s->payload_bytes;
    union {
        char space[CMSG_SPACE(sizeof(struct in_pktinfo)) + CMSG_SPACE(sizeof(uint32_t))];
        struct cmsghdr align;
    } control;
    int outcome = RD_FULL;
    uint64_t written_to = start; /* the write goes on only when everything before it went */
    while (offset + s->room <= s->cap) {
        uint8_t *f = buf + offset;
        struct iovec iov = {f + DATA_HEADER, s->cap - offset - DATA_HEADER};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t size = recvmsg((int)s->fd, &msg, MSG_DONTWAIT);
        if (size < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                outcome = RD_EMPTY;
                break;
            }
            s->err = errno;
            outcome = RD_ERROR;
            break;
        }
        int64_t ts = now_ns(CLOCK_REALTIME);
        uint32_t group = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
                struct in_pktinfo info;
                memcpy(&info, CMSG_DATA(c), sizeof info);
                group = ntohl(info.ipi_addr.s_addr);
            } else if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL) {
                uint32_t drops;
                memcpy(&drops, CMSG_DATA(c), sizeof drops);
                s->drops = drops;
                s->drops_seen = 1;
            }
        }
        put16(f, (uint16_t)(DATA_BODY_MIN + size));
        f[2] = TYPE_DATA;
        f[3] = 0;
        put16(f + 4, (uint16_t)s->port);
        put32(f + 6, group);
        put64(f + 10, s->first + count);
        put64(f + 18, (uint64_t)ts);
        offset += DATA_HEADER + (uint64_t)size;
        bytes += (uint64_t)size;
        count++;
        if (early && count == start_count + 1 && s->claim && s->sent == start) {
            capture_claim(s);
            if (s->claimed) {
                capture_send(s, s->claimed_fd, offset);
                written_to = offset;
            }
        }
    }
    s->count = count;
    s->offset = offset;
    s->payload_bytes = bytes;
    s->last_wake = count - start_count;
    if (count > start_count && s->claim) capture_claim(s);
    /* latency first: written before any Python runs (after a partial write the rest waits) */
    if (s->claimed && s->sent == written_to) capture_send(s, s->claimed_fd, offset);
    if (count > start_count && s->upstream)
        rd_upstream_scan(s->upstream, buf + start, count - start_count, now_ns(CLOCK_MONOTONIC));
    return outcome;
}

/* A wake-up at `woke`: 1 when it came less than hold_gap_ns after the one before (a high
 * rate, where a batch is held open). */
static int capture_woke(struct rd_capture *s, int64_t woke) {
    int soon = woke - s->last_wake_ns < s->hold_gap_ns;
    s->last_wake_ns = woke;
    return soon;
}

/* Keep a batch open while it is written whole to the claimed connection, is the numbering's
 * only user's (a feed of one socket: no other thread waits for its sequence numbers) and
 * wake-ups come less than hold_gap_ns apart: up to hold_ns, wait again and add what comes to
 * it, each datagram written to the connection at once as before. Python's pass over a batch
 * (the replay buffer, the counters) then covers the datagrams of many wake-ups instead of one
 * or two. Below that rate the pass costs no wake-up of its own, and holding measured a higher
 * median latency with capture and emit on shared cores (docs/PERFORMANCE.md). Returns the
 * batch's outcome: RD_EMPTY also when the hold ends (time, a gap, or the stop pipe: the next
 * call sees it), RD_FULL, RD_ERROR. */
static int capture_hold(struct rd_capture *s) {
    int64_t until = now_ns(CLOCK_MONOTONIC) + s->hold_ns;
    int outcome = RD_EMPTY;
    /* RD_EMPTY leaves room for another datagram, and a failed write leaves sent short */
    while (outcome == RD_EMPTY && s->claimed && s->sent == s->offset &&
           __atomic_load_n(&s->numbering->users, __ATOMIC_ACQUIRE) == 1) {
        int why = capture_wait(s, until);
        if (why == RD_ERROR) return RD_ERROR;
        if (why) break; /* the hold is over, or the stop pipe is readable */
        int soon = capture_woke(s, now_ns(CLOCK_MONOTONIC));
        outcome = capture_batch(s, s->last_wake == 1);
        if (!soon) break;
    }
    return outcome;
}

/* The previous batch is in the replay buffer: let the feed's other sockets number theirs. */
static void capture_release(struct rd_capture *s) {
    if (s->held) {
        s->held = 0;
        pthread_mutex_unlock(&s->numbering->lock);
    }
}

/* The thread ends: hand the numbering back, and leave its users. */
void rd_capture_done(struct rd_capture *s) {
    capture_release(s);
    if (s->joined) {
        s->joined = 0;
        __atomic_sub_fetch(&s->numbering->users, 1, __ATOMIC_ACQ_REL);
    }
}

/* The receive thread's one call per batch: hand back the previous batch's numbering lock, wait
 * for datagrams (unless the last batch was full: then only look at the stop pipe), take the
 * lock, then receive, number and (claimed) write a batch as capture_batch, held open for more
 * as capture_hold when hold_ns > 0 and the rate is high. Returns RD_EMPTY or RD_FULL (first,
 * count, ...: the lock is held until the next call or rd_capture_done), RD_STOPPED, or
 * RD_ERROR (err; the lock is held when count > 0). */
int rd_capture_next(struct rd_capture *s) {
    capture_release(s);
    s->count = s->offset = s->payload_bytes = s->sent = s->claimed = 0;
    s->send_err = 0;
    s->drops_seen = 0;
    if (s->room < DATA_HEADER + MAX_PAYLOAD || !s->numbering) { /* every datagram must fit */
        s->err = EINVAL;
        return RD_ERROR;
    }
    struct rd_numbering *n = s->numbering;
    if (!s->joined) {
        s->joined = 1;
        __atomic_add_fetch(&n->users, 1, __ATOMIC_ACQ_REL);
    }
    if (s->more) { /* sustained input must not hold up stop: the stop pipe before each batch */
        struct pollfd stop = {(int)s->stop_fd, POLLIN, 0};
        if (poll(&stop, 1, 0) > 0) return RD_STOPPED;
    } else {
        int why = capture_wait(s, 0);
        if (why) return why;
    }
    int soon = s->hold_ns > 0 && capture_woke(s, now_ns(CLOCK_MONOTONIC));
    pthread_mutex_lock(&n->lock);
    s->held = 1;
    s->first = n->seq + 1;
    int outcome = capture_batch(s, s->last_wake == 1);
    if (outcome == RD_EMPTY && soon) outcome = capture_hold(s);
    n->seq += s->count;
    s->more = outcome == RD_FULL;
    if (outcome == RD_ERROR && !s->count) capture_release(s);
    return outcome;
}

/* Read what the emit side sends while streaming: ACKs (the highest is kept in acked) and
 * HEARTBEATs are handled here; anything else (an ERROR, a malformed frame) returns RD_CONTROL
 * with buf[start] at that frame for Python's decoder. Also RD_STOPPED, RD_EOF, RD_RESET (err),
 * RD_IDLE (nothing received for idle_ns). */
int rd_capture_read(struct rd_capture_rx *s) {
    if (s->cap < 4096 || s->end > s->cap) { /* room for a whole ERROR frame, with margin */
        s->err = EINVAL;
        return RD_RESET;
    }
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + s->idle_ns;
    for (;;) {
        while (s->end - s->start >= 3) {
            const uint8_t *f = s->buf + s->start;
            uint64_t length = get16(f), size = length + 2;
            uint8_t type = f[2];
            if ((type == TYPE_ACK || type == TYPE_HEARTBEAT) && length == 9) {
                if (s->end - s->start < size) break;
                if (type == TYPE_ACK) {
                    uint64_t seq = get64(f + 3);
                    if (seq > s->acked) __atomic_store_n(&s->acked, seq, __ATOMIC_RELEASE);
                    s->acks++;
                } else {
                    s->heartbeats++;
                }
                s->start += size;
                continue;
            }
            if (((type == TYPE_ERROR && length >= 3 && length <= 3 + MAX_ERROR_TEXT) ||
                 (type == TYPE_CHALLENGE && length == CHALLENGE_LENGTH)) &&
                s->end - s->start < size)
                break; /* frames the Python decoder judges whole go to it whole */
            return RD_CONTROL;
        }
        if (s->start == s->end) s->start = s->end = 0;
        else if (s->cap - s->end < 2048) {
            memmove(s->buf, s->buf + s->start, s->end - s->start);
            s->end -= s->start;
            s->start = 0;
        }
        for (;;) {
            int64_t now = now_ns(CLOCK_MONOTONIC);
            if (now >= deadline) return RD_IDLE;
            int64_t got = wait_and_recv((int)s->tcp_fd, (int)s->stop_fd, POLLIN, deadline, now,
                                        s->buf + s->end, s->cap - s->end, &s->err);
            if (got < 0) return (int)-got;
            if (got == 0) continue;
            deadline = now_ns(CLOCK_MONOTONIC) + s->idle_ns;
            s->bytes_in += (uint64_t)got;
            s->end += (uint64_t)got;
            break;
        }
    }
}

/* -- capture: the exchange's own sequence numbers --------------------------------------------- */

/* relayd/arbitration/sequence.py's UpstreamMonitor, datagram for datagram (the differential
 * tests hold this to it): per channel (group, port, Deribit channel id) the next expected
 * sequence, gaps, duplicates, overlaps and resets, in a seq_table of at most max_channels
 * channels, the least recently used evicted first. O(1) per datagram: a hash lookup and a few
 * compares (seq_parse, seq_get, seq_classify: the arbiter's own). One monitor serves every
 * receive thread of a feed; a mutex is taken once per batch. */

struct up_channel {
    struct seq_channel seq; /* first: a slot of the monitor's seq_table */
    int64_t rotated;
    uint8_t snapshot;
    uint64_t datagrams, gaps, missing, duplicates, resets, overlaps;
};

struct rd_upstream {
    pthread_mutex_t lock;
    uint64_t layout, horizon_ns, n_ports;
    uint64_t snapshot_ports[SEQ_SNAPSHOT_PORTS];
    struct seq_table channels;
    struct rd_upstream_stats stats;
};

/* format UP_FRAME_V1 or UP_SBE; at most max_channels channels (>= 1); a sequence older than
 * horizon_ns is a reset (the spec's stale_horizon); FRAME_V1 channels on one of ports are
 * snapshot channels. NULL when the arguments are out of range or memory is short. */
struct rd_upstream *rd_upstream_new(uint64_t format, uint64_t max_channels, uint64_t horizon_ns,
                                    const uint16_t *ports, uint64_t n_ports) {
    if (format > UP_SBE || max_channels < 1 || max_channels > (1u << 24) ||
        n_ports > UP_MAX_SNAPSHOT_PORTS || horizon_ns > INT64_MAX / 4)
        return NULL;
    struct rd_upstream *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (seq_table_init(&m->channels, max_channels, sizeof(struct up_channel))) {
        free(m);
        return NULL;
    }
    if (pthread_mutex_init(&m->lock, NULL)) {
        seq_table_free(&m->channels);
        free(m);
        return NULL;
    }
    m->layout = format;
    m->horizon_ns = horizon_ns;
    m->n_ports = n_ports;
    for (uint64_t i = 0; i < n_ports; i++) m->snapshot_ports[i] = ports[i];
    return m;
}

void rd_upstream_free(struct rd_upstream *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->lock);
    seq_table_free(&m->channels);
    free(m);
}

/* The spec's ChannelTable.rotate: move the stale floors forward once per horizon. */
static void up_rotate(const struct rd_upstream *m, struct up_channel *c, int64_t now) {
    int64_t elapsed = now - c->rotated, horizon = (int64_t)m->horizon_ns;
    if (elapsed < horizon) return;
    seq_rotate(&c->seq, elapsed >= 2 * horizon);
    c->rotated = now;
}

/* The spec's UpstreamMonitor.see of one payload (the lock held). */
static void up_see(struct rd_upstream *m, uint32_t group, uint16_t port, const uint8_t *p,
                   uint64_t size, int64_t now) {
    struct rd_upstream_stats *st = &m->stats;
    struct seq_header h;
    st->datagrams++;
    if (!seq_parse(m->layout, m->snapshot_ports, m->n_ports, port, p, size, &h)) {
        st->malformed++;
        return;
    }
    if (!h.sequenced) { /* snapshot, retransmit, reject: no sequence of their own */
        st->unsequenced++;
        return;
    }
    uint64_t key_lo = (uint64_t)port << 32 | h.channel;
    struct up_channel *c = (struct up_channel *)(void *)seq_get(&m->channels, group, key_lo);
    if (!c) { /* the first datagram of a channel: it starts there */
        int evicted;
        c = (struct up_channel *)(void *)seq_take(&m->channels, &evicted);
        st->evictions += (uint64_t)evicted;
        memset(c, 0, sizeof *c);
        c->snapshot = (uint8_t)h.snapshot;
        c->rotated = now;
        c->datagrams = 1;
        seq_start(&c->seq, h.seq + (seq_t)h.span, h.stamp); /* the spec's Channel(kind, next) */
        seq_add(&m->channels, &c->seq, group, key_lo);
        return;
    }
    up_rotate(m, c, now);
    c->datagrams++;
    uint64_t missing;
    switch (seq_classify(&c->seq, h.seq, h.span, h.stamp)) {
    case SEQ_IN_ORDER:
        c->seq.next = h.seq + (seq_t)h.span;
        break;
    case SEQ_GAP:
        missing = (uint64_t)(h.seq - c->seq.next);
        c->gaps++;
        c->missing += missing;
        st->gaps++;
        st->missing += missing;
        if (c->snapshot) st->snapshot_gaps++;
        st->last_gap_group = group;
        st->last_gap_port = port;
        st->last_gap_channel = h.channel;
        st->last_gap_missing = missing;
        c->seq.next = h.seq + (seq_t)h.span;
        break;
    case SEQ_BEHIND:
        c->duplicates++;
        st->duplicates++;
        break;
    case SEQ_OVERLAP:
        c->overlaps++;
        st->overlaps++;
        c->seq.next = h.seq + (seq_t)h.span;
        break;
    case SEQ_RESET:
        c->resets++;
        st->resets++;
        seq_restart(&c->seq, h.seq, h.span);
        c->rotated = now;
        break;
    case SEQ_HEARTBEAT:
        st->heartbeats++;
    }
    if (h.stamp > c->seq.stamp) c->seq.stamp = h.stamp;
}

/* UpstreamMonitor.resume: track a channel from where an earlier process left it (a sequence
 * below next is a reset, not a duplicate); nothing counted. 0 when it is tracked already. */
int rd_upstream_resume(struct rd_upstream *m, uint64_t group, uint64_t port, uint64_t channel,
                       uint64_t snapshot, int64_t next, int64_t stamp, int64_t now) {
    uint64_t key_lo = port << 32 | (uint32_t)channel;
    pthread_mutex_lock(&m->lock);
    int added = !seq_get(&m->channels, (uint32_t)group, key_lo);
    if (added) {
        int evicted;
        struct up_channel *c = (struct up_channel *)(void *)seq_take(&m->channels, &evicted);
        m->stats.evictions += (uint64_t)evicted;
        memset(c, 0, sizeof *c);
        c->snapshot = (uint8_t)(snapshot != 0);
        c->rotated = now;
        seq_start(&c->seq, next, stamp);
        c->seq.floor_previous = next;
        seq_add(&m->channels, &c->seq, (uint32_t)group, key_lo);
    }
    pthread_mutex_unlock(&m->lock);
    return added;
}

/* See every datagram of `count` DATA frames (a capture batch) at CLOCK_MONOTONIC `now`. */
void rd_upstream_scan(struct rd_upstream *m, const uint8_t *frames, uint64_t count, int64_t now) {
    pthread_mutex_lock(&m->lock);
    for (uint64_t n = 0; n < count; n++) {
        uint64_t size = (uint64_t)get16(frames) + 2;
        up_see(m, get32(frames + 6), get16(frames + 4), frames + DATA_HEADER, size - DATA_HEADER,
               now);
        frames += size;
    }
    pthread_mutex_unlock(&m->lock);
}

void rd_upstream_read(struct rd_upstream *m, struct rd_upstream_stats *out) {
    pthread_mutex_lock(&m->lock);
    *out = m->stats;
    out->channels = m->channels.used;
    pthread_mutex_unlock(&m->lock);
}

/* A sequence as int64 (saturated: past 2**63 only by an SBE seqNum at its very end). */
static int64_t seq_int64(seq_t v) {
    return v > INT64_MAX ? INT64_MAX : v < INT64_MIN ? INT64_MIN : (int64_t)v;
}

/* Up to `max` channels' counters into `out`, least recently used first; with lossy, only
 * those with a gap, duplicate, reset or overlap. How many. */
uint64_t rd_upstream_channels(struct rd_upstream *m, struct rd_upstream_channel *out,
                              uint64_t max, uint64_t lossy) {
    uint64_t n = 0;
    pthread_mutex_lock(&m->lock);
    for (const struct seq_channel *s = m->channels.oldest; s && n < max; s = s->newer) {
        const struct up_channel *c = (const struct up_channel *)(const void *)s;
        if (lossy && !(c->gaps | c->duplicates | c->resets | c->overlaps)) continue;
        out[n] = (struct rd_upstream_channel){s->group,      seq_port(s),  seq_id(s),
                                              c->snapshot,   c->datagrams, c->gaps,
                                              c->missing,    c->duplicates, c->resets,
                                              c->overlaps,   seq_int64(s->next), s->stamp};
        n++;
    }
    pthread_mutex_unlock(&m->lock);
    return n;
}
