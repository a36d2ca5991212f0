/* The benchmark's request loop (see loadgen.h). One thread drives every
 * queue: it sleeps in ppoll() on the call eventfds while nothing is done,
 * consumes the used ring, checks each reply header and re-posts the slot's
 * next request at once. Barriers follow virtio 1.2 section 2.7.13 (driver
 * side): the avail ring entry before avail->idx (release), avail->idx before
 * reading used->flags for notification suppression (full fence), used->idx
 * before the used elements and reply bytes (acquire).
 */
#define _GNU_SOURCE
#include "loadgen.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define VRING_DESC_F_NEXT 1
#define VRING_USED_F_NO_NOTIFY 1
#define OUT_HEADER_LEN 16
#define POLL_CAP_NS 10000000

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static int fail(struct pvb_result *r, int code, uint32_t q, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(struct pvb_result *r, int code, uint32_t q, const char *fmt, ...)
{
    if (r->failure != PVB_OK)
        return r->failure; /* keep the first failure */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->message, sizeof r->message, fmt, ap);
    va_end(ap);
    r->failure = code;
    r->queue = (int32_t)q;
    return code;
}

/* Put the slot's current step on the avail ring (not yet published). */
static void post(struct pvb_queue *q, struct pvb_slot *s)
{
    struct pvb_step *st = &s->steps[s->cur];
    s->unique = q->next_unique;
    q->next_unique += 2;
    wr64(st->req + 8, s->unique); /* fuse_in_header.unique */
    if (st->reply_room)
        memset(st->reply, 0, OUT_HEADER_LEN);
    wr16(q->avail + 4 + 2 * (q->avail_idx % q->size), st->head);
    q->avail_idx++;
    s->busy = 1;
}

/* Publish avail->idx and kick unless the device asked not to be. */
static int publish(struct pvb_queue *q, struct pvb_result *r, uint32_t qi)
{
    __atomic_store_n((uint16_t *)(void *)(q->avail + 2), q->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = __atomic_load_n((uint16_t *)(void *)q->used, __ATOMIC_RELAXED);
    if (flags & VRING_USED_F_NO_NOTIFY)
        return 0;
    uint64_t one = 1;
    if (write(q->kick_fd, &one, sizeof one) != (ssize_t)sizeof one)
        return fail(r, PVB_SYSCALL, qi, "kick eventfd write: %s", strerror(errno));
    q->kicks++;
    return 0;
}

/* Check one used element against the request its slot has in flight. */
static int check(struct pvb_queue *q, uint32_t qi, uint32_t id, uint32_t len,
                 struct pvb_slot **slot_out, struct pvb_result *r)
{
    int16_t si = id < q->size ? q->head_slot[id] : -1;
    if (si < 0 || (uint32_t)si >= q->nslots || !q->slots[si].busy ||
        q->slots[si].steps[q->slots[si].cur].head != id)
        return fail(r, PVB_BAD_HEAD, qi, "used element names descriptor %u, not in flight", id);
    struct pvb_slot *s = &q->slots[si];
    struct pvb_step *st = &s->steps[s->cur];
    uint32_t opcode = rd32(st->req + 4);
    *slot_out = s;
    if (st->reply_room == 0) { /* FORGET: no reply, the chain comes back empty */
        if (len != 0)
            return fail(r, PVB_BAD_LEN, qi, "opcode %u: used len %u for a request without reply",
                        opcode, len);
        return 0;
    }
    uint32_t out_len = rd32(st->reply);
    int32_t error = (int32_t)rd32(st->reply + 4);
    uint64_t unique = rd64(st->reply + 8);
    if (unique != s->unique)
        return fail(r, PVB_BAD_UNIQUE, qi, "opcode %u: reply unique %llu, request %llu", opcode,
                    (unsigned long long)unique, (unsigned long long)s->unique);
    if (error != st->error)
        return fail(r, PVB_BAD_ERROR, qi, "opcode %u: reply error %d, expected %d", opcode, error,
                    st->error);
    if (len < OUT_HEADER_LEN || len > st->reply_room || out_len != len ||
        (st->reply_len && out_len != st->reply_len))
        return fail(r, PVB_BAD_LEN, qi, "opcode %u: used len %u, out.len %u, expected %u (room %u)",
                    opcode, len, out_len, st->reply_len, st->reply_room);
    return 0;
}

int pvb_run(struct pvb_queue **queues, uint32_t nqueues, int64_t warmup_ns, int64_t duration_ns,
            uint64_t max_ops, int64_t drain_timeout_ns, struct pvb_result *r)
{
    memset(r, 0, sizeof *r);
    if (nqueues == 0 || nqueues > PVB_MAX_QUEUES)
        return fail(r, PVB_SYSCALL, 0, "%u queues (1..%d)", nqueues, PVB_MAX_QUEUES);
    struct pollfd pfd[PVB_MAX_QUEUES];
    uint64_t posted = 0, inflight = 0;
    int posting = 1, failed = 0;
    int64_t now = mono_ns();
    const int64_t t_call = now, cpu_start = cpu_ns();
    const int64_t t_start = now + warmup_ns;
    const int64_t t_end = t_start + duration_ns;
    int64_t t_stop = t_end, drain_deadline = 0;

    for (uint32_t qi = 0; qi < nqueues; qi++) {
        struct pvb_queue *q = queues[qi];
        pfd[qi].fd = q->call_fd;
        pfd[qi].events = POLLIN;
        q->completed = q->kicks = q->calls = 0;
        for (uint32_t i = 0; i < q->nslots && (!max_ops || posted < max_ops); i++) {
            q->slots[i].cur = 0;
            q->slots[i].busy = 0;
            post(q, &q->slots[i]);
            posted++;
            inflight++;
        }
        if (publish(q, r, qi))
            goto drain;
    }

    int timed_out = 0; /* the last ppoll() ended by its timeout, no call signalled */
    for (;;) {
        uint64_t progress = 0;
        for (uint32_t qi = 0; qi < nqueues; qi++) {
            struct pvb_queue *q = queues[qi];
            uint16_t used_idx =
                __atomic_load_n((uint16_t *)(void *)(q->used + 2), __ATOMIC_ACQUIRE);
            uint64_t reposted = 0;
            while (q->used_seen != used_idx) {
                const uint8_t *e = q->used + 4 + 8 * (q->used_seen % q->size);
                uint32_t id = rd32(e), len = rd32(e + 4);
                struct pvb_slot *s = NULL;
                q->used_seen++;
                if (check(q, qi, id, len, &s, r)) {
                    if (s == NULL)
                        goto drain; /* cannot tell which request this was */
                    posting = 0;
                    failed = 1;
                }
                s->busy = 0;
                inflight--;
                r->total++;
                progress++;
                if (now >= t_start && now < t_end)
                    q->completed++;
                struct pvb_step *st = &s->steps[s->cur];
                for (int k = 0; k < PVB_MAX_PATCHES; k++)
                    if (st->patch_step[k] >= 0 && (uint32_t)st->patch_step[k] < s->nsteps)
                        memcpy(s->steps[st->patch_step[k]].req + st->patch_to[k],
                               st->reply + st->patch_from[k], 8);
                s->cur = (s->cur + 1) % s->nsteps;
                /* A finish program once started runs to its end (CREATE is
                 * followed by its UNLINK), also after the deadline or max_ops. */
                int more = posting && (!max_ops || posted < max_ops);
                if (!failed && (more || (s->finish && s->cur != 0))) {
                    post(q, s);
                    posted++;
                    inflight++;
                    reposted++;
                }
            }
            if (reposted && publish(q, r, qi))
                posting = 0, failed = 1;
        }
        now = mono_ns();
        if (posting && (now >= t_end || (max_ops && posted >= max_ops))) {
            posting = 0;
            t_stop = now < t_end ? now : t_end;
        }
        if (!posting && drain_deadline == 0)
            drain_deadline = now + drain_timeout_ns;
        if (!posting && inflight == 0)
            break;
        if (!posting && now >= drain_deadline) {
            fail(r, PVB_TIMEOUT, 0, "%llu requests still in flight after the drain timeout",
                 (unsigned long long)inflight);
            break;
        }
        if (progress && timed_out)
            r->unsignalled += progress;
        timed_out = 0;
        if (progress)
            continue;
        int64_t until = posting ? t_end : drain_deadline;
        int64_t wait = until - now;
        if (wait < 0)
            wait = 0;
        if (wait > POLL_CAP_NS)
            wait = POLL_CAP_NS; /* a missed call costs 10 ms, not the run */
        struct timespec ts = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
        int n = ppoll(pfd, nqueues, &ts, NULL);
        timed_out = n == 0;
        if (n < 0 && errno != EINTR) {
            fail(r, PVB_SYSCALL, 0, "ppoll: %s", strerror(errno));
            posting = 0;
            failed = 1;
            continue;
        }
        for (uint32_t qi = 0; n > 0 && qi < nqueues; qi++) {
            if (!(pfd[qi].revents & POLLIN))
                continue;
            uint64_t v;
            if (read(pfd[qi].fd, &v, sizeof v) == (ssize_t)sizeof v)
                queues[qi]->calls++;
        }
        now = mono_ns();
    }
    r->measured_ns = t_stop > t_start ? t_stop - t_start : 0;
    r->wall_ns = mono_ns() - t_call;
    r->cpu_ns = cpu_ns() - cpu_start;
    for (uint32_t qi = 0; qi < nqueues; qi++)
        r->ops += queues[qi]->completed;
    return r->failure;

drain:
    /* The ring state is unknown: report, do not wait. */
    r->measured_ns = 0;
    return r->failure;
}
