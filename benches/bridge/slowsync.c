/* The benchmark's slow disk (benches/bridge/slowdisk.rs compiles this with `cc` into target/ at run
 * time and preloads it, with LD_PRELOAD, into the mqtt-uplink process of the slow-disk row only).
 *
 * Every fsync, fdatasync and sync_file_range of the process first sleeps SLOWSYNC_DELAY_US
 * microseconds (default 10,000), then does the real call. Each delayed call also increments the
 * 64-bit counter in the file named by SLOWSYNC_COUNTER (8 bytes, mapped shared), so the benchmark
 * can tell that the shim took effect and how many syncs a run made. errno is that of the real call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static long delay_us = 10000;
static uint64_t *counter;

__attribute__((constructor)) static void slowsync_init(void) {
    const char *d = getenv("SLOWSYNC_DELAY_US");
    if (d != NULL) {
        delay_us = strtol(d, NULL, 10);
    }
    const char *c = getenv("SLOWSYNC_COUNTER");
    if (c != NULL) {
        int fd = open(c, O_RDWR | O_CLOEXEC);
        if (fd >= 0) {
            void *p = mmap(NULL, sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED) {
                counter = p;
            }
            close(fd);
        }
    }
}

static void slowsync_delay(void) {
    int saved = errno;
    struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
    if (counter != NULL) {
        __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    }
    errno = saved;
}

static void *slowsync_next(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (f == NULL) {
        abort();
    }
    return f;
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) {
        real = (int (*)(int))slowsync_next("fsync");
    }
    slowsync_delay();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) {
        real = (int (*)(int))slowsync_next("fdatasync");
    }
    slowsync_delay();
    return real(fd);
}

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags) {
    static int (*real)(int, off64_t, off64_t, unsigned int);
    if (real == NULL) {
        real = (int (*)(int, off64_t, off64_t, unsigned int))slowsync_next("sync_file_range");
    }
    slowsync_delay();
    return real(fd, offset, nbytes, flags);
}
