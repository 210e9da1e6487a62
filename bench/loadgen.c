/*
 * loadgen: a closed-loop load generator for Postfix SMTPD policy servers.
 *
 * It behaves like a busy Postfix: C persistent connections, each with
 * exactly one request outstanding (send, wait for the answer, send the
 * next), for a fixed duration after a warm-up. Requests come from a file of
 * records written by bench/run.py; every reply is compared with the
 * record's expected actions, so a fast wrong answer counts as an error.
 *
 * Record format (one after the other in the file):
 *
 *     #expect OK (you win!)<TAB>DUNNO (you lose!)    (or "#expect *")
 *     name=value
 *     ...
 *     <empty line>
 *
 * Connection i starts at record i and steps through the records by C, so
 * every connection sees a different, deterministic sequence and the server
 * sees every record in turn.
 *
 * A request may hold the 12-character mark ~STAMP~~~~~~ (bench/run.py puts
 * it at the end of the instance attribute): each time the request is sent,
 * the mark is replaced by 12 hex digits that no other request of this or
 * any other run in the same 18 hours carries, so that every request is a
 * new message to the server, as on a real relay, even when the records
 * come round again (a quota counts each message once).
 *
 * Built by bench/run.py as: cc -O2 -o build/loadgen bench/loadgen.c -lpthread
 * Prints one JSON object on stdout. Written in C because a Python client
 * cannot drive a fast server hard enough on one core.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EXPECT 4
#define HIST_US 1000000 /* 1 us buckets up to 1 s, one overflow bucket */
#define RECV_BUF 8192
#define MAX_PIDS 64

#define STAMP_MARK "~STAMP~~~~~~"
#define STAMP_LEN 12

struct record {
    char *request;
    size_t request_len;
    long stamp_at; /* offset of STAMP_MARK in request, or -1 */
    int n_expect; /* 0: any reply is right */
    char *expect[MAX_EXPECT];
    size_t expect_len[MAX_EXPECT];
};

enum conn_state { CONNECTING, WAITING, IDLE };

struct conn {
    int fd;
    enum conn_state state;
    size_t next_record;
    size_t current;
    size_t sent;
    uint64_t started_ns;
    char *out; /* the request being sent, stamped */
    size_t out_cap;
    char buf[RECV_BUF];
    size_t have;
    uint64_t answered; /* during the measured window */
};

struct stats {
    uint64_t requests;     /* right answers in the window */
    uint64_t wrong;        /* well-formed replies that were not expected */
    uint64_t closed;       /* server closed a connection (or reset it) */
    uint64_t connect_errors;
    uint64_t timeouts;     /* no reply within the per-request timeout */
    uint64_t malformed;    /* reply not "action=...\n\n", or unasked data */
    uint64_t max_us;
    uint32_t *hist;        /* HIST_US + 1 buckets */
    char first_wrong[300];
};

struct worker {
    pthread_t thread;
    int index;
    struct conn *conns;
    int n_conns;
    struct stats stats;
};

static struct record *records;
static size_t n_records;
/* How far a connection moves through the records after each request: the
 * number of connections, so that connections do not send the same records
 * in lockstep (which made every record a burst of C identical requests). */
static size_t record_step = 1;
/* The next request stamp: the run's start time in its top 16 bits (of 48),
 * so that runs in the same 18 hours never repeat a stamp. */
static uint64_t next_stamp;
static struct sockaddr_in server;
static uint64_t start_ns, measure_ns, end_ns;
static double request_timeout = 10.0;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void load_records(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    size_t cap = 1024;
    records = calloc(cap, sizeof *records);
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t len;
    struct record *r = NULL;
    char *req = NULL;
    size_t req_len = 0, req_cap = 0;
    while ((len = getline(&line, &line_cap, f)) != -1) {
        if (r == NULL) {
            if (len == 1 && line[0] == '\n')
                continue;
            if (strncmp(line, "#expect ", 8) != 0) {
                fprintf(stderr, "loadgen: record %zu does not start with #expect\n", n_records);
                exit(2);
            }
            if (n_records == cap) {
                cap *= 2;
                records = realloc(records, cap * sizeof *records);
            }
            r = &records[n_records++];
            memset(r, 0, sizeof *r);
            line[len - 1] = '\0';
            char *spec = line + 8;
            if (strcmp(spec, "*") != 0) {
                char *save = NULL;
                for (char *alt = strtok_r(spec, "\t", &save); alt; alt = strtok_r(NULL, "\t", &save)) {
                    if (r->n_expect == MAX_EXPECT) {
                        fprintf(stderr, "loadgen: too many expected actions\n");
                        exit(2);
                    }
                    size_t n = strlen(alt) + 9;
                    char *e = malloc(n + 1);
                    snprintf(e, n + 1, "action=%s\n\n", alt);
                    r->expect[r->n_expect] = e;
                    r->expect_len[r->n_expect++] = n;
                }
            }
            req_len = 0;
            continue;
        }
        if (req_len + len + 1 > req_cap) {
            req_cap = (req_len + len + 1) * 2;
            req = realloc(req, req_cap);
        }
        memcpy(req + req_len, line, len);
        req_len += len;
        if (len == 1 && line[0] == '\n') {
            r->request = malloc(req_len + 1);
            memcpy(r->request, req, req_len);
            r->request[req_len] = '\0';
            r->request_len = req_len;
            char *mark = strstr(r->request, STAMP_MARK);
            r->stamp_at = mark ? mark - r->request : -1;
            r = NULL;
        }
    }
    if (r != NULL) {
        fprintf(stderr, "loadgen: the last record has no empty line\n");
        exit(2);
    }
    if (n_records == 0) {
        fprintf(stderr, "loadgen: no records in %s\n", path);
        exit(2);
    }
    free(line);
    free(req);
    fclose(f);
}

static void conn_close(struct conn *c, int epfd)
{
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = IDLE;
    c->have = 0;
}

static void conn_open(struct conn *c, int epfd, struct stats *st)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        st->connect_errors++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS) {
        st->connect_errors++;
        close(fd);
        return;
    }
    c->fd = fd;
    c->state = CONNECTING;
    c->have = 0;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

/* Send the connection's next request; requests are small enough that a
 * loopback socket with an empty send buffer always takes them whole. */
static int conn_send(struct conn *c, int epfd, struct stats *st)
{
    struct record *r = &records[c->next_record];
    c->current = c->next_record;
    c->next_record = (c->next_record + record_step) % n_records;
    c->started_ns = now_ns();
    c->sent = 0;
    const char *request = r->request;
    if (r->stamp_at >= 0) {
        if (c->out_cap < r->request_len + 1) {
            c->out_cap = r->request_len + 1;
            c->out = realloc(c->out, c->out_cap);
            if (c->out == NULL)
                die("realloc");
        }
        memcpy(c->out, r->request, r->request_len);
        char stamp[STAMP_LEN + 1];
        uint64_t unique = __atomic_fetch_add(&next_stamp, 1, __ATOMIC_RELAXED);
        snprintf(stamp, sizeof stamp, "%012llx", (unsigned long long)(unique & 0xffffffffffffULL));
        memcpy(c->out + r->stamp_at, stamp, STAMP_LEN);
        request = c->out;
    }
    while (c->sent < r->request_len) {
        ssize_t n = send(c->fd, request + c->sent, r->request_len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            st->closed++;
            conn_close(c, epfd);
            return -1;
        }
        c->sent += n;
    }
    c->state = WAITING;
    return 0;
}

static void record_latency(struct stats *st, uint64_t ns)
{
    uint64_t us = ns / 1000;
    if (us > st->max_us)
        st->max_us = us;
    st->hist[us < HIST_US ? us : HIST_US]++;
}

static void on_readable(struct conn *c, int epfd, struct stats *st, int measuring)
{
    for (;;) {
        ssize_t n = recv(c->fd, c->buf + c->have, sizeof c->buf - c->have, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            st->closed++;
            conn_close(c, epfd);
            return;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        c->have += n;
        if (c->have >= 2 && c->buf[c->have - 2] == '\n' && c->buf[c->have - 1] == '\n')
            break;
        if (c->have == sizeof c->buf) {
            st->malformed++;
            conn_close(c, epfd);
            return;
        }
    }
    uint64_t t = now_ns();
    if (c->state != WAITING) {
        st->malformed++; /* a reply nobody asked for */
        conn_close(c, epfd);
        return;
    }
    struct record *r = &records[c->current];
    /* The reply must be exactly one "action=...\n\n". */
    char *first_end = memchr(c->buf, '\n', c->have);
    if (c->have < 9 || memcmp(c->buf, "action=", 7) != 0 || first_end + 2 != c->buf + c->have) {
        st->malformed++;
        if (!st->first_wrong[0])
            snprintf(st->first_wrong, sizeof st->first_wrong, "malformed: %.*s",
                     (int)(c->have > 200 ? 200 : c->have), c->buf);
        conn_close(c, epfd);
        return;
    }
    int right = r->n_expect == 0;
    for (int i = 0; i < r->n_expect && !right; i++)
        right = r->expect_len[i] == c->have && memcmp(r->expect[i], c->buf, c->have) == 0;
    if (measuring && c->started_ns >= measure_ns) {
        if (right) {
            st->requests++;
            c->answered++;
            record_latency(st, t - c->started_ns);
        } else {
            st->wrong++;
            if (!st->first_wrong[0])
                snprintf(st->first_wrong, sizeof st->first_wrong, "record %zu: got %.*s expected %.*s",
                         c->current, (int)c->have - 2, c->buf, (int)r->expect_len[0] - 2, r->expect[0]);
        }
    }
    c->have = 0;
    c->state = IDLE;
    if (t < end_ns)
        conn_send(c, epfd, st);
}

static void *run_worker(void *arg)
{
    struct worker *w = arg;
    struct stats *st = &w->stats;
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    for (int i = 0; i < w->n_conns; i++)
        conn_open(&w->conns[i], epfd, st);
    struct epoll_event events[256];
    int measuring = 0;
    uint64_t next_sweep = now_ns();
    uint64_t timeout_ns = (uint64_t)(request_timeout * 1e9);
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && t >= measure_ns) {
            /* Warm-up over: forget what happened so far. */
            uint32_t *hist = st->hist;
            memset(st, 0, sizeof *st);
            st->hist = hist;
            memset(hist, 0, (HIST_US + 1) * sizeof *hist);
            for (int i = 0; i < w->n_conns; i++)
                w->conns[i].answered = 0;
            measuring = 1;
        }
        if (t >= end_ns)
            break;
        if (t >= next_sweep) {
            next_sweep = t + 100000000ull;
            for (int i = 0; i < w->n_conns; i++) {
                struct conn *c = &w->conns[i];
                if (c->fd < 0) {
                    conn_open(c, epfd, st); /* reconnect, as Postfix would */
                } else if (c->state == WAITING && t - c->started_ns > timeout_ns) {
                    if (measuring)
                        st->timeouts++;
                    conn_close(c, epfd);
                }
            }
        }
        int n = epoll_wait(epfd, events, 256, 10);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->fd < 0)
                continue;
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err != 0) {
                    st->connect_errors++;
                    conn_close(c, epfd);
                    continue;
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                if (now_ns() < end_ns)
                    conn_send(c, epfd, st);
                continue;
            }
            if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c, epfd, st, measuring);
        }
    }
    for (int i = 0; i < w->n_conns; i++)
        conn_close(&w->conns[i], epfd);
    close(epfd);
    return NULL;
}

static double cpu_seconds(int pid)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* Fields after the command name, which may contain spaces. */
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    unsigned long utime = 0, stime = 0;
    /* state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    return (double)(utime + stime) / sysconf(_SC_CLK_TCK);
}

static double percentile(const uint32_t *hist, uint64_t total, double q, uint64_t max_us)
{
    if (total == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * total);
    if (rank >= total)
        rank = total - 1;
    uint64_t seen = 0;
    for (uint64_t us = 0; us <= HIST_US; us++) {
        seen += hist[us];
        if (seen > rank)
            return (us == HIST_US ? max_us : us) / 1000.0;
    }
    return max_us / 1000.0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen -p PORT -f RECORDS [-H 127.0.0.1] [-c CONNECTIONS] [-d SECONDS]\n"
            "               [-w WARMUP_SECONDS] [-t THREADS] [-T REQUEST_TIMEOUT] [-P PID]...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *path = NULL;
    int port = 0, n_conns = 32, n_threads = 1, n_pids = 0, pids[MAX_PIDS];
    double duration = 5, warmup = 1;
    int opt;
    while ((opt = getopt(argc, argv, "H:p:f:c:d:w:t:T:P:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'f': path = optarg; break;
        case 'c': n_conns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 't': n_threads = atoi(optarg); break;
        case 'T': request_timeout = atof(optarg); break;
        case 'P':
            if (n_pids < MAX_PIDS)
                pids[n_pids++] = atoi(optarg);
            break;
        default: usage();
        }
    }
    if (!port || !path || n_conns < 1 || n_threads < 1 || duration <= 0)
        usage();
    if (n_threads > n_conns)
        n_threads = n_conns;
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1) {
        fprintf(stderr, "loadgen: %s is not an IPv4 address\n", host);
        exit(2);
    }
    load_records(path);
    next_stamp = ((uint64_t)time(NULL) & 0xffff) << 32;

    record_step = (size_t)n_conns % n_records;
    if (record_step == 0)
        record_step = 1;
    struct conn *conns = calloc(n_conns, sizeof *conns);
    for (int i = 0; i < n_conns; i++) {
        conns[i].fd = -1;
        conns[i].next_record = (size_t)i % n_records;
    }
    struct worker *workers = calloc(n_threads, sizeof *workers);
    start_ns = now_ns();
    measure_ns = start_ns + (uint64_t)(warmup * 1e9);
    end_ns = measure_ns + (uint64_t)(duration * 1e9);
    int per = n_conns / n_threads, extra = n_conns % n_threads, at = 0;
    for (int i = 0; i < n_threads; i++) {
        workers[i].index = i;
        workers[i].conns = conns + at;
        workers[i].n_conns = per + (i < extra);
        at += workers[i].n_conns;
        workers[i].stats.hist = calloc(HIST_US + 1, sizeof(uint32_t));
        if (!workers[i].stats.hist)
            die("calloc");
        if (pthread_create(&workers[i].thread, NULL, run_worker, &workers[i]) != 0)
            die("pthread_create");
    }

    /* The daemon's CPU time over the measured window only. */
    struct timespec ts;
    uint64_t t = now_ns();
    if (measure_ns > t) {
        ts.tv_sec = (measure_ns - t) / 1000000000ull;
        ts.tv_nsec = (measure_ns - t) % 1000000000ull;
        nanosleep(&ts, NULL);
    }
    double cpu_before = 0, cpu_after = 0;
    for (int i = 0; i < n_pids; i++)
        cpu_before += cpu_seconds(pids[i]);
    struct rusage self_before, self_after;
    getrusage(RUSAGE_SELF, &self_before);
    t = now_ns();
    if (end_ns > t) {
        ts.tv_sec = (end_ns - t) / 1000000000ull;
        ts.tv_nsec = (end_ns - t) % 1000000000ull;
        nanosleep(&ts, NULL);
    }
    for (int i = 0; i < n_pids; i++)
        cpu_after += cpu_seconds(pids[i]);
    getrusage(RUSAGE_SELF, &self_after);

    struct stats total = {0};
    total.hist = calloc(HIST_US + 1, sizeof(uint32_t));
    for (int i = 0; i < n_threads; i++) {
        pthread_join(workers[i].thread, NULL);
        struct stats *s = &workers[i].stats;
        total.requests += s->requests;
        total.wrong += s->wrong;
        total.closed += s->closed;
        total.connect_errors += s->connect_errors;
        total.timeouts += s->timeouts;
        total.malformed += s->malformed;
        if (s->max_us > total.max_us)
            total.max_us = s->max_us;
        for (int b = 0; b <= HIST_US; b++)
            total.hist[b] += s->hist[b];
        if (!total.first_wrong[0] && s->first_wrong[0])
            memcpy(total.first_wrong, s->first_wrong, sizeof total.first_wrong);
    }
    int starved = 0;
    for (int i = 0; i < n_conns; i++)
        starved += conns[i].answered == 0;
    double self_cpu = (self_after.ru_utime.tv_sec - self_before.ru_utime.tv_sec) +
                      (self_after.ru_utime.tv_usec - self_before.ru_utime.tv_usec) / 1e6 +
                      (self_after.ru_stime.tv_sec - self_before.ru_stime.tv_sec) +
                      (self_after.ru_stime.tv_usec - self_before.ru_stime.tv_usec) / 1e6;
    double rps = total.requests / duration;
    double per_req = total.requests ? 1e6 / total.requests : 0;
    /* Escape the sample for JSON: keep printable ASCII, drop quotes. */
    for (char *p = total.first_wrong; *p; p++)
        if (*p < 0x20 || *p > 0x7e || *p == '"' || *p == '\\')
            *p = ' ';
    printf("{\"connections\": %d, \"threads\": %d, \"duration\": %.3f, \"records\": %zu,"
           " \"requests\": %llu, \"rps\": %.1f,"
           " \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f,"
           " \"wrong\": %llu, \"malformed\": %llu, \"closed\": %llu, \"connect_errors\": %llu,"
           " \"timeouts\": %llu, \"starved_connections\": %d,"
           " \"daemon_cpu_s\": %.3f, \"daemon_cpu_us_per_request\": %.2f,"
           " \"loadgen_cpu_s\": %.3f, \"loadgen_cpu_us_per_request\": %.2f,"
           " \"first_wrong\": \"%s\"}\n",
           n_conns, n_threads, duration, n_records, (unsigned long long)total.requests, rps,
           percentile(total.hist, total.requests, 0.50, total.max_us),
           percentile(total.hist, total.requests, 0.90, total.max_us),
           percentile(total.hist, total.requests, 0.99, total.max_us),
           percentile(total.hist, total.requests, 0.999, total.max_us), total.max_us / 1000.0,
           (unsigned long long)total.wrong, (unsigned long long)total.malformed,
           (unsigned long long)total.closed, (unsigned long long)total.connect_errors,
           (unsigned long long)total.timeouts, starved, n_pids ? cpu_after - cpu_before : -1.0,
           n_pids ? (cpu_after - cpu_before) * per_req : -1.0, self_cpu, self_cpu * per_req,
           total.first_wrong);
    return 0;
}
