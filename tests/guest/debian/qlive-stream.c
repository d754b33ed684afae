/*
 * qlive-stream: the TCP stream service of the Debian test guest.
 *
 * Every connection gets the same deterministic byte sequence, from offset 0,
 * at a steady rate, until the client closes:
 *
 *   the stream is the 64-bit little-endian words 0, 1, 2, ... back to back,
 *   so byte n is byte (n % 8) of the little-endian encoding of n / 8.
 *
 * A client checks any received byte against its offset alone; a lost,
 * duplicated or reordered byte is a mismatch.
 *
 * Pacing: CHUNK = RATE / 100 bytes every 10 ms (absolute deadlines on
 * CLOCK_MONOTONIC). After a stall of more than 1 s (guest paused, client not
 * reading) the schedule restarts from now: no burst to catch up.
 *
 * usage: qlive-stream [PORT [RATE_BYTES_PER_S]]   (defaults 7778, 102400)
 *
 * It listens on 0.0.0.0:PORT, tells systemd READY=1 (Type=notify) once it
 * listens, serves at most 64 clients at once (one thread each) and logs one
 * line per connection on stderr (the journal).
 *
 * Build: gcc -static -O2 -pthread -o qlive-stream qlive-stream.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NSEC 1000000000LL
#define TICK_NS (10 * 1000 * 1000LL) /* 10 ms */
#define MAX_CLIENTS 64

static unsigned long rate = 102400;
static atomic_int clients;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NSEC + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
    struct timespec ts = {.tv_sec = t / NSEC, .tv_nsec = t % NSEC};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* Fill buf with the stream bytes at [off, off + len). */
static void fill(unsigned char *buf, size_t len, uint64_t off)
{
    for (size_t i = 0; i < len; i++) {
        uint64_t n = off + i;
        buf[i] = (unsigned char)((n / 8) >> (8 * (n % 8)));
    }
}

static void sd_notify_ready(void)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = strlen(path);
    if (n >= sizeof sa.sun_path)
        return;
    memcpy(sa.sun_path, path, n);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = 0; /* abstract namespace */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    const char msg[] = "READY=1";
    if (sendto(fd, msg, sizeof msg - 1, 0, (struct sockaddr *)&sa,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n)) < 0)
        fprintf(stderr, "qlive-stream: sd_notify: %s\n", strerror(errno));
    close(fd);
}

struct client {
    int fd;
    char peer[64];
};

static void *serve(void *arg)
{
    struct client *c = arg;
    size_t chunk = rate / 100 ? rate / 100 : 1;
    unsigned char *buf = malloc(chunk);
    uint64_t off = 0;
    const char *why = "client closed";
    if (!buf) {
        why = "out of memory";
        goto out;
    }
    int64_t next = now_ns();
    for (;;) {
        fill(buf, chunk, off);
        size_t done = 0;
        while (done < chunk) {
            ssize_t w = send(c->fd, buf + done, chunk - done, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EPIPE && errno != ECONNRESET)
                    why = strerror(errno);
                goto out;
            }
            done += (size_t)w;
        }
        off += chunk;
        next += TICK_NS;
        int64_t now = now_ns();
        if (now - next > NSEC)
            next = now; /* stalled: restart the schedule, no burst */
        else
            sleep_until(next);
    }
out:
    fprintf(stderr, "qlive-stream: %s: %s after %llu bytes\n", c->peer, why,
            (unsigned long long)off);
    free(buf);
    close(c->fd);
    free(c);
    atomic_fetch_sub(&clients, 1);
    return NULL;
}

int main(int argc, char **argv)
{
    unsigned long port = 7778;
    if (argc > 3 || (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")))) {
        fprintf(stderr, "usage: %s [PORT [RATE_BYTES_PER_S]]\n", argv[0]);
        return 2;
    }
    if (argc > 1)
        port = strtoul(argv[1], NULL, 10);
    if (argc > 2)
        rate = strtoul(argv[2], NULL, 10);
    if (port == 0 || port > 65535 || rate == 0 || rate > 1000000000UL) {
        fprintf(stderr, "qlive-stream: bad port %lu or rate %lu\n", port, rate);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0) {
        perror("qlive-stream: socket");
        return 1;
    }
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {
        .sin_family = AF_INET,
        .sin_port = htons((uint16_t)port),
        .sin_addr.s_addr = htonl(INADDR_ANY),
    };
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 16) < 0) {
        fprintf(stderr, "qlive-stream: listen on port %lu: %s\n", port, strerror(errno));
        return 1;
    }
    fprintf(stderr, "qlive-stream: listening on 0.0.0.0:%lu, %lu bytes/s\n", port, rate);
    sd_notify_ready();

    for (;;) {
        struct sockaddr_in peer;
        socklen_t plen = sizeof peer;
        int fd = accept4(ls, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                perror("qlive-stream: accept");
            continue;
        }
        if (atomic_load(&clients) >= MAX_CLIENTS) {
            close(fd);
            continue;
        }
        struct client *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        char ip[INET_ADDRSTRLEN] = "?";
        inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
        snprintf(c->peer, sizeof c->peer, "%s:%u", ip, ntohs(peer.sin_port));
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fprintf(stderr, "qlive-stream: %s connected\n", c->peer);
        atomic_fetch_add(&clients, 1);
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (pthread_create(&t, &attr, serve, c) != 0) {
            atomic_fetch_sub(&clients, 1);
            close(fd);
            free(c);
        }
        pthread_attr_destroy(&attr);
    }
}
