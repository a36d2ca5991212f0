/* Guest side of tests/vm/test_locks.py: a blocking lock wait on a share.
 *
 *   locktool posix|flock LOCKFILE IOFILE OPS
 *   locktool hold-posix|hold-flock LOCKFILE READY GO
 *
 * The parent takes an exclusive lock on LOCKFILE (fcntl F_SETLKW or flock).
 * A child opens LOCKFILE, says so through a pipe, and asks for the same lock
 * with a blocking call.  Meanwhile the parent writes and reads IOFILE OPS
 * times (4 KiB, each write checked by a read back) and times each pair;
 * then it checks that the child is still waiting, notes the time and
 * releases.  The child reports its errno and the time it was granted.
 * Prints one line of key=value and exits 0 when: the child was still waiting
 * after the I/O, was granted (no error, no EDEADLK) no earlier than the
 * release, and all I/O succeeded.  An alarm bounds every wait.
 *
 * hold-*: take the lock, create READY, read a line from the FIFO GO, unlock,
 * remove READY (for the host to try the same lock meanwhile).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct report {
	int err;
	double granted;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int lock(int fd, int posix, int type)
{
	if (posix) {
		struct flock fl = { .l_type = type, .l_whence = SEEK_SET };
		return fcntl(fd, F_SETLKW, &fl);
	}
	return flock(fd, type == F_UNLCK ? LOCK_UN : LOCK_EX);
}

static int hold(int posix, char **argv)
{
	int fd = open(argv[2], O_RDWR | O_CREAT, 0644);
	if (fd < 0 || lock(fd, posix, F_WRLCK) < 0) {
		perror("hold lock");
		return 1;
	}
	close(open(argv[3], O_WRONLY | O_CREAT, 0644));
	char line[16];
	int go = open(argv[4], O_RDONLY);
	if (go < 0 || read(go, line, sizeof(line)) < 0) {
		perror("hold go");
		return 1;
	}
	if (lock(fd, posix, F_UNLCK) < 0) {
		perror("hold unlock");
		return 1;
	}
	unlink(argv[3]);
	return 0;
}

int main(int argc, char **argv)
{
	alarm(300);
	if (argc == 5 && !strncmp(argv[1], "hold-", 5))
		return hold(!strcmp(argv[1], "hold-posix"), argv);
	if (argc != 5 || (strcmp(argv[1], "posix") && strcmp(argv[1], "flock"))) {
		fprintf(stderr, "usage: locktool posix|flock LOCKFILE IOFILE OPS\n"
				"       locktool hold-posix|hold-flock LOCKFILE READY GO\n");
		return 2;
	}
	int posix = !strcmp(argv[1], "posix");
	int ops = atoi(argv[4]);

	int fd = open(argv[2], O_RDWR | O_CREAT, 0644);
	if (fd < 0 || lock(fd, posix, F_WRLCK) < 0) {
		perror("holder lock");
		return 1;
	}
	int up[2];
	if (pipe(up) < 0)
		return 1;
	pid_t pid = fork();
	if (pid < 0)
		return 1;
	if (pid == 0) {
		struct report r = { 0, 0 };
		int cfd = open(argv[2], O_RDWR);
		if (write(up[1], "w", 1) != 1)
			_exit(1);
		if (cfd < 0 || lock(cfd, posix, F_WRLCK) < 0)
			r.err = errno;
		r.granted = now();
		if (write(up[1], &r, sizeof(r)) != sizeof(r))
			_exit(1);
		_exit(0);
	}
	char c;
	if (read(up[0], &c, 1) != 1)
		return 1;

	int io = open(argv[3], O_RDWR | O_CREAT | O_TRUNC, 0644);
	char out[4096], in[4096];
	double worst = 0;
	int io_errors = io < 0;
	for (int i = 0; i < ops && io >= 0; i++) {
		memset(out, 'a' + i % 26, sizeof(out));
		double t = now();
		if (pwrite(io, out, sizeof(out), (off_t)(i % 64) * 4096) != sizeof(out) ||
		    pread(io, in, sizeof(in), (off_t)(i % 64) * 4096) != sizeof(in) ||
		    memcmp(in, out, sizeof(in)))
			io_errors++;
		if (now() - t > worst)
			worst = now() - t;
	}
	struct pollfd p = { .fd = up[0], .events = POLLIN };
	int still_waiting = poll(&p, 1, 0) == 0;

	double released = now();
	if (lock(fd, posix, F_UNLCK) < 0) {
		perror("holder unlock");
		return 1;
	}
	struct report r;
	if (read(up[0], &r, sizeof(r)) != sizeof(r))
		return 1;
	int status;
	waitpid(pid, &status, 0);
	printf("mode=%s still_waiting=%d child_errno=%d granted_after_release=%d "
	       "grant_latency_ms=%.1f io_ops=%d io_errors=%d io_worst_ms=%.1f\n",
	       argv[1], still_waiting, r.err, r.granted >= released,
	       (r.granted - released) * 1e3, ops, io_errors, worst * 1e3);
	return still_waiting && r.err == 0 && r.granted >= released && io_errors == 0 ? 0 : 1;
}
