/*
 * fake_nvml.c: a fake NVML (libnvidia-ml.so.1) over the same simulated devices as the fake
 * libcuda.so.1 (fakegpu.h; built from fake_nvml.c and fakegpu_state.c with -shared -fPIC
 * -Wl,-soname,libnvidia-ml.so.1 -Wl,-Bsymbolic).
 *
 * Environment (read at the first nvmlInit* of the process, besides fakegpu.h's):
 *   FAKEGPU_PID_OFFSET                    added to every reported pid (default 0), to mimic a
 *                                         container's PID namespace seen from the host
 *   FAKEGPU_SAMPLE_PERIOD_US              sampling period (default 166667)
 *   FAKEGPU_SAMPLE_DELAY_US               a sample becomes visible this long after its period
 *                                         ends (default: one period)
 *   FAKEGPU_SAMPLE_NOISE                  k: each smUtil is moved by a deterministic
 *                                         pseudo-random integer in [-k, k], clamped to 0..100
 *                                         (default 0)
 *   FAKEGPU_PROCESS_UTIL_UNSUPPORTED      1: nvmlDeviceGetProcessUtilization returns
 *                                         NVML_ERROR_NOT_SUPPORTED
 *   FAKEGPU_PROCESSES_UTIL_INFO_UNSUPPORTED  1: same for nvmlDeviceGetProcessesUtilizationInfo
 *   FAKEGPU_DRIVER_STRING                 nvmlSystemGetDriverVersion (default "570.124.06")
 *
 * Memory: nvmlDeviceGetMemoryInfo{,_v2} report the physical device: total, used = the bytes of
 * live processes (dead processes' bytes are reclaimed first), free = total - used; _v2 has
 * reserved = 0 and checks version == nvmlMemory_v2.
 * Processes: nvmlDeviceGetComputeRunningProcesses{,_v2,_v3} list live pids with a context or
 * memory on the device (usedGpuMemory in bytes, gpuInstanceId = computeInstanceId =
 * 0xFFFFFFFF); *infoCount in: capacity, out: the number of processes; too small or infos ==
 * NULL with processes present: NVML_ERROR_INSUFFICIENT_SIZE.
 *
 * Process utilisation, from the ring buffer of kernel executions: timestamps are CPU time in
 * microseconds since the epoch, like the real NVML, computed as (CLOCK_MONOTONIC ns +
 * realtime_offset_ns of the state file) / 1000, so every process uses the same grid. Period k
 * covers [k*P, (k+1)*P) us; its samples carry timeStamp (k+1)*P and are visible once now >=
 * (k+1)*P + delay. One sample per pid with busy time in the period: smUtil = round(100 * busy
 * / P) (+ noise), memUtil = encUtil = decUtil = 0. The last FAKEGPU_SAMPLE_HISTORY (32)
 * periods are kept. Only samples with timeStamp > lastSeenTimeStamp are returned; none:
 * NVML_ERROR_NOT_FOUND. samples == NULL or *count too small: NVML_ERROR_INSUFFICIENT_SIZE with
 * the needed count. nvmlDeviceGetUtilizationRates: gpu = the whole device's busy share of the
 * newest visible period.
 *
 * Compute mode is kept per device in the state file (shared). Test hooks:
 * fakenvml_call_count(exact_name) and fakenvml_reset_counts().
 */
#define _GNU_SOURCE
#include "fakegpu.h"
#include "nvml_api.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAKEGPU_SAMPLE_HISTORY 32
#define MAX_PIDS 128

#define FN_NVML(X)                                                                              \
    X(nvmlInit)                                                                                 \
    X(nvmlInit_v2)                                                                              \
    X(nvmlInitWithFlags)                                                                        \
    X(nvmlShutdown)                                                                             \
    X(nvmlErrorString)                                                                          \
    X(nvmlSystemGetDriverVersion)                                                               \
    X(nvmlSystemGetCudaDriverVersion)                                                           \
    X(nvmlSystemGetCudaDriverVersion_v2)                                                        \
    X(nvmlDeviceGetCount)                                                                       \
    X(nvmlDeviceGetCount_v2)                                                                    \
    X(nvmlDeviceGetHandleByIndex)                                                               \
    X(nvmlDeviceGetHandleByIndex_v2)                                                            \
    X(nvmlDeviceGetHandleByUUID)                                                                \
    X(nvmlDeviceGetIndex)                                                                       \
    X(nvmlDeviceGetUUID)                                                                        \
    X(nvmlDeviceGetName)                                                                        \
    X(nvmlDeviceGetPciInfo_v3)                                                                  \
    X(nvmlDeviceGetMemoryInfo)                                                                  \
    X(nvmlDeviceGetMemoryInfo_v2)                                                               \
    X(nvmlDeviceGetComputeRunningProcesses)                                                     \
    X(nvmlDeviceGetComputeRunningProcesses_v2)                                                  \
    X(nvmlDeviceGetComputeRunningProcesses_v3)                                                  \
    X(nvmlDeviceGetProcessUtilization)                                                          \
    X(nvmlDeviceGetProcessesUtilizationInfo)                                                    \
    X(nvmlDeviceGetUtilizationRates)                                                            \
    X(nvmlDeviceSetComputeMode)                                                                 \
    X(nvmlDeviceGetComputeMode)

enum {
#define N_ENUM(name) FNC_##name,
    FN_NVML(N_ENUM)
#undef N_ENUM
        FNC_COUNT
};
static _Atomic uint64_t g_counts[FNC_COUNT];
static const char *const g_names[FNC_COUNT] = {
#define N_NAME(name) #name,
    FN_NVML(N_NAME)
#undef N_NAME
};
#define COUNT(name) atomic_fetch_add_explicit(&g_counts[FNC_##name], 1, memory_order_relaxed)

FG_EXPORT uint64_t fakenvml_call_count(const char *exact_name) {
    if (!exact_name)
        return 0;
    for (int i = 0; i < FNC_COUNT; i++)
        if (strcmp(g_names[i], exact_name) == 0)
            return atomic_load_explicit(&g_counts[i], memory_order_relaxed);
    return 0;
}

FG_EXPORT void fakenvml_reset_counts(void) {
    for (int i = 0; i < FNC_COUNT; i++)
        atomic_store_explicit(&g_counts[i], 0, memory_order_relaxed);
}

struct nvmlDevice_st {
    int index;
};
static struct nvmlDevice_st g_devs[FAKEGPU_MAX_DEVICES] = {{0}, {1}, {2}, {3}};
static _Atomic int g_init_count;

static struct {
    uint64_t pid_offset, period_us, delay_us, noise;
    int util_unsupported, util_info_unsupported;
    char driver[32];
} g_cfg;

static void read_config(void) {
    g_cfg.pid_offset = fakegpu_env_u64("FAKEGPU_PID_OFFSET", 0);
    g_cfg.period_us = fakegpu_env_u64("FAKEGPU_SAMPLE_PERIOD_US", 166667);
    if (g_cfg.period_us == 0)
        g_cfg.period_us = 166667;
    g_cfg.delay_us = fakegpu_env_u64("FAKEGPU_SAMPLE_DELAY_US", g_cfg.period_us);
    g_cfg.noise = fakegpu_env_u64("FAKEGPU_SAMPLE_NOISE", 0);
    g_cfg.util_unsupported = fakegpu_env_u64("FAKEGPU_PROCESS_UTIL_UNSUPPORTED", 0) != 0;
    g_cfg.util_info_unsupported =
        fakegpu_env_u64("FAKEGPU_PROCESSES_UTIL_INFO_UNSUPPORTED", 0) != 0;
    const char *drv = getenv("FAKEGPU_DRIVER_STRING");
    snprintf(g_cfg.driver, sizeof g_cfg.driver, "%s", drv && *drv ? drv : "570.124.06");
}

static nvmlReturn_t do_init(void) {
    fakegpu_state();
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, read_config);
    atomic_fetch_add(&g_init_count, 1);
    return NVML_SUCCESS;
}

#define REQUIRE_INIT()                                                                          \
    do {                                                                                        \
        if (atomic_load(&g_init_count) <= 0)                                                    \
            return NVML_ERROR_UNINITIALIZED;                                                    \
    } while (0)

/* The device index of a handle, or -1. */
static int dev_of(nvmlDevice_t d) {
    if (d < g_devs || d >= g_devs + FAKEGPU_MAX_DEVICES)
        return -1;
    int i = (int)(d - g_devs);
    return i < (int)fakegpu_state()->device_count ? i : -1;
}

#define REQUIRE_DEV(d, var)                                                                     \
    REQUIRE_INIT();                                                                             \
    int var = dev_of(d);                                                                        \
    if (var < 0)                                                                                \
        return NVML_ERROR_INVALID_ARGUMENT;

FG_EXPORT nvmlReturn_t nvmlInit(void) {
    COUNT(nvmlInit);
    return do_init();
}

FG_EXPORT nvmlReturn_t nvmlInit_v2(void) {
    COUNT(nvmlInit_v2);
    return do_init();
}

FG_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    COUNT(nvmlInitWithFlags);
    (void)flags;
    return do_init();
}

FG_EXPORT nvmlReturn_t nvmlShutdown(void) {
    COUNT(nvmlShutdown);
    int n = atomic_load(&g_init_count);
    while (n > 0 && !atomic_compare_exchange_weak(&g_init_count, &n, n - 1)) {
    }
    return n > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

FG_EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    COUNT(nvmlErrorString);
    switch (result) {
    case NVML_SUCCESS:
        return "Success";
    case NVML_ERROR_UNINITIALIZED:
        return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT:
        return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED:
        return "Not Supported";
    case NVML_ERROR_NO_PERMISSION:
        return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND:
        return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE:
        return "Insufficient Size";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH:
        return "Argument version mismatch";
    default:
        return "Unknown Error";
    }
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src) {
    if (!dst)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    COUNT(nvmlSystemGetDriverVersion);
    REQUIRE_INIT();
    return copy_string(version, length, g_cfg.driver);
}

FG_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) {
    COUNT(nvmlSystemGetCudaDriverVersion);
    REQUIRE_INIT();
    if (!v)
        return NVML_ERROR_INVALID_ARGUMENT;
    *v = (int)fakegpu_state()->driver_version;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) {
    COUNT(nvmlSystemGetCudaDriverVersion_v2);
    REQUIRE_INIT();
    if (!v)
        return NVML_ERROR_INVALID_ARGUMENT;
    *v = (int)fakegpu_state()->driver_version;
    return NVML_SUCCESS;
}

static nvmlReturn_t get_count(unsigned int *n) {
    REQUIRE_INIT();
    if (!n)
        return NVML_ERROR_INVALID_ARGUMENT;
    *n = (unsigned int)fakegpu_state()->device_count;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount) {
    COUNT(nvmlDeviceGetCount);
    return get_count(deviceCount);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    COUNT(nvmlDeviceGetCount_v2);
    return get_count(deviceCount);
}

static nvmlReturn_t by_index(unsigned int index, nvmlDevice_t *device) {
    REQUIRE_INIT();
    if (!device || index >= fakegpu_state()->device_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_devs[index];
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    COUNT(nvmlDeviceGetHandleByIndex);
    return by_index(index, device);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    COUNT(nvmlDeviceGetHandleByIndex_v2);
    return by_index(index, device);
}

static void uuid_string(int dev, char out[48]) {
    const uint8_t *u = fakegpu_state()->devices[dev].uuid;
    snprintf(out, 48,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
             u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
             u[14], u[15]);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    COUNT(nvmlDeviceGetHandleByUUID);
    REQUIRE_INIT();
    if (!uuid || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int d = 0; d < (int)fakegpu_state()->device_count; d++) {
        char s[48];
        uuid_string(d, s);
        if (strcmp(s, uuid) == 0) {
            *device = &g_devs[d];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    COUNT(nvmlDeviceGetIndex);
    REQUIRE_DEV(device, d);
    if (!index)
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned int)d;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    COUNT(nvmlDeviceGetUUID);
    REQUIRE_DEV(device, d);
    char s[48];
    uuid_string(d, s);
    return copy_string(uuid, length, s);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    COUNT(nvmlDeviceGetName);
    REQUIRE_DEV(device, d);
    return copy_string(name, length, fakegpu_state()->devices[d].name);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    COUNT(nvmlDeviceGetPciInfo_v3);
    REQUIRE_DEV(device, d);
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof *pci);
    pci->bus = (unsigned int)(0x18 + d);
    pci->pciDeviceId = 0x233510de;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02x:00.0", pci->bus & 0xffu);
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02x:00.0", pci->bus & 0xffu);
    return NVML_SUCCESS;
}

/* Bytes of live processes on dev (after reclaiming dead ones). */
static uint64_t used_bytes(int dev) {
    fakegpu_reclaim_dead();
    return atomic_load(&fakegpu_state()->devices[dev].used_bytes);
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    COUNT(nvmlDeviceGetMemoryInfo);
    REQUIRE_DEV(device, d);
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t total = fakegpu_state()->devices[d].mem_bytes, used = used_bytes(d);
    memory->total = total;
    memory->used = used;
    memory->free = used >= total ? 0 : total - used;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    COUNT(nvmlDeviceGetMemoryInfo_v2);
    REQUIRE_DEV(device, d);
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    uint64_t total = fakegpu_state()->devices[d].mem_bytes, used = used_bytes(d);
    memory->total = total;
    memory->reserved = 0;
    memory->used = used;
    memory->free = used >= total ? 0 : total - used;
    return NVML_SUCCESS;
}

struct proc_row {
    uint64_t pid;
    uint64_t used;
};

/* Live processes with a context or memory on dev, one row per pid. */
static size_t running(int dev, struct proc_row *rows, size_t cap) {
    fakegpu_reclaim_dead();
    struct fakegpu_state *s = fakegpu_state();
    size_t n = 0;
    for (int i = 0; i < FAKEGPU_MAX_PROCS; i++) {
        struct fakegpu_proc *p = &s->procs[i];
        uint64_t pid = atomic_load(&p->pid);
        uint64_t used = atomic_load(&p->used[dev]), ctx = atomic_load(&p->contexts[dev]);
        if (pid == 0 || pid == FAKEGPU_PID_RECLAIMING || (!used && !ctx) ||
            !fakegpu_pid_alive(pid))
            continue;
        size_t k = 0;
        while (k < n && rows[k].pid != pid)
            k++;
        if (k == n) {
            if (n == cap)
                continue;
            rows[n].pid = pid;
            rows[n].used = 0;
            n++;
        }
        rows[k].used += used;
    }
    return n;
}

#define RUNNING_PROCESSES(name, type, extra)                                                    \
    COUNT(name);                                                                                \
    REQUIRE_DEV(device, d);                                                                     \
    if (!infoCount)                                                                             \
        return NVML_ERROR_INVALID_ARGUMENT;                                                     \
    struct proc_row rows[FAKEGPU_MAX_PROCS];                                                    \
    size_t n = running(d, rows, FAKEGPU_MAX_PROCS);                                             \
    if (n > 0 && (!infos || *infoCount < n)) {                                                  \
        *infoCount = (unsigned int)n;                                                           \
        return NVML_ERROR_INSUFFICIENT_SIZE;                                                    \
    }                                                                                           \
    for (size_t i = 0; i < n; i++) {                                                            \
        type *o = &infos[i];                                                                    \
        memset(o, 0, sizeof *o);                                                                \
        o->pid = (unsigned int)(rows[i].pid + g_cfg.pid_offset);                                \
        o->usedGpuMemory = rows[i].used;                                                        \
        extra;                                                                                  \
    }                                                                                           \
    *infoCount = (unsigned int)n;                                                               \
    return NVML_SUCCESS;

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device,
                                                            unsigned int *infoCount,
                                                            nvmlProcessInfo_v1_t *infos) {
    RUNNING_PROCESSES(nvmlDeviceGetComputeRunningProcesses, nvmlProcessInfo_v1_t, (void)0)
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device,
                                                               unsigned int *infoCount,
                                                               nvmlProcessInfo_v2_t *infos) {
    RUNNING_PROCESSES(nvmlDeviceGetComputeRunningProcesses_v2, nvmlProcessInfo_v2_t,
                      o->gpuInstanceId = o->computeInstanceId = 0xFFFFFFFFu)
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                               unsigned int *infoCount,
                                                               nvmlProcessInfo_t *infos) {
    RUNNING_PROCESSES(nvmlDeviceGetComputeRunningProcesses_v3, nvmlProcessInfo_t,
                      o->gpuInstanceId = o->computeInstanceId = 0xFFFFFFFFu)
}

/* ---- utilisation samples ---- */

struct sample {
    uint64_t ts_us;
    uint64_t pid; /* real pid */
    unsigned sm;
};

static uint64_t now_us(void) {
    return (uint64_t)((int64_t)fakegpu_now_ns() + fakegpu_state()->realtime_offset_ns) / 1000;
}

static uint64_t splitmix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static unsigned util_percent(uint64_t busy_ns, uint64_t period_us, uint64_t pid, uint64_t k,
                             int dev) {
    int64_t u = (int64_t)((busy_ns * 100 + period_us * 500) / (period_us * 1000));
    if (g_cfg.noise) {
        uint64_t h = splitmix(pid * 1000003ull ^ k * 7919ull ^ (uint64_t)dev);
        u += (int64_t)(h % (2 * g_cfg.noise + 1)) - (int64_t)g_cfg.noise;
    }
    return (unsigned)(u < 0 ? 0 : u > 100 ? 100 : u);
}

/*
 * The visible periods after lastSeen (at most FAKEGPU_SAMPLE_HISTORY), one pass over the ring:
 * fills out[] (at most cap) with one sample per (period, pid) with busy time, oldest period
 * first; returns the count. whole: one sample per period for the whole device instead (pid 0).
 */
static size_t collect(int dev, uint64_t last_seen, struct sample *out, size_t cap, int whole) {
    const uint64_t P = g_cfg.period_us;
    uint64_t now = now_us();
    if (now < g_cfg.delay_us + P)
        return 0;
    uint64_t k_max = (now - g_cfg.delay_us) / P - 1;
    uint64_t k_min = k_max + 1 >= FAKEGPU_SAMPLE_HISTORY ? k_max + 1 - FAKEGPU_SAMPLE_HISTORY : 0;
    if (last_seen / P > k_min)
        k_min = last_seen / P;
    if (k_min > k_max)
        return 0;
    size_t nk = (size_t)(k_max - k_min + 1);
    uint64_t pids[MAX_PIDS];
    size_t np = 0;
    uint64_t(*busy)[MAX_PIDS] = calloc(FAKEGPU_SAMPLE_HISTORY, sizeof *busy);
    if (!busy)
        return 0;

    struct fakegpu_state *s = fakegpu_state();
    int64_t off = s->realtime_offset_ns;
    uint64_t from = (uint64_t)((int64_t)(k_min * P * 1000) - off);
    uint64_t to = (uint64_t)((int64_t)((k_max + 1) * P * 1000) - off);
    uint64_t w = atomic_load_explicit(&s->ring_write, memory_order_acquire);
    uint64_t lo = w > FAKEGPU_RING_SIZE ? w - FAKEGPU_RING_SIZE : 0;
    for (uint64_t j = w; j > lo; j--) {
        uint64_t idx = j - 1;
        struct fakegpu_ring_entry *e = &s->ring[idx % FAKEGPU_RING_SIZE];
        uint64_t seq = atomic_load_explicit(&e->seq, memory_order_acquire);
        uint64_t pd = atomic_load_explicit(&e->pid_dev, memory_order_relaxed);
        uint64_t a = atomic_load_explicit(&e->start_ns, memory_order_relaxed);
        uint64_t b = atomic_load_explicit(&e->end_ns, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (seq != idx + 1 || atomic_load_explicit(&e->seq, memory_order_relaxed) != seq)
            continue;
        if ((int)(pd >> 32) != dev)
            continue;
        if (b + 1000000000ull < from)
            break;
        if (b <= from || a >= to)
            continue;
        uint64_t pid = whole ? 0 : (pd & 0xffffffffull);
        size_t pi = 0;
        while (pi < np && pids[pi] != pid)
            pi++;
        if (pi == np) {
            if (np == MAX_PIDS)
                continue;
            pids[np++] = pid;
        }
        for (size_t k = 0; k < nk; k++) {
            uint64_t ps = (uint64_t)((int64_t)((k_min + k) * P * 1000) - off);
            uint64_t pe = ps + P * 1000;
            uint64_t x = a > ps ? a : ps, y = b < pe ? b : pe;
            if (y > x)
                busy[k][pi] += y - x;
        }
    }
    size_t n = 0;
    for (size_t k = 0; k < nk; k++)
        for (size_t pi = 0; pi < np; pi++)
            if (busy[k][pi] && n < cap) {
                out[n].ts_us = (k_min + k + 1) * P;
                out[n].pid = pids[pi];
                out[n].sm = util_percent(busy[k][pi], P, pids[pi], k_min + k, dev);
                n++;
            }
    free(busy);
    return n;
}

#define MAX_SAMPLES (FAKEGPU_SAMPLE_HISTORY * MAX_PIDS)

FG_EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                                       nvmlProcessUtilizationSample_t *utilization,
                                                       unsigned int *processSamplesCount,
                                                       unsigned long long lastSeenTimeStamp) {
    COUNT(nvmlDeviceGetProcessUtilization);
    REQUIRE_DEV(device, d);
    if (g_cfg.util_unsupported)
        return NVML_ERROR_NOT_SUPPORTED;
    if (!processSamplesCount)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sample *buf = calloc(MAX_SAMPLES, sizeof *buf);
    if (!buf)
        return NVML_ERROR_UNKNOWN;
    size_t n = collect(d, lastSeenTimeStamp, buf, MAX_SAMPLES, 0);
    nvmlReturn_t r = NVML_SUCCESS;
    if (n == 0)
        r = NVML_ERROR_NOT_FOUND;
    else if (!utilization || *processSamplesCount < n)
        r = NVML_ERROR_INSUFFICIENT_SIZE;
    if (r != NVML_SUCCESS) {
        *processSamplesCount = (unsigned int)n;
        free(buf);
        return r;
    }
    for (size_t i = 0; i < n; i++) {
        nvmlProcessUtilizationSample_t *o = &utilization[i];
        memset(o, 0, sizeof *o);
        o->pid = (unsigned int)(buf[i].pid + g_cfg.pid_offset);
        o->timeStamp = buf[i].ts_us;
        o->smUtil = buf[i].sm;
    }
    *processSamplesCount = (unsigned int)n;
    free(buf);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetProcessesUtilizationInfo(nvmlDevice_t device,
                                                             nvmlProcessesUtilizationInfo_t *info) {
    COUNT(nvmlDeviceGetProcessesUtilizationInfo);
    REQUIRE_DEV(device, d);
    if (g_cfg.util_info_unsupported)
        return NVML_ERROR_NOT_SUPPORTED;
    if (!info)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != nvmlProcessesUtilizationInfo_v1)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    struct sample *buf = calloc(MAX_SAMPLES, sizeof *buf);
    if (!buf)
        return NVML_ERROR_UNKNOWN;
    size_t n = collect(d, info->lastSeenTimeStamp, buf, MAX_SAMPLES, 0);
    nvmlReturn_t r = NVML_SUCCESS;
    if (n == 0)
        r = NVML_ERROR_NOT_FOUND;
    else if (!info->procUtilArray || info->processSamplesCount < n)
        r = NVML_ERROR_INSUFFICIENT_SIZE;
    if (r != NVML_SUCCESS) {
        info->processSamplesCount = (unsigned int)n;
        free(buf);
        return r;
    }
    for (size_t i = 0; i < n; i++) {
        nvmlProcessUtilizationInfo_v1_t *o = &info->procUtilArray[i];
        memset(o, 0, sizeof *o);
        o->pid = (unsigned int)(buf[i].pid + g_cfg.pid_offset);
        o->timeStamp = buf[i].ts_us;
        o->smUtil = buf[i].sm;
    }
    info->processSamplesCount = (unsigned int)n;
    free(buf);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                     nvmlUtilization_t *utilization) {
    COUNT(nvmlDeviceGetUtilizationRates);
    REQUIRE_DEV(device, d);
    if (!utilization)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sample buf[FAKEGPU_SAMPLE_HISTORY];
    size_t n = collect(d, 0, buf, FAKEGPU_SAMPLE_HISTORY, 1);
    uint64_t newest = now_us() >= g_cfg.delay_us ? (now_us() - g_cfg.delay_us) / g_cfg.period_us
                                                 : 0;
    utilization->gpu = 0;
    utilization->memory = 0;
    /* the newest visible period ends at newest * P; idle periods have no sample */
    if (n && buf[n - 1].ts_us == newest * g_cfg.period_us)
        utilization->gpu = buf[n - 1].sm;
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceSetComputeMode(nvmlDevice_t device, nvmlComputeMode_t mode) {
    COUNT(nvmlDeviceSetComputeMode);
    REQUIRE_DEV(device, d);
    if (mode < NVML_COMPUTEMODE_DEFAULT || mode > NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
        return NVML_ERROR_INVALID_ARGUMENT;
    atomic_store(&fakegpu_state()->devices[d].compute_mode, (uint64_t)mode);
    return NVML_SUCCESS;
}

FG_EXPORT nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, nvmlComputeMode_t *mode) {
    COUNT(nvmlDeviceGetComputeMode);
    REQUIRE_DEV(device, d);
    if (!mode)
        return NVML_ERROR_INVALID_ARGUMENT;
    *mode = (nvmlComputeMode_t)atomic_load(&fakegpu_state()->devices[d].compute_mode);
    return NVML_SUCCESS;
}
