/*
 * probe: a test program that reaches the driver the way the CUDA runtime does, by
 * dlopen("libcuda.so.1") + dlsym (or cuGetProcAddress), so the limiter is exercised through
 * the same paths as cudart, PyTorch and static cudart. Built by limiter/tests/support and run
 * with LD_PRELOAD=libvcuda.so (or without, as the baseline). Prints `key value` lines.
 *
 *   probe idle                          touch no CUDA; print threads and open fds
 *   probe nvml                          NVML only, no CUDA (like nvidia-smi): memory of device 0
 *   probe uuid                          print the NVML-form UUID of device 0
 *   probe dlsym NAME...                 dlsym each NAME on the driver handle, RTLD_DEFAULT and
 *                                       RTLD_NEXT; print the object each pointer lives in
 *   probe getproc BASE VERSION FLAGS    cuGetProcAddress_v2 and cuGetProcAddress; print the
 *                                       object and the exact fake export the pointer is
 *   probe meminfo                       cuMemGetInfo(_v2), cuDeviceTotalMem(_v2), NVML memory
 *   probe fill PATH CHUNK               allocate CHUNK bytes through PATH until it fails; print
 *                                       the bytes obtained and the error; then free all
 *   probe hold BYTES SECONDS            allocate and sleep (the kill -9 test)
 *   probe race CHUNK                    fill with cuMemAlloc_v2, report, keep it 1 s
 *   probe fork BYTES                    allocate, fork; the child allocates BYTES too
 *   probe busy KERNEL_US SECONDS DEPTH [ptsz|graph|large]
 *                                       launch `busy` kernels for SECONDS, DEPTH in flight
 *   probe direct BYTES                  call cuMemAlloc_v2 by its linked symbol (needs -lcuda)
 *   probe launches N                    N `noop` launches; print ns per launch
 *   probe paced N GAP_NS                N `noop` launches, one per GAP_NS (so a share's bucket never
 *                                       has to wait); print the mean ns inside the launch call
 *   probe allocs N                      N cuMemAlloc_v2 + cuMemFree_v2 of 1 MiB; ns per pair
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream, *CUevent, *CUgraph, *CUgraphExec, *CUarray, *CUmemoryPool;
typedef unsigned long long CUdeviceptr;
typedef struct { size_t w, h; int fmt; unsigned ch; } AD;
typedef struct { size_t w, h, d; int fmt; unsigned ch, flags; } AD3;
typedef struct { int type, handleTypes; struct { int type, id; } loc; void *win; unsigned char flags[8]; } Prop;
typedef struct { unsigned long long total, free, used; } NvMem;

static void *cu, *nv;
/* Resolved only when the probe is linked against libcuda (-lcuda): the direct-link case. */
extern CUresult cuMemAlloc_v2(CUdeviceptr *, size_t) __attribute__((weak));
#define SYM(name) ((void *)dlsym(cu, #name))
#define CALL(T, name, ...) (((T)SYM(name))(__VA_ARGS__))

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *where(void *p) {
    Dl_info i;
    if (!p) return "null";
    if (!dladdr(p, &i) || !i.dli_fname) return "unknown";
    const char *s = strrchr(i.dli_fname, '/');
    return s ? s + 1 : i.dli_fname;
}

static void open_driver(void) {
    cu = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cu) { printf("error dlopen %s\n", dlerror()); exit(2); }
    nv = dlopen("libnvidia-ml.so.1", RTLD_NOW);
}

static CUcontext ctx;
static void init_ctx(void) {
    open_driver();
    CUresult r = CALL(CUresult (*)(unsigned), cuInit, 0);
    printf("cuInit %d\n", r);
    if (r) { fflush(stdout); exit(3); }
    CALL(CUresult (*)(CUcontext *, int), cuDevicePrimaryCtxRetain, &ctx, 0);
    CALL(CUresult (*)(CUcontext), cuCtxSetCurrent, ctx);
}

static int count_dir(const char *path) {
    DIR *d = opendir(path);
    int n = 0;
    struct dirent *e;
    if (!d) return -1;
    while ((e = readdir(d))) if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the DIR's own fd when counting fds; harmless for tasks (compared, not absolute) */
}

static CUfunction kernel(const char *name) {
    CUmodule m;
    CUfunction f = 0;
    CALL(CUresult (*)(CUmodule *, const void *), cuModuleLoadData, &m, "ptx");
    CALL(CUresult (*)(CUfunction *, CUmodule, const char *), cuModuleGetFunction, &f, m, name);
    return f;
}

static uint64_t fake_count(const char *exact) {
    uint64_t (*f)(const char *) = (uint64_t (*)(const char *))dlsym(cu, "fakegpu_call_count");
    return f ? f(exact) : 0;
}

/* Call a pointer of a known family once, so the fake's counters show which variant ran. */
static void call_family(const char *base, void *p) {
    if (!strcmp(base, "cuMemAlloc")) {
        CUdeviceptr d = 0;
        ((CUresult (*)(CUdeviceptr *, size_t))p)(&d, 1 << 20);
    } else if (!strcmp(base, "cuMemGetInfo")) {
        size_t a, b;
        ((CUresult (*)(size_t *, size_t *))p)(&a, &b);
    } else if (!strcmp(base, "cuLaunchKernel")) {
        CUfunction f = kernel("noop");
        ((CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **))p)(f, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0);
    } else if (!strcmp(base, "cuMemAllocAsync")) {
        CUdeviceptr d = 0;
        ((CUresult (*)(CUdeviceptr *, size_t, CUstream))p)(&d, 1 << 20, 0);
    } else if (!strcmp(base, "cuDeviceTotalMem")) {
        size_t t;
        ((CUresult (*)(size_t *, int))p)(&t, 0);
    }
}

static void getproc(const char *base, int version, unsigned long long flags) {
    void *p = 0, *q = 0;
    int status = -1;
    CUresult r2 = CALL(CUresult (*)(const char *, void **, int, unsigned long long, int *), cuGetProcAddress_v2, base, &p, version, flags, &status);
    CUresult r1 = CALL(CUresult (*)(const char *, void **, int, unsigned long long), cuGetProcAddress, base, &q, version, flags);
    printf("v2_result %d\nv2_status %d\nv2_object %s\nv1_result %d\nv1_object %s\nsame %d\n", r2, status, where(p), r1, where(q), p == q);
    static const char *suffixes[] = {"", "_v2", "_v3", "_ptsz", "_ptds", "_v2_ptsz", "_v2_ptds", 0};
    uint64_t before[8];
    char name[128];
    for (int i = 0; suffixes[i]; i++) {
        snprintf(name, sizeof name, "%s%s", base, suffixes[i]);
        before[i] = fake_count(name);
    }
    if (p) call_family(base, p);
    for (int i = 0; suffixes[i]; i++) {
        snprintf(name, sizeof name, "%s%s", base, suffixes[i]);
        if (fake_count(name) != before[i]) printf("ran %s\n", name);
    }
}

static CUresult alloc_path(const char *path, size_t chunk, uint64_t *handle) {
    CUdeviceptr d = 0;
    CUresult r;
    if (!strcmp(path, "cuMemAlloc_v2")) r = CALL(CUresult (*)(CUdeviceptr *, size_t), cuMemAlloc_v2, &d, chunk);
    else if (!strcmp(path, "cuMemAlloc")) { unsigned v = 0; r = CALL(CUresult (*)(unsigned *, unsigned), cuMemAlloc, &v, (unsigned)chunk); d = v; }
    else if (!strcmp(path, "cuMemAllocManaged")) r = CALL(CUresult (*)(CUdeviceptr *, size_t, unsigned), cuMemAllocManaged, &d, chunk, 1);
    else if (!strcmp(path, "cuMemAllocPitch_v2")) { size_t pitch; r = CALL(CUresult (*)(CUdeviceptr *, size_t *, size_t, size_t, unsigned), cuMemAllocPitch_v2, &d, &pitch, chunk / 1024, 1024, 4); }
    else if (!strcmp(path, "cuMemAllocAsync")) { r = CALL(CUresult (*)(CUdeviceptr *, size_t, CUstream), cuMemAllocAsync, &d, chunk, 0); }
    else if (!strcmp(path, "cuMemAllocAsync_ptsz")) { r = CALL(CUresult (*)(CUdeviceptr *, size_t, CUstream), cuMemAllocAsync_ptsz, &d, chunk, 0); }
    else if (!strcmp(path, "cuMemAllocFromPoolAsync")) {
        CUmemoryPool pool = 0;
        CALL(CUresult (*)(CUmemoryPool *, int), cuDeviceGetDefaultMemPool, &pool, 0);
        r = CALL(CUresult (*)(CUdeviceptr *, size_t, CUmemoryPool, CUstream), cuMemAllocFromPoolAsync, &d, chunk, pool, 0);
    } else if (!strcmp(path, "cuArrayCreate_v2")) {
        AD a = {chunk / 4, 1, 0x20, 1}; /* float, 1 channel: 4 bytes per element */
        CUarray arr = 0;
        r = CALL(CUresult (*)(CUarray *, const AD *), cuArrayCreate_v2, &arr, &a);
        d = (CUdeviceptr)arr;
    } else if (!strcmp(path, "cuArray3DCreate_v2")) {
        AD3 a = {chunk / 16, 2, 2, 0x01, 4, 0}; /* u8 × 4 channels */
        CUarray arr = 0;
        r = CALL(CUresult (*)(CUarray *, const AD3 *), cuArray3DCreate_v2, &arr, &a);
        d = (CUdeviceptr)arr;
    } else if (!strcmp(path, "cuMemCreate")) {
        Prop p = {1, 0, {1, 0}, 0, {0}};
        unsigned long long h = 0;
        r = CALL(CUresult (*)(unsigned long long *, size_t, const Prop *, unsigned long long), cuMemCreate, &h, chunk, &p, 0);
        d = h;
    } else { printf("error unknown path %s\n", path); exit(2); }
    *handle = d;
    return r;
}

static void free_path(const char *path, uint64_t h) {
    if (!strncmp(path, "cuArray", 7)) CALL(CUresult (*)(CUarray), cuArrayDestroy, (CUarray)h);
    else if (!strcmp(path, "cuMemCreate")) CALL(CUresult (*)(unsigned long long), cuMemRelease, h);
    else if (!strncmp(path, "cuMemAllocAsync", 15) || !strcmp(path, "cuMemAllocFromPoolAsync")) CALL(CUresult (*)(CUdeviceptr, CUstream), cuMemFreeAsync, h, 0);
    else if (!strcmp(path, "cuMemAlloc")) CALL(CUresult (*)(unsigned), cuMemFree, (unsigned)h);
    else CALL(CUresult (*)(CUdeviceptr), cuMemFree_v2, h);
}

static size_t fill(const char *path, size_t chunk, int keep) {
    static uint64_t hs[65536];
    int n = 0;
    CUresult r = 0;
    while (n < 65536 && (r = alloc_path(path, chunk, &hs[n])) == 0) n++;
    printf("obtained %zu\nerror %d\n", (size_t)n * chunk, r);
    fflush(stdout);
    if (keep) sleep(keep);
    for (int i = 0; i < n; i++) free_path(path, hs[i]);
    return (size_t)n * chunk;
}

static void meminfo(void) {
    size_t f = 0, t = 0, tm = 0;
    unsigned f1 = 0, t1 = 0;
    printf("getinfo_v2 %d\n", CALL(CUresult (*)(size_t *, size_t *), cuMemGetInfo_v2, &f, &t));
    printf("free %zu\ntotal %zu\n", f, t);
    CALL(CUresult (*)(unsigned *, unsigned *), cuMemGetInfo, &f1, &t1);
    printf("free_v1 %u\ntotal_v1 %u\n", f1, t1);
    CALL(CUresult (*)(size_t *, int), cuDeviceTotalMem_v2, &tm, 0);
    printf("device_total %zu\n", tm);
    if (nv) {
        void *h = 0;
        NvMem m = {0, 0, 0};
        ((int (*)(void))dlsym(nv, "nvmlInit_v2"))();
        ((int (*)(unsigned, void **))dlsym(nv, "nvmlDeviceGetHandleByIndex_v2"))(0, &h);
        int r = ((int (*)(void *, NvMem *))dlsym(nv, "nvmlDeviceGetMemoryInfo"))(h, &m);
        printf("nvml_result %d\nnvml_total %llu\nnvml_used %llu\nnvml_free %llu\n", r, m.total, m.used, m.free);
    }
}

static void busy(long kernel_us, double seconds, int depth, const char *mode) {
    CUfunction f = kernel("busy");
    CUevent ring[64];
    for (int i = 0; i < depth && i < 64; i++) CALL(CUresult (*)(CUevent *, unsigned), cuEventCreate, &ring[i], 0);
    uint64_t ns = (uint64_t)kernel_us * 1000;
    void *params[] = {&ns};
    const char *launch = mode && !strcmp(mode, "ptsz") ? "cuLaunchKernel_ptsz" : "cuLaunchKernel";
    CUresult (*lk)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **) = dlsym(cu, launch);
    CUgraphExec exec = 0;
    if (mode && !strcmp(mode, "graph")) {
        CUstream s;
        CUgraph g;
        CALL(CUresult (*)(CUstream *, unsigned), cuStreamCreate, &s, 0);
        CALL(CUresult (*)(CUstream, int), cuStreamBeginCapture_v2, s, 0);
        for (int i = 0; i < 4; i++) lk(f, 1, 1, 1, 1, 1, 1, 0, s, params, 0);
        CALL(CUresult (*)(CUstream, CUgraph *), cuStreamEndCapture, s, &g);
        CALL(CUresult (*)(CUgraphExec *, CUgraph, unsigned long long), cuGraphInstantiateWithFlags, &exec, g, 0);
    }
    int large = mode && !strcmp(mode, "large");
    double end = now_s() + seconds;
    long n = 0;
    while (now_s() < end) {
        int slot = n % depth;
        if (n >= depth) CALL(CUresult (*)(CUevent), cuEventSynchronize, ring[slot]);
        CUresult r = exec ? CALL(CUresult (*)(CUgraphExec, CUstream), cuGraphLaunch, exec, 0)
                          : lk(f, 132, 1, 1, 1, 1, 1, 0, 0, params, 0);
        if (r) { printf("launch_error %d\n", r); break; }
        CALL(CUresult (*)(CUevent, CUstream), cuEventRecord, ring[slot], 0);
        if (large) CALL(CUresult (*)(void), cuCtxSynchronize);
        n++;
    }
    CALL(CUresult (*)(void), cuCtxSynchronize);
    printf("launched %ld\n", n);
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IOLBF, 0);
    if (argc < 2) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "idle")) {
        printf("threads %d\nfds %d\n", count_dir("/proc/self/task") + 1, count_dir("/proc/self/fd"));
        return 0;
    }
    if (!strcmp(cmd, "dlsym")) {
        open_driver();
        for (int i = 2; i < argc; i++) {
            printf("%s handle %s\n", argv[i], where(dlsym(cu, argv[i])));
            printf("%s default %s\n", argv[i], where(dlsym(RTLD_DEFAULT, argv[i])));
            printf("%s next %s\n", argv[i], where(dlsym(RTLD_NEXT, argv[i])));
        }
        return 0;
    }
    if (!strcmp(cmd, "nvml")) {
        void *h = 0;
        NvMem m = {0, 0, 0};
        nv = dlopen("libnvidia-ml.so.1", RTLD_NOW);
        if (!nv) { printf("error dlopen %s\n", dlerror()); return 2; }
        printf("init %d\n", ((int (*)(void))dlsym(nv, "nvmlInit_v2"))());
        ((int (*)(unsigned, void **))dlsym(nv, "nvmlDeviceGetHandleByIndex_v2"))(0, &h);
        int r = ((int (*)(void *, NvMem *))dlsym(nv, "nvmlDeviceGetMemoryInfo"))(h, &m);
        printf("nvml_result %d\nnvml_total %llu\nnvml_used %llu\n", r, m.total, m.used);
        return 0;
    }
    if (!strcmp(cmd, "uuid")) {
        open_driver();
        unsigned char u[16];
        CALL(CUresult (*)(unsigned), cuInit, 0);
        CALL(CUresult (*)(unsigned char *, int), cuDeviceGetUuid_v2, u, 0);
        printf("uuid GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x\n", u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
        return 0;
    }
    init_ctx();
    if (!strcmp(cmd, "getproc") && argc == 5) getproc(argv[2], atoi(argv[3]), strtoull(argv[4], 0, 10));
    else if (!strcmp(cmd, "meminfo")) meminfo();
    else if (!strcmp(cmd, "direct") && argc == 3) {
        CUdeviceptr d = 0;
        if (!cuMemAlloc_v2) { printf("error not linked against libcuda\n"); return 2; }
        printf("direct_object %s\n", where((void *)cuMemAlloc_v2));
        printf("direct %d\n", cuMemAlloc_v2(&d, strtoull(argv[2], 0, 10)));
    }
    else if (!strcmp(cmd, "fill") && argc == 4) fill(argv[2], strtoull(argv[3], 0, 10), 0);
    else if (!strcmp(cmd, "race") && argc == 3) fill("cuMemAlloc_v2", strtoull(argv[2], 0, 10), 1);
    else if (!strcmp(cmd, "hold") && argc == 4) {
        CUdeviceptr d;
        printf("alloc %d\n", CALL(CUresult (*)(CUdeviceptr *, size_t), cuMemAlloc_v2, &d, strtoull(argv[2], 0, 10)));
        fflush(stdout);
        sleep(atoi(argv[3]));
    } else if (!strcmp(cmd, "fork") && argc == 3) {
        size_t b = strtoull(argv[2], 0, 10);
        CUdeviceptr d;
        printf("parent %d\n", CALL(CUresult (*)(CUdeviceptr *, size_t), cuMemAlloc_v2, &d, b));
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            CUdeviceptr e;
            printf("child %d\n", CALL(CUresult (*)(CUdeviceptr *, size_t), cuMemAlloc_v2, &e, b));
            size_t f = 0, t = 0;
            CALL(CUresult (*)(size_t *, size_t *), cuMemGetInfo_v2, &f, &t);
            printf("child_free %zu\n", f);
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(pid, &st, 0);
        printf("child_exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    } else if (!strcmp(cmd, "busy") && argc >= 5) busy(atol(argv[2]), atof(argv[3]), atoi(argv[4]), argc > 5 ? argv[5] : 0);
    else if (!strcmp(cmd, "launches") && argc == 3) {
        long n = atol(argv[2]);
        CUfunction f = kernel("noop");
        CUresult (*lk)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **) = dlsym(cu, "cuLaunchKernel");
        double t0 = now_s();
        for (long i = 0; i < n; i++) lk(f, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0);
        printf("ns_per_launch %.1f\n", (now_s() - t0) * 1e9 / n);
    } else if (!strcmp(cmd, "paced") && argc == 4) {
        long n = atol(argv[2]);
        double gap = atof(argv[3]) / 1e9, inside = 0;
        CUfunction f = kernel("noop");
        CUresult (*lk)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **) = dlsym(cu, "cuLaunchKernel");
        for (long i = 0; i < n; i++) {
            double a = now_s();
            lk(f, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0);
            double b = now_s();
            inside += b - a;
            while (now_s() < a + gap) {}
        }
        printf("ns_per_launch %.1f\n", inside * 1e9 / n);
    } else if (!strcmp(cmd, "allocs") && argc == 3) {
        long n = atol(argv[2]);
        double t0 = now_s();
        for (long i = 0; i < n; i++) {
            CUdeviceptr d;
            CALL(CUresult (*)(CUdeviceptr *, size_t), cuMemAlloc_v2, &d, 1 << 20);
            CALL(CUresult (*)(CUdeviceptr), cuMemFree_v2, d);
        }
        printf("ns_per_pair %.1f\n", (now_s() - t0) * 1e9 / n);
    } else { printf("error bad command\n"); return 2; }
    return 0;
}
