/*
 * pva-agent: the guest side of the harness control channel.
 *
 * Runs in the test guest (static binary, busybox userland) and serves
 * requests from the host harness over a virtio-serial port.  Every message,
 * in both directions, is a frame:
 *
 *   struct frame { char magic[4] = "PVA1"; u32 type; u32 id; u32 len; }  (LE)
 *   followed by `len` payload bytes.
 *
 * Requests (host -> guest) and their replies (same id):
 *   EXEC  payload: u32 timeout_s, u32 cmd_len, cmd bytes, stdin bytes (rest)
 *         reply  : EXEC_RESULT i32 status, u32 out_len, u32 err_len,
 *                  u64 elapsed_ns, out, err
 *                  status = exit code, or -signal when killed (timeout: -9);
 *                  elapsed_ns = guest CLOCK_MONOTONIC time from fork to exit
 *   READ  payload: path bytes
 *         reply  : FILE_DATA i32 errno (0 = ok), data
 *   WRITE payload: u32 mode, u32 path_len, path bytes, data (rest)
 *         reply  : WRITE_RESULT i32 errno
 *   PING  payload: anything, reply PONG with the same payload
 * Unsolicited (guest -> host): HELLO once at start, payload = uname release.
 *
 * Commands run one at a time, through /bin/sh -c, as root, cwd /.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
	T_HELLO = 1,
	T_EXEC = 2,
	T_EXEC_RESULT = 3,
	T_READ = 4,
	T_FILE_DATA = 5,
	T_WRITE = 6,
	T_WRITE_RESULT = 7,
	T_PING = 8,
	T_PONG = 9,
	T_ERROR = 10,
};

#define MAX_PAYLOAD (256u << 20)  /* requests and replies are capped at 256 MiB */
#define MAX_CAPTURE (64u << 20)   /* per output stream */

struct frame {
	char magic[4];
	uint32_t type;
	uint32_t id;
	uint32_t len;
};

static int port = -1;

static int read_full(int fd, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t r = write(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

/* Send one frame made of up to three payload pieces. */
static int send_frame(uint32_t type, uint32_t id, const void *a, size_t alen,
		      const void *b, size_t blen, const void *c, size_t clen)
{
	struct frame h = { { 'P', 'V', 'A', '1' }, type, id, (uint32_t)(alen + blen + clen) };
	if (write_full(port, &h, sizeof(h)) || (alen && write_full(port, a, alen)) ||
	    (blen && write_full(port, b, blen)) || (clen && write_full(port, c, clen)))
		return -1;
	return 0;
}

struct buf {
	char *data;
	size_t len, cap;
	int truncated;
};

static void buf_append(struct buf *b, const char *p, size_t n)
{
	if (b->len + n > MAX_CAPTURE) {
		n = MAX_CAPTURE - b->len;
		b->truncated = 1;
	}
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n)
			cap *= 2;
		char *d = realloc(b->data, cap);
		if (!d) {
			b->truncated = 1;
			return;
		}
		b->data = d;
		b->cap = cap;
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void do_exec(uint32_t id, const char *payload, uint32_t len)
{
	uint32_t timeout_s, cmd_len;
	struct buf out = { 0 }, err = { 0 };
	int32_t status;
	int in_p[2], out_p[2], err_p[2];

	/* Reap commands abandoned earlier that have died since. */
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	if (len < 8) {
		send_frame(T_ERROR, id, "short EXEC", 10, NULL, 0, NULL, 0);
		return;
	}
	memcpy(&timeout_s, payload, 4);
	memcpy(&cmd_len, payload + 4, 4);
	if (cmd_len > len - 8) {
		send_frame(T_ERROR, id, "bad EXEC cmd_len", 16, NULL, 0, NULL, 0);
		return;
	}
	char *cmd = strndup(payload + 8, cmd_len);
	const char *in = payload + 8 + cmd_len;
	size_t in_len = len - 8 - cmd_len, in_off = 0;

	if (!cmd || pipe2(in_p, O_CLOEXEC) || pipe2(out_p, O_CLOEXEC) || pipe2(err_p, O_CLOEXEC)) {
		send_frame(T_ERROR, id, "pipe failed", 11, NULL, 0, NULL, 0);
		free(cmd);
		return;
	}
	double started = now();
	pid_t pid = fork();
	if (pid == 0) {
		dup2(in_p[0], 0);
		dup2(out_p[1], 1);
		dup2(err_p[1], 2);
		setsid();
		if (chdir("/") != 0)
			_exit(127);
		execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
		_exit(127);
	}
	close(in_p[0]);
	close(out_p[1]);
	close(err_p[1]);
	free(cmd);
	if (pid < 0) {
		close(in_p[1]);
		close(out_p[0]);
		close(err_p[0]);
		send_frame(T_ERROR, id, "fork failed", 11, NULL, 0, NULL, 0);
		return;
	}
	fcntl(in_p[1], F_SETFL, O_NONBLOCK);
	if (in_len == 0) {
		close(in_p[1]);
		in_p[1] = -1;
	}
	double deadline = timeout_s ? now() + timeout_s : 0;
	int killed = 0, abandoned = 0;
	double killed_at = 0;
	int open_out = 1, open_err = 1;
	char chunk[65536];
	while (open_out || open_err) {
		struct pollfd pf[3] = {
			{ open_out ? out_p[0] : -1, POLLIN, 0 },
			{ open_err ? err_p[0] : -1, POLLIN, 0 },
			{ in_p[1], POLLOUT, 0 },
		};
		int wait_ms = -1;
		if (deadline && !killed) {
			double left = deadline - now();
			wait_ms = left > 0 ? (int)(left * 1000) + 1 : 0;
		}
		if (killed) {
			/* A killed command stuck in an uninterruptible wait (a hung
			 * filesystem) keeps its pipes open: give up on it after a
			 * grace period rather than blocking the agent forever. */
			double left = killed_at + 5.0 - now();
			wait_ms = left > 0 ? (int)(left * 1000) + 1 : 0;
		}
		int r = poll(pf, 3, wait_ms);
		if (r < 0 && errno == EINTR)
			continue;
		if (r == 0 && killed) {
			abandoned = 1;
			break;
		}
		if (r == 0 && deadline && !killed) {
			/* Time is up: kill the whole session the command started. */
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			killed = 1;
			killed_at = now();
			continue;
		}
		for (int i = 0; i < 2; i++) {
			if (!pf[i].revents)
				continue;
			ssize_t n = read(pf[i].fd, chunk, sizeof(chunk));
			if (n > 0) {
				buf_append(i ? &err : &out, chunk, (size_t)n);
			} else if (n == 0 || errno != EINTR) {
				close(pf[i].fd);
				if (i)
					open_err = 0;
				else
					open_out = 0;
			}
		}
		if (pf[2].revents & (POLLOUT | POLLERR | POLLHUP)) {
			ssize_t n = write(in_p[1], in + in_off, in_len - in_off);
			if (n > 0)
				in_off += (size_t)n;
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				in_off = in_len;
			if (in_off >= in_len) {
				close(in_p[1]);
				in_p[1] = -1;
			}
		}
	}
	if (in_p[1] >= 0)
		close(in_p[1]);
	if (open_out)
		close(out_p[0]);
	if (open_err)
		close(err_p[0]);
	int ws = 0;
	uint64_t elapsed_ns;
	if (abandoned) {
		/* Left to init to reap once (if ever) it dies. */
		status = -SIGKILL;
		buf_append(&err, "\n[pva-agent: command did not die after SIGKILL; abandoned]\n", 59);
	} else {
		while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
			;
		status = WIFEXITED(ws) ? WEXITSTATUS(ws) : -WTERMSIG(ws);
	}
	elapsed_ns = (uint64_t)((now() - started) * 1e9);
	if (err.truncated)
		buf_append(&err, "\n[pva-agent: output truncated]\n", 31);
	unsigned char hdr[20];
	uint32_t ol = (uint32_t)out.len, el = (uint32_t)err.len;
	memcpy(hdr, &status, 4);
	memcpy(hdr + 4, &ol, 4);
	memcpy(hdr + 8, &el, 4);
	memcpy(hdr + 12, &elapsed_ns, 8);
	send_frame(T_EXEC_RESULT, id, hdr, 20, out.data, out.len, err.data, err.len);
	free(out.data);
	free(err.data);
}

static void do_read(uint32_t id, const char *payload, uint32_t len)
{
	char *path = strndup(payload, len);
	int32_t e = 0;
	struct buf data = { 0 };
	int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
	if (fd < 0) {
		e = errno;
	} else {
		char chunk[65536];
		for (;;) {
			ssize_t n = read(fd, chunk, sizeof(chunk));
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				e = errno;
				break;
			}
			if (n == 0)
				break;
			buf_append(&data, chunk, (size_t)n);
			if (data.truncated) {
				e = EFBIG;
				break;
			}
		}
		close(fd);
	}
	free(path);
	send_frame(T_FILE_DATA, id, &e, 4, e ? NULL : data.data, e ? 0 : data.len, NULL, 0);
	free(data.data);
}

static void do_write(uint32_t id, const char *payload, uint32_t len)
{
	uint32_t mode, path_len;
	int32_t e = 0;
	if (len < 8) {
		e = EINVAL;
		goto out;
	}
	memcpy(&mode, payload, 4);
	memcpy(&path_len, payload + 4, 4);
	if (path_len > len - 8) {
		e = EINVAL;
		goto out;
	}
	char *path = strndup(payload + 8, path_len);
	int fd = path ? open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode & 07777) : -1;
	free(path);
	if (fd < 0) {
		e = errno;
		goto out;
	}
	if (write_full(fd, payload + 8 + path_len, len - 8 - path_len) || fchmod(fd, mode & 07777))
		e = errno ? errno : EIO;
	if (close(fd) && !e)
		e = errno;
out:
	send_frame(T_WRITE_RESULT, id, &e, 4, NULL, 0, NULL, 0);
}

static int find_port(const char *name, char *dev, size_t devlen)
{
	/* /sys/class/virtio-ports/vportNpM/name holds the port's name. */
	for (int n = 0; n < 8; n++) {
		for (int m = 0; m < 32; m++) {
			char p[128], buf[128];
			snprintf(p, sizeof(p), "/sys/class/virtio-ports/vport%dp%d/name", n, m);
			int fd = open(p, O_RDONLY);
			if (fd < 0)
				continue;
			ssize_t r = read(fd, buf, sizeof(buf) - 1);
			close(fd);
			if (r <= 0)
				continue;
			buf[r] = 0;
			buf[strcspn(buf, "\n")] = 0;
			if (strcmp(buf, name) == 0) {
				snprintf(dev, devlen, "/dev/vport%dp%d", n, m);
				return 0;
			}
		}
	}
	return -1;
}

int main(int argc, char **argv)
{
	const char *name = argc > 1 ? argv[1] : "org.pyvirtiofsd.agent.0";
	char dev[64];

	signal(SIGPIPE, SIG_IGN);
	if (find_port(name, dev, sizeof(dev))) {
		fprintf(stderr, "pva-agent: no virtio-serial port named %s\n", name);
		return 1;
	}
	port = open(dev, O_RDWR | O_CLOEXEC);
	if (port < 0) {
		perror("pva-agent: open port");
		return 1;
	}
	struct utsname u;
	uname(&u);
	if (send_frame(T_HELLO, 0, u.release, strlen(u.release), NULL, 0, NULL, 0)) {
		perror("pva-agent: hello");
		return 1;
	}
	for (;;) {
		struct frame h;
		if (read_full(port, &h, sizeof(h))) {
			/* Host side not connected (yet, or any more): init respawns
			 * us; back off so that is not a busy loop. */
			sleep(1);
			return 2;
		}
		if (memcmp(h.magic, "PVA1", 4) || h.len > MAX_PAYLOAD) {
			fprintf(stderr, "pva-agent: bad frame, resynchronising by restart\n");
			return 3;
		}
		char *payload = malloc(h.len ? h.len : 1);
		if (!payload || read_full(port, payload, h.len))
			return 2;
		switch (h.type) {
		case T_EXEC:
			do_exec(h.id, payload, h.len);
			break;
		case T_READ:
			do_read(h.id, payload, h.len);
			break;
		case T_WRITE:
			do_write(h.id, payload, h.len);
			break;
		case T_PING:
			send_frame(T_PONG, h.id, payload, h.len, NULL, 0, NULL, 0);
			break;
		default:
			send_frame(T_ERROR, h.id, "unknown request", 15, NULL, 0, NULL, 0);
		}
		free(payload);
	}
}
