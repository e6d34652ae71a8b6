/* The floor of a two-hop TCP relay on this machine: the least a relay of relayd's shape can
 * add to the direct path, with none of relayd's work (no sequence numbers, replay buffer,
 * ACKs, heartbeats, allowlist, Python).
 *
 *   floor cap  --iface ADDR --groups G1,G2,.. --port P --to HOST:PORT
 *   floor emit --listen HOST:PORT --iface ADDR
 *
 * cap: join the groups on the interface with ADDR, block in recvmsg, write each datagram at
 * once to one TCP connection (TCP_NODELAY) as [u16 length][u32 group][u16 port][payload].
 * emit: accept one connection, block in recv, send every whole frame's payload to its group
 * and port (IP_MULTICAST_IF ADDR, TTL 1, no loop). Both block in the receive call itself (no
 * poll before it): one syscall per wake-up fewer than relayd's threads, which must also watch
 * a stop pipe and timers. With FLOOR_POLL set in the environment both hops first wait in
 * ppoll on the socket and a pipe, as relayd's threads do: what that wait costs. With
 * FLOOR_DRAIN cap receives again (non-blocking) after each datagram until the socket is empty,
 * as relayd's capture does to batch: the receive that finds it empty. FLOOR_TIMED prices a
 * timed wait (see wait_readable). Used by `python -m bench.relay --paths direct,floor`. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

#define HEADER 8
#define MAX_DGRAM 65535

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in address(const char *host_port) {
    char host[64];
    const char *colon = strrchr(host_port, ':');
    if (!colon || (size_t)(colon - host_port) >= sizeof host) {
        fprintf(stderr, "floor: %s: want HOST:PORT\n", host_port);
        exit(2);
    }
    memcpy(host, host_port, (size_t)(colon - host_port));
    host[colon - host_port] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "floor: %s: not an IPv4 address\n", host);
        exit(2);
    }
    return a;
}

static int send_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int stop_pipe[2] = {-1, -1}; /* never written: only watched, like relayd's */
static int poll_first;                /* FLOOR_POLL */
static int timed;                     /* FLOOR_TIMED: 1 a 2 ms timeout per wait, 2 ("fd") a timer */

/* FLOOR_POLL's wait, like relayd's: untimed, or (FLOOR_TIMED=1) with a 2 ms timeout, which arms
 * and cancels a kernel timer per wait, or (FLOOR_TIMED=fd) beside a timerfd firing every 2 ms,
 * one timer for all the waits. */
static void wait_readable(int fd) {
    static int timer = -1;
    struct timespec two_ms = {0, 2000000};
    if (stop_pipe[0] < 0 && pipe(stop_pipe) < 0) die("pipe");
    if (timed == 2 && timer < 0) {
        struct itimerspec every = {two_ms, two_ms};
        timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
        if (timer < 0 || timerfd_settime(timer, 0, &every, NULL) < 0) die("timerfd");
    }
    struct pollfd p[3] = {{fd, POLLIN, 0}, {stop_pipe[0], POLLIN, 0}, {timer, POLLIN, 0}};
    ppoll(p, timed == 2 ? 3 : 2, timed == 1 ? &two_ms : NULL, NULL);
    uint64_t expirations;
    if (timed == 2 && p[2].revents && read(timer, &expirations, sizeof expirations) < 0)
        die("timerfd");
}

static int run_cap(const char *iface, char *groups, int port, const char *to) {
    int udp = socket(AF_INET, SOCK_DGRAM, 0), one = 1, rcvbuf = 8 << 20;
    if (udp < 0) die("socket");
    setsockopt(udp, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(udp, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    setsockopt(udp, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
    struct sockaddr_in bound = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(udp, (struct sockaddr *)&bound, sizeof bound) < 0) die("bind");
    for (char *g = strtok(groups, ","); g; g = strtok(NULL, ",")) {
        struct ip_mreq m;
        if (inet_pton(AF_INET, g, &m.imr_multiaddr) != 1 ||
            inet_pton(AF_INET, iface, &m.imr_interface) != 1) {
            fprintf(stderr, "floor: bad group %s or interface %s\n", g, iface);
            return 2;
        }
        if (setsockopt(udp, IPPROTO_IP, IP_ADD_MEMBERSHIP, &m, sizeof m) < 0) die("join");
    }
    struct sockaddr_in target = address(to);
    int tcp = -1;
    while (!stop_flag) { /* the emit side may not listen yet */
        tcp = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(tcp, (struct sockaddr *)&target, sizeof target) == 0) break;
        close(tcp);
        tcp = -1;
        usleep(50000);
    }
    if (tcp < 0) return 0;
    setsockopt(tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    static uint8_t frame[HEADER + MAX_DGRAM];
    char control[CMSG_SPACE(sizeof(struct in_pktinfo))];
    int drain = getenv("FLOOR_DRAIN") != NULL, draining = 0;
    while (!stop_flag) {
        struct iovec iov = {frame + HEADER, MAX_DGRAM};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        if (poll_first && !draining) wait_readable(udp);
        ssize_t n = recvmsg(udp, &msg, draining ? MSG_DONTWAIT : 0);
        if (n < 0) {
            if (errno == EAGAIN && draining) {
                draining = 0;
                continue;
            }
            if (errno == EINTR) continue;
            die("recvmsg");
        }
        draining = drain;
        uint32_t group = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO)
                group = ((struct in_pktinfo *)(void *)CMSG_DATA(c))->ipi_addr.s_addr;
        uint16_t len = htons((uint16_t)n), p = htons((uint16_t)port);
        memcpy(frame, &len, 2);
        memcpy(frame + 2, &group, 4); /* network order, as received */
        memcpy(frame + 6, &p, 2);
        if (send_all(tcp, frame, HEADER + (size_t)n) < 0) die("send");
    }
    return 0;
}

static int run_emit(const char *listen_on, const char *iface) {
    struct sockaddr_in at = address(listen_on);
    int lsock = socket(AF_INET, SOCK_STREAM, 0), one = 1, ttl = 1, zero = 0;
    setsockopt(lsock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lsock, (struct sockaddr *)&at, sizeof at) < 0 || listen(lsock, 1) < 0) die("listen");
    int out = socket(AF_INET, SOCK_DGRAM, 0);
    struct in_addr via;
    if (inet_pton(AF_INET, iface, &via) != 1) {
        fprintf(stderr, "floor: bad interface address %s\n", iface);
        return 2;
    }
    setsockopt(out, IPPROTO_IP, IP_MULTICAST_IF, &via, sizeof via);
    setsockopt(out, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl);
    setsockopt(out, IPPROTO_IP, IP_MULTICAST_LOOP, &zero, sizeof zero);
    int tcp = accept(lsock, NULL, NULL);
    if (tcp < 0) return stop_flag ? 0 : (perror("accept"), 1);
    static uint8_t buf[1 << 20];
    size_t end = 0;
    while (!stop_flag) {
        if (poll_first) wait_readable(tcp);
        ssize_t n = recv(tcp, buf + end, sizeof buf - end, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        end += (size_t)n;
        size_t start = 0;
        while (end - start >= HEADER) {
            uint16_t len, port;
            memcpy(&len, buf + start, 2);
            memcpy(&port, buf + start + 6, 2);
            size_t size = HEADER + ntohs(len);
            if (end - start < size) break;
            struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = port};
            memcpy(&to.sin_addr.s_addr, buf + start + 2, 4);
            if (sendto(out, buf + start + HEADER, ntohs(len), 0, (struct sockaddr *)&to,
                       sizeof to) < 0 && errno != EAGAIN && errno != ENOBUFS)
                die("sendto");
            start += size;
        }
        memmove(buf, buf + start, end - start);
        end -= start;
    }
    return 0;
}

int main(int argc, char **argv) {
    poll_first = getenv("FLOOR_POLL") != NULL;
    const char *timed_as = getenv("FLOOR_TIMED");
    timed = !timed_as ? 0 : !strcmp(timed_as, "fd") ? 2 : 1;
    const char *iface = NULL, *to = NULL, *listen_on = NULL;
    char *groups = NULL;
    int port = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--iface")) iface = argv[i + 1];
        else if (!strcmp(argv[i], "--groups")) groups = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--to")) to = argv[i + 1];
        else if (!strcmp(argv[i], "--listen")) listen_on = argv[i + 1];
    }
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: a blocked call returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (argc > 1 && !strcmp(argv[1], "cap") && iface && groups && port && to)
        return run_cap(iface, groups, port, to);
    if (argc > 1 && !strcmp(argv[1], "emit") && listen_on && iface)
        return run_emit(listen_on, iface);
    fprintf(stderr, "usage: floor cap --iface ADDR --groups G,.. --port P --to HOST:PORT\n"
                    "       floor emit --listen HOST:PORT --iface ADDR\n");
    return 2;
}
