/*
 * pva-acpid: power the test guest off cleanly on the ACPI power button.
 *
 * The guest kernel has the ACPI button driver but no evdev, so the power
 * button (QMP system_powerdown, `virsh shutdown`) reaches user space only as
 * a generic-netlink event: family "acpi_event", multicast group
 * "acpi_mc_group", command ACPI_GENL_CMD_EVENT with one ACPI_GENL_ATTR_EVENT
 * attribute holding a struct acpi_genl_event (drivers/acpi/event.c) whose
 * device_class is "button/power" (drivers/acpi/button.c).
 *
 * Started once by busybox init (inittab); creates READY_FILE once it
 * listens. On the event it signals init
 * (SIGUSR2, what busybox `poweroff` does), and init runs the inittab
 * ::shutdown: actions (sync, unmount the data filesystems), stops every
 * process and powers off. If the family is absent (no CONFIG_NET or
 * CONFIG_ACPI in the kernel) it says so once and exits: nothing else in the
 * guest depends on it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define FAMILY_NAME "acpi_event"
#define GROUP_NAME "acpi_mc_group"
#define ACPI_GENL_CMD_EVENT 1
#define ACPI_GENL_ATTR_EVENT 1
#define POWER_CLASS "button/power"
#define READY_FILE "/run/pva-acpid.listening"

/* include/acpi/acpi_bus.h (the kernel's; not in the uapi headers) */
struct acpi_genl_event {
	char device_class[20];
	char bus_id[15];
	uint32_t type;
	uint32_t data;
};

static void note(const char *msg)
{
	fprintf(stderr, "pva-acpid: %s\n", msg);
}

/* Walk the attributes in [p, p+len): call back for each one. */
#define FOR_EACH_ATTR(a, p, len)                                                    \
	for (struct nlattr *a = (struct nlattr *)(p); (char *)a + NLA_HDRLEN <= (char *)(p) + (len) && \
	     a->nla_len >= NLA_HDRLEN && (char *)a + a->nla_len <= (char *)(p) + (len);  \
	     a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len)))

static void *attr_data(struct nlattr *a)
{
	return (char *)a + NLA_HDRLEN;
}

static int attr_len(struct nlattr *a)
{
	return a->nla_len - NLA_HDRLEN;
}

/* CTRL_CMD_GETFAMILY for FAMILY_NAME: its id and GROUP_NAME's id. 0 = found. */
static int resolve(int fd, uint16_t *family, uint32_t *group)
{
	struct {
		struct nlmsghdr n;
		struct genlmsghdr g;
		char attrs[64];
	} req = { 0 };
	size_t name_len = sizeof(FAMILY_NAME);
	struct nlattr *a = (struct nlattr *)req.attrs;
	a->nla_type = CTRL_ATTR_FAMILY_NAME;
	a->nla_len = (uint16_t)(NLA_HDRLEN + name_len);
	memcpy(attr_data(a), FAMILY_NAME, name_len);
	req.n.nlmsg_len = (uint32_t)(NLMSG_LENGTH(GENL_HDRLEN) + NLA_ALIGN(a->nla_len));
	req.n.nlmsg_type = GENL_ID_CTRL;
	req.n.nlmsg_flags = NLM_F_REQUEST;
	req.n.nlmsg_seq = 1;
	req.g.cmd = CTRL_CMD_GETFAMILY;
	req.g.version = 1;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	if (sendto(fd, &req, req.n.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -1;

	static char buf[16384];
	ssize_t r;
	while ((r = recv(fd, buf, sizeof(buf), 0)) < 0 && errno == EINTR)
		;
	if (r < 0)
		return -1;
	struct nlmsghdr *n = (struct nlmsghdr *)buf;
	if (!NLMSG_OK(n, (int)r) || n->nlmsg_type == NLMSG_ERROR ||
	    n->nlmsg_len < NLMSG_LENGTH(GENL_HDRLEN))
		return -1;  /* ENOENT: no such family */
	char *attrs = (char *)NLMSG_DATA(n) + GENL_HDRLEN;
	int len = (int)(n->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN));
	int have_family = 0, have_group = 0;
	FOR_EACH_ATTR(at, attrs, len) {
		if (at->nla_type == CTRL_ATTR_FAMILY_ID && attr_len(at) >= 2) {
			memcpy(family, attr_data(at), 2);
			have_family = 1;
		} else if ((at->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GROUPS) {
			FOR_EACH_ATTR(grp, attr_data(at), attr_len(at)) {
				const char *name = NULL;
				uint32_t id = 0;
				int has_id = 0;
				FOR_EACH_ATTR(f, attr_data(grp), attr_len(grp)) {
					if (f->nla_type == CTRL_ATTR_MCAST_GRP_NAME && attr_len(f) > 0 &&
					    ((char *)attr_data(f))[attr_len(f) - 1] == 0)
						name = attr_data(f);
					else if (f->nla_type == CTRL_ATTR_MCAST_GRP_ID && attr_len(f) >= 4) {
						memcpy(&id, attr_data(f), 4);
						has_id = 1;
					}
				}
				if (name && has_id && strcmp(name, GROUP_NAME) == 0) {
					*group = id;
					have_group = 1;
				}
			}
		}
	}
	return have_family && have_group ? 0 : -1;
}

/* 1 when the message is the power button's event. */
static int is_power_button(struct nlmsghdr *n, uint16_t family)
{
	if (n->nlmsg_type != family || n->nlmsg_len < NLMSG_LENGTH(GENL_HDRLEN))
		return 0;
	struct genlmsghdr *g = NLMSG_DATA(n);
	if (g->cmd != ACPI_GENL_CMD_EVENT)
		return 0;
	char *attrs = (char *)g + GENL_HDRLEN;
	int len = (int)(n->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN));
	FOR_EACH_ATTR(a, attrs, len) {
		if (a->nla_type != ACPI_GENL_ATTR_EVENT ||
		    attr_len(a) < (int)sizeof(struct acpi_genl_event))
			continue;
		struct acpi_genl_event ev;
		memcpy(&ev, attr_data(a), sizeof(ev));
		ev.device_class[sizeof(ev.device_class) - 1] = 0;
		ev.bus_id[sizeof(ev.bus_id) - 1] = 0;
		fprintf(stderr, "pva-acpid: ACPI event %s %s %08x %08x\n", ev.device_class,
			ev.bus_id, ev.type, ev.data);
		if (strcmp(ev.device_class, POWER_CLASS) == 0)
			return 1;
	}
	return 0;
}

int main(void)
{
	uint16_t family = 0;
	uint32_t group = 0;
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	if (fd < 0) {
		note("no generic netlink (kernel without CONFIG_NET?): power button ignored");
		return 0;
	}
	if (resolve(fd, &family, &group)) {
		note("no \"" FAMILY_NAME "\" genetlink family (kernel without ACPI events?): "
		     "power button ignored");
		return 0;
	}
	if (setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group))) {
		perror("pva-acpid: joining " GROUP_NAME "; power button ignored");
		return 0;
	}
	fprintf(stderr, "pva-acpid: listening for the power button (family %u, group %u)\n",
		family, group);
	/* Tells the harness the button is now answered (a press before this
	 * point is lost, as on real hardware before acpid starts). */
	FILE *ready = fopen(READY_FILE, "w");
	if (ready)
		fclose(ready);
	static char buf[16384];
	for (;;) {
		struct sockaddr_nl from;
		socklen_t from_len = sizeof(from);
		ssize_t r = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &from_len);
		if (r < 0) {
			if (errno == EINTR || errno == ENOBUFS)
				continue;
			perror("pva-acpid: recv; power button ignored from now on");
			return 1;
		}
		if (from.nl_pid != 0)
			continue;  /* only the kernel sends ACPI events */
		int len = (int)r;
		for (struct nlmsghdr *n = (struct nlmsghdr *)buf; NLMSG_OK(n, len);
		     n = NLMSG_NEXT(n, len)) {
			if (!is_power_button(n, family))
				continue;
			note("power button: powering off");
			/* busybox init: SIGUSR2 = poweroff, through ::shutdown: */
			if (kill(1, SIGUSR2)) {
				perror("pva-acpid: signalling init");
				return 1;
			}
			return 0;
		}
	}
}
