/*
 * qlive test guest: /init of a tiny initramfs.
 *
 * Prints a heartbeat line every millisecond on ttyS0, keeps a memory pattern
 * and verifies it continuously, and optionally dirties memory, writes/verifies
 * a disk, echoes UDP datagrams and serves a TCP sink/source. Options come from /proc/cmdline (qlive.*).
 * See README.md in this folder for the option and output reference.
 *
 * Build: gcc -static -O2 -pthread -o init init.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / 8u)
#define BLK 4096u
#define DISK_MAGIC 0x514c495645424c4bULL /* "QLIVEBLK" */
#define NSEC 1000000000LL

/* ---------- options ---------- */

static struct {
    unsigned long pattern_mib;
    unsigned long dirty_mib_per_s;
    char disk[128];
    char disk_mode[16];
    unsigned long disk_rate;
    int net;
    char ip[64];
    unsigned long udp_port;
    unsigned long tcp_port;
    char modules[512];
    unsigned long hb_us;
    unsigned long slice_us;
    int stats;
    int inject_corrupt;
} opt = {
    .pattern_mib = 64,
    .dirty_mib_per_s = 0,
    .disk = "",
    .disk_mode = "write",
    .disk_rate = 200,
    .net = 0,
    .ip = "10.0.0.2/24",
    .udp_port = 7777,
    .modules = "",
    .hb_us = 1000,
    .slice_us = 200,
};

/* ---------- output ---------- */

static int out_fd = -1;

/* One line, one write(2) call: lines from different threads never interleave. */
static void emit(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    if (out_fd < 0)
        return;
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(out_fd, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return;
        }
        p += w;
        n -= w;
    }
}

static void open_console(void)
{
    const char *cands[] = {"/dev/ttyS0", "/dev/console"};
    for (unsigned i = 0; i < 2 && out_fd < 0; i++) {
        for (int tries = 0; tries < 100; tries++) {
            int fd = open(cands[i], O_RDWR | O_NOCTTY | O_CLOEXEC);
            if (fd >= 0) {
                struct termios t;
                if (tcgetattr(fd, &t) == 0) {
                    cfmakeraw(&t);
                    cfsetispeed(&t, B115200);
                    cfsetospeed(&t, B115200);
                    t.c_cflag |= CLOCAL;
                    tcsetattr(fd, TCSANOW, &t);
                }
                out_fd = fd;
                break;
            }
            if (errno != ENOENT && errno != ENXIO)
                break;
            usleep(10000);
        }
    }
}

/* ---------- helpers ---------- */

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

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static void copy_opt(char *dst, size_t n, const char *src)
{
    snprintf(dst, n, "%s", src);
}

static void parse_cmdline(void)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(tok, "qlive.", 6) != 0)
            continue;
        char *key = tok + 6;
        char *val = strchr(key, '=');
        if (!val)
            continue;
        *val++ = 0;
        if (!strcmp(key, "pattern_mib"))
            opt.pattern_mib = strtoul(val, NULL, 0);
        else if (!strcmp(key, "dirty_mib_per_s"))
            opt.dirty_mib_per_s = strtoul(val, NULL, 0);
        else if (!strcmp(key, "disk"))
            copy_opt(opt.disk, sizeof opt.disk, val);
        else if (!strcmp(key, "disk_mode"))
            copy_opt(opt.disk_mode, sizeof opt.disk_mode, val);
        else if (!strcmp(key, "disk_rate"))
            opt.disk_rate = strtoul(val, NULL, 0);
        else if (!strcmp(key, "net"))
            opt.net = atoi(val);
        else if (!strcmp(key, "ip"))
            copy_opt(opt.ip, sizeof opt.ip, val);
        else if (!strcmp(key, "udp_port"))
            opt.udp_port = strtoul(val, NULL, 0);
        else if (!strcmp(key, "tcp_port"))
            opt.tcp_port = strtoul(val, NULL, 0);
        else if (!strcmp(key, "modules"))
            copy_opt(opt.modules, sizeof opt.modules, val);
        else if (!strcmp(key, "hb_us"))
            opt.hb_us = strtoul(val, NULL, 0);
        else if (!strcmp(key, "slice_us"))
            opt.slice_us = strtoul(val, NULL, 0);
        else if (!strcmp(key, "stats"))
            opt.stats = atoi(val);
        else if (!strcmp(key, "inject_corrupt"))
            opt.inject_corrupt = atoi(val);
    }
    if (opt.hb_us == 0)
        opt.hb_us = 1000;
    if (opt.disk_rate == 0)
        opt.disk_rate = 200;
}

/* ---------- modules ---------- */

static void load_modules(void)
{
    char list[sizeof opt.modules];
    copy_opt(list, sizeof list, opt.modules);
    char *save = NULL;
    for (char *m = strtok_r(list, ",", &save); m; m = strtok_r(NULL, ",", &save)) {
        if (!*m)
            continue;
        char path[256];
        snprintf(path, sizeof path, "/lib/modules/%s.ko", m);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            /* module names use '_' but files may use '-' (or vice versa) */
            for (char *p = path + strlen("/lib/modules/"); *p && strcmp(p, ".ko"); p++)
                if (*p == '_')
                    *p = '-';
            fd = open(path, O_RDONLY | O_CLOEXEC);
        }
        if (fd < 0) {
            emit("GUEST-ERROR insmod %s: open: %s", m, strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            emit("GUEST-ERROR insmod %s: %s", m, strerror(errno));
        close(fd);
    }
}

/* ---------- memory pattern ---------- */

static uint64_t *region;
static uint32_t *page_gen;
static size_t npages;

static inline uint64_t gen_mix(uint32_t gen)
{
    return (uint64_t)gen * 0xD6E8FEB86659FD93ULL;
}

static void write_page(size_t pg, uint32_t gen)
{
    uint64_t *w = region + pg * WORDS_PER_PAGE;
    uint64_t base = (uint64_t)pg * WORDS_PER_PAGE, g = gen_mix(gen);
    for (unsigned i = 0; i < WORDS_PER_PAGE; i++)
        w[i] = splitmix64(base + i) ^ g;
    page_gen[pg] = gen;
}

static int64_t corrupt_window_start;
static unsigned corrupt_in_window;
static unsigned long corrupt_total;

/* Returns 0 if the page is intact. On mismatch reports once (rate limited) and
 * rewrites the page, so one corruption is not reported on every pass. */
static int verify_page(size_t pg)
{
    const uint64_t *w = region + pg * WORDS_PER_PAGE;
    uint64_t base = (uint64_t)pg * WORDS_PER_PAGE, g = gen_mix(page_gen[pg]);
    for (unsigned i = 0; i < WORDS_PER_PAGE; i++) {
        uint64_t want = splitmix64(base + i) ^ g;
        if (__builtin_expect(w[i] != want, 0)) {
            uint64_t got = w[i];
            int64_t t = now_ns();
            corrupt_total++;
            if (t - corrupt_window_start > NSEC) {
                if (corrupt_in_window > 5)
                    emit("CORRUPT-SUPPRESSED %u", corrupt_in_window - 5);
                corrupt_window_start = t;
                corrupt_in_window = 0;
            }
            if (++corrupt_in_window <= 5)
                emit("CORRUPT off=%zx want=%016llx got=%016llx", pg * PAGE + i * 8,
                     (unsigned long long)want, (unsigned long long)got);
            write_page(pg, page_gen[pg] + 1);
            return -1;
        }
    }
    return 0;
}

/* ---------- disk ---------- */

struct blkhdr {
    uint64_t magic;
    uint64_t seq;
    uint64_t blk;
    uint64_t sum;
};
#define PAYLOAD_WORDS ((BLK - sizeof(struct blkhdr)) / 8)

static void fill_payload(uint64_t *p, uint64_t seq)
{
    for (unsigned i = 0; i < PAYLOAD_WORDS; i++)
        p[i] = splitmix64((seq << 12) + i);
}

static uint64_t payload_sum(const uint64_t *p)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a over 64-bit words */
    for (unsigned i = 0; i < PAYLOAD_WORDS; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static int open_disk(int flags, uint64_t *nblocks)
{
    int fd = -1;
    for (int tries = 0; tries < 500; tries++) { /* device node may appear late */
        fd = open(opt.disk, flags | O_DIRECT | O_CLOEXEC);
        if (fd >= 0 || (errno != ENOENT && errno != ENXIO && errno != ENODEV))
            break;
        usleep(10000);
    }
    if (fd < 0) {
        emit("GUEST-ERROR disk open %s: %s", opt.disk, strerror(errno));
        return -1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        struct stat st;
        if (fstat(fd, &st) == 0)
            size = st.st_size;
    }
    *nblocks = size / BLK;
    if (*nblocks == 0) {
        emit("GUEST-ERROR disk %s: size %llu too small", opt.disk, (unsigned long long)size);
        close(fd);
        return -1;
    }
    return fd;
}

static void disk_write_loop(void)
{
    uint64_t nblocks;
    int fd = open_disk(O_RDWR, &nblocks);
    if (fd < 0)
        return;
    void *mem;
    if (posix_memalign(&mem, BLK, BLK) != 0) {
        emit("GUEST-ERROR disk: no memory");
        return;
    }
    struct blkhdr *h = mem;
    uint64_t *payload = (uint64_t *)(h + 1);
    int64_t period = NSEC / (int64_t)opt.disk_rate;
    if (period < 1)
        period = 1;
    int64_t deadline = now_ns();
    unsigned errors = 0;
    for (uint64_t seq = 1;;) {
        sleep_until(deadline);
        uint64_t blk = (seq - 1) % nblocks;
        h->magic = DISK_MAGIC;
        h->seq = seq;
        h->blk = blk;
        fill_payload(payload, seq);
        h->sum = payload_sum(payload) ^ seq ^ (blk << 1);
        ssize_t w = pwrite(fd, mem, BLK, (off_t)(blk * BLK));
        int ok = w == (ssize_t)BLK && fdatasync(fd) == 0;
        if (ok) {
            emit("DISK %llu", (unsigned long long)seq);
            seq++;
        } else if (errors++ < 10) {
            emit("GUEST-ERROR disk write seq=%llu: %s", (unsigned long long)seq,
                 w < 0 || w == (ssize_t)BLK ? strerror(errno) : "short write");
        }
        deadline += period;
        int64_t t = now_ns();
        if (deadline < t) /* fell behind: resync, no burst */
            deadline = t;
    }
}

static void disk_verify(void)
{
    uint64_t nblocks;
    int fd = open_disk(O_RDONLY, &nblocks);
    if (fd < 0)
        return;
    const size_t chunk = 256 * BLK;
    void *mem;
    if (posix_memalign(&mem, BLK, chunk) != 0) {
        emit("GUEST-ERROR disk: no memory");
        return;
    }
    uint64_t ok = 0, bad = 0, maxseq = 0;
    uint64_t *want = malloc(BLK);
    for (uint64_t b = 0; b < nblocks;) {
        size_t n = nblocks - b < chunk / BLK ? (size_t)(nblocks - b) : chunk / BLK;
        ssize_t r = pread(fd, mem, n * BLK, (off_t)(b * BLK));
        if (r < (ssize_t)BLK) {
            emit("GUEST-ERROR disk read blk=%llu: %s", (unsigned long long)b,
                 r < 0 ? strerror(errno) : "short read");
            break;
        }
        n = (size_t)r / BLK;
        for (size_t i = 0; i < n; i++, b++) {
            const struct blkhdr *h = (const void *)((char *)mem + i * BLK);
            if (h->magic != DISK_MAGIC)
                continue;
            const uint64_t *p = (const uint64_t *)(h + 1);
            int good = h->blk == b && h->seq != 0 &&
                       (payload_sum(p) ^ h->seq ^ (h->blk << 1)) == h->sum;
            if (good) {
                fill_payload(want, h->seq);
                good = memcmp(want, p, PAYLOAD_WORDS * 8) == 0;
            }
            if (good) {
                ok++;
                if (h->seq > maxseq)
                    maxseq = h->seq;
            } else if (bad++ < 8) {
                emit("DISKBAD blk=%llu seq=%llu", (unsigned long long)b,
                     (unsigned long long)h->seq);
            }
        }
    }
    close(fd);
    free(want);
    free(mem);
    emit("DISKVERIFY ok=%llu bad=%llu maxseq=%llu", (unsigned long long)ok,
         (unsigned long long)bad, (unsigned long long)maxseq);
}

static void *disk_thread(void *arg)
{
    (void)arg;
    if (!strcmp(opt.disk_mode, "verify"))
        disk_verify();
    else if (!strcmp(opt.disk_mode, "write"))
        disk_write_loop();
    else
        emit("GUEST-ERROR disk_mode %s unknown", opt.disk_mode);
    return NULL;
}

/* ---------- network ---------- */

static int first_netdev(char *name, size_t n)
{
    DIR *d = opendir("/sys/class/net");
    if (!d)
        return -1;
    int found = -1;
    char best[IFNAMSIZ] = "";
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !strcmp(e->d_name, "lo") || strlen(e->d_name) >= IFNAMSIZ)
            continue;
        if (found < 0 || strcmp(e->d_name, best) < 0) {
            copy_opt(best, sizeof best, e->d_name);
            found = 0;
        }
    }
    closedir(d);
    if (found == 0)
        copy_opt(name, n, best);
    return found;
}

static int if_flags_up(int s, const char *ifname)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    copy_opt(ifr.ifr_name, IFNAMSIZ, ifname);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0)
        return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static int set_addr(int s, const char *ifname, unsigned long req, in_addr_t a)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    copy_opt(ifr.ifr_name, IFNAMSIZ, ifname);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = a;
    return ioctl(s, req, &ifr);
}

/* ---------- TCP sink / source (qlive.tcp_port) ---------- */

/* Byte o of every SOURCE stream is tcp_pat[o % TCP_PAT_BYTES]: word i of the
 * table is splitmix64(TCP_PAT_SEED + i), little-endian. */
#define TCP_PAT_BYTES (1u << 20)
#define TCP_PAT_SEED 0x51ec0000ULL
#define TCP_BUF (256u * 1024)
static unsigned char *tcp_pat;

static unsigned tcp_retrans(int fd)
{
    struct tcp_info ti;
    socklen_t l = sizeof ti;
    memset(&ti, 0, sizeof ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) != 0)
        return 0;
    return ti.tcpi_total_retrans;
}

/* SINK: read and discard until the peer shuts down its side, then answer
 * "SINK bytes=N" on the connection. */
static void tcp_sink(int fd, unsigned port)
{
    char *buf = malloc(TCP_BUF);
    unsigned long long bytes = 0;
    if (!buf)
        return;
    for (;;) {
        ssize_t r = read(fd, buf, TCP_BUF);
        if (r > 0)
            bytes += (unsigned long long)r;
        else if (r < 0 && errno == EINTR)
            continue;
        else
            break;
    }
    free(buf);
    dprintf(fd, "SINK bytes=%llu\n", bytes);
    emit("TCP END SINK port=%u bytes=%llu retrans=%u", port, bytes, tcp_retrans(fd));
}

/* SOURCE [RATE]: write the pattern as fast as possible (RATE 0 or absent) or
 * at RATE bytes/s, until the peer closes. Meanwhile each "INFO TAG" line the
 * peer sends is answered on the console (a TCP INFO line). */
static void tcp_source(int fd, unsigned port, unsigned long rate)
{
    unsigned long long off = 0;
    size_t chunk = TCP_BUF;
    if (rate) {
        chunk = rate / 1000; /* about one chunk per millisecond */
        if (chunk < 1024)
            chunk = 1024;
        if (chunk > TCP_BUF)
            chunk = TCP_BUF;
    }
    int64_t t0 = now_ns();
    char cmd[128];
    size_t clen = 0;
    for (;;) {
        short ev = POLLIN;
        struct timespec ts, *tsp = NULL;
        size_t want = chunk;
        if (!rate) {
            ev |= POLLOUT;
        } else {
            int64_t now = now_ns();
            double allowed = (double)(now - t0) * (double)rate / 1e9;
            /* after a pause, catch up at most 100 ms worth: no long burst */
            if (allowed - (double)off > (double)rate / 10) {
                t0 = now - (int64_t)(((double)off + (double)rate / 10) * 1e9 / (double)rate);
                allowed = (double)off + (double)rate / 10;
            }
            if ((double)off + 1 <= allowed) {
                ev |= POLLOUT;
                if ((double)(off + want) > allowed)
                    want = (size_t)(allowed - (double)off);
                if (want == 0)
                    want = 1;
            } else {
                int64_t wait = (int64_t)(((double)off + (double)chunk - allowed) * 1e9 / (double)rate);
                if (wait < 100000)
                    wait = 100000;
                ts.tv_sec = wait / NSEC;
                ts.tv_nsec = wait % NSEC;
                tsp = &ts;
            }
        }
        struct pollfd p = {.fd = fd, .events = ev};
        int r = ppoll(&p, 1, tsp, NULL);
        if (r < 0 && errno != EINTR)
            break;
        if (r <= 0)
            continue;
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(fd, cmd + clen, sizeof cmd - 1 - clen);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
                break;
            if (n > 0)
                clen += (size_t)n;
            char *nl;
            while ((nl = memchr(cmd, '\n', clen))) {
                *nl = 0;
                if (!strncmp(cmd, "INFO", 4))
                    emit("TCP INFO %s port=%u sent=%llu retrans=%u", cmd[4] ? cmd + 5 : "-", port, off,
                         tcp_retrans(fd));
                size_t used = (size_t)(nl + 1 - cmd);
                memmove(cmd, nl + 1, clen - used);
                clen -= used;
            }
            if (clen == sizeof cmd - 1) /* an overlong line: drop it */
                clen = 0;
        }
        if (p.revents & POLLOUT) {
            size_t at = (size_t)(off % TCP_PAT_BYTES);
            if (want > TCP_PAT_BYTES - at)
                want = TCP_PAT_BYTES - at;
            ssize_t w = send(fd, tcp_pat + at, want, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0)
                off += (unsigned long long)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                break;
        }
    }
    emit("TCP END SOURCE port=%u bytes=%llu retrans=%u", port, off, tcp_retrans(fd));
}

struct tcp_conn {
    int fd;
    unsigned port;
};

static void *tcp_conn_thread(void *arg)
{
    struct tcp_conn c = *(struct tcp_conn *)arg;
    free(arg);
    /* The command line, a byte at a time: nothing after it is consumed. */
    char line[128];
    size_t n = 0;
    while (n < sizeof line - 1) {
        ssize_t r = read(c.fd, line + n, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || line[n] == '\n')
            break;
        n++;
    }
    line[n] = 0;
    if (!strcmp(line, "SINK"))
        tcp_sink(c.fd, c.port);
    else if (!strncmp(line, "SOURCE", 6) && (line[6] == 0 || line[6] == ' '))
        tcp_source(c.fd, c.port, line[6] ? strtoul(line + 7, NULL, 0) : 0);
    else
        emit("GUEST-ERROR tcp port=%u: unknown command", c.port);
    close(c.fd);
    return NULL;
}

static void *tcp_thread(void *arg)
{
    (void)arg;
    uint64_t *w = malloc(TCP_PAT_BYTES);
    if (!w) {
        emit("GUEST-ERROR tcp: no memory");
        return NULL;
    }
    for (unsigned i = 0; i < TCP_PAT_BYTES / 8; i++)
        w[i] = splitmix64(TCP_PAT_SEED + i);
    tcp_pat = (unsigned char *)w;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) {
        emit("GUEST-ERROR tcp socket: %s", strerror(errno));
        return NULL;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.tcp_port)};
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(s, 16) != 0) {
        emit("GUEST-ERROR tcp bind/listen %lu: %s", opt.tcp_port, strerror(errno));
        return NULL;
    }
    emit("TCP UP port=%lu", opt.tcp_port);
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        int c = accept4(s, (struct sockaddr *)&from, &fl, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        struct tcp_conn *tc = malloc(sizeof *tc);
        if (!tc) {
            close(c);
            continue;
        }
        tc->fd = c;
        tc->port = ntohs(from.sin_port);
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        int e = pthread_create(&t, &a, tcp_conn_thread, tc);
        pthread_attr_destroy(&a);
        if (e != 0) {
            emit("GUEST-ERROR thread tcp: %s", strerror(e));
            close(c);
            free(tc);
        }
    }
    return NULL;
}

static void start_thread(void *(*fn)(void *), const char *what);

static void *net_thread(void *arg)
{
    (void)arg;
    char ifname[IFNAMSIZ] = "";
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        emit("GUEST-ERROR net socket: %s", strerror(errno));
        return NULL;
    }
    if_flags_up(s, "lo");
    for (int tries = 0; first_netdev(ifname, sizeof ifname) != 0; tries++) {
        if (tries == 500) {
            emit("GUEST-ERROR net: no interface in /sys/class/net");
            return NULL;
        }
        usleep(10000);
    }
    char ipbuf[sizeof opt.ip];
    copy_opt(ipbuf, sizeof ipbuf, opt.ip);
    unsigned prefix = 24;
    char *slash = strchr(ipbuf, '/');
    if (slash) {
        *slash = 0;
        prefix = (unsigned)atoi(slash + 1);
        if (prefix > 32)
            prefix = 24;
    }
    struct in_addr addr;
    if (inet_pton(AF_INET, ipbuf, &addr) != 1) {
        emit("GUEST-ERROR net: bad qlive.ip %s", opt.ip);
        return NULL;
    }
    in_addr_t mask = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
    if (set_addr(s, ifname, SIOCSIFADDR, addr.s_addr) != 0) {
        emit("GUEST-ERROR net SIOCSIFADDR %s: %s", ifname, strerror(errno));
        return NULL;
    }
    if (set_addr(s, ifname, SIOCSIFNETMASK, mask) != 0)
        emit("GUEST-ERROR net SIOCSIFNETMASK %s: %s", ifname, strerror(errno));
    if (if_flags_up(s, ifname) != 0) {
        emit("GUEST-ERROR net SIOCSIFFLAGS %s: %s", ifname, strerror(errno));
        return NULL;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.udp_port)};
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    /* A deep receive buffer: under TCG on a loaded host the echo thread can
     * be off the vCPU for 100+ ms, and the default buffer (about 90
     * datagrams at virtio-net's truesize) would drop what the tap queued. */
    int rcvbuf = 8 << 20;
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        emit("GUEST-ERROR net SO_RCVBUFFORCE: %s", strerror(errno));
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        emit("GUEST-ERROR net bind udp %lu: %s", opt.udp_port, strerror(errno));
        return NULL;
    }
    emit("NET UP %s", ifname);
    if (opt.tcp_port)
        start_thread(tcp_thread, "tcp");
    static char pkt[65536];
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(s, pkt, sizeof pkt, 0, (struct sockaddr *)&from, &fl);
        if (n < 0)
            continue;
        sendto(s, pkt, (size_t)n, 0, (struct sockaddr *)&from, fl);
    }
    return NULL;
}

/* ---------- main ---------- */

/* Returns 0 or an errno; the console is not open yet, so the caller reports. */
static int mount_fs(const char *src, const char *dst, const char *type, unsigned long flags)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, NULL) != 0 && errno != EBUSY)
        return errno;
    return 0;
}

static void start_thread(void *(*fn)(void *), const char *what)
{
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 256 * 1024);
    pthread_attr_setinheritsched(&a, PTHREAD_EXPLICIT_SCHED);
    pthread_attr_setschedpolicy(&a, SCHED_OTHER);
    int e = pthread_create(&t, &a, fn, NULL);
    if (e != 0)
        emit("GUEST-ERROR thread %s: %s", what, strerror(e));
    pthread_attr_destroy(&a);
}

int main(void)
{
    int e_proc = mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV);
    int e_sys = mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NOEXEC | MS_NODEV);
    int e_dev = mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID);
    parse_cmdline();
    open_console();
    if (e_proc)
        emit("GUEST-ERROR mount /proc: %s", strerror(e_proc));
    if (e_sys)
        emit("GUEST-ERROR mount /sys: %s", strerror(e_sys));
    if (e_dev)
        emit("GUEST-ERROR mount /dev: %s", strerror(e_dev));
    load_modules();
    /* leading newline: firmware leaves escape sequences without a newline */
    emit("\nQLIVE-GUEST READY");

    if (opt.net)
        start_thread(net_thread, "net");
    if (opt.disk[0])
        start_thread(disk_thread, "disk");

    /* The heartbeat thread (this one) gets a real-time priority: it sleeps most
     * of the time and its work per period is bounded by slice_us. */
    struct sched_param sp = {.sched_priority = 10};
    sched_setscheduler(0, SCHED_FIFO, &sp);

    npages = (size_t)opt.pattern_mib * (1024 * 1024 / PAGE);
    if (npages) {
        region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        page_gen = calloc(npages, sizeof *page_gen);
        if (region == MAP_FAILED || !page_gen) {
            emit("GUEST-ERROR pattern alloc %lu MiB", opt.pattern_mib);
            region = NULL;
            npages = 0;
        }
    }

    const int64_t period = (int64_t)opt.hb_us * 1000;
    const int64_t slice = (int64_t)opt.slice_us * 1000;
    size_t filled = 0;      /* pages [0, filled) hold the pattern */
    size_t vpos = 0;        /* next page to verify */
    size_t dpos = 0;        /* next page to dirty */
    unsigned long passes = 0;
    double dirty_credit = 0; /* pages owed to the dirtier */
    const double dirty_pages_per_ns = (double)opt.dirty_mib_per_s * (1024.0 * 1024 / PAGE) / 1e9;
    unsigned long long seq = 0;
    int64_t deadline = now_ns();
    int64_t last_work = deadline;
    /* per-second statistics (qlive.stats=1) */
    int64_t st_start = deadline, st_late_max = 0, st_late_sum = 0, st_work = 0;
    unsigned long st_hb = 0, st_skipped = 0, st_pages = 0, st_dirty = 0;

    for (;;) {
        sleep_until(deadline);
        emit("HB %llu", ++seq);

        int64_t t0 = now_ns();
        if (opt.stats) {
            int64_t late = t0 - deadline;
            st_hb++;
            st_late_sum += late;
            if (late > st_late_max)
                st_late_max = late;
            if (t0 - st_start >= NSEC) {
                emit("STAT hb=%lu skipped=%lu late_avg_us=%lld late_max_us=%lld work_us=%lld pages=%lu dirtied=%lu",
                     st_hb, st_skipped, (long long)(st_late_sum / (int64_t)st_hb / 1000),
                     (long long)(st_late_max / 1000), (long long)(st_work / 1000), st_pages, st_dirty);
                st_start = t0;
                st_hb = st_skipped = st_pages = st_dirty = 0;
                st_late_max = st_late_sum = st_work = 0;
            }
        }
        deadline += period;
        if (deadline <= t0) { /* fell behind: skip missed beats, keep the phase */
            int64_t missed = (t0 - deadline) / period + 1;
            deadline += missed * period;
            st_skipped += (unsigned long)missed;
        }

        /* Work budget for this period: slice, and never past the next beat. */
        int64_t stop = t0 + slice;
        if (stop > deadline - period / 10)
            stop = deadline - period / 10;
        if (stop < t0 + slice / 4) /* always make some progress, even when late */
            stop = t0 + slice / 4;

        if (!npages)
            continue;
        int64_t w0 = now_ns();
        if (filled < npages) {
            while (filled < npages && now_ns() < stop) {
                write_page(filled++, 1);
                st_pages++;
            }
            if (filled == npages)
                emit("PATTERN READY mib=%lu", opt.pattern_mib);
            last_work = now_ns();
        } else {
            if (dirty_pages_per_ns > 0) {
                dirty_credit += (double)(w0 - last_work) * dirty_pages_per_ns;
                if (dirty_credit > (double)npages)
                    dirty_credit = (double)npages;
                /* the dirtier gets at most half of the budget, verify the rest */
                int64_t dstop = w0 + (stop - w0) / 2;
                while (dirty_credit >= 1.0 && now_ns() < dstop) {
                    write_page(dpos, page_gen[dpos] + 1);
                    dpos = (dpos + 1) % npages;
                    dirty_credit -= 1.0;
                    st_dirty++;
                }
            }
            last_work = w0;
            while (now_ns() < stop) {
                verify_page(vpos);
                st_pages++;
                if (++vpos == npages) {
                    vpos = 0;
                    passes++;
                    emit("VERIFY pass=%lu corrupt=%lu", passes, corrupt_total);
                    if (passes == 1 && opt.inject_corrupt && npages > 2) {
                        /* self-test of the checker: flip bits the guest did not write */
                        region[WORDS_PER_PAGE + 3] ^= 0xff00ULL;
                        emit("INJECTED off=%x", PAGE + 3 * 8);
                    }
                }
            }
        }
        st_work += now_ns() - w0;
    }
}
