/*
 * pva-uevent-wait: run a command until it succeeds, retrying only when the
 * kernel announces the event that can make it succeed.
 *
 *   pva-uevent-wait [-t SECONDS] KEY=VALUE... -- COMMAND [ARG...]
 *
 * 1. Listen for kernel uevents (NETLINK_KOBJECT_UEVENT, the group udev
 *    listens to) before anything else.
 * 2. Run COMMAND.  Exit 0 when it succeeds: the event happened earlier.
 * 3. Otherwise wait, up to SECONDS (default 30), for a uevent that carries
 *    every KEY=VALUE given, then run COMMAND once more and exit with its
 *    status.  Without such an event: exit 124 with a message on stderr.
 *
 * Listening before the first try closes the race between "not yet" and
 * "announced": an event sent after step 1 is queued on the socket, and one
 * sent before it made the first try succeed.  Used for Linux >= 6.9
 * virtio-fs hot-plug: ACTION=add SUBSYSTEM=virtiofs TAG=<tag> comes after
 * the tag is registered (mountable).  No polling, no sleeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/netlink.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_KEYS 16

static int run(char **argv)
{
	int status;
	pid_t pid = fork();

	if (pid < 0) {
		perror("pva-uevent-wait: fork");
		return 1;
	}
	if (pid == 0) {
		execvp(argv[0], argv);
		perror("pva-uevent-wait: exec");
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return 1;
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	return 128 + WTERMSIG(status);
}

/* Does the uevent message (NUL-separated "KEY=VALUE" strings) hold every key? */
static int matches(const char *msg, size_t len, char **keys, int nkeys)
{
	for (int k = 0; k < nkeys; k++) {
		size_t off = 0;
		int found = 0;

		while (off < len) {
			const char *s = msg + off;
			size_t n = strnlen(s, len - off);

			if (strlen(keys[k]) == n && memcmp(s, keys[k], n) == 0) {
				found = 1;
				break;
			}
			off += n + 1;
		}
		if (!found)
			return 0;
	}
	return 1;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	char *keys[MAX_KEYS];
	int nkeys = 0, i = 1, fd, rc;
	double timeout = 30, deadline;
	struct sockaddr_nl addr = { .nl_family = AF_NETLINK, .nl_groups = 1 };
	static char buf[16384];

	if (i + 1 < argc && strcmp(argv[i], "-t") == 0) {
		timeout = atof(argv[i + 1]);
		i += 2;
	}
	for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
		if (!strchr(argv[i], '=') || nkeys == MAX_KEYS) {
			fprintf(stderr, "pva-uevent-wait: bad KEY=VALUE %s\n", argv[i]);
			return 2;
		}
		keys[nkeys++] = argv[i];
	}
	if (i >= argc - 1 || nkeys == 0) {
		fprintf(stderr, "usage: pva-uevent-wait [-t SECONDS] KEY=VALUE... -- COMMAND...\n");
		return 2;
	}
	argv += i + 1;

	fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("pva-uevent-wait: uevent socket");
		return 1;
	}
	rc = run(argv);
	if (rc == 0)
		return 0;

	deadline = now() + timeout;
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		double left = deadline - now();
		ssize_t n;

		if (left <= 0) {
			fprintf(stderr, "pva-uevent-wait: no uevent with");
			for (int k = 0; k < nkeys; k++)
				fprintf(stderr, " %s", keys[k]);
			fprintf(stderr, " within %g s\n", timeout);
			return 124;
		}
		if (poll(&p, 1, (int)(left * 1000) + 1) < 0) {
			if (errno == EINTR)
				continue;
			perror("pva-uevent-wait: poll");
			return 1;
		}
		if (!(p.revents & POLLIN))
			continue;
		n = recv(fd, buf, sizeof(buf) - 1, 0);
		if (n < 0 && errno == ENOBUFS) {
			/* Events were lost, ours among them perhaps: try again. */
			if (run(argv) == 0)
				return 0;
			continue;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("pva-uevent-wait: recv");
			return 1;
		}
		buf[n] = '\0';
		if (matches(buf, (size_t)n, keys, nkeys))
			break;
	}
	close(fd);
	return run(argv);
}
