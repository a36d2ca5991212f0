/*
 * pyvirtiofsd C core: the declarations exposed to Python through cffi.
 *
 * Everything here is opaque or plain data: no host address ever crosses this
 * interface.  dma/build_core.py repeats these declarations in its CDEF (cffi
 * cannot read headers); keep the two in sync and bump the ABI version.
 *
 * Return convention: functions returning int use 0 (or a positive count /
 * boolean) for success and a negative PVD_E_* / PVD_C_* code on failure;
 * pvd_strerror() turns a code into a message.  Codes <= PVD_C_FIRST are
 * per-chain defects (the chain has already been completed with used len 0,
 * except for a salvage chain handed out by pvd_vq_pop).
 */
#ifndef PVD_CORE_H
#define PVD_CORE_H

#include <stddef.h>
#include <stdint.h>

/* Bumped whenever the C ABI seen by Python changes. */
int pvd_core_abi_version(void);

enum {
	PVD_OK = 0,
	/* generic / memory-table errors */
	PVD_E_NOMEM = -1,
	PVD_E_INVAL = -2,
	PVD_E_REGION_SIZE = -3,
	PVD_E_REGION_OVERFLOW = -4,
	PVD_E_REGION_OVERLAP = -5,
	PVD_E_TOO_MANY_REGIONS = -6,
	PVD_E_MMAP = -7,
	PVD_E_NOT_FOUND = -8,
	PVD_E_OUTSIDE_MEMORY = -9,
	PVD_E_OUTSIDE_WINDOW = -10,
	/* queue-level errors */
	PVD_E_NOT_CONFIGURED = -20,
	PVD_E_QUEUE_SIZE = -21,
	PVD_E_RING_ALIGN = -22,
	PVD_E_RING_MEMORY = -23,
	PVD_E_RING_WINDOW = -24,
	PVD_E_AVAIL_IDX = -25,
	PVD_E_BROKEN = -26,
	/* chain usage errors (host-side misuse, not guest defects) */
	PVD_E_COMPLETED = -40,
	PVD_E_RANGE = -41,
	PVD_E_STALE = -42,
	PVD_E_IO = -43,
	PVD_E_WRONG_QUEUE = -44,
	PVD_E_BUSY = -45,
	/* swiotlb window allocator (window_alloc.c; pvd_walloc_strerror) */
	PVD_E_WIN_RANGE = -60,
	PVD_E_WIN_ALIGN = -61,
	PVD_E_WIN_SIZE = -62,
	PVD_E_WIN_OWNER = -63,
	PVD_E_WIN_DUPLICATE = -64,
	PVD_E_WIN_EXHAUSTED = -65,
	PVD_E_WIN_FRAGMENTED = -66,
	PVD_E_WIN_UNKNOWN = -67,
	/* per-chain guest defects: the chain was failed (used len 0) */
	PVD_C_FIRST = -100,
	PVD_C_HEAD_RANGE = -100,
	PVD_C_NEXT_RANGE = -101,
	PVD_C_TTL = -102,
	PVD_C_DESC_MEMORY = -103,
	PVD_C_DESC_WINDOW = -104,
	PVD_C_READ_AFTER_WRITE = -105,
	PVD_C_INDIRECT_LEN = -106,
	PVD_C_NESTED_INDIRECT = -107,
	PVD_C_INDIRECT_NEXT = -108,
	PVD_C_TOTAL_LEN = -109,
	PVD_C_TOO_MANY_SEGS = -110,
	PVD_C_INDIRECT_MEMORY = -111,
	PVD_C_INDIRECT_WINDOW = -112,
	PVD_C_INDIRECT_SPLIT = -113,
	PVD_C_NOMEM = -114,
};

/* Most memory regions one table may hold (vhost-user VHOST_USER_MAX_RAM_SLOTS). */
#define PVD_MAX_REGIONS 509
/* Largest indirect descriptor table accepted, in entries. */
#define PVD_MAX_INDIRECT 1024
/* Largest queue size (virtio split ring limit). */
#define PVD_MAX_QUEUE_SIZE 32768

const char *pvd_strerror(int code);

/* One guest memory region as the front-end described it. */
struct pvd_region_info {
	uint64_t gpa;
	uint64_t size;
	uint64_t uaddr;
	uint64_t mmap_offset;
};

struct pvd_mem;
struct pvd_vq;
struct pvd_chain;
struct pvd_fs;
struct pvd_slowq;

/* ---- guest memory (guest_memory.c) ---- */
struct pvd_mem *pvd_mem_new(int has_window, uint64_t win_base, uint64_t win_size);
void pvd_mem_free(struct pvd_mem *mem);
int pvd_mem_add(struct pvd_mem *mem, int fd, const struct pvd_region_info *r, int *err);
int pvd_mem_remove(struct pvd_mem *mem, const struct pvd_region_info *r);
int pvd_mem_replace(struct pvd_mem *mem, size_t n, const int *fds,
		    const struct pvd_region_info *rs, int *err);
int pvd_mem_clear(struct pvd_mem *mem);
/* Copies up to max entries into out (sorted by gpa); returns the region count. */
size_t pvd_mem_regions(struct pvd_mem *mem, struct pvd_region_info *out, size_t max);
uint64_t pvd_mem_mapped_bytes(struct pvd_mem *mem);
int pvd_mem_uaddr_to_gpa(struct pvd_mem *mem, uint64_t uaddr, uint64_t len, uint64_t *gpa);
int pvd_mem_read(struct pvd_mem *mem, uint64_t gpa, void *buf, size_t len);
int pvd_mem_write(struct pvd_mem *mem, uint64_t gpa, const void *buf, size_t len);

/* ---- split virtqueue (virtqueue.c) ---- */
struct pvd_vq *pvd_vq_new(struct pvd_mem *mem, uint32_t max_size, uint32_t index);
void pvd_vq_free(struct pvd_vq *vq);
int pvd_vq_configure(struct pvd_vq *vq, uint32_t size, uint64_t desc_gpa,
		     uint64_t avail_gpa, uint64_t used_gpa, int event_idx);
int pvd_vq_set_base(struct pvd_vq *vq, uint16_t last_avail_idx);
uint16_t pvd_vq_last_avail_idx(struct pvd_vq *vq);
uint32_t pvd_vq_size(struct pvd_vq *vq);
void pvd_vq_set_kick_fd(struct pvd_vq *vq, int fd);
void pvd_vq_set_call_fd(struct pvd_vq *vq, int fd);
/*
 * 0: nothing available; 1: *out is a chain; <0: error (*bad_head set for PVD_C_*).
 *
 * Salvage (salvage_rlen and salvage_wlen both > 0): a chain refused only
 * because descriptor buffers lie outside guest memory or the window
 * (PVD_C_DESC_MEMORY / PVD_C_DESC_WINDOW, the chain otherwise well formed)
 * is NOT completed when its first readable descriptor holds salvage_rlen
 * bytes and its first writable descriptor salvage_wlen bytes, all inside
 * memory and the window.  Then the return is that PVD_C_* code and *out is
 * a "salvage chain" whose readable / writable parts are exactly those
 * bytes; the caller must complete it (once) like any chain, e.g. with an
 * error reply.  With *out NULL, every PVD_C_* chain has been completed with
 * used len 0, as without salvage.
 */
int pvd_vq_pop(struct pvd_vq *vq, struct pvd_chain **out, uint32_t *bad_head,
	       uint32_t salvage_rlen, uint32_t salvage_wlen);
/* 1: call eventfd written; 0: suppressed / nothing to signal; <0: error. */
int pvd_vq_notify(struct pvd_vq *vq);
int pvd_vq_set_notification(struct pvd_vq *vq, int enable);
/* 1: kicked (counter drained); 0: stopped or timed out. timeout_ms < 0: forever. */
int pvd_vq_wait_kick(struct pvd_vq *vq, int timeout_ms);
void pvd_vq_stop(struct pvd_vq *vq);
void pvd_vq_reset(struct pvd_vq *vq);
void pvd_vq_close(struct pvd_vq *vq);
/*
 * The queue's serving loop (fast path, see fuse_fast.c): wait for kicks,
 * pop every available chain and answer the ones fs can serve in place;
 * the others go to q, or back to the caller when q is NULL.  Returns only
 * for the caller: 0 stopped (pvd_vq_stop) or the kick fd failed; 1 *out is
 * a chain to handle (q NULL or closed); PVD_C_* a chain defect, exactly as
 * pvd_vq_pop (salvage included); other <0 the queue cannot go on.  Call it
 * again to continue.  One runner per queue at a time (else PVD_E_BUSY).
 * fs may be NULL (nothing served in place).
 */
int pvd_vq_run(struct pvd_vq *vq, struct pvd_fs *fs, struct pvd_slowq *q,
	       struct pvd_chain **out, uint32_t *bad_head, uint32_t salvage_rlen,
	       uint32_t salvage_wlen);
/* Chains answered in place / handed on / failed as defects, since creation. */
void pvd_vq_stats(struct pvd_vq *vq, uint64_t *fast, uint64_t *slow, uint64_t *defects);
/*
 * Adaptive polling of the avail ring before pvd_vq_run sleeps: at most
 * max_ns per wait (0: never poll; capped at PVD_POLL_MAX_NS).  The window
 * adapts between 0 and max_ns as QEMU's poll-max-ns does.  Any thread.
 */
#define PVD_POLL_MIN_NS 4000
#define PVD_POLL_MAX_NS 1000000
void pvd_vq_set_poll(struct pvd_vq *vq, uint64_t max_ns);
/* Polling windows that found a chain / that did not; the current window. */
void pvd_vq_poll_stats(struct pvd_vq *vq, uint64_t *hits, uint64_t *misses, uint64_t *window_ns);

/* ---- popped chains (virtqueue.c) ---- */
void pvd_chain_info(struct pvd_chain *c, uint32_t *head, uint64_t *readable_len,
		    uint64_t *writable_len);
int pvd_chain_read(struct pvd_chain *c, uint64_t offset, void *buf, size_t len);
int pvd_chain_write(struct pvd_chain *c, uint64_t offset, const void *buf, size_t len);
/* >= 0: bytes transferred; <0: error, errno in *err for PVD_E_IO. */
int64_t pvd_chain_preadv(struct pvd_chain *c, int fd, int64_t file_offset, uint64_t len,
			 uint64_t offset, int *err);
int64_t pvd_chain_pwritev(struct pvd_chain *c, int fd, int64_t file_offset, uint64_t len,
			  uint64_t offset, int *err);
/* 0: published; PVD_E_STALE: queue was reconfigured since pop (nothing written). */
int pvd_chain_complete(struct pvd_vq *vq, struct pvd_chain *c, uint32_t used_len);
/* pvd_chain_complete, then pvd_vq_notify when it was published. */
int pvd_chain_complete_notify(struct pvd_vq *vq, struct pvd_chain *c, uint32_t used_len);
void pvd_chain_free(struct pvd_chain *c);
/* The fuse_in_header opcode/unique pvd_vq_run read (0 if it did not), and the queue index. */
void pvd_chain_request(struct pvd_chain *c, uint32_t *opcode, uint64_t *unique, uint32_t *queue);
/* Both of the above in one call (Chain._wrap, once per request handed to
 * Python): head, readable_len, writable_len, opcode, unique. */
void pvd_chain_summary(struct pvd_chain *c, uint64_t out[5]);

/* ---- chains waiting for a Python worker (virtqueue.c) ---- */
struct pvd_slowq *pvd_slowq_new(void);
/* Frees chains still queued without completing them (teardown only). */
void pvd_slowq_free(struct pvd_slowq *q);
/* Blocks until a chain is queued (1, *out set) or the queue is closed and empty (0). */
int pvd_slowq_take(struct pvd_slowq *q, struct pvd_chain **out);
void pvd_slowq_close(struct pvd_slowq *q);
uint32_t pvd_slowq_len(struct pvd_slowq *q);
/*
 * Opcodes (bit n for opcode n < 64) pvd_vq_run returns to its caller (*out,
 * rc 1) instead of queueing here: the caller serves them on the queue's own
 * thread.  Call before any runner uses q.
 */
void pvd_slowq_set_inline(struct pvd_slowq *q, uint64_t opcodes);

/*
 * ---- the FUSE fast path's mirror of the passthrough tables (fuse_fast.c) ----
 *
 * Python owns the tables and publishes each entry: inodes (nodeid -> O_PATH
 * fd) and handles (fh -> open fd, file or directory).  Publishing hands the
 * mirror the duty to close the fd: retire an entry instead of closing it,
 * and the mirror closes it once no in-place request still uses it.
 */
#define PVD_FS_INODES 0
#define PVD_FS_HANDLES 1
#define PVD_KIND_INODE 0
#define PVD_KIND_FILE 1
#define PVD_KIND_DIR 2

struct pvd_fs_stats {
	uint64_t inodes, handles;              /* entries published now */
	uint64_t getattr, read, write, lookup, readdirplus, unlink, readdir; /* in place */
	uint32_t busy_now, busy_max;           /* queue runners serving at once: now / most */
};

/* What the in-place handlers answer with (PassthroughFs's settings). */
struct pvd_fs_settings {
	uint64_t attr_valid, entry_valid;
	uint32_t attr_valid_nsec, entry_valid_nsec;
	int readonly, switch_creds, announce_submounts;
	int python_writes; /* every WRITE to Python (a remapped security.capability) */
};

struct pvd_fs *pvd_fs_new(void);
/* Closes every fd still published. */
void pvd_fs_free(struct pvd_fs *fs);
void pvd_fs_configure(struct pvd_fs *fs, const struct pvd_fs_settings *st);
/* Requests are served in place only while ready (the FUSE session is initialised). */
void pvd_fs_set_ready(struct pvd_fs *fs, int ready);
/*
 * Publish inode nodeid (its O_PATH fd and host identity) or handle fh (kind
 * FILE or DIR).  PVD_E_INVAL for a duplicate key or a bad fd/kind,
 * PVD_E_NOMEM.
 */
int pvd_fs_publish_inode(struct pvd_fs *fs, uint64_t nodeid, int fd, uint64_t dev, uint64_t ino);
int pvd_fs_publish_handle(struct pvd_fs *fs, uint64_t fh, int fd, uint32_t kind);
/* PVD_E_NOT_FOUND when key is not published (the caller still owns the fd). */
int pvd_fs_retire(struct pvd_fs *fs, int table, uint64_t key);
/*
 * Retire inode nodeid to bound the daemon's fds (Python keeps the inode and
 * reopens it by file handle): as pvd_fs_retire, and *credits gets the
 * lookups answered in place and not yet settled, read as the entry is
 * unlinked, so none is lost (a later in-place LOOKUP misses and goes to
 * Python).
 */
int pvd_fs_evict_inode(struct pvd_fs *fs, uint64_t nodeid, uint64_t *credits);
/*
 * LOOKUP counts.  A LOOKUP answered in place credits its inode here before
 * the reply is published; Python folds the credits into its own count
 * whenever it decides about the inode's life: *total = count + credits -
 * forget (at least 0), credits reset.  At 0 (unless keep) the inode is
 * hidden at once: no in-place request can use or credit it again, and it
 * awaits Python's retire.  Returns 0 when nodeid is not published.
 */
int pvd_fs_settle(struct pvd_fs *fs, uint64_t nodeid, uint64_t count, uint64_t forget,
		  int keep, uint64_t *total);
/* Credits not yet settled (tests, nlookup introspection). */
uint64_t pvd_fs_credits(struct pvd_fs *fs, uint64_t nodeid);
uint64_t pvd_fs_count(struct pvd_fs *fs, int table);
void pvd_fs_stats(struct pvd_fs *fs, struct pvd_fs_stats *out);
void pvd_fs_reset_busy_max(struct pvd_fs *fs);

/*
 * ---- per-device swiotlb windows (window_alloc.c) ----
 *
 * A range allocator over the guest's published bounce-buffer range
 * [base, base+size), which must end at or below 4 GiB.  Each allocation (a
 * "window") is tagged with an owner id: printable ASCII without spaces, 1..63
 * bytes (a PCI BDF such as "0000:00:05.0", or a device id).  First fit in
 * address order; every call takes the allocator's mutex.
 */
/* guest swiotlb slab (IO_TLB_SIZE) and segment (IO_TLB_SEGSIZE * IO_TLB_SIZE) */
#define PVD_WIN_SLAB 2048
#define PVD_WIN_SEGMENT 262144
/* window bases are always at least page aligned */
#define PVD_WIN_PAGE 4096
/* owner id buffer, NUL included */
#define PVD_WIN_OWNER_MAX 64

struct pvd_window {
	uint64_t base;
	uint64_t size;
	char owner[64]; /* PVD_WIN_OWNER_MAX, NUL terminated */
};

struct pvd_walloc_stats {
	uint64_t base, size;  /* the managed range */
	uint64_t free_bytes;  /* size minus the sum of all windows */
	uint64_t largest_free; /* largest free extent, before alignment */
	uint64_t largest_fit; /* largest window that align/granule would allow now */
	uint32_t count;       /* number of windows */
};

struct pvd_walloc;

/* NULL on failure, *err = PVD_E_WIN_RANGE (empty range, u64 overflow, end
 * above 4 GiB, base not page aligned) or PVD_E_NOMEM. */
struct pvd_walloc *pvd_walloc_new(uint64_t base, uint64_t size, int *err);
void pvd_walloc_destroy(struct pvd_walloc *w);
/*
 * Allocate a window for owner.  Its base is aligned to max(align, PAGE); its
 * size is size rounded up to granule (align and granule: powers of two >=
 * SLAB).  On success *out holds the window.  On PVD_E_WIN_EXHAUSTED /
 * PVD_E_WIN_FRAGMENTED, *st (if not NULL) is the state at the time of the
 * failure, largest_fit computed for this align/granule.
 */
int pvd_walloc_alloc(struct pvd_walloc *w, const char *owner, uint64_t size, uint64_t align,
		     uint64_t granule, struct pvd_window *out, struct pvd_walloc_stats *st);
/* Free owner's window, copying it to *out (may be NULL); PVD_E_WIN_UNKNOWN if none. */
int pvd_walloc_release(struct pvd_walloc *w, const char *owner, struct pvd_window *out);
/* 1: found (*out filled), 0: no window for owner, <0: bad owner id. */
int pvd_walloc_lookup(struct pvd_walloc *w, const char *owner, struct pvd_window *out);
/* Copies up to max windows (sorted by base) into out; returns the window count. */
size_t pvd_walloc_list(struct pvd_walloc *w, struct pvd_window *out, size_t max);
/* largest_fit is computed for align/granule (0 for either: PAGE / SLAB). */
void pvd_walloc_stats(struct pvd_walloc *w, uint64_t align, uint64_t granule,
		      struct pvd_walloc_stats *st);
/* pvd_strerror() extended with the PVD_E_WIN_* codes. */
const char *pvd_walloc_strerror(int code);

#endif
