/*
 * sandboxd-spawner: starts commands for the daemon, off its event loop.
 *
 * A vfork-style spawn suspends the caller until the child has exec'd; with the spawn on the
 * daemon's only thread, its event loop waited with it (about 1 ms under load, when the child
 * waits for a CPU). This helper, a child of the daemon, does the spawns instead: it clones
 * each command with CLONE_PARENT, so the command is the daemon's child (the daemon reaps it
 * and signals its group as before), not the helper's.
 *
 * Protocol, on the stream socket at fd 3 (the daemon's end of a socketpair), little-endian:
 *   request: u32 length of what follows the header, u32 flags, u32 argc, u32 envc, with the
 *            fds (SCM_RIGHTS) on the header: stdin (unless FLAG_NULL_STDIN or FLAG_PTY),
 *            stdout, stderr (unless FLAG_PTY), the script (if FLAG_SCRIPT); then the strings,
 *            each NUL-terminated: the program's path, the work dir, the PTY slave's path (if
 *            FLAG_PTY), argc arguments, envc "NAME=value" entries.
 *   reply:   i32 pid (or -1), i32 stage that failed (0: none), i32 errno.
 * The helper exits at EOF on fd 3, or at any request it cannot read.
 *
 * The child (sharing the helper's memory until its exec: CLONE_VM | CLONE_VFORK) calls only
 * system calls: setsid, open of the slave by path (after setsid, so it becomes the
 * controlling terminal), dup2 onto 0-3, chdir, execve. The helper was started with every
 * signal at its default disposition and an empty mask, and never changes them, so the
 * child starts so too. The helper closes every fd above 3 at its start, and every fd it
 * has but 0-2 is close-on-exec (received ones too: MSG_CMSG_CLOEXEC), so the command gets
 * 0-2 (and 3, the script) only.
 *
 * Run as "sandboxd-pty-relay" (its argv[0]), the same program is a PTY command's output
 * relay instead (runtime/spawn.py, "PTY relays"): it copies fd 0, the master, to fd 1, a
 * pipe the daemon reads, until the master's EIO (every holder of the slave is gone) or an
 * EOF. The master is one open file with the daemon's, which writes the command's input
 * to it without blocking, so the relay's reads may see EAGAIN: it then waits in poll().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define CHANNEL 3
#define FLAG_PTY 1u
#define FLAG_NULL_STDIN 2u
#define FLAG_SCRIPT 4u
#define MAX_FDS 4
#define MAX_REQUEST (64u << 20)
#define SCRIPT_FD 3

enum stage { STAGE_NONE = 0, STAGE_SETSID, STAGE_STDIO, STAGE_CHDIR, STAGE_EXEC, STAGE_CLONE };

struct job {
    uint32_t flags;
    int fds[MAX_FDS];
    int nfds;
    const char *path, *cwd, *slave;
    char **argv, **envp;
    /* written by the child before it fails: */
    volatile int failed_stage, failed_errno;
};

static char child_stack[64 * 1024] __attribute__((aligned(16)));

static int fail(struct job *job, int stage) {
    job->failed_errno = errno;
    job->failed_stage = stage;
    _exit(127);
}

/* Put the fd just opened, `fd`, at `target` (and close it where it was). */
static int move_to(int fd, int target) {
    if (fd == target) return 0;
    if (dup2(fd, target) < 0) return -1;
    return close(fd);
}

static int child_main(void *arg) {
    struct job *job = arg;
    int next = 0;
    if (setsid() < 0) fail(job, STAGE_SETSID);
    if (job->flags & FLAG_PTY) {
        int tty = open(job->slave, O_RDWR);
        if (tty < 0 || move_to(tty, 0) < 0) fail(job, STAGE_STDIO);
        if (dup2(0, 1) < 0 || dup2(0, 2) < 0) fail(job, STAGE_STDIO);
    } else {
        if (job->flags & FLAG_NULL_STDIN) {
            int null = open("/dev/null", O_RDONLY);
            if (null < 0 || move_to(null, 0) < 0) fail(job, STAGE_STDIO);
        } else if (dup2(job->fds[next++], 0) < 0) {
            fail(job, STAGE_STDIO);
        }
        if (dup2(job->fds[next++], 1) < 0 || dup2(job->fds[next++], 2) < 0)
            fail(job, STAGE_STDIO);
    }
    /* (Received fds are all above 3: 0-2 are /dev/null and 3 the channel, so this dup2
     * never meets its own fd.) */
    if ((job->flags & FLAG_SCRIPT) && dup2(job->fds[next], SCRIPT_FD) < 0)
        fail(job, STAGE_STDIO);
    if (chdir(job->cwd) < 0) fail(job, STAGE_CHDIR);
    execve(job->path, job->argv, job->envp);
    return fail(job, STAGE_EXEC);
}

/* Read exactly n bytes (0: done, -1: EOF or error). */
static int read_all(char *buf, size_t n) {
    while (n) {
        ssize_t got = read(CHANNEL, buf, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        buf += got;
        n -= (size_t)got;
    }
    return 0;
}

static int write_all(const char *buf, size_t n) {
    while (n) {
        ssize_t put = write(CHANNEL, buf, n);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return -1;
        buf += put;
        n -= (size_t)put;
    }
    return 0;
}

/* Receive the header and its fds; -1 at EOF or on a malformed message. */
static int receive_header(uint32_t header[4], struct job *job) {
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {header, 16};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t got;
    do got = recvmsg(CHANNEL, &msg, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got <= 0) return -1;
    job->nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (job->nfds < MAX_FDS) job->fds[job->nfds++] = fd;
            else close(fd);
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) return -1;
    if (got < 16 && read_all((char *)header + got, (size_t)(16 - got)) < 0) return -1;
    return 0;
}

/* Point `out[0..count)` at the next NUL-terminated strings of [*at, end); -1 if short. */
static int take_strings(char **at, char *end, char **out, uint32_t count) {
    for (uint32_t i = 0; i < count; i++) {
        char *nul = memchr(*at, '\0', (size_t)(end - *at));
        if (!nul) return -1;
        out[i] = *at;
        *at = nul + 1;
    }
    return 0;
}

static int serve_one(void) {
    uint32_t header[4];
    struct job job;
    memset(&job, 0, sizeof job);
    if (receive_header(header, &job) < 0) return -1;
    uint32_t length = header[0], argc = header[2], envc = header[3];
    job.flags = header[1];
    int wanted = (job.flags & FLAG_PTY) ? 0 : (job.flags & FLAG_NULL_STDIN) ? 2 : 3;
    wanted += (job.flags & FLAG_SCRIPT) ? 1 : 0;
    if (length > MAX_REQUEST || argc == 0 || argc > length || envc > length
        || job.nfds != wanted)
        return -1;
    char *body = malloc(length + 1);
    char **strings = calloc((size_t)argc + envc + 5, sizeof(char *));
    int status = -1;
    if (!body || !strings || read_all(body, length) < 0) goto out;
    body[length] = '\0';
    char *at = body, *end = body + length;
    char *fixed[3] = {0};
    if (take_strings(&at, end, fixed, (job.flags & FLAG_PTY) ? 3 : 2) < 0) goto out;
    job.path = fixed[0];
    job.cwd = fixed[1];
    job.slave = fixed[2];
    job.argv = strings;
    job.envp = strings + argc + 1;
    if (take_strings(&at, end, job.argv, argc) < 0) goto out;
    if (take_strings(&at, end, job.envp, envc) < 0) goto out;
    pid_t pid = clone(child_main, child_stack + sizeof child_stack,
                      CLONE_VM | CLONE_VFORK | CLONE_PARENT | SIGCHLD, &job);
    int32_t reply[3] = {pid, 0, 0};
    if (pid < 0) {
        reply[1] = STAGE_CLONE;
        reply[2] = errno;
    } else if (job.failed_stage) {
        reply[1] = job.failed_stage;
        reply[2] = job.failed_errno;
    }
    status = write_all((const char *)reply, sizeof reply);
out:
    for (int i = 0; i < job.nfds; i++) close(job.fds[i]);
    free(body);
    free(strings);
    return status;
}

/* Close every fd above the channel: whatever the daemon's own parent left inheritable
 * must not reach the commands. */
static void close_other_fds(void) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, CHANNEL + 1, ~0U, 0) == 0) return;
#endif
    DIR *dir = opendir("/proc/self/fd");
    if (!dir) return;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        int fd = atoi(entry->d_name);
        if (fd > CHANNEL && fd != dirfd(dir)) close(fd);
    }
    closedir(dir);
}

/* Wait until `fd` is ready for `events`; 0, or -1 if it never will be. */
static int wait_for(int fd, short events) {
    struct pollfd ready = {fd, events, 0};
    while (poll(&ready, 1, -1) < 0)
        if (errno != EINTR) return -1;
    return (ready.revents & POLLNVAL) ? -1 : 0;
}

/* The output relay: fd 0 to fd 1; 0 at the master's EIO or an EOF, 1 on another error. */
static int relay(void) {
    static char buffer[64 * 1024];
    for (;;) {
        ssize_t got = read(0, buffer, sizeof buffer);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN && wait_for(0, POLLIN) == 0) continue;
            return errno == EIO ? 0 : 1;
        }
        if (got == 0) return 0;
        for (char *at = buffer; got > 0;) {
            ssize_t put = write(1, at, (size_t)got);
            if (put < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN && wait_for(1, POLLOUT) == 0) continue;
                return 1;
            }
            at += put;
            got -= put;
        }
    }
}

int main(int argc, char **argv) {
    (void)argc;
    if (argv[0] && strcmp(argv[0], "sandboxd-pty-relay") == 0) return relay();
    close_other_fds();
    if (fcntl(CHANNEL, F_SETFD, FD_CLOEXEC) < 0) return 2;
    while (serve_one() == 0) {
    }
    return 0;
}
