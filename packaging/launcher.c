/*
 * The single-file sandboxd: unpack once, then exec in place.
 *
 * PyInstaller's one-file loader stays behind as the parent of the program it unpacks, so in
 * a container it, not sandboxd, would be PID 1: it reaps nothing but its own child, and its
 * command line (with any --token) stays in /proc/1/cmdline. This launcher instead unpacks the
 * one-folder build appended to it (a zlib stream of records, written by packaging/pack.py)
 * into a private directory and execve()s the program there, so the pid it was started as
 * (1 in a container) becomes sandboxd itself.
 *
 * The directory is $SANDBOXD_UNPACK_DIR, else $TMPDIR or /tmp, plus "sandboxd-<payload id>".
 * It is reused by later starts only if it is a real directory owned by this user and closed
 * to everyone else (a stranger could otherwise plant a program there for root to run);
 * otherwise the launcher unpacks into a fresh private directory. A directory only gets its
 * final name, by rename(), once it is complete.
 *
 * Layout of the file: [this launcher][payload][trailer]. Trailer (48 bytes, little-endian):
 * u64 payload offset, u64 payload length, u32 crc32 of the payload, 4 zero bytes, 16 ASCII
 * hex chars of payload id, "SBXDPAK1". The crc32 is checked before anything is unpacked.
 * Records inside the inflated payload: u8 kind ('d', 'f', 'l', or 'e' for the end), u32 mode,
 * u16 path length, path, u64 size, then size bytes (file contents or symlink target).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define TRAILER_SIZE 48
#define MAGIC "SBXDPAK1"
#define CHUNK (256 * 1024)

/* A directory being unpacked into, removed if the launcher gives up. */
static const char *unpacking;

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "sandboxd launcher: %s%s%s%s%s\n", what, detail ? ": " : "",
            detail ? detail : "", errno ? ": " : "", errno ? strerror(errno) : "");
    if (unpacking) nftw(unpacking, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    exit(127);
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* The artifact was damaged: say so, and leave nothing unpacked. */
static void corrupt(const char *why) {
    errno = 0;
    die("payload is corrupt", why);
}

/* The compressed payload, read from our own executable and inflated on demand. */
struct payload {
    int fd;
    uint64_t next, end;  /* file offsets of the compressed bytes still to read */
    int ended;           /* zlib saw the stream's end, and its checksum matched */
    z_stream z;
    unsigned char in[CHUNK];
};

/* Inflate until `n` bytes are out (n == 0: until the stream's end, which must come next). */
static void payload_read(struct payload *p, void *out, size_t n) {
    unsigned char extra;
    p->z.next_out = n ? out : &extra;
    p->z.avail_out = n ? (uInt)n : 1;
    while (n ? p->z.avail_out > 0 : !p->ended) {
        if (p->ended) corrupt("ends early");
        if (p->z.avail_in == 0) {
            uint64_t want = p->end - p->next;
            if (want == 0) corrupt("ends early");
            if (want > CHUNK) want = CHUNK;
            ssize_t got = pread(p->fd, p->in, (size_t)want, (off_t)p->next);
            if (got <= 0) die("cannot read the payload", NULL);
            p->next += (uint64_t)got;
            p->z.next_in = p->in;
            p->z.avail_in = (uInt)got;
        }
        int rc = inflate(&p->z, Z_NO_FLUSH);
        if (rc == Z_STREAM_END) p->ended = 1;
        else if (rc != Z_OK) corrupt(p->z.msg ? p->z.msg : "inflate failed");
        if (!n && p->z.avail_out == 0) corrupt("data after the end record");
    }
}

static uint64_t payload_u(struct payload *p, int bytes) {
    unsigned char b[8] = {0};
    payload_read(p, b, (size_t)bytes);
    return le64(b);
}

/* A path inside the bundle: relative, no "..", no empty parts. */
static int safe_path(const char *path) {
    if (path[0] == '\0' || path[0] == '/') return 0;
    for (const char *part = path; part; ) {
        const char *slash = strchr(part, '/');
        size_t len = slash ? (size_t)(slash - part) : strlen(part);
        if (len == 0 || (len == 2 && part[0] == '.' && part[1] == '.') ||
            (len == 1 && part[0] == '.'))
            return 0;
        part = slash ? slash + 1 : NULL;
    }
    return 1;
}

static void unpack(struct payload *p, const char *root) {
    static char buf[CHUNK];
    char path[PATH_MAX], name[PATH_MAX];
    for (;;) {
        int kind = (int)payload_u(p, 1);
        if (kind == 'e') {
            payload_read(p, NULL, 0);  /* the stream must end here, checksum intact */
            return;
        }
        mode_t mode = (mode_t)payload_u(p, 4) & 07777;
        size_t len = (size_t)payload_u(p, 2);
        if (len >= sizeof name) corrupt("path too long");
        payload_read(p, name, len);
        name[len] = '\0';
        uint64_t size = payload_u(p, 8);
        if (!safe_path(name)) corrupt("unsafe path");
        errno = 0;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", root, name) >= sizeof path)
            die("path too long", name);
        if (kind == 'd') {
            if (mkdir(path, 0700) != 0) die("cannot make", path);
        } else if (kind == 'l') {
            if (size >= sizeof buf) corrupt("symlink target too long");
            payload_read(p, buf, (size_t)size);
            buf[size] = '\0';
            if (symlink(buf, path) != 0) die("cannot link", path);
        } else if (kind == 'f') {
            int out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (out < 0) die("cannot create", path);
            while (size > 0) {
                size_t n = size > CHUNK ? CHUNK : (size_t)size;
                payload_read(p, buf, n);
                for (size_t done = 0; done < n; ) {
                    ssize_t w = write(out, buf + done, n - done);
                    if (w < 0) { if (errno == EINTR) continue; die("cannot write", path); }
                    done += (size_t)w;
                }
                size -= n;
            }
            if (fchmod(out, mode & 0755) != 0 || close(out) != 0) die("cannot finish", path);
        } else {
            corrupt("unknown record");
        }
    }
}

/* Whether `dir` is a complete unpacked bundle only this user can have written. */
static int trusted_dir(const char *dir) {
    struct stat st;
    return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid() &&
           (st.st_mode & 077) == 0;
}

/* Whether the compressed payload's crc32 is the one the trailer records. */
static int payload_intact(int fd, uint64_t next, uint64_t end, uint32_t expected) {
    static unsigned char buf[CHUNK];
    uLong crc = crc32(0L, Z_NULL, 0);
    while (next < end) {
        size_t want = end - next > CHUNK ? CHUNK : (size_t)(end - next);
        ssize_t got = pread(fd, buf, want, (off_t)next);
        if (got <= 0) die("cannot read the payload", NULL);
        crc = crc32(crc, buf, (uInt)got);
        next += (uint64_t)got;
    }
    return (uint32_t)crc == expected;
}

int main(int argc, char **argv) {
    (void)argc;
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("cannot open /proc/self/exe (is /proc mounted?)", NULL);
    struct stat st;
    unsigned char trailer[TRAILER_SIZE];
    if (fstat(fd, &st) != 0 || st.st_size < TRAILER_SIZE ||
        pread(fd, trailer, TRAILER_SIZE, st.st_size - TRAILER_SIZE) != TRAILER_SIZE)
        die("cannot read own trailer", NULL);
    errno = 0;
    if (memcmp(trailer + 40, MAGIC, 8) != 0) die("no payload appended to this launcher", NULL);
    char id[17];
    memcpy(id, trailer + 24, 16);
    id[16] = '\0';
    if (strspn(id, "0123456789abcdef") != 16) die("the trailer's payload id is damaged", id);

    const char *base = getenv("SANDBOXD_UNPACK_DIR");
    if (!base || !*base) base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    char dir[PATH_MAX], program[PATH_MAX], fresh[PATH_MAX];
    if ((size_t)snprintf(dir, sizeof dir, "%s/sandboxd-%s", base, id) >= sizeof dir)
        die("unpack directory name too long", base);

    if (!trusted_dir(dir)) {
        if ((size_t)snprintf(fresh, sizeof fresh, "%s/.sandboxd-%s-XXXXXX", base, id) >=
            sizeof fresh)
            die("unpack directory name too long", base);
        struct payload *p = calloc(1, sizeof *p);
        if (!p) die("out of memory", NULL);
        p->fd = fd;
        p->next = le64(trailer);
        p->end = p->next + le64(trailer + 8);
        if (p->end > (uint64_t)st.st_size - TRAILER_SIZE || p->end < p->next ||
            !payload_intact(fd, p->next, p->end, (uint32_t)le64(trailer + 16)))
            corrupt("checksum mismatch (a damaged download or copy?)");
        if (!mkdtemp(fresh)) die("cannot make a directory in", base);  /* mode 0700 */
        if (inflateInit(&p->z) != Z_OK) die("cannot start zlib", NULL);
        unpacking = fresh;
        unpack(p, fresh);
        unpacking = NULL;
        inflateEnd(&p->z);
        free(p);
        if (rename(fresh, dir) != 0) {
            /* Another launcher finished first (fine), or a stranger's entry holds the name
             * (then this start runs from its own private copy, and leaves it behind). */
            if (trusted_dir(dir)) {
                nftw(fresh, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
            } else {
                memcpy(dir, fresh, sizeof dir);
            }
        }
    }
    close(fd);
    if ((size_t)snprintf(program, sizeof program, "%s/sandboxd", dir) >= sizeof program)
        die("program path too long", dir);
    /* A live upgrade without an uploaded candidate re-execs the artifact (which unpacks
     * whatever payload it holds by then), so the program is told where it came from. */
    char self[PATH_MAX];
    if (realpath("/proc/self/exe", self) && setenv("SANDBOXD_ARTIFACT", self, 1) != 0)
        die("cannot set SANDBOXD_ARTIFACT", NULL);
    execv(program, argv);
    die("cannot run (a noexec file system? set SANDBOXD_UNPACK_DIR)", program);
    return 127;
}
