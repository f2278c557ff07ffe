/*
 * fakegpu_state.c: mapping and updating the shared fake-GPU state (see fakegpu.h). Compiled
 * into both fakes; every function here is hidden, so the two copies never interpose.
 */
#define _GNU_SOURCE
#include "fakegpu.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static struct fakegpu_state *g_state;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static uint64_t g_pid;
static struct fakegpu_proc *g_proc;
static pthread_mutex_t g_proc_lock = PTHREAD_MUTEX_INITIALIZER;

#define RLX memory_order_relaxed

static void die(const char *what) {
    fprintf(stderr, "fakegpu: %s: %s\n", what, strerror(errno));
    abort();
}

uint64_t fakegpu_env_u64(const char *name, uint64_t def) {
    const char *v = getenv(name);
    if (!v || !*v)
        return def;
    char *end = NULL;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    if (errno || !end || *end)
        return def;
    return (uint64_t)x;
}

uint64_t fakegpu_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void fakegpu_sleep_until(uint64_t mono_ns) {
    struct timespec ts = {.tv_sec = (time_t)(mono_ns / 1000000000ull),
                          .tv_nsec = (long)(mono_ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

void fakegpu_uuid(int dev, uint8_t out[16]) {
    static const uint8_t base[16] = {0x46, 0x41, 0x4b, 0x45, 0xd0, 0x0d, 0x40, 0x00,
                                     0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    memcpy(out, base, 16);
    out[15] = (uint8_t)(0x10 + dev);
}

static void init_contents(struct fakegpu_state *s) {
    memset(s, 0, sizeof *s);
    uint64_t n = fakegpu_env_u64("FAKEGPU_DEVICES", 1);
    if (n < 1)
        n = 1;
    if (n > FAKEGPU_MAX_DEVICES)
        n = FAKEGPU_MAX_DEVICES;
    s->device_count = n;
    s->driver_version = fakegpu_env_u64("FAKEGPU_DRIVER_VERSION", 12080);
    struct timespec rt, mono;
    clock_gettime(CLOCK_REALTIME, &rt);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    s->realtime_offset_ns = ((int64_t)rt.tv_sec - (int64_t)mono.tv_sec) * 1000000000ll +
                            ((int64_t)rt.tv_nsec - (int64_t)mono.tv_nsec);
    for (int d = 0; d < FAKEGPU_MAX_DEVICES; d++) {
        struct fakegpu_device *dv = &s->devices[d];
        dv->sms = fakegpu_env_u64("FAKEGPU_SMS", 132);
        if (dv->sms == 0)
            dv->sms = 1;
        dv->threads_per_sm = fakegpu_env_u64("FAKEGPU_THREADS_PER_SM", 2048);
        if (dv->threads_per_sm == 0)
            dv->threads_per_sm = 2048;
        dv->mem_bytes = fakegpu_env_u64("FAKEGPU_MEM_BYTES", 150323855360ull);
        dv->ctx_overhead = fakegpu_env_u64("FAKEGPU_CTX_OVERHEAD", 0);
        fakegpu_uuid(d, dv->uuid);
        snprintf(dv->name, sizeof dv->name, "Fake H200");
        atomic_store_explicit(&dv->next_addr, 0x200000000000ull + ((uint64_t)d << 40), RLX);
    }
    s->size = sizeof *s;
    s->version = FAKEGPU_VERSION;
    atomic_thread_fence(memory_order_release);
    s->magic = FAKEGPU_MAGIC;
}

static int valid(const struct fakegpu_state *s) {
    return s->magic == FAKEGPU_MAGIC && s->version == FAKEGPU_VERSION && s->size == sizeof *s;
}

static void after_fork_child(void) {
    g_pid = (uint64_t)getpid();
    g_proc = NULL;
    pthread_mutex_init(&g_proc_lock, NULL);
}

static void map_state(void) {
    g_pid = (uint64_t)getpid();
    pthread_atfork(NULL, NULL, after_fork_child);
    const char *path = getenv("FAKEGPU_STATE");
    struct fakegpu_state *s;
    if (!path || !*path) {
        s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (s == MAP_FAILED)
            die("mmap of the anonymous state");
        init_contents(s);
        g_state = s;
        return;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0)
        die(path);
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR)
            die("flock of the state file");
    }
    struct stat st;
    if (fstat(fd, &st) != 0)
        die("fstat of the state file");
    if ((size_t)st.st_size != sizeof *s && ftruncate(fd, (off_t)sizeof *s) != 0)
        die("ftruncate of the state file");
    s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (s == MAP_FAILED)
        die("mmap of the state file");
    if (!valid(s))
        init_contents(s);
    flock(fd, LOCK_UN);
    close(fd);
    g_state = s;
}

struct fakegpu_state *fakegpu_state(void) {
    struct fakegpu_state *s = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE);
    if (__builtin_expect(s != NULL, 1))
        return s;
    pthread_once(&g_once, map_state);
    return g_state;
}

uint64_t fakegpu_pid(void) {
    fakegpu_state();
    return g_pid;
}

int fakegpu_pid_alive(uint64_t pid) {
    if (pid == 0 || pid == FAKEGPU_PID_RECLAIMING || pid > (uint64_t)INT32_MAX)
        return 0;
    return !(kill((pid_t)pid, 0) != 0 && errno == ESRCH);
}

void fakegpu_reclaim_dead(void) {
    struct fakegpu_state *s = fakegpu_state();
    for (int i = 0; i < FAKEGPU_MAX_PROCS; i++) {
        struct fakegpu_proc *p = &s->procs[i];
        uint64_t pid = atomic_load_explicit(&p->pid, memory_order_acquire);
        if (pid == 0 || pid == FAKEGPU_PID_RECLAIMING || fakegpu_pid_alive(pid))
            continue;
        if (!atomic_compare_exchange_strong(&p->pid, &pid, FAKEGPU_PID_RECLAIMING))
            continue;
        for (int d = 0; d < FAKEGPU_MAX_DEVICES; d++) {
            uint64_t used = atomic_exchange(&p->used[d], 0);
            if (used)
                atomic_fetch_sub(&s->devices[d].used_bytes, used);
            atomic_store(&p->contexts[d], 0);
        }
        atomic_store_explicit(&p->pid, 0, memory_order_release);
    }
}

struct fakegpu_proc *fakegpu_my_proc(void) {
    struct fakegpu_state *s = fakegpu_state();
    struct fakegpu_proc *p = __atomic_load_n(&g_proc, __ATOMIC_ACQUIRE);
    if (p)
        return p;
    pthread_mutex_lock(&g_proc_lock);
    for (int attempt = 0; attempt < 2 && !g_proc; attempt++) {
        for (int i = 0; i < FAKEGPU_MAX_PROCS; i++) {
            uint64_t zero = 0;
            if (atomic_compare_exchange_strong(&s->procs[i].pid, &zero, g_pid)) {
                __atomic_store_n(&g_proc, &s->procs[i], __ATOMIC_RELEASE);
                break;
            }
        }
        if (!g_proc)
            fakegpu_reclaim_dead();
    }
    p = g_proc;
    pthread_mutex_unlock(&g_proc_lock);
    if (!p)
        fprintf(stderr, "fakegpu: all %d process slots hold live processes\n", FAKEGPU_MAX_PROCS);
    return p;
}

static int try_charge(struct fakegpu_device *dv, uint64_t bytes) {
    uint64_t used = atomic_load_explicit(&dv->used_bytes, RLX);
    for (;;) {
        if (bytes > dv->mem_bytes || used > dv->mem_bytes - bytes)
            return -1;
        if (atomic_compare_exchange_weak(&dv->used_bytes, &used, used + bytes))
            return 0;
    }
}

int fakegpu_charge(int dev, uint64_t bytes) {
    struct fakegpu_state *s = fakegpu_state();
    struct fakegpu_proc *p = fakegpu_my_proc();
    if (!p)
        return -1;
    struct fakegpu_device *dv = &s->devices[dev];
    if (try_charge(dv, bytes) != 0) {
        fakegpu_reclaim_dead();
        if (try_charge(dv, bytes) != 0)
            return -1;
    }
    atomic_fetch_add(&p->used[dev], bytes);
    return 0;
}

void fakegpu_uncharge(int dev, uint64_t bytes) {
    struct fakegpu_state *s = fakegpu_state();
    struct fakegpu_proc *p = fakegpu_my_proc();
    if (!p || bytes == 0)
        return;
    atomic_fetch_sub(&p->used[dev], bytes);
    atomic_fetch_sub(&s->devices[dev].used_bytes, bytes);
}

uint64_t fakegpu_next_addr(int dev, uint64_t bytes) {
    uint64_t span = (bytes + FAKEGPU_GRANULARITY - 1) & ~(FAKEGPU_GRANULARITY - 1);
    if (span == 0)
        span = FAKEGPU_GRANULARITY;
    return atomic_fetch_add(&fakegpu_state()->devices[dev].next_addr, span);
}

void fakegpu_ring_append(uint64_t pid, int dev, uint64_t start_ns, uint64_t end_ns) {
    struct fakegpu_state *s = fakegpu_state();
    uint64_t i = atomic_fetch_add_explicit(&s->ring_write, 1, RLX);
    struct fakegpu_ring_entry *e = &s->ring[i % FAKEGPU_RING_SIZE];
    atomic_store_explicit(&e->seq, 0, RLX);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&e->pid_dev, pid | ((uint64_t)dev << 32), RLX);
    atomic_store_explicit(&e->start_ns, start_ns, RLX);
    atomic_store_explicit(&e->end_ns, end_ns, RLX);
    atomic_store_explicit(&e->seq, i + 1, memory_order_release);
}

size_t fakegpu_busy_by_pid(int dev, uint64_t from_ns, uint64_t to_ns, struct fakegpu_busy *out,
                           size_t cap) {
    struct fakegpu_state *s = fakegpu_state();
    uint64_t w = atomic_load_explicit(&s->ring_write, memory_order_acquire);
    uint64_t lo = w > FAKEGPU_RING_SIZE ? w - FAKEGPU_RING_SIZE : 0;
    size_t n = 0;
    /* A device's entries are appended in (nearly) end-time order: stop a second before the
     * window. */
    for (uint64_t j = w; j > lo; j--) {
        uint64_t idx = j - 1;
        struct fakegpu_ring_entry *e = &s->ring[idx % FAKEGPU_RING_SIZE];
        uint64_t seq = atomic_load_explicit(&e->seq, memory_order_acquire);
        uint64_t pd = atomic_load_explicit(&e->pid_dev, RLX);
        uint64_t a = atomic_load_explicit(&e->start_ns, RLX);
        uint64_t b = atomic_load_explicit(&e->end_ns, RLX);
        atomic_thread_fence(memory_order_acquire);
        if (seq != idx + 1 || atomic_load_explicit(&e->seq, RLX) != seq)
            continue;
        if ((int)(pd >> 32) != dev)
            continue;
        if (b + 1000000000ull < from_ns)
            break;
        uint64_t lo_t = a > from_ns ? a : from_ns;
        uint64_t hi_t = b < to_ns ? b : to_ns;
        if (hi_t <= lo_t)
            continue;
        uint64_t pid = pd & 0xffffffffull;
        size_t k = 0;
        while (k < n && out[k].pid != pid)
            k++;
        if (k == n) {
            if (n == cap)
                continue;
            out[n].pid = pid;
            out[n].busy_ns = 0;
            n++;
        }
        out[k].busy_ns += hi_t - lo_t;
    }
    return n;
}
