/*
 * Split virtqueue engine (device side) and popped descriptor chains.
 *
 * Spec references are to the virtio 1.2 numbering ("Split Virtqueues" is
 * section 2.7; in virtio 1.1 the same text is 2.6.x):
 *   2.7.5   The Virtqueue Descriptor Table (2.7.5.3 Indirect Descriptors)
 *   2.7.6   The Virtqueue Available Ring
 *   2.7.7   Used Buffer Notification Suppression
 *   2.7.8   The Virtqueue Used Ring
 *   2.7.10  Available Buffer Notification Suppression
 *   2.7.13  Supplying Buffers to The Device (2.7.13.3 Updating idx)
 *   2.7.14  Receiving Used Buffers From The Device
 *
 * Guest memory is shared with a concurrently running driver, so:
 *  - ring indices are accessed with C11 atomics (the rings are 2/4-aligned);
 *  - every descriptor is copied once into a local before it is validated
 *    and used, so the guest cannot change it between check and use;
 *  - the ring host pointers come from a table snapshot the queue holds a
 *    reference on (pvd_vq::tbl), re-translated when the memory table changes.
 *
 * Locking: pvd_vq::lock serialises every ring access (pop, complete, notify,
 * notification toggles, configure/reset).  It is never held while blocking
 * (wait_kick polls without it).  Chains need no lock: they own a table
 * reference and their iovecs, and are used by a single thread.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

/* Most iovecs a chain may produce (a descriptor can cross region borders). */
#define PVD_MAX_IOV 2048
/* iovecs per preadv/pwritev call (IOV_MAX on Linux). */
#define PVD_IOV_BATCH 1024

struct pvd_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct pvd_vq {
	pthread_mutex_t lock;
	struct pvd_mem *mem;
	struct pvd_table *tbl; /* snapshot the ring pointers below came from */
	uint32_t max_size, size;
	int configured, event_idx, broken, notify_enabled;
	uint64_t desc_gpa, avail_gpa, used_gpa;
	uint8_t *desc, *avail, *used; /* host addresses of the rings */
	uint16_t last_avail_idx, shadow_avail_idx, used_idx, signalled_used;
	int signalled_used_valid;
	uint32_t gen; /* bumped by configure/set_base/reset: stale chains are dropped */
	int kick_fd, call_fd, stop_fd;
	struct iovec *scratch;
	/* pvd_vq_run: its own iovec buffer (one runner at a time) and counters */
	uint32_t index;
	/*
	 * wait_kick polls kick_fd itself (no dup: a dup can fail with EMFILE and
	 * would leave the wait deaf).  While waiters poll it, a replaced kick fd
	 * is not closed but parked in retired[] and closed by the last waiter.
	 */
	int kick_waiters;
	int retired[8], nretired;
	atomic_int running;
	struct iovec *run_iov;
	atomic_uint_fast64_t n_fast, n_slow, n_defect;
	/*
	 * Adaptive polling (pvd_vq_run): the most and the current window, in
	 * ns, and how often a window found a chain.  poll_max_ns is written by
	 * pvd_vq_set_poll from any thread; poll_ns only by the runner (atomic,
	 * relaxed, only so that pvd_vq_poll_stats may read it).
	 * stopped mirrors stop_fd being readable, so the polling loop sees a
	 * stop without a system call.
	 */
	atomic_uint_fast64_t poll_max_ns, poll_ns;
	atomic_uint_fast64_t n_poll_hit, n_poll_miss;
	atomic_int stopped;
};

struct pvd_chain {
	struct pvd_table *tbl; /* NULL once completed */
	struct pvd_vq *vq;
	uint32_t gen;
	uint32_t head;
	uint32_t opcode;  /* fuse_in_header, when pvd_vq_run looked (else 0) */
	uint64_t unique;
	struct pvd_chain *qnext; /* pvd_slowq link */
	uint64_t rlen, wlen;
	uint32_t nr, nw; /* readable iovecs first, then writable */
	struct iovec iov[];
};

/* ------------------------------------------------------ guest ring accessors */

static inline uint16_t ld16(const uint8_t *p, memory_order mo)
{
	return le16toh(atomic_load_explicit((_Atomic uint16_t *)(void *)p, mo));
}

static inline void st16(uint8_t *p, uint16_t v, memory_order mo)
{
	atomic_store_explicit((_Atomic uint16_t *)(void *)p, htole16(v), mo);
}

static inline void st32(uint8_t *p, uint32_t v, memory_order mo)
{
	atomic_store_explicit((_Atomic uint32_t *)(void *)p, htole32(v), mo);
}

/* avail: flags@0 idx@2 ring@4 used_event@4+2*size */
#define AVAIL_FLAGS(vq) ((vq)->avail)
#define AVAIL_IDX(vq) ((vq)->avail + 2)
#define AVAIL_RING(vq, i) ((vq)->avail + 4 + 2 * (size_t)(i))
#define USED_EVENT(vq) AVAIL_RING(vq, (vq)->size)
/* used: flags@0 idx@2 ring@4 (8 bytes each) avail_event@4+8*size */
#define USED_FLAGS(vq) ((vq)->used)
#define USED_IDX(vq) ((vq)->used + 2)
#define USED_ELEM(vq, i) ((vq)->used + 4 + 8 * (size_t)(i))
#define AVAIL_EVENT(vq) USED_ELEM(vq, (vq)->size)

static void read_desc(const uint8_t *p, struct pvd_desc *d)
{
	/* One copy out of guest memory: later checks and uses see the same value. */
	uint8_t raw[16];
	memcpy(raw, p, sizeof(raw));
	atomic_signal_fence(memory_order_acq_rel); /* keep the compiler from re-reading p */
	uint64_t a;
	uint32_t l;
	uint16_t f, n;
	memcpy(&a, raw, 8);
	memcpy(&l, raw + 8, 4);
	memcpy(&f, raw + 12, 2);
	memcpy(&n, raw + 14, 2);
	d->addr = le64toh(a);
	d->len = le32toh(l);
	d->flags = le16toh(f);
	d->next = le16toh(n);
}

static uint64_t ring_bytes_avail(uint32_t size, int ev) { return 4 + 2 * (uint64_t)size + (ev ? 2 : 0); }
static uint64_t ring_bytes_used(uint32_t size, int ev) { return 4 + 8 * (uint64_t)size + (ev ? 2 : 0); }

static int ring_err(int rc)
{
	return rc == PVD_E_OUTSIDE_WINDOW ? PVD_E_RING_WINDOW : PVD_E_RING_MEMORY;
}

/* Translate the three rings against t. */
static int translate_rings(struct pvd_vq *vq, struct pvd_table *t, uint8_t **d, uint8_t **a,
			   uint8_t **u)
{
	int split, rc;
	rc = pvd_table_translate_contig(t, vq->desc_gpa, 16 * (uint64_t)vq->size, d, &split);
	if (rc)
		return ring_err(rc);
	rc = pvd_table_translate_contig(t, vq->avail_gpa, ring_bytes_avail(vq->size, vq->event_idx),
					a, &split);
	if (rc)
		return ring_err(rc);
	rc = pvd_table_translate_contig(t, vq->used_gpa, ring_bytes_used(vq->size, vq->event_idx),
					u, &split);
	if (rc)
		return ring_err(rc);
	return PVD_OK;
}

/* Lock held.  Make sure the ring pointers come from the current memory table. */
static int refresh_rings(struct pvd_vq *vq)
{
	if (!vq->configured)
		return PVD_E_NOT_CONFIGURED;
	uint64_t gen = atomic_load_explicit(&vq->mem->cur_gen, memory_order_acquire);
	if (vq->tbl && vq->tbl->gen == gen)
		return PVD_OK;
	struct pvd_table *t = pvd_table_acquire(vq->mem);
	uint8_t *d, *a, *u;
	int rc = translate_rings(vq, t, &d, &a, &u);
	pvd_table_put(vq->tbl); /* never keep a stale snapshot's mappings alive */
	if (rc) {
		pvd_table_put(t);
		vq->tbl = NULL;
		vq->desc = vq->avail = vq->used = NULL;
		vq->broken = 1;
		return rc;
	}
	vq->tbl = t;
	vq->desc = d;
	vq->avail = a;
	vq->used = u;
	return PVD_OK;
}

/* Lock held, rings valid. */
static void push_used(struct pvd_vq *vq, uint32_t head, uint32_t len)
{
	uint8_t *e = USED_ELEM(vq, vq->used_idx & (vq->size - 1));
	st32(e, head, memory_order_relaxed);
	st32(e + 4, len, memory_order_relaxed);
	vq->used_idx++;
	/*
	 * 2.7.8 / 2.7.14: the used element (id, len) and every byte written into
	 * the buffers must be visible to the driver before it can observe the
	 * new used idx: release store (pairs with the driver's read barrier
	 * after it reads used->idx).
	 */
	st16(USED_IDX(vq), vq->used_idx, memory_order_release);
}

/* ------------------------------------------------------------------ queues */

struct pvd_vq *pvd_vq_new(struct pvd_mem *mem, uint32_t max_size, uint32_t index)
{
	if (max_size == 0 || max_size > PVD_MAX_QUEUE_SIZE || (max_size & (max_size - 1)))
		return NULL;
	struct pvd_vq *vq = calloc(1, sizeof(*vq));
	if (!vq)
		return NULL;
	vq->scratch = malloc(PVD_MAX_IOV * sizeof(struct iovec));
	vq->run_iov = malloc(PVD_MAX_IOV * sizeof(struct iovec));
	vq->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!vq->scratch || !vq->run_iov || vq->stop_fd < 0) {
		if (vq->stop_fd >= 0)
			close(vq->stop_fd);
		free(vq->scratch);
		free(vq->run_iov);
		free(vq);
		return NULL;
	}
	vq->index = index;
	pthread_mutex_init(&vq->lock, NULL);
	vq->mem = mem;
	vq->max_size = max_size;
	vq->kick_fd = -1;
	vq->call_fd = -1;
	vq->notify_enabled = 1;
	return vq;
}

static void drain_fd(int fd)
{
	uint64_t v;
	while (read(fd, &v, sizeof(v)) < 0 && errno == EINTR)
		;
}

/* Lock held. */
static void unconfigure(struct pvd_vq *vq)
{
	pvd_table_put(vq->tbl);
	vq->tbl = NULL;
	vq->desc = vq->avail = vq->used = NULL;
	vq->configured = 0;
	vq->size = 0;
	vq->broken = 0;
	vq->gen++;
}

void pvd_vq_free(struct pvd_vq *vq)
{
	if (!vq)
		return;
	pvd_vq_close(vq);
	pthread_mutex_lock(&vq->lock);
	unconfigure(vq);
	pthread_mutex_unlock(&vq->lock);
	for (int i = 0; i < vq->nretired; i++)
		close(vq->retired[i]);
	close(vq->stop_fd);
	pthread_mutex_destroy(&vq->lock);
	free(vq->scratch);
	free(vq->run_iov);
	free(vq);
}

int pvd_vq_configure(struct pvd_vq *vq, uint32_t size, uint64_t desc_gpa, uint64_t avail_gpa,
		     uint64_t used_gpa, int event_idx)
{
	int rc;
	pthread_mutex_lock(&vq->lock);
	unconfigure(vq); /* a failed configure leaves the queue unconfigured */
	if (size == 0 || size > vq->max_size || (size & (size - 1))) {
		rc = PVD_E_QUEUE_SIZE;
		goto out;
	}
	if ((desc_gpa & 15) || (avail_gpa & 1) || (used_gpa & 3)) {
		rc = PVD_E_RING_ALIGN;
		goto out;
	}
	vq->size = size;
	vq->desc_gpa = desc_gpa;
	vq->avail_gpa = avail_gpa;
	vq->used_gpa = used_gpa;
	vq->event_idx = !!event_idx;
	struct pvd_table *t = pvd_table_acquire(vq->mem);
	uint8_t *d, *a, *u;
	rc = translate_rings(vq, t, &d, &a, &u);
	if (rc) {
		pvd_table_put(t);
		vq->size = 0;
		goto out;
	}
	vq->tbl = t;
	vq->desc = d;
	vq->avail = a;
	vq->used = u;
	vq->configured = 1;
	vq->notify_enabled = 1;
	vq->shadow_avail_idx = vq->last_avail_idx;
	vq->used_idx = ld16(USED_IDX(vq), memory_order_relaxed);
	vq->signalled_used_valid = 0;
	drain_fd(vq->stop_fd);
	atomic_store(&vq->stopped, 0);
out:
	pthread_mutex_unlock(&vq->lock);
	return rc;
}

int pvd_vq_set_base(struct pvd_vq *vq, uint16_t last_avail_idx)
{
	pthread_mutex_lock(&vq->lock);
	vq->last_avail_idx = last_avail_idx;
	vq->shadow_avail_idx = last_avail_idx;
	vq->signalled_used_valid = 0;
	vq->broken = 0;
	vq->gen++;
	if (vq->configured && refresh_rings(vq) == PVD_OK)
		vq->used_idx = ld16(USED_IDX(vq), memory_order_relaxed);
	else
		vq->used_idx = last_avail_idx;
	pthread_mutex_unlock(&vq->lock);
	return PVD_OK;
}

uint16_t pvd_vq_last_avail_idx(struct pvd_vq *vq)
{
	pthread_mutex_lock(&vq->lock);
	uint16_t v = vq->last_avail_idx;
	pthread_mutex_unlock(&vq->lock);
	return v;
}

uint32_t pvd_vq_size(struct pvd_vq *vq)
{
	pthread_mutex_lock(&vq->lock);
	uint32_t v = vq->size;
	pthread_mutex_unlock(&vq->lock);
	return v;
}

void pvd_vq_set_kick_fd(struct pvd_vq *vq, int fd)
{
	int close_fd = -1;
	pthread_mutex_lock(&vq->lock);
	int old = vq->kick_fd;
	vq->kick_fd = fd;
	if (old >= 0 && vq->kick_waiters > 0) {
		/* A waiter polls old: wake it (eventfd) and let the last waiter close it. */
		uint64_t one = 1;
		ssize_t r = write(old, &one, sizeof(one));
		(void)r;
		if (vq->nretired == (int)(sizeof(vq->retired) / sizeof(vq->retired[0]))) {
			close_fd = vq->retired[0]; /* oldest: its waiter sees POLLNVAL and re-checks */
			memmove(vq->retired, vq->retired + 1, sizeof(vq->retired) - sizeof(int));
			vq->nretired--;
		}
		vq->retired[vq->nretired++] = old;
		old = -1;
	}
	pthread_mutex_unlock(&vq->lock);
	if (old >= 0)
		close(old);
	if (close_fd >= 0)
		close(close_fd);
}

void pvd_vq_set_call_fd(struct pvd_vq *vq, int fd)
{
	pthread_mutex_lock(&vq->lock);
	int old = vq->call_fd;
	vq->call_fd = fd;
	pthread_mutex_unlock(&vq->lock);
	if (old >= 0)
		close(old);
}

void pvd_vq_close(struct pvd_vq *vq)
{
	pvd_vq_stop(vq);
	pvd_vq_set_kick_fd(vq, -1);
	pvd_vq_set_call_fd(vq, -1);
}

void pvd_vq_stop(struct pvd_vq *vq)
{
	uint64_t one = 1;
	/* The stop eventfd stays readable (never drained by waiters) until
	 * reset()/configure(): every wait returns 0 until then. */
	atomic_store(&vq->stopped, 1);
	while (write(vq->stop_fd, &one, sizeof(one)) < 0 && errno == EINTR)
		;
}

void pvd_vq_reset(struct pvd_vq *vq)
{
	pthread_mutex_lock(&vq->lock);
	unconfigure(vq);
	vq->last_avail_idx = vq->shadow_avail_idx = vq->used_idx = 0;
	vq->signalled_used_valid = 0;
	vq->notify_enabled = 1;
	drain_fd(vq->stop_fd);
	atomic_store(&vq->stopped, 0);
	pthread_mutex_unlock(&vq->lock);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int pvd_vq_wait_kick(struct pvd_vq *vq, int timeout_ms)
{
	pthread_mutex_lock(&vq->lock);
	int kfd = vq->kick_fd;
	vq->kick_waiters++;
	pthread_mutex_unlock(&vq->lock);

	struct pollfd p[2] = {
		{ .fd = vq->stop_fd, .events = POLLIN },
		{ .fd = kfd, .events = POLLIN }, /* negative fd: ignored by poll */
	};
	int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : 0;
	int result = 0;
	for (;;) {
		int t = -1;
		if (timeout_ms >= 0) {
			int64_t left = deadline - now_ms();
			t = left > 0 ? (left > INT_MAX ? INT_MAX : (int)left) : 0;
		}
		int n = poll(p, 2, t);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (n == 0)
			break; /* timed out */
		if (p[0].revents)
			break; /* stopped (stop wins over a simultaneous kick) */
		if (p[1].revents & POLLIN) {
			drain_fd(kfd); /* eventfd: one read resets the counter */
			result = 1;
			break;
		}
		if (p[1].revents)
			break; /* error/hangup on the kick fd: report "not kicked" */
	}

	int to_close[8], nclose = 0;
	pthread_mutex_lock(&vq->lock);
	if (result == 0 && kfd != vq->kick_fd && kfd >= 0 && !(p[0].revents))
		result = 1; /* the kick fd was replaced meanwhile: re-check the ring */
	if (--vq->kick_waiters == 0) {
		memcpy(to_close, vq->retired, sizeof(int) * (size_t)vq->nretired);
		nclose = vq->nretired;
		vq->nretired = 0;
	}
	pthread_mutex_unlock(&vq->lock);
	for (int i = 0; i < nclose; i++)
		close(to_close[i]);
	return result;
}

/* ------------------------------------------------------------ chain walking */

struct walk {
	struct pvd_vq *vq;
	const struct pvd_table *t;
	struct iovec *iov;
	uint32_t niov, nr;
	uint64_t rlen, wlen;
	int writable_seen;
	/*
	 * Salvage mode (see pvd_vq_pop): a descriptor outside guest memory or
	 * the window does not end the walk; its code is kept in addr_rc, no
	 * more iovecs are built, and the rest of the chain is still checked
	 * for structural defects (which then win).
	 */
	int keep_going;
	int addr_rc;
	/* first non-empty readable / writable descriptor, as the guest gave it */
	int have_r0, have_w0;
	uint64_t r0_addr, w0_addr;
	uint32_t r0_len, w0_len;
};

static int add_buffer(struct walk *w, uint64_t addr, uint32_t len, int writable)
{
	if (writable) {
		w->writable_seen = 1;
		w->wlen += len;
		if (!w->have_w0) {
			w->have_w0 = 1;
			w->w0_addr = addr;
			w->w0_len = len;
		}
	} else {
		if (w->writable_seen)
			return PVD_C_READ_AFTER_WRITE;
		w->rlen += len;
		if (!w->have_r0) {
			w->have_r0 = 1;
			w->r0_addr = addr;
			w->r0_len = len;
		}
	}
	/* 2.7.5: used len is 32 bits; refuse chains whose total does not fit. */
	if (w->rlen + w->wlen > UINT32_MAX)
		return PVD_C_TOTAL_LEN;
	if (w->addr_rc)
		return PVD_OK; /* salvage mode after an address defect: checks only */
	uint64_t left = len;
	while (left) {
		uint8_t *h;
		uint64_t chunk;
		int rc = pvd_table_translate(w->t, addr, left, &h, &chunk);
		if (rc) {
			rc = rc == PVD_E_OUTSIDE_WINDOW ? PVD_C_DESC_WINDOW : PVD_C_DESC_MEMORY;
			if (!w->keep_going)
				return rc;
			w->addr_rc = rc;
			return PVD_OK;
		}
		if (w->niov >= PVD_MAX_IOV)
			return PVD_C_TOO_MANY_SEGS;
		w->iov[w->niov].iov_base = h;
		w->iov[w->niov].iov_len = (size_t)chunk;
		w->niov++;
		if (!writable)
			w->nr++;
		addr += chunk;
		left -= chunk;
	}
	return PVD_OK;
}

/* 2.7.5 / 2.7.5.3: walk the chain starting at head, validating every step. */
static int walk_chain(struct walk *w, uint32_t head)
{
	struct pvd_vq *vq = w->vq;
	const uint8_t *table = vq->desc;
	uint32_t n = vq->size; /* entries in the current table */
	uint32_t ttl = vq->size;
	int indirect = 0;
	uint32_t i = head;

	if (head >= vq->size)
		return PVD_C_HEAD_RANGE;
	for (;;) {
		if (ttl-- == 0)
			return PVD_C_TTL; /* loop, or longer than the table allows */
		struct pvd_desc d;
		read_desc(table + 16 * (size_t)i, &d);
		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (indirect)
				return PVD_C_NESTED_INDIRECT;
			if (d.flags & VRING_DESC_F_NEXT)
				return PVD_C_INDIRECT_NEXT;
			if (d.len == 0 || d.len % 16 || d.len / 16 > PVD_MAX_INDIRECT)
				return PVD_C_INDIRECT_LEN;
			uint8_t *h;
			int split;
			int rc = pvd_table_translate_contig(w->t, d.addr, d.len, &h, &split);
			if (rc == PVD_E_OUTSIDE_WINDOW)
				return PVD_C_INDIRECT_WINDOW;
			if (rc)
				return split ? PVD_C_INDIRECT_SPLIT : PVD_C_INDIRECT_MEMORY;
			table = h;
			n = ttl = d.len / 16;
			indirect = 1;
			i = 0;
			continue;
		}
		if (d.len) {
			int rc = add_buffer(w, d.addr, d.len, !!(d.flags & VRING_DESC_F_WRITE));
			if (rc)
				return rc;
		} else if (d.flags & VRING_DESC_F_WRITE) {
			w->writable_seen = 1;
		} else if (w->writable_seen) {
			return PVD_C_READ_AFTER_WRITE;
		}
		if (!(d.flags & VRING_DESC_F_NEXT))
			return PVD_OK;
		if (d.next >= n)
			return PVD_C_NEXT_RANGE;
		i = d.next;
	}
}

/*
 * Translate the first len bytes at addr into iov[*n..max) (the range may
 * cross region borders).  0 on success, <0 when any byte is outside guest
 * memory or the window or max is reached.
 */
static int salvage_part(const struct pvd_table *t, uint64_t addr, uint64_t len,
			struct iovec *iov, uint32_t *n, uint32_t max)
{
	while (len) {
		uint8_t *h;
		uint64_t chunk;
		int rc = pvd_table_translate(t, addr, len, &h, &chunk);
		if (rc)
			return rc;
		if (*n >= max)
			return PVD_C_TOO_MANY_SEGS;
		iov[*n].iov_base = h;
		iov[*n].iov_len = (size_t)chunk;
		(*n)++;
		addr += chunk;
		len -= chunk;
	}
	return PVD_OK;
}

/* A chain owning copies of iov[0..niov) and a new reference on tbl (translated against it). */
static struct pvd_chain *make_chain(struct pvd_vq *vq, struct pvd_table *tbl, uint32_t gen,
				    const struct iovec *iov, uint32_t niov, uint32_t nr,
				    uint64_t rlen, uint64_t wlen, uint32_t head)
{
	struct pvd_chain *c = malloc(sizeof(*c) + (size_t)niov * sizeof(struct iovec));
	if (!c)
		return NULL;
	memcpy(c->iov, iov, (size_t)niov * sizeof(struct iovec));
	c->nr = nr;
	c->nw = niov - nr;
	c->rlen = rlen;
	c->wlen = wlen;
	c->head = head;
	c->vq = vq;
	c->gen = gen;
	c->opcode = 0;
	c->unique = 0;
	c->qnext = NULL;
	c->tbl = tbl;
	pvd_table_get(tbl);
	return c;
}

#define PVD_SALVAGE_IOV 16

/*
 * Lock held.  A chain made of the first rlen bytes of the chain's first
 * readable descriptor and the first wlen bytes of its first writable one,
 * or NULL when either is missing, shorter, or not entirely in guest memory
 * and the window (or on allocation failure).
 */
static struct pvd_chain *salvage_chain(struct pvd_vq *vq, const struct walk *w, uint32_t head,
				       uint32_t rlen, uint32_t wlen)
{
	if (!w->have_r0 || !w->have_w0 || w->r0_len < rlen || w->w0_len < wlen)
		return NULL;
	struct iovec iov[2 * PVD_SALVAGE_IOV];
	uint32_t n = 0;
	if (salvage_part(w->t, w->r0_addr, rlen, iov, &n, PVD_SALVAGE_IOV))
		return NULL;
	uint32_t nr = n;
	if (salvage_part(w->t, w->w0_addr, wlen, iov, &n, 2 * PVD_SALVAGE_IOV))
		return NULL;
	return make_chain(vq, vq->tbl, vq->gen, iov, n, nr, rlen, wlen, head);
}

/*
 * Lock held.  Take the next available head and walk it into iov.
 * 0: nothing available; 1: *w holds a valid chain (not completed);
 * PVD_C_*: a defect -- completed with used len 0, or (*out set) handed out
 * as a salvage chain; other <0: queue error.
 */
static int take_locked(struct pvd_vq *vq, struct iovec *iov, uint32_t salvage_rlen,
		       uint32_t salvage_wlen, struct walk *w, uint32_t *head_out,
		       struct pvd_chain **out)
{
	int rc;
	*out = NULL;
	if (!vq->configured)
		return PVD_E_NOT_CONFIGURED;
	if (vq->broken)
		return PVD_E_BROKEN;
	rc = refresh_rings(vq);
	if (rc)
		return rc;
	if (vq->shadow_avail_idx == vq->last_avail_idx) {
		/*
		 * 2.7.13.3: the driver issues a write barrier between filling the
		 * ring entry and bumping avail->idx.  Acquire load pairs with it.
		 */
		uint16_t idx = ld16(AVAIL_IDX(vq), memory_order_acquire);
		if ((uint16_t)(idx - vq->last_avail_idx) > vq->size) {
			vq->broken = 1; /* 2.7.6: at most `size` entries can be pending */
			return PVD_E_AVAIL_IDX;
		}
		vq->shadow_avail_idx = idx;
		if (idx == vq->last_avail_idx)
			return 0;
	}
	/*
	 * 2.7.13.3: read barrier between observing avail->idx and reading the
	 * ring entry and the descriptors it names (needed again here because the
	 * idx may have been read by an earlier call).
	 */
	atomic_thread_fence(memory_order_acquire);
	uint32_t head = ld16(AVAIL_RING(vq, vq->last_avail_idx & (vq->size - 1)), memory_order_relaxed);
	vq->last_avail_idx++;
	if (vq->event_idx && vq->notify_enabled)
		/* 2.7.10: ask for a kick when the driver goes past what we consumed. */
		st16(AVAIL_EVENT(vq), vq->last_avail_idx, memory_order_relaxed);
	*head_out = head;

	int salvage = salvage_rlen > 0 && salvage_wlen > 0;
	*w = (struct walk){ .vq = vq, .t = vq->tbl, .iov = iov, .keep_going = salvage };
	rc = walk_chain(w, head);
	if (rc == PVD_OK && w->addr_rc) {
		/* Structurally sound, refused only for where its buffers lie. */
		rc = w->addr_rc;
		if (salvage && (*out = salvage_chain(vq, w, head, salvage_rlen, salvage_wlen)))
			return rc; /* not completed: the caller completes the salvage chain */
	} else if (rc == PVD_OK) {
		return 1;
	}
	/* Fail just this chain: hand the head back with nothing written. */
	push_used(vq, head, 0);
	return rc;
}

int pvd_vq_pop(struct pvd_vq *vq, struct pvd_chain **out, uint32_t *bad_head,
	       uint32_t salvage_rlen, uint32_t salvage_wlen)
{
	struct walk w;
	uint32_t head = 0;
	pthread_mutex_lock(&vq->lock);
	int rc = take_locked(vq, vq->scratch, salvage_rlen, salvage_wlen, &w, &head, out);
	if (rc == 1) {
		*out = make_chain(vq, vq->tbl, vq->gen, w.iov, w.niov, w.nr, w.rlen, w.wlen, head);
		if (!*out) {
			rc = PVD_C_NOMEM;
			push_used(vq, head, 0);
		}
	}
	if (rc <= PVD_C_FIRST)
		*bad_head = head;
	pthread_mutex_unlock(&vq->lock);
	return rc;
}

/* 2.7.7: vring_need_event() - did new_idx cross event since old? */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
	return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int pvd_vq_notify(struct pvd_vq *vq)
{
	int rc;
	pthread_mutex_lock(&vq->lock);
	rc = refresh_rings(vq);
	if (rc)
		goto out;
	/*
	 * 2.7.7 / 2.7.10: full barrier between publishing used->idx (done in
	 * push_used) and reading used_event / avail->flags.  Pairs with the
	 * driver's full barrier between writing used_event (or clearing
	 * NO_INTERRUPT) and re-reading used->idx; without it both sides could
	 * miss each other and the driver would sleep forever.
	 */
	atomic_thread_fence(memory_order_seq_cst);
	int need;
	uint16_t old = vq->signalled_used, cur = vq->used_idx;
	int valid = vq->signalled_used_valid;
	vq->signalled_used = cur;
	vq->signalled_used_valid = 1;
	if (vq->event_idx) {
		uint16_t ev = ld16(USED_EVENT(vq), memory_order_relaxed);
		need = !valid || need_event(ev, cur, old);
		if (valid && old == cur)
			need = 0;
	} else {
		need = (!valid || old != cur) &&
		       !(ld16(AVAIL_FLAGS(vq), memory_order_relaxed) & VRING_AVAIL_F_NO_INTERRUPT);
	}
	rc = 0;
	if (need && vq->call_fd >= 0) {
		uint64_t one = 1;
		ssize_t r;
		do
			r = write(vq->call_fd, &one, sizeof(one));
		while (r < 0 && errno == EINTR);
		rc = 1; /* EAGAIN means the counter is saturated: signalled anyway */
	}
out:
	pthread_mutex_unlock(&vq->lock);
	return rc;
}

int pvd_vq_set_notification(struct pvd_vq *vq, int enable)
{
	pthread_mutex_lock(&vq->lock);
	vq->notify_enabled = !!enable;
	int rc = refresh_rings(vq);
	if (rc)
		goto out;
	if (vq->event_idx) {
		/* 2.7.10: with EVENT_IDX the driver ignores used->flags. */
		if (enable)
			st16(AVAIL_EVENT(vq), vq->last_avail_idx, memory_order_relaxed);
	} else {
		st16(USED_FLAGS(vq), enable ? 0 : VRING_USED_F_NO_NOTIFY, memory_order_relaxed);
	}
	/*
	 * 2.7.10: the flag / avail_event store must be visible before we
	 * re-read avail->idx (the caller pops again after enabling): full fence,
	 * pairing with the driver's barrier between bumping avail->idx and
	 * reading used->flags / avail_event.
	 */
	atomic_thread_fence(memory_order_seq_cst);
out:
	pthread_mutex_unlock(&vq->lock);
	return rc;
}

/* ------------------------------------------------------------------ chains */

void pvd_chain_info(struct pvd_chain *c, uint32_t *head, uint64_t *rlen, uint64_t *wlen)
{
	*head = c->head;
	*rlen = c->rlen;
	*wlen = c->wlen;
}

/*
 * Build, into out[], iovecs covering [offset, offset+len) of the part
 * iov[0..n).  Returns the count (<= max); *covered receives how many bytes
 * they cover (less than len when max was reached).
 */
static int slice_iov(const struct iovec *iov, uint32_t n, uint64_t offset, uint64_t len,
		     struct iovec *out, int max, uint64_t *covered)
{
	int k = 0;
	*covered = 0;
	for (uint32_t i = 0; i < n && len && k < max; i++) {
		uint64_t l = iov[i].iov_len;
		if (offset >= l) {
			offset -= l;
			continue;
		}
		uint64_t take = l - offset;
		if (take > len)
			take = len;
		out[k].iov_base = (uint8_t *)iov[i].iov_base + offset;
		out[k].iov_len = (size_t)take;
		k++;
		offset = 0;
		len -= take;
		*covered += take;
	}
	return k;
}

static int check_part(struct pvd_chain *c, uint64_t part_len, uint64_t offset, uint64_t len)
{
	if (!c->tbl)
		return PVD_E_COMPLETED;
	if (offset > part_len || len > part_len - offset)
		return PVD_E_RANGE;
	return PVD_OK;
}

void pvd_iov_copy(const struct iovec *iov, uint32_t n, uint64_t offset, uint8_t *buf,
		  uint64_t len, int to_guest)
{
	for (uint32_t i = 0; i < n && len; i++) {
		uint64_t l = iov[i].iov_len;
		if (offset >= l) {
			offset -= l;
			continue;
		}
		uint64_t take = l - offset;
		if (take > len)
			take = len;
		uint8_t *g = (uint8_t *)iov[i].iov_base + offset;
		if (to_guest)
			memcpy(g, buf, take);
		else
			memcpy(buf, g, take);
		buf += take;
		len -= take;
		offset = 0;
	}
}

int pvd_chain_read(struct pvd_chain *c, uint64_t offset, void *buf, size_t len)
{
	int rc = check_part(c, c->rlen, offset, len);
	if (rc)
		return rc;
	pvd_iov_copy(c->iov, c->nr, offset, buf, len, 0);
	return PVD_OK;
}

int pvd_chain_write(struct pvd_chain *c, uint64_t offset, const void *buf, size_t len)
{
	int rc = check_part(c, c->wlen, offset, len);
	if (rc)
		return rc;
	pvd_iov_copy(c->iov + c->nr, c->nw, offset, (uint8_t *)buf, len, 1);
	return PVD_OK;
}

int64_t pvd_iov_io(const struct iovec *part, uint32_t n, int fd, int64_t foff, uint64_t len,
		   uint64_t offset, int *err, int to_guest)
{
	if (foff < 0) {
		*err = EINVAL;
		return PVD_E_IO;
	}
	struct iovec v[PVD_IOV_BATCH];
	uint64_t done = 0;
	while (done < len) {
		uint64_t covered;
		int k = slice_iov(part, n, offset + done, len - done, v, PVD_IOV_BATCH, &covered);
		ssize_t r = to_guest ? preadv(fd, v, k, foff + (int64_t)done)
				     : pwritev(fd, v, k, foff + (int64_t)done);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (done)
				break; /* report the partial transfer; the error recurs next call */
			*err = errno;
			return PVD_E_IO;
		}
		if (r == 0)
			break; /* EOF (read) or no progress (write) */
		done += (uint64_t)r;
	}
	return (int64_t)done;
}

static int64_t chain_io(struct pvd_chain *c, int fd, int64_t foff, uint64_t len, uint64_t offset,
			int *err, int to_guest)
{
	int rc = check_part(c, to_guest ? c->wlen : c->rlen, offset, len);
	if (rc)
		return rc;
	return to_guest ? pvd_iov_io(c->iov + c->nr, c->nw, fd, foff, len, offset, err, 1)
			: pvd_iov_io(c->iov, c->nr, fd, foff, len, offset, err, 0);
}

int64_t pvd_chain_preadv(struct pvd_chain *c, int fd, int64_t file_offset, uint64_t len,
			 uint64_t offset, int *err)
{
	return chain_io(c, fd, file_offset, len, offset, err, 1);
}

int64_t pvd_chain_pwritev(struct pvd_chain *c, int fd, int64_t file_offset, uint64_t len,
			  uint64_t offset, int *err)
{
	return chain_io(c, fd, file_offset, len, offset, err, 0);
}

int pvd_chain_complete(struct pvd_vq *vq, struct pvd_chain *c, uint32_t used_len)
{
	if (!c->tbl)
		return PVD_E_COMPLETED;
	if (c->vq != vq)
		return PVD_E_WRONG_QUEUE;
	int rc = PVD_OK;
	pthread_mutex_lock(&vq->lock);
	if (c->gen != vq->gen || !vq->configured) {
		rc = PVD_E_STALE; /* queue reconfigured since the pop: drop silently */
	} else if (refresh_rings(vq) == PVD_OK) {
		push_used(vq, c->head, used_len);
	} else {
		rc = PVD_E_BROKEN;
	}
	pthread_mutex_unlock(&vq->lock);
	/* Our writes into the buffers happened before push_used's release store;
	 * only now may the old snapshot be unmapped. */
	pvd_table_put(c->tbl);
	c->tbl = NULL;
	return rc;
}

int pvd_chain_complete_notify(struct pvd_vq *vq, struct pvd_chain *c, uint32_t used_len)
{
	int rc = pvd_chain_complete(vq, c, used_len);
	if (rc == PVD_OK)
		pvd_vq_notify(vq); /* in the same call: no GIL hand-off between the two */
	return rc;
}

void pvd_chain_free(struct pvd_chain *c)
{
	if (!c)
		return;
	pvd_table_put(c->tbl);
	free(c);
}

void pvd_chain_request(struct pvd_chain *c, uint32_t *opcode, uint64_t *unique, uint32_t *queue)
{
	*opcode = c->opcode;
	*unique = c->unique;
	*queue = c->vq->index;
}

void pvd_chain_summary(struct pvd_chain *c, uint64_t out[5])
{
	out[0] = c->head;
	out[1] = c->rlen;
	out[2] = c->wlen;
	out[3] = c->opcode;
	out[4] = c->unique;
}

/* -------------------------------------------------------------- slow queue */

/*
 * Chains the fast path did not answer, waiting for a Python worker.  A
 * linked list through pvd_chain::qnext: nothing is allocated per request
 * beyond the chain itself, and its length is bounded by the rings' sizes
 * (each chain is a descriptor head the guest is waiting on).
 */
struct pvd_slowq {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct pvd_chain *head, *tail;
	uint32_t len;
	int closed;
	/*
	 * Opcodes (bit n: opcode n < 64) the runner hands back to its caller to
	 * serve on the queue's own thread instead of queueing them here.  Set
	 * once, before any runner starts (pvd_slowq_set_inline), read-only after.
	 */
	uint64_t inline_mask;
};

struct pvd_slowq *pvd_slowq_new(void)
{
	struct pvd_slowq *q = calloc(1, sizeof(*q));
	if (!q)
		return NULL;
	pthread_mutex_init(&q->lock, NULL);
	pthread_cond_init(&q->cond, NULL);
	return q;
}

void pvd_slowq_free(struct pvd_slowq *q)
{
	if (!q)
		return;
	struct pvd_chain *c = q->head;
	while (c) {
		struct pvd_chain *n = c->qnext;
		pvd_chain_free(c);
		c = n;
	}
	pthread_cond_destroy(&q->cond);
	pthread_mutex_destroy(&q->lock);
	free(q);
}

static int slowq_push(struct pvd_slowq *q, struct pvd_chain *c)
{
	pthread_mutex_lock(&q->lock);
	if (q->closed) {
		pthread_mutex_unlock(&q->lock);
		return PVD_E_BROKEN;
	}
	c->qnext = NULL;
	if (q->tail)
		q->tail->qnext = c;
	else
		q->head = c;
	q->tail = c;
	q->len++;
	pthread_cond_signal(&q->cond);
	pthread_mutex_unlock(&q->lock);
	return PVD_OK;
}

int pvd_slowq_take(struct pvd_slowq *q, struct pvd_chain **out)
{
	pthread_mutex_lock(&q->lock);
	while (!q->head && !q->closed)
		pthread_cond_wait(&q->cond, &q->lock);
	struct pvd_chain *c = q->head;
	if (c) {
		q->head = c->qnext;
		if (!q->head)
			q->tail = NULL;
		q->len--;
		c->qnext = NULL;
	}
	pthread_mutex_unlock(&q->lock);
	*out = c;
	return c != NULL;
}

void pvd_slowq_close(struct pvd_slowq *q)
{
	pthread_mutex_lock(&q->lock);
	q->closed = 1;
	pthread_cond_broadcast(&q->cond);
	pthread_mutex_unlock(&q->lock);
}

void pvd_slowq_set_inline(struct pvd_slowq *q, uint64_t opcodes)
{
	q->inline_mask = opcodes;
}

/* Whether the runner serves this chain's request itself (opcode 0: not read). */
static int slowq_inline(const struct pvd_slowq *q, uint32_t opcode)
{
	return opcode && opcode < 64 && ((q->inline_mask >> opcode) & 1);
}

uint32_t pvd_slowq_len(struct pvd_slowq *q)
{
	pthread_mutex_lock(&q->lock);
	uint32_t n = q->len;
	pthread_mutex_unlock(&q->lock);
	return n;
}

/* ---------------------------------------------------------------- runner */

/* Complete an in-place request popped at generation gen (lock not held). */
static void complete_inplace(struct pvd_vq *vq, uint32_t gen, uint32_t head, uint32_t used)
{
	pthread_mutex_lock(&vq->lock);
	if (gen == vq->gen && vq->configured && refresh_rings(vq) == PVD_OK)
		push_used(vq, head, used);
	pthread_mutex_unlock(&vq->lock);
}

/*
 * Serve every available chain: fast requests in place, the rest to q (or
 * back to the caller when q is NULL).  0 when the ring is empty; 1 with
 * *out for the caller; PVD_C_* for a defect (as pvd_vq_pop); <0 queue error.
 * *served counts the chains taken.
 */
static int serve_all(struct pvd_vq *vq, struct pvd_fs *fs, struct pvd_slowq *q,
		     struct pvd_chain **out, uint32_t *bad_head, uint32_t srlen, uint32_t swlen,
		     int *served)
{
	int rc;
	for (;;) {
		struct walk w;
		uint32_t head = 0, gen = 0;
		struct pvd_table *tbl = NULL;
		pthread_mutex_lock(&vq->lock);
		rc = take_locked(vq, vq->run_iov, srlen, swlen, &w, &head, out);
		if (rc == 1) {
			tbl = vq->tbl; /* the iovecs point into it: pin it past the unlock */
			pvd_table_get(tbl);
			gen = vq->gen;
		}
		pthread_mutex_unlock(&vq->lock);
		if (rc != 1) {
			if (rc <= PVD_C_FIRST) {
				*bad_head = head;
				atomic_fetch_add_explicit(&vq->n_defect, 1, memory_order_relaxed);
				(*served)++;
			}
			break;
		}
		(*served)++;
		struct pvd_req req = { .iov = w.iov, .nr = w.nr, .nw = w.niov - w.nr,
				       .rlen = w.rlen, .wlen = w.wlen };
		uint32_t used = 0, opcode = 0;
		uint64_t unique = 0;
		if (fs && pvd_fast_handle(fs, &req, &used, &opcode, &unique)) {
			complete_inplace(vq, gen, head, used <= w.wlen ? used : (uint32_t)w.wlen);
			pvd_table_put(tbl);
			atomic_fetch_add_explicit(&vq->n_fast, 1, memory_order_relaxed);
			/*
			 * Notify after every completion (EVENT_IDX / NO_INTERRUPT still
			 * suppress what the driver does not want).  Batching the
			 * notifications over a run made both sides sleep in turn: the
			 * driver idle until the batch ended, then the device idle until
			 * it refilled, two cross-CPU wake-ups per batch (daemon bench,
			 * 2 CPUs: GETATTR at depth 32 0.62x the Rust virtiofsd batched
			 * by 32, 0.86x by 4, 1.10x per completion).
			 */
			pvd_vq_notify(vq);
			continue;
		}
		struct pvd_chain *c = make_chain(vq, tbl, gen, w.iov, w.niov, w.nr, w.rlen, w.wlen,
						 head);
		pvd_table_put(tbl);
		if (!c) {
			complete_inplace(vq, gen, head, 0);
			*bad_head = head;
			atomic_fetch_add_explicit(&vq->n_defect, 1, memory_order_relaxed);
			rc = PVD_C_NOMEM;
			break;
		}
		c->opcode = opcode;
		c->unique = unique;
		atomic_fetch_add_explicit(&vq->n_slow, 1, memory_order_relaxed);
		if (q && !slowq_inline(q, opcode) && slowq_push(q, c) == PVD_OK)
			continue;
		*out = c;
		rc = 1;
		break;
	}
	return rc;
}

/* FsDevice's drain: serve with notifications off, re-check after enabling. */
static int drain(struct pvd_vq *vq, struct pvd_fs *fs, struct pvd_slowq *q,
		 struct pvd_chain **out, uint32_t *bad_head, uint32_t srlen, uint32_t swlen)
{
	for (;;) {
		int first = 0, again = 0;
		pvd_vq_set_notification(vq, 0);
		int rc = serve_all(vq, fs, q, out, bad_head, srlen, swlen, &first);
		if (rc)
			return rc;
		pvd_vq_set_notification(vq, 1);
		/*
		 * 2.7.10: a chain made available after the last pop but before
		 * notifications were re-enabled raised no kick; look again.
		 */
		rc = serve_all(vq, fs, q, out, bad_head, srlen, swlen, &again);
		if (rc)
			return rc;
		if (!again)
			break;
	}
	pvd_vq_notify(vq);
	return 0;
}

/* ------------------------------------------------------- adaptive polling */

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* Whether the driver has made a chain available that we have not popped. */
static int avail_pending(struct pvd_vq *vq)
{
	int pending = 0;
	pthread_mutex_lock(&vq->lock);
	if (!vq->broken && refresh_rings(vq) == PVD_OK)
		/* acquire: pairs with the driver's release of avail->idx */
		pending = ld16(AVAIL_IDX(vq), memory_order_acquire) != vq->last_avail_idx;
	pthread_mutex_unlock(&vq->lock);
	return pending;
}

/*
 * Before sleeping on the kick eventfd, watch avail->idx for up to the
 * current window with guest notifications off (QEMU's AioContext polling,
 * the kernel vhost's busyloop_timeout): a driver that posts its next
 * request within the window is served without waiting for this thread to
 * be woken, which is most of a request's latency at depth 1 (without
 * EVENT_IDX it does not even kick; with it, avail_event stays where the
 * last enable put it, so it kicks once, and the next wait returns at once).  1 when a
 * chain became available (or the queue was stopped: the caller's wait then
 * returns at once).
 */
static int poll_avail(struct pvd_vq *vq)
{
	uint64_t window = atomic_load_explicit(&vq->poll_ns, memory_order_relaxed);
	uint64_t max = atomic_load_explicit(&vq->poll_max_ns, memory_order_relaxed);
	if (window > max) /* lowered (or switched off) by pvd_vq_set_poll since */
		window = max;
	if (!window)
		return 0;
	pvd_vq_set_notification(vq, 0);
	int64_t end = now_ns() + (int64_t)window;
	int found = 0;
	do {
		if (atomic_load_explicit(&vq->stopped, memory_order_relaxed))
			break;
		found = avail_pending(vq);
		if (found)
			break;
		cpu_relax();
	} while (now_ns() < end);
	/*
	 * 2.7.10: set_notification(1) ends with a full fence; a chain posted
	 * after the last look but before the driver saw notifications on
	 * raised no kick, so look once more.
	 */
	pvd_vq_set_notification(vq, 1);
	if (!found)
		found = avail_pending(vq);
	atomic_fetch_add_explicit(found ? &vq->n_poll_hit : &vq->n_poll_miss, 1,
				  memory_order_relaxed);
	return found;
}

/*
 * QEMU's adjust_polling_time(): idle_ns is how long the queue stayed empty
 * (window included).  A wait longer than the most we would poll means
 * polling could not have helped: halve the window (to 0 below 4 us).  A
 * wait that a longer window would have covered grows it: 4 us, then
 * doubling, up to the maximum.
 */
static void adapt_poll(struct pvd_vq *vq, int64_t idle_ns)
{
	uint64_t max = atomic_load_explicit(&vq->poll_max_ns, memory_order_relaxed);
	uint64_t cur = atomic_load_explicit(&vq->poll_ns, memory_order_relaxed);
	uint64_t idle = idle_ns > 0 ? (uint64_t)idle_ns : 0;
	uint64_t next = cur;
	if (!max) {
		next = 0;
	} else if (idle <= cur) {
		/* the window was long enough */
	} else if (idle > max) {
		next = cur / 2 < PVD_POLL_MIN_NS ? 0 : cur / 2;
	} else {
		next = cur ? cur * 2 : PVD_POLL_MIN_NS;
		if (next > max)
			next = max;
	}
	atomic_store_explicit(&vq->poll_ns, next, memory_order_relaxed);
}

void pvd_vq_set_poll(struct pvd_vq *vq, uint64_t max_ns)
{
	if (max_ns > PVD_POLL_MAX_NS)
		max_ns = PVD_POLL_MAX_NS;
	atomic_store_explicit(&vq->poll_max_ns, max_ns, memory_order_relaxed);
}

void pvd_vq_poll_stats(struct pvd_vq *vq, uint64_t *hits, uint64_t *misses, uint64_t *window_ns)
{
	*hits = atomic_load(&vq->n_poll_hit);
	*misses = atomic_load(&vq->n_poll_miss);
	uint64_t window = atomic_load(&vq->poll_ns), max = atomic_load(&vq->poll_max_ns);
	*window_ns = window < max ? window : max; /* what the next wait polls */
}

int pvd_vq_run(struct pvd_vq *vq, struct pvd_fs *fs, struct pvd_slowq *q,
	       struct pvd_chain **out, uint32_t *bad_head, uint32_t salvage_rlen,
	       uint32_t salvage_wlen)
{
	int expected = 0;
	*out = NULL;
	if (!atomic_compare_exchange_strong(&vq->running, &expected, 1))
		return PVD_E_BUSY;
	int rc;
	for (;;) {
		if (fs)
			pvd_fs_busy_enter(fs);
		rc = drain(vq, fs, q, out, bad_head, salvage_rlen, salvage_wlen);
		if (fs)
			pvd_fs_busy_leave(fs);
		if (rc)
			break;
		int polling = atomic_load_explicit(&vq->poll_max_ns, memory_order_relaxed) != 0;
		int64_t idle_from = polling ? now_ns() : 0;
		if (poll_avail(vq))
			continue;
		if (!pvd_vq_wait_kick(vq, -1)) {
			rc = 0; /* stopped */
			break;
		}
		if (polling || atomic_load_explicit(&vq->poll_ns, memory_order_relaxed))
			adapt_poll(vq, now_ns() - idle_from);
	}
	atomic_store(&vq->running, 0);
	return rc;
}

void pvd_vq_stats(struct pvd_vq *vq, uint64_t *fast, uint64_t *slow, uint64_t *defects)
{
	*fast = atomic_load(&vq->n_fast);
	*slow = atomic_load(&vq->n_slow);
	*defects = atomic_load(&vq->n_defect);
}
