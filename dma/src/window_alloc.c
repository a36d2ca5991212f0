/*
 * Per-device swiotlb windows: a range allocator over the contiguous range the
 * guest reserved below 4 GiB for virtio bounce buffers.
 *
 * Representation: a growable array of windows sorted by base, never
 * overlapping.  The free extents are the gaps between consecutive windows
 * (plus the head and tail of the range); they are never stored, so there is
 * no second structure to keep consistent.  A handful of devices share one
 * range (at most size / SLAB windows in theory, a few in practice), so the
 * O(n) walks below cost nothing worth optimising.
 *
 * Policy: first fit in address order.  Windows are few and long lived, so
 * fragmentation behaviour matters less than predictability: first fit packs
 * windows at the low end, gives the same address back when a device is
 * unplugged and replugged with the same size, and keeps the large tail of the
 * range in one piece.  Best fit would only win on many mixed-size
 * allocations, which this workload does not have.
 *
 * Alignment: a window's base is aligned (absolutely, as a guest-physical
 * address, not relative to the range's base) to max(align, PAGE); its size is
 * rounded up to granule.  The guest's swiotlb carves a pool into 2 KiB slabs
 * (IO_TLB_SIZE) grouped in segments of 128 slabs (256 KiB); the Python layer
 * passes granule = SEGMENT so that every window is a valid pool.  A range
 * whose base is only page aligned is fine: the first window starts at the
 * first suitably aligned address inside it.
 *
 * Arithmetic: everything is u64 and every addition that could wrap is
 * checked (align/granule may be as large as 2^63; size up to 2^64-1).  The
 * range itself ends at or below 2^32.
 *
 * Locking: one mutex per allocator, held for the whole of every call.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

struct pvd_walloc {
	pthread_mutex_t lock;
	uint64_t base, end; /* [base, end), end <= 2^32 */
	uint64_t used;      /* sum of window sizes */
	size_t n, cap;
	struct pvd_window *w; /* sorted by base, non-overlapping, inside [base, end) */
};

#define FOUR_GIB (1ULL << 32)

static int is_pow2(uint64_t x)
{
	return x && !(x & (x - 1));
}

/* *out = x rounded up to a multiple of a (a power of two); 0 on overflow. */
static int align_up(uint64_t x, uint64_t a, uint64_t *out)
{
	uint64_t rem = x & (a - 1);
	if (!rem) {
		*out = x;
		return 1;
	}
	uint64_t add = a - rem;
	if (x > UINT64_MAX - add)
		return 0;
	*out = x + add;
	return 1;
}

/* Owner ids: 1..63 bytes of printable ASCII, no spaces (they are written
 * space-separated to the guest's swiotlb_assign). */
static int owner_ok(const char *owner)
{
	if (!owner)
		return 0;
	size_t len = strnlen(owner, PVD_WIN_OWNER_MAX);
	if (len == 0 || len >= PVD_WIN_OWNER_MAX)
		return 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)owner[i];
		if (c < 0x21 || c > 0x7e)
			return 0;
	}
	return 1;
}

static int check_align(uint64_t a)
{
	return is_pow2(a) && a >= PVD_WIN_SLAB;
}

/* Index of owner's window, or -1.  Caller holds the lock. */
static long find_owner(const struct pvd_walloc *w, const char *owner)
{
	for (size_t i = 0; i < w->n; i++)
		if (strcmp(w->w[i].owner, owner) == 0)
			return (long)i;
	return -1;
}

/* Free extent i (0..n): [*start, *stop) between window i-1 and window i. */
static void gap(const struct pvd_walloc *w, size_t i, uint64_t *start, uint64_t *stop)
{
	*start = i == 0 ? w->base : w->w[i - 1].base + w->w[i - 1].size;
	*stop = i == w->n ? w->end : w->w[i].base;
}

/*
 * Place size bytes at an align-aligned address in [start, stop).  Returns 1
 * with *at set when it fits.  No overflow: stop <= 2^32, and align_up fails
 * cleanly when the aligned start would wrap.
 */
static int fit(uint64_t start, uint64_t stop, uint64_t size, uint64_t align, uint64_t *at)
{
	uint64_t b;
	if (!align_up(start, align, &b) || b >= stop)
		return 0;
	if (stop - b < size)
		return 0;
	*at = b;
	return 1;
}

/* Fill *st.  Caller holds the lock; align/granule already valid. */
static void stats_locked(const struct pvd_walloc *w, uint64_t align, uint64_t granule,
			 struct pvd_walloc_stats *st)
{
	st->base = w->base;
	st->size = w->end - w->base;
	st->free_bytes = st->size - w->used;
	st->largest_free = 0;
	st->largest_fit = 0;
	st->count = (uint32_t)w->n;
	for (size_t i = 0; i <= w->n; i++) {
		uint64_t start, stop, b;
		gap(w, i, &start, &stop);
		if (stop - start > st->largest_free)
			st->largest_free = stop - start;
		if (align_up(start, align, &b) && b < stop) {
			uint64_t usable = (stop - b) & ~(granule - 1);
			if (usable > st->largest_fit)
				st->largest_fit = usable;
		}
	}
}

struct pvd_walloc *pvd_walloc_new(uint64_t base, uint64_t size, int *err)
{
	*err = PVD_OK;
	if (size == 0 || base > UINT64_MAX - size || base + size > FOUR_GIB ||
	    (base & (PVD_WIN_PAGE - 1))) {
		*err = PVD_E_WIN_RANGE;
		return NULL;
	}
	struct pvd_walloc *w = calloc(1, sizeof(*w));
	if (!w) {
		*err = PVD_E_NOMEM;
		return NULL;
	}
	if (pthread_mutex_init(&w->lock, NULL)) {
		free(w);
		*err = PVD_E_NOMEM;
		return NULL;
	}
	w->base = base;
	w->end = base + size;
	return w;
}

void pvd_walloc_destroy(struct pvd_walloc *w)
{
	if (!w)
		return;
	pthread_mutex_destroy(&w->lock);
	free(w->w);
	free(w);
}

/* Make room for one more window.  Caller holds the lock. */
static int reserve(struct pvd_walloc *w)
{
	if (w->n < w->cap)
		return PVD_OK;
	size_t cap = w->cap ? w->cap * 2 : 8;
	if (cap < w->cap || cap > SIZE_MAX / sizeof(*w->w))
		return PVD_E_NOMEM;
	struct pvd_window *nw = realloc(w->w, cap * sizeof(*nw));
	if (!nw)
		return PVD_E_NOMEM;
	w->w = nw;
	w->cap = cap;
	return PVD_OK;
}

int pvd_walloc_alloc(struct pvd_walloc *w, const char *owner, uint64_t size, uint64_t align,
		     uint64_t granule, struct pvd_window *out, struct pvd_walloc_stats *st)
{
	if (!owner_ok(owner))
		return PVD_E_WIN_OWNER;
	if (!check_align(align) || !check_align(granule))
		return PVD_E_WIN_ALIGN;
	if (size == 0)
		return PVD_E_WIN_SIZE;
	if (align < PVD_WIN_PAGE)
		align = PVD_WIN_PAGE;
	/* A size that wraps when rounded up cannot fit either: treat it as the
	 * largest possible request rather than as a different error. */
	uint64_t rsize = 0;
	int huge = !align_up(size, granule, &rsize);

	int rc = PVD_OK;
	pthread_mutex_lock(&w->lock);
	if (find_owner(w, owner) >= 0) {
		rc = PVD_E_WIN_DUPLICATE;
		goto out;
	}
	if (huge || rsize > (w->end - w->base) - w->used) {
		rc = PVD_E_WIN_EXHAUSTED;
		goto fail_stats;
	}
	for (size_t i = 0; i <= w->n; i++) {
		uint64_t start, stop, at;
		gap(w, i, &start, &stop);
		if (!fit(start, stop, rsize, align, &at))
			continue;
		rc = reserve(w);
		if (rc)
			goto out;
		memmove(&w->w[i + 1], &w->w[i], (w->n - i) * sizeof(*w->w));
		struct pvd_window *nw = &w->w[i];
		memset(nw, 0, sizeof(*nw));
		nw->base = at;
		nw->size = rsize;
		memcpy(nw->owner, owner, strlen(owner) + 1);
		w->n++;
		w->used += rsize;
		if (out)
			*out = *nw;
		goto out;
	}
	rc = PVD_E_WIN_FRAGMENTED;
fail_stats:
	if (st)
		stats_locked(w, align, granule, st);
out:
	pthread_mutex_unlock(&w->lock);
	return rc;
}

int pvd_walloc_release(struct pvd_walloc *w, const char *owner, struct pvd_window *out)
{
	if (!owner_ok(owner))
		return PVD_E_WIN_OWNER;
	int rc = PVD_OK;
	pthread_mutex_lock(&w->lock);
	long i = find_owner(w, owner);
	if (i < 0) {
		rc = PVD_E_WIN_UNKNOWN;
	} else {
		if (out)
			*out = w->w[i];
		w->used -= w->w[i].size;
		memmove(&w->w[i], &w->w[i + 1], (w->n - (size_t)i - 1) * sizeof(*w->w));
		w->n--;
	}
	pthread_mutex_unlock(&w->lock);
	return rc;
}

int pvd_walloc_lookup(struct pvd_walloc *w, const char *owner, struct pvd_window *out)
{
	if (!owner_ok(owner))
		return PVD_E_WIN_OWNER;
	pthread_mutex_lock(&w->lock);
	long i = find_owner(w, owner);
	if (i >= 0 && out)
		*out = w->w[i];
	pthread_mutex_unlock(&w->lock);
	return i >= 0;
}

size_t pvd_walloc_list(struct pvd_walloc *w, struct pvd_window *out, size_t max)
{
	pthread_mutex_lock(&w->lock);
	size_t n = w->n;
	if (out && n && max) /* w->w is NULL while empty: memcpy must not see it */
		memcpy(out, w->w, (n < max ? n : max) * sizeof(*out));
	pthread_mutex_unlock(&w->lock);
	return n;
}

void pvd_walloc_stats(struct pvd_walloc *w, uint64_t align, uint64_t granule,
		      struct pvd_walloc_stats *st)
{
	if (!check_align(align) || align < PVD_WIN_PAGE)
		align = PVD_WIN_PAGE;
	if (!check_align(granule))
		granule = PVD_WIN_SLAB;
	pthread_mutex_lock(&w->lock);
	stats_locked(w, align, granule, st);
	pthread_mutex_unlock(&w->lock);
}

const char *pvd_walloc_strerror(int code)
{
	switch (code) {
	case PVD_E_WIN_RANGE:
		return "swiotlb range is empty, overflows, ends above 4 GiB or is not page aligned";
	case PVD_E_WIN_ALIGN: return "alignment is not a power of two of at least 2 KiB";
	case PVD_E_WIN_SIZE: return "window size is zero";
	case PVD_E_WIN_OWNER:
		return "owner id must be 1..63 bytes of printable ASCII without spaces";
	case PVD_E_WIN_DUPLICATE: return "owner already has a window";
	case PVD_E_WIN_EXHAUSTED: return "not enough free space in the swiotlb range";
	case PVD_E_WIN_FRAGMENTED: return "enough bytes free but no free extent fits the window";
	case PVD_E_WIN_UNKNOWN: return "owner has no window";
	default: return pvd_strerror(code);
	}
}
