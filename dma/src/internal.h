/*
 * Internal structures shared by guest_memory.c and virtqueue.c.  Not exposed
 * through cffi.
 *
 * Memory table design: a pvd_table is an immutable snapshot of the region
 * list.  It is reference counted; every user that dereferences guest memory
 * (a queue's ring pointers, a popped chain's iovecs, a one-shot read/write)
 * holds a reference for as long as it uses host pointers derived from it.
 * Mutations (add/remove/replace/clear) build a new table and swap the
 * pvd_mem::cur pointer; the old snapshot is dropped by the swapper and freed
 * when its last user lets go.  Each mmap() is itself refcounted
 * (pvd_mapping) because consecutive snapshots share unchanged mappings; the
 * munmap happens when the last snapshot referencing it is freed.
 *
 * Locking: pvd_mem::ctl serialises writers (control plane only; it may be
 * held across mmap).  pvd_mem::swap is held only for "load cur + take a
 * reference" and for "store cur", so readers never wait on an mmap and a
 * reference is never taken on a table that is being freed.  Lock order:
 * ctl -> swap; pvd_vq::lock -> swap.  No path takes ctl while holding a
 * queue lock, so the order is acyclic.
 */
#ifndef PVD_INTERNAL_H
#define PVD_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

#include "core.h"

struct pvd_mapping {
	atomic_uint ref;
	void *addr;
	size_t len;
};

struct pvd_entry {
	uint64_t gpa, size, uaddr, mmap_offset; /* as given by the front-end */
	uint64_t last;                          /* gpa + size - 1 */
	int mapped;                             /* part of the region is mmapped */
	uint64_t map_first, map_last;           /* mapped GPA range (region ∩ window), inclusive */
	uint8_t *host;                          /* host address of map_first */
	struct pvd_mapping *m;                  /* NULL when !mapped */
};

struct pvd_table {
	atomic_uint ref;
	uint64_t gen;
	int has_window;
	uint64_t win_first, win_last; /* inclusive */
	uint64_t mapped_bytes;
	uint32_t n;
	struct pvd_entry e[]; /* sorted by gpa, non-overlapping */
};

struct pvd_mem {
	pthread_mutex_t ctl;
	pthread_mutex_t swap;
	struct pvd_table *cur; /* never NULL; guarded by swap */
	atomic_uint_fast64_t cur_gen; /* cur->gen, readable without the lock */
	uint64_t next_gen;            /* guarded by ctl */
	int has_window;
	uint64_t win_first, win_last;
};

/* Take a reference on the current snapshot (never NULL). */
struct pvd_table *pvd_table_acquire(struct pvd_mem *mem);
void pvd_table_get(struct pvd_table *t);
void pvd_table_put(struct pvd_table *t);

/*
 * Translate [gpa, gpa+len) (len > 0) to the host address of its first byte.
 * *chunk receives how many bytes are contiguous there (<= len); the caller
 * loops for ranges crossing regions.  Returns PVD_OK, PVD_E_OUTSIDE_MEMORY or
 * PVD_E_OUTSIDE_WINDOW.  The window check covers the whole range up front.
 */
int pvd_table_translate(const struct pvd_table *t, uint64_t gpa, uint64_t len,
			uint8_t **host, uint64_t *chunk);

/* Whole range, single contiguous host span (rings, indirect tables). */
int pvd_table_translate_contig(const struct pvd_table *t, uint64_t gpa, uint64_t len,
			       uint8_t **host, int *split);

/*
 * One part (readable or writable) of a descriptor chain as host iovecs:
 * the view both popped chains (virtqueue.c) and requests served in place
 * (fuse_fast.c) work on.  Bounds are checked by the callers.
 */
void pvd_iov_copy(const struct iovec *iov, uint32_t n, uint64_t offset, uint8_t *buf,
		  uint64_t len, int to_guest);
/* preadv (to_guest) / pwritev between fd and [offset, offset+len) of the part. */
int64_t pvd_iov_io(const struct iovec *part, uint32_t n, int fd, int64_t foff, uint64_t len,
		   uint64_t offset, int *err, int to_guest);

/* A request being served in place: the chain's iovecs, readable part first. */
struct pvd_req {
	const struct iovec *iov;
	uint32_t nr, nw;
	uint64_t rlen, wlen;
};

/*
 * fuse_fast.c: serve req entirely in C.  Returns 1 with *used = bytes
 * written into the writable part when the request was answered; 0 when it
 * must go to the Python session (nothing was written).  *opcode and
 * *unique are what the fuse_in_header says (0 when it is too short).
 * Safe to call from several queue threads at once.
 */
int pvd_fast_handle(struct pvd_fs *fs, const struct pvd_req *req, uint32_t *used,
		    uint32_t *opcode, uint64_t *unique);
/* Queue threads currently serving / the most ever at once (busy accounting). */
void pvd_fs_busy_enter(struct pvd_fs *fs);
void pvd_fs_busy_leave(struct pvd_fs *fs);

#endif
