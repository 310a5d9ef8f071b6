/* kproxyd benchmark load generator: a tiny HTTP/1.0 server, a bounded new-connection client, a probe.
 *
 *   loadgen server PORT THREADS
 *       answers every connection's request with "HTTP/1.0 200 OK ... ok" and closes (SO_REUSEPORT, one
 *       accept loop per thread); runs until killed.
 *   loadgen client IP PORT THREADS SECONDS MAX_CONNECTIONS
 *       THREADS loops of connect / GET / read to EOF / close until SECONDS pass or MAX_CONNECTIONS are
 *       made (both bounds always apply); prints one JSON line: ok, errors, elapsed_s, rate (ok/s),
 *       connect and request (connect..EOF) latency percentiles in microseconds.
 *   loadgen probe IP PORT up|down TIMEOUT_S [INTERVAL_US]
 *       probes IP:PORT (a full request, 200 ms budget) every INTERVAL_US (default 1000) microseconds between
 *       one probe's end and the next one's start; prints "ready" once the first probe
 *       has the opposite result, then, when the result first becomes up (answered) or down (refused or
 *       failed), prints the CLOCK_REALTIME seconds of that probe's start and exits 0; exits 1 on timeout.
 *
 * Built by bench/run.py with `cc -O2 -pthread`; the benchmark runs it only inside lab namespaces.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char REQUEST[] = "GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
static const char RESPONSE[] = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- server ---- */

static int server_port;

static void *serve(void *arg) {
    (void)arg;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(server_port)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 4096) != 0) {
        perror("bind/listen");
        exit(2);
    }
    char buf[2048];
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        struct timeval tv = {.tv_sec = 2};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        size_t got = 0;
        while (got < sizeof buf - 1) { /* read the request head */
            ssize_t n = read(c, buf + got, sizeof buf - 1 - got);
            if (n <= 0) break;
            got += n;
            buf[got] = 0;
            if (strstr(buf, "\r\n\r\n")) break;
        }
        if (write(c, RESPONSE, sizeof RESPONSE - 1) < 0) { /* the client is gone */ }
        shutdown(c, SHUT_WR);
        close(c);
    }
    return NULL;
}

static int run_server(int argc, char **argv) {
    if (argc < 4) return 64;
    server_port = atoi(argv[2]);
    int threads = atoi(argv[3]);
    pthread_t t[64];
    for (int i = 0; i < threads && i < 64; i++) pthread_create(&t[i], NULL, serve, NULL);
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}

/* ---- one request ---- */

/* Connect (non-blocking, budget ms), send the request, read to EOF. 0 on success; *connect_s set. */
static int one_request(const struct sockaddr_in *to, int budget_ms, double *connect_s) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    double start = now_mono();
    int rc = connect(fd, (const struct sockaddr *)to, sizeof *to);
    if (rc != 0 && errno != EINPROGRESS) goto fail;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (rc != 0) {
        if (poll(&p, 1, budget_ms) != 1) goto fail;
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) goto fail;
    }
    if (connect_s) *connect_s = now_mono() - start;
    if (write(fd, REQUEST, sizeof REQUEST - 1) != (ssize_t)(sizeof REQUEST - 1)) goto fail;
    char buf[512];
    size_t total = 0;
    for (;;) {
        p.events = POLLIN;
        if (poll(&p, 1, budget_ms) != 1) goto fail;
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) goto fail;
        if (n == 0) break;
        total += n;
    }
    close(fd);
    return total > 0 ? 0 : -1;
fail:
    close(fd);
    return -1;
}

/* ---- client ---- */

static struct sockaddr_in target;
static double deadline;
static atomic_long budget;
static atomic_long errors;

typedef struct {
    double *connect, *request;
    long n, cap;
} samples;

static void *client_loop(void *arg) {
    samples *s = arg;
    while (now_mono() < deadline && atomic_fetch_sub(&budget, 1) > 0) {
        double c = 0, start = now_mono();
        if (one_request(&target, 2000, &c) != 0) {
            atomic_fetch_add(&errors, 1);
            continue;
        }
        if (s->n < s->cap) {
            s->connect[s->n] = c;
            s->request[s->n] = now_mono() - start;
            s->n++;
        }
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, long n, double q) {
    if (n == 0) return -1;
    long i = (long)(q * (n - 1) + 0.5);
    return v[i] * 1e6;
}

static int run_client(int argc, char **argv) {
    if (argc < 7) return 64;
    target.sin_family = AF_INET;
    target.sin_port = htons(atoi(argv[3]));
    inet_pton(AF_INET, argv[2], &target.sin_addr);
    int threads = atoi(argv[4]);
    double seconds = atof(argv[5]);
    long max = atol(argv[6]);
    if (threads < 1 || threads > 64 || seconds <= 0 || seconds > 60 || max < 1) return 64;
    atomic_store(&budget, max);
    pthread_t t[64];
    samples s[64];
    double start = now_mono();
    deadline = start + seconds;
    for (int i = 0; i < threads; i++) {
        s[i].cap = max;
        s[i].n = 0;
        s[i].connect = malloc(sizeof(double) * max);
        s[i].request = malloc(sizeof(double) * max);
        pthread_create(&t[i], NULL, client_loop, &s[i]);
    }
    long ok = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        ok += s[i].n;
    }
    double elapsed = now_mono() - start;
    double *c = malloc(sizeof(double) * (ok + 1)), *r = malloc(sizeof(double) * (ok + 1));
    long k = 0;
    for (int i = 0; i < threads; i++)
        for (long j = 0; j < s[i].n; j++, k++) c[k] = s[i].connect[j], r[k] = s[i].request[j];
    qsort(c, ok, sizeof(double), cmp);
    qsort(r, ok, sizeof(double), cmp);
    printf("{\"ok\": %ld, \"errors\": %ld, \"elapsed_s\": %.4f, \"rate\": %.1f, "
           "\"connect_p50_us\": %.1f, \"connect_p99_us\": %.1f, "
           "\"request_p50_us\": %.1f, \"request_p99_us\": %.1f}\n",
           ok, atomic_load(&errors), elapsed, ok / elapsed, pct(c, ok, 0.5), pct(c, ok, 0.99),
           pct(r, ok, 0.5), pct(r, ok, 0.99));
    return 0;
}

/* ---- probe ---- */

static int run_probe(int argc, char **argv) {
    if (argc < 6) return 64;
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &to.sin_addr);
    int want_up = strcmp(argv[4], "up") == 0;
    double end = now_mono() + atof(argv[5]);
    useconds_t interval = argc > 6 ? (useconds_t)atoi(argv[6]) : 1000;
    int ready = 0;
    while (now_mono() < end) {
        double at = now_real();
        int up = one_request(&to, 200, NULL) == 0;
        if (up == want_up) {
            if (!ready) { /* already in the wanted state before any change: report it as such */
                printf("already\n");
                return 2;
            }
            printf("%.6f\n", at);
            return 0;
        }
        if (!ready) {
            printf("ready\n");
            fflush(stdout);
            ready = 1;
        }
        if (interval) usleep(interval);
    }
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && strcmp(argv[1], "server") == 0) return run_server(argc, argv);
    if (argc > 1 && strcmp(argv[1], "client") == 0) return run_client(argc, argv);
    if (argc > 1 && strcmp(argv[1], "probe") == 0) return run_probe(argc, argv);
    fprintf(stderr, "usage: loadgen server|client|probe ...\n");
    return 64;
}
