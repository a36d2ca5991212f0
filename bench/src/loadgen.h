/* The benchmark's request loop: the guest driver side of split virtqueues.
 *
 * Python lays out the rings, the descriptor chains and the pre-encoded FUSE
 * requests in "guest RAM" (a memfd the front-end shares with the daemon) and
 * fills these structures; pvb_run() then keeps every slot's request in
 * flight, re-posting it the moment its reply is checked, until the deadline
 * or max_ops. Nothing is allocated and no Python runs in the loop.
 *
 * This header is also the cffi cdef (see bench/loadgen.py): plain
 * declarations only, integer #defines.
 */
#ifndef PVB_LOADGEN_H
#define PVB_LOADGEN_H

#include <stdint.h>

#define PVB_MAX_QUEUES 8
#define PVB_MSG_LEN 256
#define PVB_MAX_PATCHES 4

/* failure codes (pvb_result.failure) */
#define PVB_OK 0
#define PVB_BAD_HEAD 1      /* used ring names a descriptor no slot posted */
#define PVB_BAD_LEN 2       /* used len or out.len wrong */
#define PVB_BAD_ERROR 3     /* out.error is not the one expected */
#define PVB_BAD_UNIQUE 4    /* out.unique is not the request's */
#define PVB_TIMEOUT 5       /* in-flight requests did not complete in time */
#define PVB_SYSCALL 6       /* poll/read/write of an eventfd failed */

/* One request of a slot's program: a chain Python has written already. */
struct pvb_step {
    uint16_t head;           /* first descriptor of the chain */
    uint16_t _pad;
    uint32_t reply_room;     /* writable bytes (out header + payload); 0: no reply (FORGET) */
    uint8_t *req;            /* the request (fuse_in_header first), in guest RAM */
    uint8_t *reply;          /* the writable part, contiguous here, in guest RAM */
    uint32_t reply_len;      /* exact expected out.len; 0: any, 16 <= len <= room */
    int32_t error;           /* expected out.error (0 or -errno) */
    /* After this step's reply: for each k < PVB_MAX_PATCHES with patch_step[k] >= 0, copy 8
     * bytes from reply + patch_from[k] into the request of step
     * patch_step[k] at patch_to[k] (CREATE's nodeid and fh into RELEASE and FORGET). */
    int32_t patch_step[PVB_MAX_PATCHES];
    uint32_t patch_from[PVB_MAX_PATCHES];
    uint32_t patch_to[PVB_MAX_PATCHES];
};

/* A slot keeps one request in flight, cycling through its steps. */
struct pvb_slot {
    struct pvb_step *steps;
    uint32_t nsteps;
    uint32_t cur;            /* step in flight */
    uint64_t unique;         /* unique of the request in flight */
    int32_t busy;            /* posted and not yet completed */
    uint32_t finish;         /* once started, run the program to its end (CREATE..UNLINK) */
};

/* One split virtqueue (virtio 1.2, 2.7) as the driver sees it. The ring
 * indices persist across pvb_run calls. */
struct pvb_queue {
    uint8_t *desc;           /* descriptor table (16 * size bytes) */
    uint8_t *avail;          /* flags, idx, ring[size] (u16 each) */
    uint8_t *used;           /* flags, idx, ring[size] of (u32 id, u32 len) */
    uint32_t size;
    uint16_t avail_idx;      /* the driver's copy of avail->idx */
    uint16_t used_seen;      /* used entries consumed so far */
    int kick_fd;             /* eventfd the daemon waits on */
    int call_fd;             /* eventfd the daemon signals */
    struct pvb_slot *slots;
    uint32_t nslots;
    uint32_t _pad;
    int16_t *head_slot;      /* size entries: slot whose chain starts there, or -1 */
    uint64_t next_unique;    /* uniques step by 2, as the kernel's (bit 0 = interrupt) */
    uint64_t completed;      /* completions counted in the measured window */
    uint64_t kicks;          /* eventfd writes */
    uint64_t calls;          /* call eventfd wake-ups */
};

struct pvb_result {
    uint64_t ops;            /* completions inside the measured window */
    uint64_t total;          /* all completions (warm-up and drain included) */
    int64_t measured_ns;     /* length of the measured window */
    int64_t wall_ns;         /* the whole call, warm-up and drain included */
    int64_t cpu_ns;          /* CPU time of this thread over the call: near wall_ns
                              * means the load generator, not the daemon, set the pace */
    uint64_t unsignalled;    /* completions found after a 10 ms wait no call eventfd ended:
                              * the device did not signal them (we never set
                              * VRING_AVAIL_F_NO_INTERRUPT) or signalled late */
    int32_t failure;         /* PVB_* */
    int32_t queue;           /* queue index (into queues) of the failure */
    char message[PVB_MSG_LEN];
};

/* Keep every slot of every queue busy. Counting starts after warmup_ns and
 * lasts duration_ns; max_ops > 0 stops starting requests after that many.
 * Then slots marked finish run their program to its end (a CREATE is
 * always followed by its UNLINK), no other request is posted, and the
 * in-flight ones are drained (drain_timeout_ns at most). After a failed
 * check nothing more is posted. Returns result->failure. */
int pvb_run(struct pvb_queue **queues, uint32_t nqueues, int64_t warmup_ns, int64_t duration_ns,
            uint64_t max_ops, int64_t drain_timeout_ns, struct pvb_result *result);

#endif
