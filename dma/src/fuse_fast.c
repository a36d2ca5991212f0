/*
 * The FUSE fast path: the commonest requests served start to finish in C,
 * on the queue thread, without the GIL.
 *
 * Ownership.  Python (daemon/passthrough) is the one owner of the inode and
 * handle tables and of every opcode's meaning.  This file sees a *mirror*
 * that Python publishes into (pvd_fs_publish / pvd_fs_retire):
 *
 *   inodes:  nodeid -> the inode's O_PATH fd
 *   handles: fh     -> the open fd, and whether it is a file or a directory
 *
 * Publishing hands the mirror the duty to close that fd: Python retires an
 * entry where it would otherwise close the fd (when its own last borrow is
 * gone), and the mirror closes it once no fast-path request still uses it.
 * So an fd number is never closed under a C user and never reused while a
 * request may still act on it.  Node IDs and fhs are never reused either.
 *
 * What is served here is exactly what the Python handlers would answer for
 * the same request (daemon/fuse/session.py + passthrough/filesystem.py):
 * GETATTR, READ and WRITE in their ordinary forms, LOOKUP and READDIRPLUS
 * of inodes Python already holds, UNLINK and RMDIR.  Anything else -- an
 * unknown id, a wrong handle kind, a malformed or unusual request, the
 * session not initialised, a read-only share for WRITE, a kill-suid write
 * as root -- goes to Python untouched (return 0), which answers it and logs
 * what deserves a log line.  Host errors of the system call itself (EIO,
 * ENOSPC, ...) are answered here with -errno, as Python would.
 *
 * Nothing here allocates per request: a request is a view of the queue's
 * iovec buffer, replies are built on the stack, and the mirror lookup takes
 * a shard mutex and a reference count.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

/* include/uapi/linux/fuse.h */
#define FUSE_LOOKUP 1
#define FUSE_GETATTR 3
#define FUSE_UNLINK 10
#define FUSE_RMDIR 11
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_READDIR 28
#define FUSE_READDIRPLUS 44
#define FUSE_GETATTR_FH (1u << 0)
#define FUSE_WRITE_KILL_SUIDGID (1u << 2)
#define IN_HEADER_SIZE 40
#define OUT_HEADER_SIZE 16
#define GETATTR_IN_SIZE 16
#define READ_IN_SIZE 40
#define WRITE_IN_SIZE 40
#define ATTR_OUT_SIZE 104
#define ENTRY_OUT_SIZE 128
#define FUSE_ATTR_SUBMOUNT (1u << 0)
#define NAME_MAX_LEN 255
#define WRITE_OUT_SIZE 8
/* session.py MAX_BODY: larger bodies are refused by Python (with a log line) */
#define MAX_BODY ((1u << 16) + 2 * 4096 + 256)
#define OFFSET_MAX INT64_MAX
#define ROOT_NODEID 1
/* fuse_dirent: ino, off, namelen, type, then the name, padded to 8 */
#define DIRENT_NAME_OFFSET 24
/* linux_dirent64: d_ino, d_off, d_reclen, d_type, then d_name */
#define DIRENT64_NAME_OFFSET 19
/* getdents64 buffer of the READDIRPLUS fast path: 128 entries of short
 * names; a page that needs more reads again from where it stopped */
#define DIRENTS_BUF 4096

#define SHARDS 16

struct entry {
	uint64_t key;
	int fd;
	uint32_t kind;
	uint32_t refs; /* fast-path users right now */
	int dead;      /* retired: unlinked from the map, closed at refs == 0 */
	int hidden;    /* inode settled to zero lookups: no new users, awaiting retire */
	uint64_t dev, ino;  /* inodes: the host inode, for LOOKUP */
	uint64_t credits;   /* inodes: lookups answered in place, not yet settled */
	struct entry *next;
};

/* (st_dev, st_ino) -> nodeid, for LOOKUP hits; inodes only. */
struct ident {
	uint64_t dev, ino, nodeid;
	struct ident *next;
};

struct ishard {
	pthread_mutex_t lock;
	struct ident **buckets;
	uint32_t nbuckets, count;
};

struct shard {
	pthread_mutex_t lock;
	struct entry **buckets;
	uint32_t nbuckets; /* power of two */
	uint32_t count;
};

struct pvd_fs {
	struct shard tables[2][SHARDS];
	struct ishard idents[SHARDS];
	atomic_int ready;
	/* settings (pvd_fs_configure); written before ready is set */
	uint64_t attr_valid, entry_valid;
	uint32_t attr_valid_nsec, entry_valid_nsec;
	int readonly;
	int switch_creds;
	int announce_submounts;
	int python_writes;
	/* statistics */
	/* GETATTR, READ, WRITE, LOOKUP, READDIRPLUS, UNLINK+RMDIR, READDIR */
	atomic_uint_fast64_t served[7];
	atomic_int busy, busy_max;
};

/* ---------------------------------------------------------------- mirror */

static uint64_t mix(uint64_t k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	return k;
}

static struct shard *shard_of(struct pvd_fs *fs, int table, uint64_t key)
{
	return &fs->tables[table][key & (SHARDS - 1)];
}

static struct entry **slot(struct shard *s, uint64_t key)
{
	return &s->buckets[mix(key >> 4) & (s->nbuckets - 1)];
}

struct pvd_fs *pvd_fs_new(void)
{
	struct pvd_fs *fs = calloc(1, sizeof(*fs));
	if (!fs)
		return NULL;
	for (int i = 0; i < SHARDS; i++) {
		struct ishard *s = &fs->idents[i];
		pthread_mutex_init(&s->lock, NULL);
		s->nbuckets = 16;
		s->buckets = calloc(s->nbuckets, sizeof(*s->buckets));
		if (!s->buckets) {
			pvd_fs_free(fs);
			return NULL;
		}
	}
	for (int t = 0; t < 2; t++) {
		for (int i = 0; i < SHARDS; i++) {
			struct shard *s = &fs->tables[t][i];
			pthread_mutex_init(&s->lock, NULL);
			s->nbuckets = 16;
			s->buckets = calloc(s->nbuckets, sizeof(*s->buckets));
			if (!s->buckets) {
				pvd_fs_free(fs);
				return NULL;
			}
		}
	}
	return fs;
}

void pvd_fs_free(struct pvd_fs *fs)
{
	if (!fs)
		return;
	for (int t = 0; t < 2; t++) {
		for (int i = 0; i < SHARDS; i++) {
			struct shard *s = &fs->tables[t][i];
			for (uint32_t b = 0; s->buckets && b < s->nbuckets; b++) {
				struct entry *e = s->buckets[b];
				while (e) {
					struct entry *n = e->next;
					close(e->fd); /* the mirror owns published fds */
					free(e);
					e = n;
				}
			}
			free(s->buckets);
			pthread_mutex_destroy(&s->lock);
		}
	}
	for (int i = 0; i < SHARDS; i++) {
		struct ishard *s = &fs->idents[i];
		for (uint32_t b = 0; s->buckets && b < s->nbuckets; b++) {
			struct ident *x = s->buckets[b];
			while (x) {
				struct ident *n = x->next;
				free(x);
				x = n;
			}
		}
		free(s->buckets);
		pthread_mutex_destroy(&s->lock);
	}
	free(fs);
}

void pvd_fs_configure(struct pvd_fs *fs, const struct pvd_fs_settings *st)
{
	fs->attr_valid = st->attr_valid;
	fs->attr_valid_nsec = st->attr_valid_nsec;
	fs->entry_valid = st->entry_valid;
	fs->entry_valid_nsec = st->entry_valid_nsec;
	fs->readonly = !!st->readonly;
	fs->switch_creds = !!st->switch_creds;
	fs->announce_submounts = !!st->announce_submounts;
	fs->python_writes = !!st->python_writes;
}

void pvd_fs_set_ready(struct pvd_fs *fs, int ready)
{
	/* Release: the settings above are visible to a queue thread that sees ready. */
	atomic_store_explicit(&fs->ready, !!ready, memory_order_release);
}

/* Lock held.  Double the buckets when the chains get long; failure is harmless. */
static void maybe_grow(struct shard *s)
{
	if (s->count < 2 * s->nbuckets)
		return;
	uint32_t n = s->nbuckets * 2;
	struct entry **nb = calloc(n, sizeof(*nb));
	if (!nb)
		return;
	for (uint32_t b = 0; b < s->nbuckets; b++) {
		struct entry *e = s->buckets[b];
		while (e) {
			struct entry *next = e->next;
			struct entry **h = &nb[mix(e->key >> 4) & (n - 1)];
			e->next = *h;
			*h = e;
			e = next;
		}
	}
	free(s->buckets);
	s->buckets = nb;
	s->nbuckets = n;
}

static uint64_t ident_hash(uint64_t dev, uint64_t ino)
{
	return mix(ino ^ (dev * 0x9e3779b97f4a7c15ULL));
}

static struct ishard *ishard_of(struct pvd_fs *fs, uint64_t dev, uint64_t ino)
{
	return &fs->idents[ident_hash(dev, ino) & (SHARDS - 1)];
}

static struct ident **islot(struct ishard *s, uint64_t dev, uint64_t ino)
{
	return &s->buckets[(ident_hash(dev, ino) >> 8) & (s->nbuckets - 1)];
}

/* Lock held.  As maybe_grow, for the ident index. */
static void maybe_grow_idents(struct ishard *s)
{
	if (s->count < 2 * s->nbuckets)
		return;
	uint32_t n = s->nbuckets * 2;
	struct ident **nb = calloc(n, sizeof(*nb));
	if (!nb)
		return;
	for (uint32_t b = 0; b < s->nbuckets; b++) {
		struct ident *x = s->buckets[b];
		while (x) {
			struct ident *next = x->next;
			struct ident **h = &nb[(ident_hash(x->dev, x->ino) >> 8) & (n - 1)];
			x->next = *h;
			*h = x;
			x = next;
		}
	}
	free(s->buckets);
	s->buckets = nb;
	s->nbuckets = n;
}

static void ident_remove(struct pvd_fs *fs, uint64_t dev, uint64_t ino, uint64_t nodeid)
{
	struct ishard *s = ishard_of(fs, dev, ino);
	pthread_mutex_lock(&s->lock);
	for (struct ident **p = islot(s, dev, ino); *p; p = &(*p)->next) {
		struct ident *x = *p;
		if (x->dev == dev && x->ino == ino && x->nodeid == nodeid) {
			*p = x->next;
			s->count--;
			free(x);
			break;
		}
	}
	pthread_mutex_unlock(&s->lock);
}

/* The nodeid published for (dev, ino), or 0. */
static uint64_t ident_find(struct pvd_fs *fs, uint64_t dev, uint64_t ino)
{
	struct ishard *s = ishard_of(fs, dev, ino);
	uint64_t nodeid = 0;
	pthread_mutex_lock(&s->lock);
	for (struct ident *x = *islot(s, dev, ino); x; x = x->next) {
		if (x->dev == dev && x->ino == ino) {
			nodeid = x->nodeid;
			break;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return nodeid;
}

static int publish(struct pvd_fs *fs, int table, uint64_t key, int fd, uint32_t kind,
		   uint64_t dev, uint64_t ino)
{
	if (table < 0 || table > 1 || fd < 0)
		return PVD_E_INVAL;
	struct shard *s = shard_of(fs, table, key);
	struct entry *e = malloc(sizeof(*e));
	struct ident *x = table == PVD_FS_INODES ? malloc(sizeof(*x)) : NULL;
	if (!e || (table == PVD_FS_INODES && !x)) {
		free(e);
		free(x);
		return PVD_E_NOMEM;
	}
	*e = (struct entry){ .key = key, .fd = fd, .kind = kind, .dev = dev, .ino = ino };
	pthread_mutex_lock(&s->lock);
	for (struct entry *y = *slot(s, key); y; y = y->next) {
		if (y->key == key) {
			pthread_mutex_unlock(&s->lock);
			free(e);
			free(x);
			return PVD_E_INVAL; /* ids are never reused: a duplicate is our bug */
		}
	}
	maybe_grow(s);
	struct entry **h = slot(s, key);
	e->next = *h;
	*h = e;
	s->count++;
	pthread_mutex_unlock(&s->lock);
	if (x) {
		/* After the entry: a LOOKUP that finds the ident finds the entry too. */
		struct ishard *is = ishard_of(fs, dev, ino);
		*x = (struct ident){ .dev = dev, .ino = ino, .nodeid = key };
		pthread_mutex_lock(&is->lock);
		maybe_grow_idents(is);
		struct ident **ih = islot(is, dev, ino);
		x->next = *ih;
		*ih = x;
		is->count++;
		pthread_mutex_unlock(&is->lock);
	}
	return PVD_OK;
}

int pvd_fs_publish_inode(struct pvd_fs *fs, uint64_t nodeid, int fd, uint64_t dev, uint64_t ino)
{
	return publish(fs, PVD_FS_INODES, nodeid, fd, PVD_KIND_INODE, dev, ino);
}

int pvd_fs_publish_handle(struct pvd_fs *fs, uint64_t fh, int fd, uint32_t kind)
{
	if (kind != PVD_KIND_FILE && kind != PVD_KIND_DIR)
		return PVD_E_INVAL;
	return publish(fs, PVD_FS_HANDLES, fh, fd, kind, 0, 0);
}

int pvd_fs_settle(struct pvd_fs *fs, uint64_t nodeid, uint64_t count, uint64_t forget,
		  int keep, uint64_t *total)
{
	struct shard *s = shard_of(fs, PVD_FS_INODES, nodeid);
	int found = 0, unlink_ident = 0;
	uint64_t dev = 0, ino = 0;
	pthread_mutex_lock(&s->lock);
	struct entry *e = *slot(s, nodeid);
	while (e && e->key != nodeid)
		e = e->next;
	if (e && !e->hidden) {
		uint64_t have = count + e->credits;
		*total = have > forget ? have - forget : 0;
		e->credits = 0;
		if (*total == 0 && !keep) {
			/* No lookup can credit it any more: it dies with Python's entry. */
			e->hidden = 1;
			unlink_ident = 1;
			dev = e->dev;
			ino = e->ino;
		}
		found = 1;
	}
	pthread_mutex_unlock(&s->lock);
	if (unlink_ident)
		ident_remove(fs, dev, ino, nodeid);
	return found;
}

uint64_t pvd_fs_credits(struct pvd_fs *fs, uint64_t nodeid)
{
	struct shard *s = shard_of(fs, PVD_FS_INODES, nodeid);
	uint64_t n = 0;
	pthread_mutex_lock(&s->lock);
	for (struct entry *e = *slot(s, nodeid); e; e = e->next)
		if (e->key == nodeid)
			n = e->credits;
	pthread_mutex_unlock(&s->lock);
	return n;
}

static int retire(struct pvd_fs *fs, int table, uint64_t key, uint64_t *credits)
{
	struct shard *s = shard_of(fs, table, key);
	int close_fd = -1;
	pthread_mutex_lock(&s->lock);
	struct entry **p = slot(s, key);
	while (*p && (*p)->key != key)
		p = &(*p)->next;
	struct entry *e = *p;
	if (!e) {
		pthread_mutex_unlock(&s->lock);
		return PVD_E_NOT_FOUND;
	}
	*p = e->next;
	s->count--;
	if (credits)
		*credits = e->hidden ? 0 : e->credits; /* under the lock: none can be added after */
	int unlink_ident = table == PVD_FS_INODES && !e->hidden;
	uint64_t dev = e->dev, ino = e->ino;
	if (e->refs == 0) {
		close_fd = e->fd;
		free(e);
	} else {
		e->dead = 1; /* the last fast-path user closes it (entry_put) */
	}
	pthread_mutex_unlock(&s->lock);
	if (unlink_ident)
		ident_remove(fs, dev, ino, key);
	if (close_fd >= 0)
		close(close_fd);
	return PVD_OK;
}

int pvd_fs_retire(struct pvd_fs *fs, int table, uint64_t key)
{
	if (table < 0 || table > 1)
		return PVD_E_INVAL;
	return retire(fs, table, key, NULL);
}

int pvd_fs_evict_inode(struct pvd_fs *fs, uint64_t nodeid, uint64_t *credits)
{
	*credits = 0;
	return retire(fs, PVD_FS_INODES, nodeid, credits);
}

uint64_t pvd_fs_count(struct pvd_fs *fs, int table)
{
	uint64_t n = 0;
	if (table < 0 || table > 1)
		return 0;
	for (int i = 0; i < SHARDS; i++) {
		struct shard *s = &fs->tables[table][i];
		pthread_mutex_lock(&s->lock);
		n += s->count;
		pthread_mutex_unlock(&s->lock);
	}
	return n;
}

void pvd_fs_stats(struct pvd_fs *fs, struct pvd_fs_stats *out)
{
	out->inodes = pvd_fs_count(fs, PVD_FS_INODES);
	out->handles = pvd_fs_count(fs, PVD_FS_HANDLES);
	out->getattr = atomic_load(&fs->served[0]);
	out->read = atomic_load(&fs->served[1]);
	out->write = atomic_load(&fs->served[2]);
	out->lookup = atomic_load(&fs->served[3]);
	out->readdirplus = atomic_load(&fs->served[4]);
	out->unlink = atomic_load(&fs->served[5]);
	out->readdir = atomic_load(&fs->served[6]);
	out->busy_now = (uint32_t)atomic_load(&fs->busy);
	out->busy_max = (uint32_t)atomic_load(&fs->busy_max);
}

void pvd_fs_reset_busy_max(struct pvd_fs *fs)
{
	atomic_store(&fs->busy_max, atomic_load(&fs->busy));
}

void pvd_fs_busy_enter(struct pvd_fs *fs)
{
	int now = atomic_fetch_add(&fs->busy, 1) + 1;
	int max = atomic_load(&fs->busy_max);
	while (now > max && !atomic_compare_exchange_weak(&fs->busy_max, &max, now))
		;
}

void pvd_fs_busy_leave(struct pvd_fs *fs)
{
	atomic_fetch_sub(&fs->busy, 1);
}

/* A live entry with a reference taken, or NULL. */
static struct entry *entry_get(struct pvd_fs *fs, int table, uint64_t key)
{
	struct shard *s = shard_of(fs, table, key);
	pthread_mutex_lock(&s->lock);
	struct entry *e = *slot(s, key);
	while (e && e->key != key)
		e = e->next;
	if (e && e->hidden)
		e = NULL;
	if (e)
		e->refs++;
	pthread_mutex_unlock(&s->lock);
	return e;
}

static void entry_put(struct pvd_fs *fs, int table, struct entry *e)
{
	struct shard *s = shard_of(fs, table, e->key);
	int close_fd = -1;
	pthread_mutex_lock(&s->lock);
	if (--e->refs == 0 && e->dead) {
		close_fd = e->fd;
		free(e);
	}
	pthread_mutex_unlock(&s->lock);
	if (close_fd >= 0)
		close(close_fd);
}

/* --------------------------------------------------------------- requests */

struct in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t total_extlen, padding;
};

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static void read_part(const struct pvd_req *r, uint64_t off, void *buf, uint64_t len)
{
	pvd_iov_copy(r->iov, r->nr, off, buf, len, 0);
}

static void write_reply(const struct pvd_req *r, uint64_t off, const void *buf, uint64_t len)
{
	pvd_iov_copy(r->iov + r->nr, r->nw, off, (uint8_t *)buf, len, 1);
}

/* fuse_out_header at offset 0 of the writable part; returns the used length. */
static uint32_t reply_header(const struct pvd_req *r, uint64_t unique, int32_t error,
			     uint32_t payload)
{
	uint8_t h[OUT_HEADER_SIZE];
	uint32_t total = OUT_HEADER_SIZE + payload;
	put32(h, total);
	memcpy(h + 4, &error, 4);
	put64(h + 8, unique);
	write_reply(r, 0, h, sizeof(h));
	return total;
}

static uint32_t reply_errno(const struct pvd_req *r, uint64_t unique, int err)
{
	return reply_header(r, unique, -(err ? err : EIO), 0);
}

/* passthrough/filesystem.py encode_dev: host dev_t -> new_encode_dev. */
static uint32_t encode_dev(dev_t d)
{
	uint32_t ma = major(d), mi = minor(d);
	return (mi & 0xff) | ((ma & 0xfff) << 8) | ((mi & ~0xffu) << 12);
}

static uint32_t clamp32(uint64_t v) { return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v; }

/* fuse_attr (88 bytes), as stat_to_attr() builds it. */
static void encode_attr(uint8_t *a, const struct stat *st)
{
	put64(a + 0, st->st_ino);
	put64(a + 8, (uint64_t)st->st_size);
	put64(a + 16, (uint64_t)st->st_blocks);
	put64(a + 24, (uint64_t)st->st_atim.tv_sec);
	put64(a + 32, (uint64_t)st->st_mtim.tv_sec);
	put64(a + 40, (uint64_t)st->st_ctim.tv_sec);
	put32(a + 48, (uint32_t)st->st_atim.tv_nsec);
	put32(a + 52, (uint32_t)st->st_mtim.tv_nsec);
	put32(a + 56, (uint32_t)st->st_ctim.tv_nsec);
	put32(a + 60, st->st_mode);
	put32(a + 64, clamp32(st->st_nlink));
	put32(a + 68, st->st_uid);
	put32(a + 72, st->st_gid);
	put32(a + 76, encode_dev(st->st_rdev));
	put32(a + 80, clamp32((uint64_t)st->st_blksize));
	put32(a + 84, 0);
}

static int fast_getattr(struct pvd_fs *fs, const struct pvd_req *r, const struct in_header *h,
			uint32_t *used)
{
	uint8_t in[GETATTR_IN_SIZE];
	if (h->len < IN_HEADER_SIZE + GETATTR_IN_SIZE || r->wlen < OUT_HEADER_SIZE + ATTR_OUT_SIZE)
		return 0;
	read_part(r, IN_HEADER_SIZE, in, sizeof(in));
	uint32_t flags = get32(in);
	int table = PVD_FS_INODES;
	uint64_t key = h->nodeid;
	if (flags & FUSE_GETATTR_FH) {
		table = PVD_FS_HANDLES;
		key = get64(in + 8);
	}
	struct entry *e = entry_get(fs, table, key);
	if (!e)
		return 0; /* EBADF and its log line come from Python */
	struct stat st;
	int rc = fstat(e->fd, &st);
	int err = errno;
	entry_put(fs, table, e);
	if (rc < 0) {
		*used = reply_errno(r, h->unique, err);
		return 1;
	}
	uint8_t out[ATTR_OUT_SIZE];
	put64(out, fs->attr_valid);
	put32(out + 8, fs->attr_valid_nsec);
	put32(out + 12, 0);
	encode_attr(out + 16, &st);
	write_reply(r, OUT_HEADER_SIZE, out, sizeof(out));
	*used = reply_header(r, h->unique, 0, ATTR_OUT_SIZE);
	atomic_fetch_add_explicit(&fs->served[0], 1, memory_order_relaxed);
	return 1;
}

static int fast_read(struct pvd_fs *fs, const struct pvd_req *r, const struct in_header *h,
		     uint32_t *used)
{
	uint8_t in[READ_IN_SIZE];
	if (h->len < IN_HEADER_SIZE + READ_IN_SIZE || r->wlen < OUT_HEADER_SIZE)
		return 0;
	read_part(r, IN_HEADER_SIZE, in, sizeof(in));
	uint64_t fh = get64(in), offset = get64(in + 8);
	uint64_t size = get32(in + 16);
	if (offset > (uint64_t)OFFSET_MAX)
		return 0; /* EINVAL from Python */
	if (size > r->wlen - OUT_HEADER_SIZE)
		size = r->wlen - OUT_HEADER_SIZE;
	struct entry *e = entry_get(fs, PVD_FS_HANDLES, fh);
	if (!e)
		return 0;
	if (e->kind != PVD_KIND_FILE) {
		entry_put(fs, PVD_FS_HANDLES, e);
		return 0;
	}
	int err = 0;
	int64_t n = size ? pvd_iov_io(r->iov + r->nr, r->nw, e->fd, (int64_t)offset, size,
				      OUT_HEADER_SIZE, &err, 1)
			 : 0;
	entry_put(fs, PVD_FS_HANDLES, e);
	if (n < 0) {
		*used = reply_errno(r, h->unique, err);
		return 1;
	}
	*used = reply_header(r, h->unique, 0, (uint32_t)n);
	atomic_fetch_add_explicit(&fs->served[1], 1, memory_order_relaxed);
	return 1;
}

/*
 * Per-thread credentials for a kill-suid WRITE (HANDLE_KILLPRIV_V2): as
 * oscalls.caller_credentials(), the thread drops its supplementary groups
 * once, and switches fsgid then fsuid for the one call.  With a non-zero
 * fsuid the kernel also clears CAP_FSETID (and the other filesystem
 * capabilities) from the effective set, so the host clears setuid/setgid/
 * security.capability exactly as for that caller; switching back to 0
 * restores them from the permitted set (capabilities(7)).
 */
static _Thread_local int groups_dropped;

static int switch_fs_ids(uint32_t uid, uint32_t gid)
{
	if (!groups_dropped) {
		if (syscall(SYS_setgroups, 0, NULL) != 0)
			return -1;
		groups_dropped = 1;
	}
	setfsgid(gid);
	if ((uint32_t)setfsgid((gid_t)-1) != gid)
		return -1;
	setfsuid(uid);
	if ((uint32_t)setfsuid((uid_t)-1) != uid) {
		setfsgid(0);
		return -1;
	}
	return 0;
}

static void restore_fs_ids(void)
{
	setfsuid(0);
	setfsgid(0);
}

static int fast_write(struct pvd_fs *fs, const struct pvd_req *r, const struct in_header *h,
		      uint32_t *used)
{
	uint8_t in[WRITE_IN_SIZE];
	const uint64_t start = IN_HEADER_SIZE + WRITE_IN_SIZE;
	if (fs->readonly || fs->python_writes || h->len < start ||
	    r->wlen < OUT_HEADER_SIZE + WRITE_OUT_SIZE)
		return 0;
	read_part(r, IN_HEADER_SIZE, in, sizeof(in));
	uint64_t fh = get64(in), offset = get64(in + 8);
	uint64_t size = get32(in + 16);
	uint32_t write_flags = get32(in + 20);
	if (size > h->len - start)
		return 0; /* malformed: Python logs it */
	if (offset > (uint64_t)OFFSET_MAX || offset + size > (uint64_t)OFFSET_MAX + 1)
		return 0; /* EINVAL / EFBIG from Python */
	int kill = !!(write_flags & FUSE_WRITE_KILL_SUIDGID);
	if (kill && (!fs->switch_creds || h->uid == 0))
		return 0; /* Python drops CAP_FSETID with capset for these */
	struct entry *e = entry_get(fs, PVD_FS_HANDLES, fh);
	if (!e)
		return 0;
	if (e->kind != PVD_KIND_FILE) {
		entry_put(fs, PVD_FS_HANDLES, e);
		return 0;
	}
	if (kill && switch_fs_ids(h->uid, h->gid) != 0) {
		restore_fs_ids();
		entry_put(fs, PVD_FS_HANDLES, e);
		return 0; /* let Python report it */
	}
	int err = 0;
	int64_t n = size ? pvd_iov_io(r->iov, r->nr, e->fd, (int64_t)offset, size, start, &err, 0)
			 : 0;
	if (kill)
		restore_fs_ids();
	entry_put(fs, PVD_FS_HANDLES, e);
	if (n < 0) {
		*used = reply_errno(r, h->unique, err);
		return 1;
	}
	uint8_t out[WRITE_OUT_SIZE];
	put32(out, (uint32_t)n);
	put32(out + 4, 0);
	write_reply(r, OUT_HEADER_SIZE, out, sizeof(out));
	*used = reply_header(r, h->unique, 0, WRITE_OUT_SIZE);
	atomic_fetch_add_explicit(&fs->served[2], 1, memory_order_relaxed);
	return 1;
}

/*
 * The request's body as one name (validate_name): exactly one NUL, at the
 * end; not "", ".", ".." or containing '/'; at most NAME_MAX bytes.  0:
 * Python judges it (EINVAL, ENAMETOOLONG and their log lines).
 */
static int read_name(const struct pvd_req *r, const struct in_header *h,
		     char name[NAME_MAX_LEN + 2])
{
	uint64_t body = h->len - IN_HEADER_SIZE;
	if (body < 2 || body > NAME_MAX_LEN + 1)
		return 0;
	read_part(r, IN_HEADER_SIZE, name, body);
	if (name[body - 1] != 0 || memchr(name, 0, body - 1) || memchr(name, '/', body - 1))
		return 0;
	if ((body == 2 && name[0] == '.') || (body == 3 && name[0] == '.' && name[1] == '.'))
		return 0;
	return 1;
}

/*
 * UNLINK and RMDIR: filesystem.py unlink() / rmdir(), as the daemon (the
 * guest has checked the directory's permissions and sticky bit).  They
 * change no table: the unlinked inode stays the guest's until it forgets
 * it.  A read-only share goes to Python (EROFS).
 */
static int fast_unlink(struct pvd_fs *fs, const struct pvd_req *r, const struct in_header *h,
		       uint32_t *used, int flags)
{
	char name[NAME_MAX_LEN + 2];
	if (fs->readonly || r->wlen < OUT_HEADER_SIZE || !read_name(r, h, name))
		return 0;
	struct entry *parent = entry_get(fs, PVD_FS_INODES, h->nodeid);
	if (!parent)
		return 0;
	int rc = unlinkat(parent->fd, name, flags);
	int err = errno;
	entry_put(fs, PVD_FS_INODES, parent);
	*used = rc == 0 ? reply_header(r, h->unique, 0, 0) : reply_errno(r, h->unique, err);
	atomic_fetch_add_explicit(&fs->served[5], 1, memory_order_relaxed);
	return 1;
}

/* Credit one in-place lookup to nodeid if it is still live for (dev, ino). */
static int credit_lookup(struct pvd_fs *fs, uint64_t nodeid, uint64_t dev, uint64_t ino)
{
	struct shard *s = shard_of(fs, PVD_FS_INODES, nodeid);
	int ok = 0;
	pthread_mutex_lock(&s->lock);
	struct entry *e = *slot(s, nodeid);
	while (e && e->key != nodeid)
		e = e->next;
	if (e && !e->hidden && e->dev == dev && e->ino == ino) {
		e->credits++;
		ok = 1;
	}
	pthread_mutex_unlock(&s->lock);
	return ok;
}

/*
 * LOOKUP of a name whose inode the guest already knows (a "hit"), or that
 * does not exist: filesystem.py lookup() / _lookup_at().  The new O_PATH fd
 * is closed again, as InodeTable.add_lookup does for a known inode; the
 * lookup is credited to the inode in the mirror (pvd_fs_settle), *before*
 * the reply can reach the guest, so Python counts it before any FORGET of
 * it.  A new inode goes to Python, which owns the table.
 */
static int fast_lookup(struct pvd_fs *fs, const struct pvd_req *r, const struct in_header *h,
		       uint32_t *used)
{
	char name[NAME_MAX_LEN + 2];
	if (r->wlen < OUT_HEADER_SIZE + ENTRY_OUT_SIZE || !read_name(r, h, name))
		return 0;
	struct entry *parent = entry_get(fs, PVD_FS_INODES, h->nodeid);
	if (!parent)
		return 0;
	int fd = openat(parent->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		int err = errno;
		entry_put(fs, PVD_FS_INODES, parent);
		if (err == EMFILE || err == ENFILE)
			return 0; /* Python sheds cached inode fds and retries */
		*used = reply_errno(r, h->unique, err);
		atomic_fetch_add_explicit(&fs->served[3], 1, memory_order_relaxed);
		return 1;
	}
	struct stat st, pst;
	int rc = fstat(fd, &st);
	int err = errno;
	close(fd);
	int submount = 0;
	if (rc == 0 && fs->announce_submounts && S_ISDIR(st.st_mode)) {
		if (fstat(parent->fd, &pst) != 0) {
			entry_put(fs, PVD_FS_INODES, parent);
			return 0;
		}
		submount = st.st_dev != pst.st_dev;
	}
	entry_put(fs, PVD_FS_INODES, parent);
	if (rc < 0) {
		*used = reply_errno(r, h->unique, err);
		atomic_fetch_add_explicit(&fs->served[3], 1, memory_order_relaxed);
		return 1;
	}
	uint64_t nodeid = ident_find(fs, st.st_dev, st.st_ino);
	if (!nodeid || !credit_lookup(fs, nodeid, st.st_dev, st.st_ino))
		return 0; /* a new inode: Python adds it to the table */
	uint8_t out[ENTRY_OUT_SIZE];
	put64(out, nodeid);
	put64(out + 8, 0); /* generation: node ids are never reused */
	put64(out + 16, fs->entry_valid);
	put64(out + 24, fs->attr_valid);
	put32(out + 32, fs->entry_valid_nsec);
	put32(out + 36, fs->attr_valid_nsec);
	encode_attr(out + 40, &st);
	if (submount)
		put32(out + 40 + 84, FUSE_ATTR_SUBMOUNT);
	write_reply(r, OUT_HEADER_SIZE, out, sizeof(out));
	*used = reply_header(r, h->unique, 0, ENTRY_OUT_SIZE);
	atomic_fetch_add_explicit(&fs->served[3], 1, memory_order_relaxed);
	return 1;
}

/* ------------------------------------------------------------ READDIRPLUS */

static uint32_t rec_align(uint32_t n) { return (n + 7) & ~7u; }

/*
 * One fuse_dirent, or with plus a fuse_direntplus (the entry all zero for
 * "." and "..", which the kernel takes no reference on), at offset pos of
 * the reply payload.  rec holds at most 128 + 24 + 255 + 7 bytes.
 */
static uint32_t dirent_size(int plus, uint32_t namelen)
{
	return rec_align((plus ? ENTRY_OUT_SIZE : 0) + DIRENT_NAME_OFFSET + namelen);
}

static void put_dirent(const struct pvd_req *r, uint32_t pos, int plus, const uint8_t *entry,
		       uint64_t ino, uint64_t off, uint32_t dtype, const char *name,
		       uint32_t namelen)
{
	uint8_t rec[ENTRY_OUT_SIZE + DIRENT_NAME_OFFSET + NAME_MAX_LEN + 8];
	uint32_t n = dirent_size(plus, namelen);
	memset(rec, 0, n);
	uint8_t *d = rec;
	if (plus) {
		if (entry)
			memcpy(rec, entry, ENTRY_OUT_SIZE);
		d += ENTRY_OUT_SIZE;
	}
	put64(d, ino);
	put64(d + 8, off);
	put32(d + 16, namelen);
	put32(d + 20, dtype);
	memcpy(d + DIRENT_NAME_OFFSET, name, namelen);
	write_reply(r, OUT_HEADER_SIZE + pos, rec, n);
}

/*
 * READDIRPLUS of a directory whose entries the guest already knows:
 * filesystem.py readdirplus() / session.py _readdirplus(), for the case
 * where every entry listed is an inode of the mirror.  The commonest
 * listing in a guest: the kernel drops a directory's page cache on every
 * change, and lists again what its dentries still hold.
 *
 * Python streams from the handle's own fd under the handle's lock (READDIRs
 * of one handle move its position); this path cannot take that lock, so it
 * reads through a description of its own (openat ".") with the same host
 * cookies: lseek(offset) then getdents64, as Python does.  Each entry takes
 * the reply room first (as _ReplyBudget), then is looked up with fstatat:
 * no fd to open and close, because only an inode the mirror holds an fd on
 * (so whose number cannot be reused) is answered, and credited as a lookup
 * (credit_lookup) before the reply can reach the guest.  A name that
 * vanished meanwhile is skipped, its room unused, as in Python.
 *
 * READDIR (plus 0) is the same walk without the lookups: the host's d_ino
 * and d_type (DT_UNKNOWN resolved with fstatat, as read_dirents does), so
 * every page of it is served here.
 *
 * The first entry that is not such an inode (new, evicted, DT_UNKNOWN for
 * "."/"..", an error other than ENOENT) ends the page there; the guest
 * asks again from that entry's cookie and Python, finding it first, serves
 * that page.  A page that would hold no entry looked up here goes to
 * Python whole.
 */
static int fast_readdir(struct pvd_fs *fs, const struct pvd_req *r, const struct in_header *h,
			uint32_t *used, int plus)
{
	uint8_t in[READ_IN_SIZE];
	if (h->len < IN_HEADER_SIZE + READ_IN_SIZE || r->wlen < OUT_HEADER_SIZE)
		return 0;
	read_part(r, IN_HEADER_SIZE, in, sizeof(in));
	uint64_t fh = get64(in), offset = get64(in + 8);
	uint64_t room = get32(in + 16);
	if (offset > (uint64_t)OFFSET_MAX)
		return 0; /* EINVAL from Python */
	if (room > r->wlen - OUT_HEADER_SIZE)
		room = r->wlen - OUT_HEADER_SIZE;
	struct entry *e = entry_get(fs, PVD_FS_HANDLES, fh);
	if (!e)
		return 0;
	if (e->kind != PVD_KIND_DIR) {
		entry_put(fs, PVD_FS_HANDLES, e);
		return 0;
	}
	int dfd = openat(e->fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	entry_put(fs, PVD_FS_HANDLES, e);
	if (dfd < 0)
		return 0;
	struct stat dst;
	int have_dst = 0; /* the directory's own stat: submounts, the root's ".." */
	uint8_t entry[ENTRY_OUT_SIZE];
	memset(entry, 0, sizeof(entry));
	put64(entry + 16, fs->entry_valid);
	put64(entry + 24, fs->attr_valid);
	put32(entry + 32, fs->entry_valid_nsec);
	put32(entry + 36, fs->attr_valid_nsec);
	/* 8-aligned for linux_dirent64's d_ino/d_off */
	_Alignas(8) char buf[DIRENTS_BUF];
	uint64_t taken = 0; /* reply room taken, vanished entries' included */
	uint32_t pos = 0, emitted = 0; /* bytes written, entries written */
	uint32_t looked = 0;           /* of those, entries looked up (not "."/"..") */
	int handed = 0; /* stopped at an entry only Python may answer */
	int eof = 0;    /* getdents64 said the directory ends here */
	int stop = 0;
	while (!stop) {
		if (lseek(dfd, (off_t)offset, SEEK_SET) < 0)
			break;
		ssize_t n = syscall(SYS_getdents64, dfd, buf, sizeof(buf));
		if (n <= 0) {
			eof = n == 0; /* else an error Python will meet again */
			break;
		}
		for (ssize_t at = 0; at < n && !stop;) {
			uint64_t d_ino, d_off;
			uint16_t reclen;
			memcpy(&d_ino, buf + at, 8);
			memcpy(&d_off, buf + at + 8, 8);
			memcpy(&reclen, buf + at + 16, 2);
			uint8_t d_type = (uint8_t)buf[at + 18];
			const char *name = buf + at + DIRENT64_NAME_OFFSET;
			uint32_t namelen = (uint32_t)strnlen(name, (size_t)(n - at) - DIRENT64_NAME_OFFSET);
			if (reclen == 0 || namelen > NAME_MAX_LEN) {
				stop = 1; /* not what a kernel writes */
				break;
			}
			at += reclen;
			uint32_t size = dirent_size(plus, namelen);
			if (size > room - taken) {
				stop = 1; /* full */
				break;
			}
			taken += size;
			int dots = (namelen == 1 && name[0] == '.') ||
				   (namelen == 2 && name[0] == '.' && name[1] == '.');
			if (dots) {
				if (d_type == DT_UNKNOWN) {
					stop = handed = 1;
					break;
				}
				if (namelen == 2) {
					/* never reveal what lies above the share (_dir_stream) */
					struct entry *root = entry_get(fs, PVD_FS_INODES, ROOT_NODEID);
					if (!root) {
						stop = handed = 1;
						break;
					}
					uint64_t rdev = root->dev, rino = root->ino;
					entry_put(fs, PVD_FS_INODES, root);
					if (!have_dst && fstat(dfd, &dst) != 0) {
						stop = handed = 1;
						break;
					}
					have_dst = 1;
					if ((uint64_t)dst.st_dev == rdev && (uint64_t)dst.st_ino == rino)
						d_ino = rino;
				}
				put_dirent(r, pos, plus, NULL, d_ino, d_off, d_type, name, namelen);
				pos += size;
				emitted++;
				offset = d_off;
				continue;
			}
			struct stat st;
			if (!plus) {
				/* READDIR: the host's d_type; DT_UNKNOWN resolved as read_dirents does */
				if (d_type == DT_UNKNOWN)
					d_type = fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0
							 ? (uint8_t)((st.st_mode & S_IFMT) >> 12)
							 : DT_UNKNOWN;
				put_dirent(r, pos, 0, NULL, d_ino, d_off, d_type, name, namelen);
				pos += size;
				emitted++;
				offset = d_off;
				continue;
			}
			if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT) != 0) {
				if (errno == ENOENT) {
					offset = d_off; /* gone since listed: its room stays unused */
					continue;
				}
				stop = handed = 1;
				break;
			}
			uint32_t flags = 0;
			if (fs->announce_submounts && S_ISDIR(st.st_mode)) {
				if (!have_dst && fstat(dfd, &dst) != 0) {
					stop = handed = 1;
					break;
				}
				have_dst = 1;
				if (st.st_dev != dst.st_dev)
					flags = FUSE_ATTR_SUBMOUNT;
			}
			uint64_t nodeid = ident_find(fs, st.st_dev, st.st_ino);
			if (!nodeid || !credit_lookup(fs, nodeid, st.st_dev, st.st_ino)) {
				stop = handed = 1; /* a new inode: Python adds it, from this cookie on */
				break;
			}
			put64(entry, nodeid);
			encode_attr(entry + 40, &st);
			put32(entry + 40 + 84, flags);
			put_dirent(r, pos, 1, entry, st.st_ino, d_off, (st.st_mode & S_IFMT) >> 12, name,
				   namelen);
			pos += size;
			emitted++;
			looked++;
			offset = d_off;
		}
	}
	close(dfd);
	/*
	 * Nothing listed but not the end (an error), or only "."/".." before an
	 * entry for Python (the first page of a fresh listing): Python serves
	 * the whole page, rather than the guest asking twice.  The end of the
	 * directory is an empty page, as Python's (every listing ends so).
	 */
	if ((!emitted && !eof) || (handed && !looked))
		return 0;
	*used = reply_header(r, h->unique, 0, pos);
	atomic_fetch_add_explicit(&fs->served[plus ? 4 : 6], 1, memory_order_relaxed);
	return 1;
}

int pvd_fast_handle(struct pvd_fs *fs, const struct pvd_req *req, uint32_t *used,
		    uint32_t *opcode, uint64_t *unique)
{
	uint8_t raw[IN_HEADER_SIZE];
	struct in_header h;
	*opcode = 0;
	*unique = 0;
	if (req->rlen < IN_HEADER_SIZE)
		return 0;
	read_part(req, 0, raw, sizeof(raw));
	h.len = get32(raw);
	h.opcode = get32(raw + 4);
	h.unique = get64(raw + 8);
	h.nodeid = get64(raw + 16);
	h.uid = get32(raw + 24);
	h.gid = get32(raw + 28);
	h.pid = get32(raw + 32);
	memcpy(&h.total_extlen, raw + 36, 2);
	memcpy(&h.padding, raw + 38, 2);
	*opcode = h.opcode;
	*unique = h.unique;
	/* Acquire: pairs with pvd_fs_set_ready's release (settings published). */
	if (!fs || !atomic_load_explicit(&fs->ready, memory_order_acquire))
		return 0;
	if (h.len < IN_HEADER_SIZE || h.len > req->rlen)
		return 0;
	if (h.opcode != FUSE_WRITE && h.len - IN_HEADER_SIZE > MAX_BODY)
		return 0;
	/* Request extensions (7.38): Python splits and checks them; none of the
	 * opcodes here carries one from Linux, so this is a hostile guest's. */
	if (h.total_extlen)
		return 0;
	switch (h.opcode) {
	case FUSE_LOOKUP:
		return fast_lookup(fs, req, &h, used);
	case FUSE_GETATTR:
		return fast_getattr(fs, req, &h, used);
	case FUSE_READ:
		return fast_read(fs, req, &h, used);
	case FUSE_WRITE:
		return fast_write(fs, req, &h, used);
	case FUSE_READDIR:
		return fast_readdir(fs, req, &h, used, 0);
	case FUSE_READDIRPLUS:
		return fast_readdir(fs, req, &h, used, 1);
	case FUSE_UNLINK:
		return fast_unlink(fs, req, &h, used, 0);
	case FUSE_RMDIR:
		return fast_unlink(fs, req, &h, used, AT_REMOVEDIR);
	default:
		return 0;
	}
}
