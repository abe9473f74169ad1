/* coapload: a raw-UDP CoAP load generator for `make bench` (docs/benchmarks.md).
 *
 * Sends confirmable PUTs of a ~100-byte JSON reading to /meters/<id>/reading, from many meter ids and
 * many client sockets, and measures each acknowledgement. It is C so that the generator is not the
 * bottleneck: the servers under test (aiocoap, the consumer) spend ~0.5 ms of CPU a request, this ~5 us.
 *
 * Two loops: open (--rate R: a request every 1/R s whatever the answers, as a fleet of meters sends; at
 * most --outstanding in flight, a send that finds none free waits and is counted late) and closed
 * (--rate 0: --outstanding requests always in flight, the next sent when one is answered).
 * Meter i always sends from socket i % sockets (a meter is one source address and port, as a real one
 * is); its readings carry seq 0, 1, 2 ... and the wall-clock time, and a steady pressure (a bottle at rest:
 * a falling one would be judged a leak, and every reading would then update its open alert). A request unanswered after
 * --timeout-ms is counted timed out and never re-sent (no CoAP retransmission: a loss shows as a loss).
 * A separate response (an empty ACK first, the answer later as a CON) is matched by token and ACKed.
 *
 * Output: one JSON object on stdout (counts, rate, latency percentiles from a histogram in 10 us steps
 * up to 10 s). --acked FILE writes "meter_id seq" per reading answered 2.04, for the store check.
 * Bounded: stops after --count requests or --duration-s seconds of sending, whichever comes first, then
 * waits at most --timeout-ms for what is in flight.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SOCKETS 256
#define HIST_STEP_US 10
#define HIST_BUCKETS 1000000 /* 10 s in 10 us steps; slower answers land in the last bucket */

struct slot {
    int busy;
    int meter;
    long seq;
    int sock;
    uint16_t mid;
    uint32_t token; /* the slot's index in the low 16 bits, a serial above: a late answer to an earlier use is ignored */
    double sent_at;
    int next_free;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void usage(void) {
    fprintf(stderr,
            "usage: coapload --port P [--host 127.0.0.1] [--meters 1000] [--sockets 16] [--rate 0]\n"
            "                [--outstanding 64] [--count 10000] [--duration-s 60] [--timeout-ms 5000]\n"
            "                [--prefix bench-] [--first-seq 0] [--acked FILE]\n");
    exit(2);
}

/* One CoAP option: delta and length nibbles (with their extended bytes), then the value. */
static size_t put_option(uint8_t *out, unsigned delta, const void *value, size_t length) {
    size_t n = 0;
    uint8_t *head = &out[n++];
    unsigned d = delta, l = (unsigned)length;
    uint8_t dn, ln;
    uint8_t ext[4];
    size_t e = 0;
    if (d < 13) dn = d;
    else if (d < 269) { dn = 13; ext[e++] = d - 13; }
    else { dn = 14; ext[e++] = (d - 269) >> 8; ext[e++] = (d - 269) & 0xff; }
    if (l < 13) ln = l;
    else if (l < 269) { ln = 13; ext[e++] = l - 13; }
    else { ln = 14; ext[e++] = (l - 269) >> 8; ext[e++] = (l - 269) & 0xff; }
    *head = (dn << 4) | ln;
    memcpy(&out[n], ext, e);
    n += e;
    memcpy(&out[n], value, length);
    return n + length;
}

static size_t build_put(uint8_t *out, uint16_t mid, uint32_t token, const char *meter_id, long seq) {
    size_t n = 0;
    out[n++] = 0x40 | 4; /* version 1, CON, token length 4 */
    out[n++] = 0x03;     /* PUT */
    out[n++] = mid >> 8;
    out[n++] = mid & 0xff;
    memcpy(&out[n], &token, 4);
    n += 4;
    n += put_option(&out[n], 11, "meters", 6); /* Uri-Path */
    n += put_option(&out[n], 0, meter_id, strlen(meter_id));
    n += put_option(&out[n], 0, "reading", 7);
    uint8_t json = 50;
    n += put_option(&out[n], 1, &json, 1); /* Content-Format 12: application/json */
    out[n++] = 0xff;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    struct tm utc;
    gmtime_r(&wall.tv_sec, &utc);
    char ts[40];
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &utc);
    n += (size_t)sprintf((char *)&out[n],
                         "{\"seq\": %ld, \"ts\": \"%s.%06ldZ\", \"pressure_bar\": 180.25, \"temperature_c\": 15.0, "
                         "\"volume_l\": 50.0}",
                         seq, ts, wall.tv_nsec / 1000);
    return n;
}

static long percentile(const long *hist, long total, double fraction) {
    long want = (long)(fraction * total + 0.5), seen = 0;
    if (want < 1) want = 1;
    for (long b = 0; b < HIST_BUCKETS; b++) {
        seen += hist[b];
        if (seen >= want) return (b + 1) * HIST_STEP_US;
    }
    return (long)HIST_BUCKETS * HIST_STEP_US;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *prefix = "bench-", *acked_path = NULL;
    int port = 0, meters = 1000, sockets = 16, outstanding = 64, timeout_ms = 5000;
    double rate = 0, duration_s = 60;
    long count = 10000, first_seq = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--meters")) meters = atoi(v);
        else if (!strcmp(a, "--sockets")) sockets = atoi(v);
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--outstanding")) outstanding = atoi(v);
        else if (!strcmp(a, "--count")) count = atol(v);
        else if (!strcmp(a, "--duration-s")) duration_s = atof(v);
        else if (!strcmp(a, "--timeout-ms")) timeout_ms = atoi(v);
        else if (!strcmp(a, "--prefix")) prefix = v;
        else if (!strcmp(a, "--first-seq")) first_seq = atol(v);
        else if (!strcmp(a, "--acked")) acked_path = v;
        else usage();
        i++;
    }
    if (port <= 0 || meters < 1 || sockets < 1 || sockets > MAX_SOCKETS || outstanding < 1 || outstanding > 65536 || count < 1)
        usage();
    if (strlen(prefix) > 48) usage();

    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1) usage();
    struct pollfd fds[MAX_SOCKETS];
    uint16_t next_mid[MAX_SOCKETS];
    for (int s = 0; s < sockets; s++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&server, sizeof server) < 0) {
            perror("coapload: socket");
            return 1;
        }
        int buffer = 4 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer, sizeof buffer);
        fds[s] = (struct pollfd){.fd = fd, .events = POLLIN};
        next_mid[s] = (uint16_t)(rand() & 0xffff);
    }
    FILE *acked_file = NULL;
    if (acked_path && !(acked_file = fopen(acked_path, "w"))) {
        perror("coapload: --acked");
        return 1;
    }
    long *seq_of = calloc(meters, sizeof *seq_of);
    struct slot *slots = calloc(outstanding, sizeof *slots);
    long *hist = calloc(HIST_BUCKETS, sizeof *hist);
    if (!seq_of || !slots || !hist) return 1;
    for (int i = 0; i < meters; i++) seq_of[i] = first_seq;
    for (int i = 0; i < outstanding; i++) slots[i].next_free = i + 1 < outstanding ? i + 1 : -1;
    int free_head = 0, in_flight = 0;

    long sent = 0, acked = 0, other_code = 0, timed_out = 0, late = 0, separate = 0;
    long codes[256] = {0};
    int next_meter = 0;
    double timeout_s = timeout_ms / 1000.0, started = now_s(), stop_sending = started + duration_s;
    double next_send = started;
    uint8_t packet[512], answer[2048];
    char meter_id[64];

    for (;;) {
        double t = now_s();
        int sending = sent < count && t < stop_sending;
        if (!sending && in_flight == 0) break;
        if (!sending && t > stop_sending + timeout_s + 1) break;
        /* Send what is due. */
        while (sending && free_head >= 0 && (rate <= 0 || next_send <= t) && sent < count) {
            int k = free_head;
            struct slot *s = &slots[k];
            free_head = s->next_free;
            int meter = next_meter;
            next_meter = (next_meter + 1) % meters;
            s->busy = 1;
            s->meter = meter;
            s->seq = seq_of[meter]++;
            s->sock = meter % sockets;
            s->mid = next_mid[s->sock]++;
            snprintf(meter_id, sizeof meter_id, "%s%05d", prefix, meter);
            s->token = (uint32_t)k | ((uint32_t)(sent & 0xffff) << 16);
            size_t length = build_put(packet, s->mid, s->token, meter_id, s->seq);
            s->sent_at = now_s();
            if (send(fds[s->sock].fd, packet, length, 0) < 0 && errno != EAGAIN) {
                perror("coapload: send");
                return 1;
            }
            in_flight++;
            sent++;
            if (rate > 0) {
                if (s->sent_at - next_send > 0.001) late++; /* waited for a free slot, or the loop was behind */
                next_send += 1.0 / rate;
            }
        }
        /* Wait for answers until the next send is due (or briefly). In nanoseconds (ppoll), not poll's
         * milliseconds: at an open loop's rate above 1,000/s the wait is under 1 ms, which poll rounds down
         * to 0, and the generator spun on a whole core beside the server it measures. */
        double wait_s = 0.05;
        if (sending && rate > 0 && free_head >= 0) {
            double until = next_send - now_s();
            wait_s = until < 0 ? 0 : until > 0.05 ? 0.05 : until;
        }
        if (sending && rate <= 0 && free_head >= 0) wait_s = 0;
        struct timespec wait = {.tv_sec = 0, .tv_nsec = (long)(wait_s * 1e9)};
        int ready = ppoll(fds, sockets, &wait, NULL);
        if (ready < 0 && errno != EINTR) {
            perror("coapload: poll");
            return 1;
        }
        for (int f = 0; ready > 0 && f < sockets; f++) {
            if (!(fds[f].revents & POLLIN)) continue;
            for (;;) {
                ssize_t got = recv(fds[f].fd, answer, sizeof answer, 0);
                if (got < 0) break;
                if (got < 4 || (answer[0] >> 6) != 1) continue;
                int type = (answer[0] >> 4) & 3, token_length = answer[0] & 15, code = answer[1];
                uint16_t mid = (answer[2] << 8) | answer[3];
                if (type == 2 && code == 0) { /* empty ACK: the answer follows separately */
                    separate++;
                    continue;
                }
                if (type == 0) { /* a CON answer (separate response): ACK it */
                    uint8_t ack[4] = {0x60, 0, (uint8_t)(mid >> 8), (uint8_t)(mid & 0xff)};
                    send(fds[f].fd, ack, 4, 0);
                }
                if (token_length != 4 || got < 8) continue;
                uint32_t token, k;
                memcpy(&token, &answer[4], 4);
                k = token & 0xffff;
                if (k >= (uint32_t)outstanding || !slots[k].busy || slots[k].token != token || slots[k].sock != f) continue;
                struct slot *s = &slots[k];
                double latency = now_s() - s->sent_at;
                long bucket = (long)(latency * 1e6 / HIST_STEP_US);
                hist[bucket < HIST_BUCKETS ? bucket : HIST_BUCKETS - 1]++;
                codes[code]++;
                if (code == 0x44) { /* 2.04 Changed */
                    acked++;
                    if (acked_file) fprintf(acked_file, "%s%05d %ld\n", prefix, s->meter, s->seq);
                } else {
                    other_code++;
                }
                s->busy = 0;
                s->next_free = free_head;
                free_head = (int)k;
                in_flight--;
            }
        }
        /* Give up on what waited too long. */
        t = now_s();
        for (int k = 0; k < outstanding; k++) {
            if (slots[k].busy && t - slots[k].sent_at > timeout_s) {
                slots[k].busy = 0;
                slots[k].next_free = free_head;
                free_head = k;
                in_flight--;
                timed_out++;
            }
        }
    }
    double elapsed = now_s() - started;
    if (acked_file) fclose(acked_file);
    long answered = acked + other_code;
    printf("{\"sent\": %ld, \"acknowledged\": %ld, \"other_code\": %ld, \"timed_out\": %ld, \"late_sends\": %ld, "
           "\"separate_responses\": %ld, \"seconds\": %.3f, \"acknowledged_per_second\": %.1f, \"offered_rate\": %.1f",
           sent, acked, other_code, timed_out, late, separate, elapsed, acked / elapsed, rate);
    if (answered) {
        printf(", \"latency_ms_p50\": %.2f, \"latency_ms_p90\": %.2f, \"latency_ms_p99\": %.2f, \"latency_ms_max\": %.2f",
               percentile(hist, answered, 0.50) / 1000.0, percentile(hist, answered, 0.90) / 1000.0,
               percentile(hist, answered, 0.99) / 1000.0, percentile(hist, answered, 1.0) / 1000.0);
    }
    printf(", \"codes\": {");
    int first = 1;
    for (int c = 0; c < 256; c++) {
        if (codes[c]) {
            printf("%s\"%d.%02d\": %ld", first ? "" : ", ", c >> 5, c & 31, codes[c]);
            first = 0;
        }
    }
    printf("}}\n");
    return 0;
}
