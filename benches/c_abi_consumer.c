/*
 * The C ABI consumer of the bench feed, written as a C user would: one pool with one
 * connection and the raw codec, drained with wirepool_pool_poll into a batch of 4096.
 * Per message it reads the sequence number out of the frame (the same work as the
 * Rust consumers) and checks for gaps. Prints one JSON line.
 *
 * usage: c_abi_consumer WS_URL WARMUP_SECONDS MEASURE_SECONDS
 * build: gcc -O2 -I include benches/c_abi_consumer.c -L target/release -lwirepool
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "wirepool.h"

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The number after "seq": in a frame, or -1. The same work as the Rust consumers'
   `seq_of` (benches/feed/frames.rs): the member follows `{"type":"data","channel":"`,
   so the search starts 26 bytes in. (Until 2026-11-30 this searched from byte 0, 26
   more compares a message than the Rust consumer it is held against: 0.80-0.90x of
   the Rust API in the README's runs, 0.94-0.99x with equal work.) */
static int64_t seq_of(const uint8_t *frame, size_t len) {
    static const char key[] = "\"seq\":";
    const size_t key_len = sizeof key - 1;
    for (size_t at = 26; at + key_len <= len; at++) {
        if (memcmp(frame + at, key, key_len) == 0) {
            int64_t value = 0;
            size_t digit = at + key_len;
            if (digit >= len || frame[digit] < '0' || frame[digit] > '9')
                return -1;
            for (; digit < len && frame[digit] >= '0' && frame[digit] <= '9'; digit++)
                value = value * 10 + (frame[digit] - '0');
            return value;
        }
    }
    return -1;
}

static int fail(const char *what) {
    fprintf(stderr, "c_abi_consumer: %s: %s\n", what, wirepool_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s WS_URL WARMUP_SECONDS MEASURE_SECONDS\n", argv[0]);
        return 2;
    }
    const double warmup = atof(argv[2]);
    const double measure = atof(argv[3]);
    char config[1024];
    snprintf(config, sizeof config,
             "{\"servers\":[{\"url\":\"%s/feed\"}],"
             "\"pool\":{\"min_connections\":1,\"max_connections\":1},"
             "\"codec\":{\"builtin\":\"raw\",\"config\":{\"subscribe_frame\":"
             "\"{\\\"type\\\":\\\"subscribe\\\",\\\"channel\\\":\\\"{channel}\\\"}\","
             "\"unsubscribe_frame\":"
             "\"{\\\"type\\\":\\\"unsubscribe\\\",\\\"channel\\\":\\\"{channel}\\\"}\"}}}",
             argv[1]);
    wirepool_pool *pool = NULL;
    if (wirepool_pool_new(config, &pool) != WIREPOOL_OK)
        return fail("wirepool_pool_new");
    if (wirepool_pool_wait_ready(pool, 30000) != WIREPOOL_OK)
        return fail("wirepool_pool_wait_ready");
    if (wirepool_pool_subscribe(pool, "c0") != WIREPOOL_OK)
        return fail("wirepool_pool_subscribe");
    wirepool_batch *batch = NULL;
    if (wirepool_batch_new(4096, &batch) != WIREPOOL_OK)
        return fail("wirepool_batch_new");

    double first = 0, opened = 0, last = 0;
    uint64_t counted = 0, bytes = 0, gaps = 0, unparsed = 0, idle_polls = 0;
    int64_t next_seq = -1;
    for (;;) {
        size_t count = 0;
        if (wirepool_pool_poll(pool, batch, 200, &count) != WIREPOOL_OK)
            return fail("wirepool_pool_poll");
        if (count == 0) {
            if (++idle_polls > 75) {
                fprintf(stderr, "c_abi_consumer: no data for 15 s\n");
                return 1;
            }
            continue;
        }
        idle_polls = 0;
        const wirepool_message *messages = wirepool_batch_messages(batch);
        const int measuring = opened > 0;
        for (size_t i = 0; i < count; i++) {
            const int64_t seq = seq_of(messages[i].payload, messages[i].payload_len);
            if (seq < 0) {
                unparsed++;
                continue;
            }
            if (next_seq >= 0 && seq != next_seq)
                gaps++;
            next_seq = seq + 1;
            if (measuring)
                bytes += messages[i].payload_len;
        }
        const double now = now_seconds();
        if (first == 0)
            first = now;
        if (opened == 0) {
            if (now - first >= warmup)
                opened = now;
            continue;
        }
        counted += count;
        last = now;
        if (now - opened >= measure)
            break;
    }
    const double seconds = last - opened;
    printf("{\"measure\":\"c_abi_batch\",\"msgs_per_s\":%.0f,\"messages\":%llu,"
           "\"seconds\":%.6f,\"bytes\":%llu,\"gaps\":%llu,\"unparsed\":%llu}\n",
           seconds > 0 ? (double)counted / seconds : 0.0, (unsigned long long)counted, seconds,
           (unsigned long long)bytes, (unsigned long long)gaps, (unsigned long long)unparsed);
    /* Stop the feed and drain before closing, so the close handshake does not wait
       behind a flood of data. */
    wirepool_pool_unsubscribe(pool, "c0");
    for (int polls = 0; polls < 100; polls++) {
        size_t count = 0;
        if (wirepool_pool_poll(pool, batch, 300, &count) != WIREPOOL_OK || count == 0)
            break;
    }
    wirepool_batch_free(batch);
    wirepool_pool_free(pool);
    return 0;
}
