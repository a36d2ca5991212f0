/*
 * Guest memory map: refcounted immutable snapshots of the vhost-user memory
 * table, optionally restricted to a swiotlb window (only the window's part
 * of each region is ever mmapped).  See internal.h for the locking design.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* ---------------------------------------------------------------- mappings */

static void mapping_put(struct pvd_mapping *m)
{
	if (!m)
		return;
	if (atomic_fetch_sub_explicit(&m->ref, 1, memory_order_acq_rel) == 1) {
		munmap(m->addr, m->len);
		free(m);
	}
}

static uint64_t page_size(void)
{
	long p = sysconf(_SC_PAGESIZE);
	return p > 0 ? (uint64_t)p : 4096;
}

/*
 * mmap the part of region r that lies inside [first, last] (already
 * intersected with the window) and fill the mapping fields of e.
 * The file offset is aligned down to the fd's block size (the huge page size
 * on hugetlbfs, the page size otherwise).
 */
static int map_entry(int fd, struct pvd_entry *e, uint64_t first, uint64_t last, int *err)
{
	uint64_t align = page_size();
	struct stat st;

	if (fstat(fd, &st) == 0 && st.st_blksize > 0 &&
	    ((uint64_t)st.st_blksize & ((uint64_t)st.st_blksize - 1)) == 0 &&
	    (uint64_t)st.st_blksize > align && (uint64_t)st.st_blksize <= (1ULL << 30))
		align = (uint64_t)st.st_blksize;

	uint64_t file_off = e->mmap_offset + (first - e->gpa); /* no overflow: validated */
	uint64_t aligned = file_off & ~(align - 1);
	uint64_t slack = file_off - aligned;
	uint64_t span = last - first + 1;
	if (span > UINT64_MAX - slack - align) {
		*err = EOVERFLOW;
		return PVD_E_MMAP;
	}
	uint64_t len = (slack + span + align - 1) & ~(align - 1);
	if (len > SIZE_MAX || aligned > (uint64_t)INT64_MAX) {
		*err = EOVERFLOW;
		return PVD_E_MMAP;
	}
	struct pvd_mapping *m = malloc(sizeof(*m));
	if (!m)
		return PVD_E_NOMEM;
	void *p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)aligned);
	if (p == MAP_FAILED) {
		*err = errno;
		free(m);
		return PVD_E_MMAP;
	}
	atomic_init(&m->ref, 1);
	m->addr = p;
	m->len = (size_t)len;
	e->m = m;
	e->mapped = 1;
	e->map_first = first;
	e->map_last = last;
	e->host = (uint8_t *)p + slack;
	return PVD_OK;
}

/* ------------------------------------------------------------------ tables */

static struct pvd_table *table_alloc(const struct pvd_mem *mem, uint32_t n)
{
	struct pvd_table *t = calloc(1, sizeof(*t) + (size_t)n * sizeof(struct pvd_entry));
	if (!t)
		return NULL;
	atomic_init(&t->ref, 1);
	t->has_window = mem->has_window;
	t->win_first = mem->win_first;
	t->win_last = mem->win_last;
	return t;
}

void pvd_table_get(struct pvd_table *t)
{
	atomic_fetch_add_explicit(&t->ref, 1, memory_order_relaxed);
}

void pvd_table_put(struct pvd_table *t)
{
	if (!t)
		return;
	/* acq_rel: all accesses through this snapshot happen-before the unmap. */
	if (atomic_fetch_sub_explicit(&t->ref, 1, memory_order_acq_rel) == 1) {
		for (uint32_t i = 0; i < t->n; i++)
			mapping_put(t->e[i].m);
		free(t);
	}
}

struct pvd_table *pvd_table_acquire(struct pvd_mem *mem)
{
	pthread_mutex_lock(&mem->swap);
	struct pvd_table *t = mem->cur;
	pvd_table_get(t);
	pthread_mutex_unlock(&mem->swap);
	return t;
}

/* Caller holds ctl.  Takes ownership of t's initial reference. */
static void publish(struct pvd_mem *mem, struct pvd_table *t)
{
	uint64_t sz = page_size();
	t->mapped_bytes = 0;
	for (uint32_t i = 0; i < t->n; i++)
		if (t->e[i].mapped)
			t->mapped_bytes += (t->e[i].m->len + sz - 1) / sz * sz;
	t->gen = ++mem->next_gen;
	pthread_mutex_lock(&mem->swap);
	struct pvd_table *old = mem->cur;
	mem->cur = t;
	atomic_store_explicit(&mem->cur_gen, t->gen, memory_order_release);
	pthread_mutex_unlock(&mem->swap);
	pvd_table_put(old);
}

static int find_entry(const struct pvd_table *t, uint64_t gpa)
{
	uint32_t lo = 0, hi = t->n;
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		const struct pvd_entry *e = &t->e[mid];
		if (gpa < e->gpa)
			hi = mid;
		else if (gpa > e->last)
			lo = mid + 1;
		else
			return (int)mid;
	}
	return -1;
}

int pvd_table_translate(const struct pvd_table *t, uint64_t gpa, uint64_t len,
			uint8_t **host, uint64_t *chunk)
{
	if (len == 0)
		return PVD_E_INVAL;
	uint64_t last = gpa + len - 1;
	if (last < gpa)
		return PVD_E_OUTSIDE_MEMORY; /* wraps around 2^64 */
	if (t->has_window && (gpa < t->win_first || last > t->win_last))
		return PVD_E_OUTSIDE_WINDOW;
	int i = find_entry(t, gpa);
	if (i < 0)
		return PVD_E_OUTSIDE_MEMORY;
	const struct pvd_entry *e = &t->e[i];
	/* With a window the range is inside it, hence inside map_first..map_last
	 * as far as this region goes; without one the whole region is mapped. */
	if (!e->mapped || gpa < e->map_first || gpa > e->map_last)
		return PVD_E_OUTSIDE_WINDOW;
	uint64_t room = e->map_last - gpa + 1; /* >= 1 */
	*host = e->host + (gpa - e->map_first);
	*chunk = len < room ? len : room;
	return PVD_OK;
}

int pvd_table_translate_contig(const struct pvd_table *t, uint64_t gpa, uint64_t len,
			       uint8_t **host, int *split)
{
	uint64_t chunk;
	*split = 0;
	int rc = pvd_table_translate(t, gpa, len, host, &chunk);
	if (rc)
		return rc;
	if (chunk != len) {
		/* Report why: the rest may be unmapped or just another region. */
		uint8_t *h2;
		uint64_t c2;
		rc = pvd_table_translate(t, gpa + chunk, len - chunk, &h2, &c2);
		if (rc)
			return rc;
		*split = 1;
		return PVD_E_OUTSIDE_MEMORY;
	}
	return PVD_OK;
}

/* --------------------------------------------------------------- validation */

static int validate(const struct pvd_region_info *r)
{
	if (r->size == 0)
		return PVD_E_REGION_SIZE;
	if (r->gpa + (r->size - 1) < r->gpa || r->uaddr + (r->size - 1) < r->uaddr ||
	    r->mmap_offset + (r->size - 1) < r->mmap_offset ||
	    r->mmap_offset + (r->size - 1) > (uint64_t)INT64_MAX)
		return PVD_E_REGION_OVERFLOW;
	return PVD_OK;
}

static int overlaps(const struct pvd_entry *a, const struct pvd_region_info *r)
{
	uint64_t rlast = r->gpa + r->size - 1;
	return !(rlast < a->gpa || r->gpa > a->last);
}

/* Fill e from r and map it (respecting the window). */
static int make_entry(const struct pvd_mem *mem, int fd, const struct pvd_region_info *r,
		      struct pvd_entry *e, int *err)
{
	memset(e, 0, sizeof(*e));
	e->gpa = r->gpa;
	e->size = r->size;
	e->uaddr = r->uaddr;
	e->mmap_offset = r->mmap_offset;
	e->last = r->gpa + r->size - 1;
	uint64_t first = e->gpa, last = e->last;
	if (mem->has_window) {
		if (mem->win_first > first)
			first = mem->win_first;
		if (mem->win_last < last)
			last = mem->win_last;
		if (first > last)
			return PVD_OK; /* no part inside the window: nothing mapped */
	}
	return map_entry(fd, e, first, last, err);
}

static int cmp_entry(const void *a, const void *b)
{
	const struct pvd_entry *x = a, *y = b;
	return x->gpa < y->gpa ? -1 : x->gpa > y->gpa;
}

/* --------------------------------------------------------------- public API */

struct pvd_mem *pvd_mem_new(int has_window, uint64_t win_base, uint64_t win_size)
{
	if (has_window && (win_size == 0 || win_base + (win_size - 1) < win_base))
		return NULL;
	struct pvd_mem *mem = calloc(1, sizeof(*mem));
	if (!mem)
		return NULL;
	mem->has_window = !!has_window;
	if (has_window) {
		mem->win_first = win_base;
		mem->win_last = win_base + (win_size - 1);
	}
	pthread_mutex_init(&mem->ctl, NULL);
	pthread_mutex_init(&mem->swap, NULL);
	mem->cur = table_alloc(mem, 0);
	if (!mem->cur) {
		free(mem);
		return NULL;
	}
	mem->cur->gen = ++mem->next_gen;
	atomic_init(&mem->cur_gen, mem->cur->gen);
	return mem;
}

void pvd_mem_free(struct pvd_mem *mem)
{
	if (!mem)
		return;
	/* Queues and chains hold their own table references. */
	pvd_table_put(mem->cur);
	pthread_mutex_destroy(&mem->ctl);
	pthread_mutex_destroy(&mem->swap);
	free(mem);
}

/* Copy of cur with room for `extra` more entries; mapping refs taken. */
static struct pvd_table *clone_cur(struct pvd_mem *mem, uint32_t extra)
{
	struct pvd_table *cur = mem->cur; /* stable: only ctl holders swap it */
	struct pvd_table *t = table_alloc(mem, cur->n + extra);
	if (!t)
		return NULL;
	for (uint32_t i = 0; i < cur->n; i++) {
		t->e[i] = cur->e[i];
		if (t->e[i].m)
			atomic_fetch_add_explicit(&t->e[i].m->ref, 1, memory_order_relaxed);
	}
	t->n = cur->n;
	return t;
}

int pvd_mem_add(struct pvd_mem *mem, int fd, const struct pvd_region_info *r, int *err)
{
	int rc = validate(r);
	if (rc)
		return rc;
	pthread_mutex_lock(&mem->ctl);
	struct pvd_table *cur = mem->cur;
	if (cur->n >= PVD_MAX_REGIONS) {
		rc = PVD_E_TOO_MANY_REGIONS;
		goto out;
	}
	for (uint32_t i = 0; i < cur->n; i++)
		if (overlaps(&cur->e[i], r)) {
			rc = PVD_E_REGION_OVERLAP;
			goto out;
		}
	struct pvd_entry e;
	rc = make_entry(mem, fd, r, &e, err);
	if (rc)
		goto out;
	struct pvd_table *t = clone_cur(mem, 1);
	if (!t) {
		mapping_put(e.m);
		rc = PVD_E_NOMEM;
		goto out;
	}
	t->e[t->n++] = e;
	qsort(t->e, t->n, sizeof(t->e[0]), cmp_entry);
	publish(mem, t);
out:
	pthread_mutex_unlock(&mem->ctl);
	return rc;
}

int pvd_mem_remove(struct pvd_mem *mem, const struct pvd_region_info *r)
{
	int rc = PVD_E_NOT_FOUND;
	pthread_mutex_lock(&mem->ctl);
	struct pvd_table *cur = mem->cur;
	for (uint32_t i = 0; i < cur->n; i++) {
		const struct pvd_entry *e = &cur->e[i];
		if (e->gpa != r->gpa || e->size != r->size || e->uaddr != r->uaddr)
			continue;
		struct pvd_table *t = table_alloc(mem, cur->n - 1);
		if (!t) {
			rc = PVD_E_NOMEM;
			break;
		}
		for (uint32_t j = 0; j < cur->n; j++) {
			if (j == i)
				continue;
			t->e[t->n] = cur->e[j];
			if (t->e[t->n].m)
				atomic_fetch_add_explicit(&t->e[t->n].m->ref, 1, memory_order_relaxed);
			t->n++;
		}
		/* The removed mapping is unmapped once no snapshot references it. */
		publish(mem, t);
		rc = PVD_OK;
		break;
	}
	pthread_mutex_unlock(&mem->ctl);
	return rc;
}

int pvd_mem_replace(struct pvd_mem *mem, size_t n, const int *fds,
		    const struct pvd_region_info *rs, int *err)
{
	if (n > PVD_MAX_REGIONS)
		return PVD_E_TOO_MANY_REGIONS;
	for (size_t i = 0; i < n; i++) {
		int rc = validate(&rs[i]);
		if (rc)
			return rc;
	}
	struct pvd_table *t = table_alloc(mem, (uint32_t)n);
	if (!t)
		return PVD_E_NOMEM;
	int rc = PVD_OK;
	for (size_t i = 0; i < n; i++) {
		for (uint32_t j = 0; j < t->n; j++)
			if (overlaps(&t->e[j], &rs[i])) {
				rc = PVD_E_REGION_OVERLAP;
				goto fail;
			}
		rc = make_entry(mem, fds[i], &rs[i], &t->e[t->n], err);
		if (rc)
			goto fail;
		t->n++;
	}
	qsort(t->e, t->n, sizeof(t->e[0]), cmp_entry);
	pthread_mutex_lock(&mem->ctl);
	publish(mem, t);
	pthread_mutex_unlock(&mem->ctl);
	return PVD_OK;
fail:
	pvd_table_put(t); /* unmaps what was mapped so far; the old table is untouched */
	return rc;
}

int pvd_mem_clear(struct pvd_mem *mem)
{
	struct pvd_table *t = table_alloc(mem, 0);
	if (!t)
		return PVD_E_NOMEM;
	pthread_mutex_lock(&mem->ctl);
	publish(mem, t);
	pthread_mutex_unlock(&mem->ctl);
	return PVD_OK;
}

size_t pvd_mem_regions(struct pvd_mem *mem, struct pvd_region_info *out, size_t max)
{
	struct pvd_table *t = pvd_table_acquire(mem);
	size_t n = t->n;
	for (size_t i = 0; i < n && i < max; i++) {
		out[i].gpa = t->e[i].gpa;
		out[i].size = t->e[i].size;
		out[i].uaddr = t->e[i].uaddr;
		out[i].mmap_offset = t->e[i].mmap_offset;
	}
	pvd_table_put(t);
	return n;
}

uint64_t pvd_mem_mapped_bytes(struct pvd_mem *mem)
{
	struct pvd_table *t = pvd_table_acquire(mem);
	uint64_t b = t->mapped_bytes;
	pvd_table_put(t);
	return b;
}

int pvd_mem_uaddr_to_gpa(struct pvd_mem *mem, uint64_t uaddr, uint64_t len, uint64_t *gpa)
{
	if (len == 0)
		len = 1;
	uint64_t last = uaddr + len - 1;
	if (last < uaddr)
		return PVD_E_OUTSIDE_MEMORY;
	int rc = PVD_E_OUTSIDE_MEMORY;
	struct pvd_table *t = pvd_table_acquire(mem);
	for (uint32_t i = 0; i < t->n; i++) {
		const struct pvd_entry *e = &t->e[i];
		if (uaddr >= e->uaddr && last <= e->uaddr + (e->size - 1)) {
			*gpa = e->gpa + (uaddr - e->uaddr);
			rc = PVD_OK;
			break;
		}
	}
	pvd_table_put(t);
	return rc;
}

static int mem_copy(struct pvd_mem *mem, uint64_t gpa, void *buf, size_t len, int to_guest)
{
	if (len == 0)
		return PVD_OK;
	struct pvd_table *t = pvd_table_acquire(mem);
	/* Validate the whole range first so a failed write changes nothing. */
	uint64_t g = gpa, left = len;
	int rc = PVD_OK;
	while (left) {
		uint8_t *h;
		uint64_t chunk;
		rc = pvd_table_translate(t, g, left, &h, &chunk);
		if (rc)
			goto out;
		g += chunk;
		left -= chunk;
	}
	g = gpa;
	left = len;
	uint8_t *b = buf;
	while (left) {
		uint8_t *h;
		uint64_t chunk;
		pvd_table_translate(t, g, left, &h, &chunk);
		if (to_guest)
			memcpy(h, b, chunk);
		else
			memcpy(b, h, chunk);
		b += chunk;
		g += chunk;
		left -= chunk;
	}
out:
	pvd_table_put(t);
	return rc;
}

int pvd_mem_read(struct pvd_mem *mem, uint64_t gpa, void *buf, size_t len)
{
	return mem_copy(mem, gpa, buf, len, 0);
}

int pvd_mem_write(struct pvd_mem *mem, uint64_t gpa, const void *buf, size_t len)
{
	return mem_copy(mem, gpa, (void *)buf, len, 1);
}
