/*
 * fake_selftest.c: exercises the fake libcuda.so.1 and libnvidia-ml.so.1 with no limiter
 * loaded (driven by limiter/tests/fake_device.rs). The fakes are dlopen()ed by path from
 * $FAKE_CUDA_LIB and $FAKE_NVML_LIB, like cudart and nvidia-smi would find them.
 *
 * Usage: fake_selftest <command> [args]; prints "PASS <what>" / "FAIL <what>: <detail>" lines,
 * "key=value" lines for the Rust side, and "DONE failures=<n>" last (exit status 1 on failures).
 *   layout                          shared-state offsets from fakegpu.h
 *   procaddr                        cuGetProcAddress/_v2 resolution, statuses, exact counters
 *   identity                        UUID bytes (CUDA) vs UUID string (NVML), names, attributes
 *   mem-api                         every allocation entry point's accounting, frees, OOM
 *   hold <bytes>                    allocate, print "held", wait for a line on stdin, free
 *   try-alloc <bytes>               one cuMemAlloc_v2: "alloc_rc=<rc>", cuMemGetInfo_v2 values
 *   nvml-procs                      running processes (v1/v2/v3) and memory info
 *   timing                          busy 20 ms: events, stream sync, query; block model; graph
 *   burst <ms> <count>              count back-to-back busy kernels of <ms>, then sync
 *   duty <busy_ms> <idle_ms> <total_ms>  a kernel every busy+idle ms (absolute schedule)
 *   nvml-util                       process-utilisation samples and lastSeen filtering
 *   noop-bench <n>                  ns per noop cuLaunchKernel
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda_api.h"
#include "fakegpu.h"
#include "nvml_api.h"

static void *g_cuda, *g_nvml;
static int g_failures;

static void *sym(void *h, const char *name) {
    void *p = dlsym(h, name);
    if (!p) {
        printf("FAIL dlsym %s: %s\n", name, dlerror());
        fflush(stdout);
        exit(2);
    }
    return p;
}
#define CU(name) ((__typeof__(&name))sym(g_cuda, #name))
#define NV(name) ((__typeof__(&name))sym(g_nvml, #name))

#define CHECK(cond, ...)                                                                        \
    do {                                                                                        \
        if (cond) {                                                                             \
            printf("PASS ");                                                                    \
            printf(__VA_ARGS__);                                                                \
            printf("\n");                                                                       \
        } else {                                                                                \
            g_failures++;                                                                       \
            printf("FAIL ");                                                                    \
            printf(__VA_ARGS__);                                                                \
            printf(" [%s, line %d]\n", #cond, __LINE__);                                        \
        }                                                                                       \
    } while (0)

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
}

static void open_libs(int nvml) {
    const char *c = getenv("FAKE_CUDA_LIB"), *n = getenv("FAKE_NVML_LIB");
    if (c && !(g_cuda = dlopen(c, RTLD_NOW | RTLD_LOCAL))) {
        printf("FAIL dlopen %s: %s\n", c, dlerror());
        exit(2);
    }
    if (nvml && n && !(g_nvml = dlopen(n, RTLD_NOW | RTLD_LOCAL))) {
        printf("FAIL dlopen %s: %s\n", n, dlerror());
        exit(2);
    }
}

static uint64_t count(const char *exact) { return CU(fakegpu_call_count)(exact); }

/* cuInit + primary context of device 0 made current. */
static CUcontext cuda_up(void) {
    CUcontext ctx = NULL;
    CUresult r = CU(cuInit)(0);
    if (r == CUDA_SUCCESS)
        r = CU(cuDevicePrimaryCtxRetain)(&ctx, 0);
    if (r == CUDA_SUCCESS)
        r = CU(cuCtxSetCurrent)(ctx);
    if (r != CUDA_SUCCESS) {
        printf("FAIL cuda_up: %d\n", r);
        exit(2);
    }
    return ctx;
}

static CUfunction kernel(const char *name) {
    static CUmodule mod;
    if (!mod && CU(cuModuleLoadData)(&mod, "fake image") != CUDA_SUCCESS) {
        printf("FAIL cuModuleLoadData\n");
        exit(2);
    }
    CUfunction f = NULL;
    if (CU(cuModuleGetFunction)(&f, mod, name) != CUDA_SUCCESS) {
        printf("FAIL cuModuleGetFunction %s\n", name);
        exit(2);
    }
    return f;
}

static CUresult launch_busy(uint64_t ns, CUstream s) {
    void *params[] = {&ns};
    return CU(cuLaunchKernel)(kernel("busy"), 1, 1, 1, 1, 1, 1, 0, s, params, NULL);
}

/* ---- layout ---- */

static void cmd_layout(void) {
    printf("off_devices=%zu\ndevice_size=%zu\noff_procs=%zu\nproc_size=%zu\n",
           offsetof(struct fakegpu_state, devices), sizeof(struct fakegpu_device),
           offsetof(struct fakegpu_state, procs), sizeof(struct fakegpu_proc));
    printf("off_ring_write=%zu\noff_ring=%zu\nentry_size=%zu\nring_size=%u\nstate_size=%zu\n",
           offsetof(struct fakegpu_state, ring_write), offsetof(struct fakegpu_state, ring),
           sizeof(struct fakegpu_ring_entry), FAKEGPU_RING_SIZE, sizeof(struct fakegpu_state));
    printf("off_realtime_offset=%zu\noff_used_bytes=%zu\noff_device_free_at=%zu\n",
           offsetof(struct fakegpu_state, realtime_offset_ns),
           offsetof(struct fakegpu_device, used_bytes),
           offsetof(struct fakegpu_device, device_free_at));
}

/* ---- cuGetProcAddress ---- */

struct triple {
    const char *base;
    int version;
    unsigned flags;
    const char *exact;
};

static const struct triple g_triples[] = {
    {"cuMemAlloc", 2000, 0, "cuMemAlloc"},
    {"cuMemAlloc", 3020, 0, "cuMemAlloc_v2"},
    {"cuMemAlloc", 12080, 2, "cuMemAlloc_v2"},
    {"cuMemGetInfo", 3010, 0, "cuMemGetInfo"},
    {"cuMemGetInfo", 12000, 1, "cuMemGetInfo_v2"},
    {"cuDeviceTotalMem", 3020, 0, "cuDeviceTotalMem_v2"},
    {"cuMemFree", 11030, 0, "cuMemFree_v2"},
    {"cuMemAllocPitch", 2000, 0, "cuMemAllocPitch"},
    {"cuCtxCreate", 3000, 0, "cuCtxCreate"},
    {"cuCtxCreate", 11030, 0, "cuCtxCreate_v2"},
    {"cuCtxCreate", 11040, 0, "cuCtxCreate_v3"},
    {"cuCtxCreate", 12040, 0, "cuCtxCreate_v3"},
    {"cuCtxCreate", 12050, 0, "cuCtxCreate_v4"},
    {"cuCtxCreate", 13000, 2, "cuCtxCreate_v4"},
    {"cuLaunchKernel", 12000, 0, "cuLaunchKernel"},
    {"cuLaunchKernel", 12000, 1, "cuLaunchKernel"},
    {"cuLaunchKernel", 12000, 2, "cuLaunchKernel_ptsz"},
    {"cuLaunchKernelEx", 12000, 2, "cuLaunchKernelEx_ptsz"},
    {"cuLaunchCooperativeKernel", 11030, 2, "cuLaunchCooperativeKernel_ptsz"},
    {"cuMemAllocAsync", 11020, 2, "cuMemAllocAsync_ptsz"},
    {"cuMemAllocFromPoolAsync", 12000, 0, "cuMemAllocFromPoolAsync"},
    {"cuMemFreeAsync", 12000, 2, "cuMemFreeAsync_ptsz"},
    {"cuStreamBeginCapture", 10000, 0, "cuStreamBeginCapture"},
    {"cuStreamBeginCapture", 10010, 0, "cuStreamBeginCapture_v2"},
    {"cuStreamBeginCapture", 12000, 2, "cuStreamBeginCapture_v2_ptsz"},
    {"cuStreamEndCapture", 12000, 2, "cuStreamEndCapture_ptsz"},
    {"cuGraphInstantiate", 10020, 0, "cuGraphInstantiate"},
    {"cuGraphInstantiate", 11000, 0, "cuGraphInstantiate_v2"},
    {"cuGraphInstantiate", 12000, 0, "cuGraphInstantiateWithFlags"},
    {"cuGraphInstantiateWithParams", 12000, 2, "cuGraphInstantiateWithParams_ptsz"},
    {"cuGraphExecUpdate", 11040, 0, "cuGraphExecUpdate"},
    {"cuGraphExecUpdate", 12000, 0, "cuGraphExecUpdate_v2"},
    {"cuGraphAddKernelNode", 11080, 0, "cuGraphAddKernelNode"},
    {"cuGraphAddKernelNode", 12000, 0, "cuGraphAddKernelNode_v2"},
    {"cuGraphKernelNodeGetParams", 12000, 0, "cuGraphKernelNodeGetParams_v2"},
    {"cuGraphLaunch", 12000, 2, "cuGraphLaunch_ptsz"},
    {"cuDeviceGetUuid", 11030, 0, "cuDeviceGetUuid"},
    {"cuDeviceGetUuid", 11040, 0, "cuDeviceGetUuid_v2"},
    {"cuDevicePrimaryCtxRelease", 11000, 0, "cuDevicePrimaryCtxRelease_v2"},
    {"cuEventDestroy", 4000, 0, "cuEventDestroy_v2"},
    {"cuStreamDestroy", 12000, 0, "cuStreamDestroy_v2"},
    {"cuCtxDestroy", 12000, 0, "cuCtxDestroy_v2"},
    {"cuStreamSynchronize", 12000, 2, "cuStreamSynchronize_ptsz"},
    {"cuEventRecord", 12000, 2, "cuEventRecord_ptsz"},
    {"cuGetProcAddress", 11030, 0, "cuGetProcAddress"},
    {"cuGetProcAddress", 12000, 0, "cuGetProcAddress_v2"},
};

static void cmd_procaddr(void) {
    __typeof__(&cuGetProcAddress) gpa = CU(cuGetProcAddress);
    __typeof__(&cuGetProcAddress_v2) gpa2 = CU(cuGetProcAddress_v2);
    for (size_t i = 0; i < sizeof g_triples / sizeof g_triples[0]; i++) {
        const struct triple *t = &g_triples[i];
        void *want = sym(g_cuda, t->exact);
        void *p1 = NULL, *p2 = NULL;
        CUdriverProcAddressQueryResult st = (CUdriverProcAddressQueryResult)7;
        CUresult r1 = gpa(t->base, &p1, t->version, t->flags);
        CUresult r2 = gpa2(t->base, &p2, t->version, t->flags, &st);
        CHECK(r1 == CUDA_SUCCESS && r2 == CUDA_SUCCESS && p1 == want && p2 == want &&
                  st == CU_GET_PROC_ADDRESS_SUCCESS,
              "%s@%d flags=%u -> %s", t->base, t->version, t->flags, t->exact);
    }
    void *p = (void *)1;
    CUdriverProcAddressQueryResult st = CU_GET_PROC_ADDRESS_SUCCESS;
    CUresult r = gpa2("cuNoSuchFunction", &p, 12080, 0, &st);
    CHECK(r == CUDA_ERROR_NOT_FOUND && p == NULL && st == CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND,
          "unknown symbol: NOT_FOUND, NULL, SYMBOL_NOT_FOUND (rc=%d status=%d)", r, (int)st);
    p = (void *)1;
    r = gpa2("cuMemAlloc_v2", &p, 12080, 0, &st);
    CHECK(r == CUDA_ERROR_NOT_FOUND && p == NULL && st == CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND,
          "an exact name is not a base name (rc=%d status=%d)", r, (int)st);
    p = (void *)1;
    r = gpa2("cuMemAllocAsync", &p, 11010, 0, &st);
    CHECK(r == CUDA_ERROR_NOT_FOUND && p == NULL &&
              st == CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT,
          "too old a version: VERSION_NOT_SUFFICIENT (rc=%d status=%d)", r, (int)st);
    r = gpa("cuMemAlloc", &p, 12080, 7);
    CHECK(r == CUDA_ERROR_INVALID_VALUE, "unknown flags: INVALID_VALUE (rc=%d)", r);

    /* the pointer handed out runs exactly that variant */
    cuda_up();
    CU(fakegpu_reset_counts)();
    void *fp = NULL;
    gpa2("cuMemAlloc", &fp, 3020, 0, &st);
    CUdeviceptr d = 0;
    r = ((__typeof__(&cuMemAlloc_v2))fp)(&d, 1 << 20);
    CHECK(r == CUDA_SUCCESS && count("cuMemAlloc_v2") == 1 && count("cuMemAlloc") == 0,
          "cuMemAlloc@3020 ran cuMemAlloc_v2 only");
    gpa("cuMemAlloc", &fp, 2000, 0);
    CUdeviceptr_v1 d1 = 0;
    r = ((__typeof__(&cuMemAlloc))fp)(&d1, 1 << 20);
    CHECK(r == CUDA_SUCCESS && count("cuMemAlloc") == 1 && count("cuMemAlloc_v2") == 1 &&
              d1 != 0,
          "cuMemAlloc@2000 ran cuMemAlloc (v1, 32-bit address 0x%x)", d1);
    CUfunction noop = kernel("noop");
    gpa("cuLaunchKernel", &fp, 12000, 2);
    r = ((__typeof__(&cuLaunchKernel_ptsz))fp)(noop, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
    CHECK(r == CUDA_SUCCESS && count("cuLaunchKernel_ptsz") == 1 && count("cuLaunchKernel") == 0,
          "cuLaunchKernel per-thread ran cuLaunchKernel_ptsz only");
    gpa("cuLaunchKernel", &fp, 12000, 0);
    r = ((__typeof__(&cuLaunchKernel))fp)(noop, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
    CHECK(r == CUDA_SUCCESS && count("cuLaunchKernel") == 1 && count("cuLaunchKernel_ptsz") == 1,
          "cuLaunchKernel default ran cuLaunchKernel");
    gpa("cuCtxCreate", &fp, 12050, 0);
    CUcontext c4 = NULL;
    r = ((__typeof__(&cuCtxCreate_v4))fp)(&c4, NULL, 0, 0);
    CHECK(r == CUDA_SUCCESS && count("cuCtxCreate_v4") == 1 && count("cuCtxCreate_v2") == 0 &&
              count("cuCtxCreate_v3") == 0,
          "cuCtxCreate@12050 ran cuCtxCreate_v4");
    CU(cuCtxDestroy_v2)(c4);
    gpa("cuGetProcAddress", &fp, 12000, 0);
    CHECK(fp == (void *)gpa2, "cuGetProcAddress@12000 is cuGetProcAddress_v2");
    gpa2("cuGetProcAddress", &fp, 11030, 0, &st);
    CHECK(fp == (void *)gpa, "cuGetProcAddress@11030 is cuGetProcAddress");
    CHECK(count("cuGetProcAddress") == 5 && count("cuGetProcAddress_v2") == 2,
          "cuGetProcAddress calls counted per variant (%" PRIu64 ", %" PRIu64 ")",
          count("cuGetProcAddress"), count("cuGetProcAddress_v2"));
    CHECK(count("cuNoSuchFunction") == 0, "unknown names count 0");
}

/* ---- identity ---- */

static void cmd_identity(void) {
    cuda_up();
    int n = 0;
    CU(cuDeviceGetCount)(&n);
    NV(nvmlInit_v2)();
    unsigned nn = 0;
    NV(nvmlDeviceGetCount_v2)(&nn);
    CHECK(n >= 1 && (unsigned)n == nn, "CUDA and NVML count %d devices", n);
    for (int d = 0; d < n; d++) {
        CUuuid u;
        CU(cuDeviceGetUuid_v2)(&u, d);
        CUuuid u1;
        CU(cuDeviceGetUuid)(&u1, d);
        const unsigned char *b = (const unsigned char *)u.bytes;
        char want[64];
        snprintf(want, sizeof want,
                 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                 b[14], b[15]);
        nvmlDevice_t h = NULL, h2 = NULL;
        char got[96] = "";
        NV(nvmlDeviceGetHandleByIndex_v2)((unsigned)d, &h);
        NV(nvmlDeviceGetUUID)(h, got, sizeof got);
        CHECK(strcmp(want, got) == 0 && memcmp(u.bytes, u1.bytes, 16) == 0,
              "device %d: cuDeviceGetUuid bytes match NVML %s", d, got);
        printf("uuid%d=%s\n", d, got);
        CHECK(NV(nvmlDeviceGetHandleByUUID)(got, &h2) == NVML_SUCCESS && h2 == h,
              "nvmlDeviceGetHandleByUUID finds device %d", d);
        char name[64];
        CU(cuDeviceGetName)(name, sizeof name, d);
        CHECK(strcmp(name, "Fake H200") == 0, "name %s", name);
        int sms = 0, tps = 0, tpb = 0;
        CU(cuDeviceGetAttribute)(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, d);
        CU(cuDeviceGetAttribute)(&tps, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, d);
        CU(cuDeviceGetAttribute)(&tpb, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, d);
        printf("sms=%d\nthreads_per_sm=%d\nthreads_per_block=%d\n", sms, tps, tpb);
        size_t total = 0;
        CU(cuDeviceTotalMem_v2)(&total, d);
        printf("total_mem=%zu\n", total);
    }
    int v = 0;
    CU(cuDriverGetVersion)(&v);
    printf("driver_version=%d\n", v);
    CHECK(NV(nvmlDeviceGetUUID)(NULL, NULL, 0) == NVML_ERROR_INVALID_ARGUMENT,
          "a bad NVML handle is INVALID_ARGUMENT");
}

/* ---- memory ---- */

static size_t g_free;
static int64_t used_delta(void) {
    size_t fr = 0, total = 0;
    CU(cuMemGetInfo_v2)(&fr, &total);
    int64_t d = (int64_t)g_free - (int64_t)fr;
    g_free = fr;
    return d;
}

static void cmd_mem_api(void) {
    const int64_t MiB = 1 << 20;
    CUcontext ctx = cuda_up();
    used_delta();
    CUdeviceptr p = 0, q = 0;
    CHECK(CU(cuMemAlloc_v2)(&p, 3 * MiB) == CUDA_SUCCESS && used_delta() == 3 * MiB,
          "cuMemAlloc_v2 charges its size");
    CHECK(CU(cuMemFree_v2)(p) == CUDA_SUCCESS && used_delta() == -3 * MiB, "cuMemFree_v2 frees");
    CHECK(CU(cuMemFree_v2)(p) == CUDA_ERROR_INVALID_VALUE, "double free: INVALID_VALUE");
    CHECK(CU(cuMemFree_v2)(0x1234000) == CUDA_ERROR_INVALID_VALUE,
          "unknown pointer: INVALID_VALUE");
    CUdeviceptr_v1 p1 = 0;
    CHECK(CU(cuMemAlloc)(&p1, 5 * MiB) == CUDA_SUCCESS && used_delta() == 5 * MiB &&
              CU(cuMemFree)(p1) == CUDA_SUCCESS && used_delta() == -5 * MiB,
          "cuMemAlloc (v1) and cuMemFree (v1)");
    size_t pitch = 0;
    CHECK(CU(cuMemAllocPitch_v2)(&p, &pitch, 1000, 100, 4) == CUDA_SUCCESS && pitch == 1024 &&
              used_delta() == 1024 * 100,
          "cuMemAllocPitch_v2: pitch %zu, bytes pitch*height", pitch);
    CU(cuMemFree_v2)(p);
    used_delta();
    unsigned pitch1 = 0;
    CHECK(CU(cuMemAllocPitch)(&p1, &pitch1, 513, 10, 8) == CUDA_SUCCESS && pitch1 == 1024 &&
              used_delta() == 10240 && CU(cuMemFree_v2)(p1) == CUDA_SUCCESS,
          "cuMemAllocPitch (v1)");
    used_delta();
    CHECK(CU(cuMemAllocManaged)(&p, 7 * MiB, 1) == CUDA_SUCCESS && used_delta() == 7 * MiB &&
              CU(cuMemFree_v2)(p) == CUDA_SUCCESS && used_delta() == -7 * MiB,
          "cuMemAllocManaged");
    CUstream s = NULL;
    CU(cuStreamCreate)(&s, 0);
    CHECK(CU(cuMemAllocAsync)(&p, 2 * MiB, s) == CUDA_SUCCESS && used_delta() == 2 * MiB &&
              CU(cuMemFreeAsync)(p, s) == CUDA_SUCCESS && used_delta() == -2 * MiB,
          "cuMemAllocAsync / cuMemFreeAsync");
    CHECK(CU(cuMemAllocAsync_ptsz)(&p, 2 * MiB, NULL) == CUDA_SUCCESS &&
              used_delta() == 2 * MiB && CU(cuMemFreeAsync_ptsz)(p, NULL) == CUDA_SUCCESS &&
              used_delta() == -2 * MiB,
          "cuMemAllocAsync_ptsz / cuMemFreeAsync_ptsz");
    CUmemoryPool pool = NULL;
    CU(cuDeviceGetDefaultMemPool)(&pool, 0);
    CHECK(CU(cuMemAllocFromPoolAsync)(&p, 4 * MiB, pool, s) == CUDA_SUCCESS &&
              used_delta() == 4 * MiB && CU(cuMemFree_v2)(p) == CUDA_SUCCESS &&
              used_delta() == -4 * MiB && CU(cuMemPoolTrimTo)(pool, 0) == CUDA_SUCCESS,
          "cuMemAllocFromPoolAsync");
    CHECK(CU(cuMemAllocFromPoolAsync_ptsz)(&p, 4 * MiB, pool, NULL) == CUDA_SUCCESS &&
              used_delta() == 4 * MiB && CU(cuMemFree_v2)(p) == CUDA_SUCCESS && used_delta() == -4 * MiB,
          "cuMemAllocFromPoolAsync_ptsz");

    CUarray a = NULL;
    CUDA_ARRAY_DESCRIPTOR ad = {100, 0, CU_AD_FORMAT_FLOAT, 4};
    CHECK(CU(cuArrayCreate_v2)(&a, &ad) == CUDA_SUCCESS && used_delta() == 100 * 4 * 4 &&
              CU(cuArrayDestroy)(a) == CUDA_SUCCESS && used_delta() == -1600,
          "cuArrayCreate_v2: w * max(h,1) * channels * bytes (1600)");
    CUDA_ARRAY_DESCRIPTOR_v1 ad1 = {64, 32, CU_AD_FORMAT_UNSIGNED_INT16, 2};
    CHECK(CU(cuArrayCreate)(&a, &ad1) == CUDA_SUCCESS && used_delta() == 64 * 32 * 2 * 2 &&
              CU(cuArrayDestroy)(a) == CUDA_SUCCESS,
          "cuArrayCreate (v1)");
    used_delta();
    CUDA_ARRAY3D_DESCRIPTOR a3 = {16, 16, 16, CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
    CHECK(CU(cuArray3DCreate_v2)(&a, &a3) == CUDA_SUCCESS && used_delta() == 4096 &&
              CU(cuArrayDestroy)(a) == CUDA_SUCCESS && used_delta() == -4096,
          "cuArray3DCreate_v2");
    CUDA_ARRAY3D_DESCRIPTOR_v1 a31 = {8, 8, 0, CU_AD_FORMAT_HALF, 1, 0};
    CHECK(CU(cuArray3DCreate)(&a, &a31) == CUDA_SUCCESS && used_delta() == 128 &&
              CU(cuArrayDestroy)(a) == CUDA_SUCCESS,
          "cuArray3DCreate (v1)");
    used_delta();
    CUmipmappedArray m = NULL;
    CUDA_ARRAY3D_DESCRIPTOR md = {64, 64, 0, CU_AD_FORMAT_UNSIGNED_INT8, 4, 0};
    int64_t want = 4 * (64 * 64 + 32 * 32 + 16 * 16);
    CHECK(CU(cuMipmappedArrayCreate)(&m, &md, 3) == CUDA_SUCCESS && used_delta() == want &&
              CU(cuMipmappedArrayDestroy)(m) == CUDA_SUCCESS && used_delta() == -want,
          "cuMipmappedArrayCreate adds the smaller levels");
    CHECK(CU(cuArrayDestroy)(a) == CUDA_ERROR_INVALID_HANDLE, "destroyed array: INVALID_HANDLE");

    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = 1;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t gran = 0;
    CU(cuMemGetAllocationGranularity)(&gran, &prop, 0);
    CHECK(gran == 2 * MiB, "granularity 2 MiB");
    CUmemGenericAllocationHandle h = 0, hh = 0;
    CHECK(CU(cuMemCreate)(&h, 8 * MiB, &prop, 0) == CUDA_SUCCESS && used_delta() == 8 * MiB,
          "cuMemCreate on a device location charges");
    CUdeviceptr va = 0;
    CHECK(CU(cuMemAddressReserve)(&va, 8 * MiB, 0, 0, 0) == CUDA_SUCCESS && used_delta() == 0,
          "cuMemAddressReserve charges nothing");
    CUmemAccessDesc acc = {{CU_MEM_LOCATION_TYPE_DEVICE, 0}, 3};
    CHECK(CU(cuMemMap)(va, 8 * MiB, 0, h, 0) == CUDA_SUCCESS &&
              CU(cuMemSetAccess)(va, 8 * MiB, &acc, 1) == CUDA_SUCCESS && used_delta() == 0,
          "cuMemMap / cuMemSetAccess");
    CHECK(CU(cuMemRelease)(h) == CUDA_SUCCESS && used_delta() == 0,
          "cuMemRelease of a mapped handle keeps the memory");
    CHECK(CU(cuMemUnmap)(va, 8 * MiB) == CUDA_SUCCESS && used_delta() == -8 * MiB,
          "cuMemUnmap of the last mapping frees it");
    CHECK(CU(cuMemAddressFree)(va, 8 * MiB) == CUDA_SUCCESS, "cuMemAddressFree");
    prop.location.type = 2; /* host */
    CHECK(CU(cuMemCreate)(&hh, 2 * MiB, &prop, 0) == CUDA_SUCCESS && used_delta() == 0 &&
              CU(cuMemRelease)(hh) == CUDA_SUCCESS,
          "cuMemCreate on a host location charges nothing");
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    CHECK(CU(cuMemCreate)(&hh, 3 * MiB, &prop, 0) == CUDA_ERROR_INVALID_VALUE,
          "cuMemCreate of a size off the granularity: INVALID_VALUE");

    void *hp = NULL;
    CHECK(CU(cuMemAllocHost_v2)(&hp, 1 << 20) == CUDA_SUCCESS && used_delta() == 0 &&
              CU(cuMemFreeHost)(hp) == CUDA_SUCCESS,
          "cuMemAllocHost_v2 is not charged");
    CHECK(CU(cuMemHostAlloc)(&hp, 1 << 20, 0) == CUDA_SUCCESS && used_delta() == 0 &&
              CU(cuMemFreeHost)(hp) == CUDA_SUCCESS,
          "cuMemHostAlloc is not charged");

    /* a created context's memory goes with it */
    CUcontext c2 = NULL;
    CU(cuCtxCreate_v2)(&c2, 0, 0);
    CU(cuMemAlloc_v2)(&q, 6 * MiB);
    used_delta();
    CHECK(CU(cuCtxDestroy_v2)(c2) == CUDA_SUCCESS, "cuCtxDestroy_v2");
    CU(cuCtxSetCurrent)(ctx);
    CHECK(used_delta() == -6 * MiB && CU(cuMemFree_v2)(q) == CUDA_ERROR_INVALID_VALUE,
          "destroying a context frees its allocations");

    /* physical capacity */
    size_t fr = 0, total = 0;
    CU(cuMemGetInfo_v2)(&fr, &total);
    CHECK(CU(cuMemAlloc_v2)(&p, fr + 1) == CUDA_ERROR_OUT_OF_MEMORY,
          "one byte over the free memory: OUT_OF_MEMORY");
    CHECK(CU(cuMemAlloc_v2)(&p, fr) == CUDA_SUCCESS, "exactly the free memory fits");
    CU(cuMemGetInfo_v2)(&fr, &total);
    CHECK(fr == 0, "then nothing is free");
    CHECK(CU(cuMemCreate)(&h, 2 * MiB, &prop, 0) == CUDA_ERROR_OUT_OF_MEMORY,
          "cuMemCreate past capacity: OUT_OF_MEMORY");
    CU(cuMemFree_v2)(p);
    unsigned f1 = 0, t1 = 0;
    CHECK(CU(cuMemGetInfo)(&f1, &t1) == CUDA_SUCCESS && t1 == (total > 0xffffffffu ? 0xffffffffu : total),
          "cuMemGetInfo (v1) saturates to 32 bits");
    CHECK(CU(cuDevicePrimaryCtxRelease_v2)(0) == CUDA_SUCCESS, "primary context released");
    CHECK(CU(cuDevicePrimaryCtxRelease_v2)(0) == CUDA_ERROR_INVALID_CONTEXT,
          "releasing it once more: INVALID_CONTEXT");
}

static void cmd_hold(uint64_t bytes) {
    cuda_up();
    CUdeviceptr p = 0;
    CUresult r = CU(cuMemAlloc_v2)(&p, bytes);
    printf("held rc=%d pid=%d\n", r, (int)getpid());
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) {
    }
    if (r == CUDA_SUCCESS)
        CU(cuMemFree_v2)(p);
}

static void cmd_try_alloc(uint64_t bytes) {
    cuda_up();
    CUdeviceptr p = 0;
    CUresult r = CU(cuMemAlloc_v2)(&p, bytes);
    size_t fr = 0, total = 0;
    CU(cuMemGetInfo_v2)(&fr, &total);
    printf("alloc_rc=%d\nfree=%zu\ntotal=%zu\npid=%d\n", r, fr, total, (int)getpid());
}

static void cmd_nvml_procs(void) {
    NV(nvmlInit_v2)();
    nvmlDevice_t d = NULL;
    NV(nvmlDeviceGetHandleByIndex_v2)(0, &d);
    unsigned n = 0;
    nvmlReturn_t r = NV(nvmlDeviceGetComputeRunningProcesses_v3)(d, &n, NULL);
    printf("count_rc=%d\ncount=%u\n", r, n);
    nvmlProcessInfo_t v3[64];
    nvmlProcessInfo_v2_t v2[64];
    nvmlProcessInfo_v1_t v1[64];
    unsigned n3 = 64, n2 = 64, n1 = 64;
    nvmlReturn_t r3 = NV(nvmlDeviceGetComputeRunningProcesses_v3)(d, &n3, v3);
    nvmlReturn_t r2 = NV(nvmlDeviceGetComputeRunningProcesses_v2)(d, &n2, v2);
    nvmlReturn_t r1 = NV(nvmlDeviceGetComputeRunningProcesses)(d, &n1, v1);
    CHECK(r3 == 0 && r2 == 0 && r1 == 0 && n3 == n2 && n2 == n1, "v1, v2, v3 agree on %u", n3);
    for (unsigned i = 0; i < n3; i++) {
        printf("proc pid=%u used=%llu\n", v3[i].pid, v3[i].usedGpuMemory);
        CHECK(v2[i].pid == v3[i].pid && v1[i].pid == v3[i].pid &&
                  v1[i].usedGpuMemory == v3[i].usedGpuMemory &&
                  v3[i].gpuInstanceId == 0xFFFFFFFFu,
              "process %u the same in every version", v3[i].pid);
    }
    if (n3 > 1) {
        unsigned small = 1;
        CHECK(NV(nvmlDeviceGetComputeRunningProcesses_v3)(d, &small, v3) ==
                      NVML_ERROR_INSUFFICIENT_SIZE &&
                  small == n3,
              "too small a buffer: INSUFFICIENT_SIZE with the count");
    }
    nvmlMemory_t m;
    NV(nvmlDeviceGetMemoryInfo)(d, &m);
    nvmlMemory_v2_t m2;
    m2.version = nvmlMemory_v2;
    CHECK(NV(nvmlDeviceGetMemoryInfo_v2)(d, &m2) == NVML_SUCCESS && m2.used == m.used &&
              m2.total == m.total,
          "nvmlDeviceGetMemoryInfo_v2 agrees");
    m2.version = 1;
    CHECK(NV(nvmlDeviceGetMemoryInfo_v2)(d, &m2) == NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
          "a wrong struct version: ARGUMENT_VERSION_MISMATCH");
    printf("mem total=%llu used=%llu free=%llu\n", m.total, m.used, m.free);
}

/* ---- timing ---- */

static void cmd_timing(void) {
    cuda_up();
    CUstream s = NULL;
    CU(cuStreamCreate)(&s, 0);
    CUevent e0 = NULL, e1 = NULL;
    CU(cuEventCreate)(&e0, 0);
    CU(cuEventCreate)(&e1, 0);
    CU(cuEventRecord)(e0, s);
    CHECK(launch_busy(20000000ull, s) == CUDA_SUCCESS, "busy kernel launched");
    CU(cuEventRecord)(e1, s);
    CUresult q0 = CU(cuEventQuery)(e1), sq0 = CU(cuStreamQuery)(s);
    float ms = 0;
    CUresult el0 = CU(cuEventElapsedTime)(&ms, e0, e1);
    uint64_t t0 = mono_ns();
    CU(cuStreamSynchronize)(s);
    uint64_t t1 = mono_ns();
    CUresult q1 = CU(cuEventQuery)(e1), sq1 = CU(cuStreamQuery)(s);
    CUresult el1 = CU(cuEventElapsedTime)(&ms, e0, e1);
    printf("query_before=%d\nstream_query_before=%d\nelapsed_before=%d\n", q0, sq0, el0);
    printf("query_after=%d\nstream_query_after=%d\nelapsed_rc=%d\n", q1, sq1, el1);
    printf("elapsed_ms=%.6f\nsync_wait_ms=%.3f\n", ms, (double)(t1 - t0) / 1e6);

    /* block model: 1024-thread blocks, 2 per SM, so SMS*2 blocks per wave; 3 waves */
    int sms = 0;
    CU(cuDeviceGetAttribute)(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0);
    CU(cuLaunchKernel)(kernel("block_ns_1000"), (unsigned)sms * 6, 1, 1, 1024, 1, 1, 0, s, NULL,
                       NULL);
    CU(cuLaunchKernel)(kernel("block_ns_500"), (unsigned)sms * 8 + 1, 1, 1, 256, 1, 1, 0, s, NULL,
                       NULL);
    CU(cuLaunchKernel)(kernel("other"), 1, 1, 1, 32, 1, 1, 0, s, NULL, NULL);
    CHECK(CU(cuLaunchKernel)(kernel("busy"), 1, 1, 1, 1, 1, 1, 0, s, NULL, NULL) ==
              CUDA_ERROR_INVALID_VALUE,
          "busy without its parameter: INVALID_VALUE");
    CHECK(CU(cuLaunchKernel)(kernel("noop"), 1, 1, 1, 2048, 1, 1, 0, s, NULL, NULL) ==
              CUDA_ERROR_INVALID_VALUE,
          "2048-thread block: INVALID_VALUE");
    CU(cuCtxSynchronize)();

    /* capture: kernels become nodes, nothing runs until the graph is launched */
    CUstream cs = NULL;
    CU(cuStreamCreate)(&cs, 0);
    CHECK(CU(cuStreamBeginCapture_v2)(NULL, 0) == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
          "capture on the legacy stream is refused");
    CHECK(CU(cuStreamBeginCapture_v2)(cs, 0) == CUDA_SUCCESS, "capture begins");
    CUstreamCaptureStatus st = 0;
    CU(cuStreamIsCapturing)(cs, &st);
    CHECK(st == CU_STREAM_CAPTURE_STATUS_ACTIVE, "stream is capturing");
    uint64_t launches_before = count("cuLaunchKernel");
    for (int i = 0; i < 3; i++)
        launch_busy(1000000ull * (uint64_t)(i + 1), cs);
    CUgraph g = NULL;
    CHECK(CU(cuStreamEndCapture)(cs, &g) == CUDA_SUCCESS && g, "capture ends with a graph");
    CU(cuStreamIsCapturing)(cs, &st);
    CHECK(st == CU_STREAM_CAPTURE_STATUS_NONE, "stream no longer capturing");
    size_t nn = 0;
    CU(cuGraphGetNodes)(g, NULL, &nn);
    CHECK(nn == 3 && count("cuLaunchKernel") == launches_before + 3, "3 kernel nodes captured");
    CUgraphNode nodes[3];
    CU(cuGraphGetNodes)(g, nodes, &nn);
    CUDA_KERNEL_NODE_PARAMS_v2 kp;
    CU(cuGraphKernelNodeGetParams_v2)(nodes[1], &kp);
    CHECK(kp.kernelParams && *(uint64_t *)kp.kernelParams[0] == 2000000ull && kp.gridDimX == 1,
          "node parameters read back");
    CUgraphExec x = NULL;
    CHECK(CU(cuGraphInstantiateWithFlags)(&x, g, 0) == CUDA_SUCCESS, "graph instantiated");
    uint64_t launched_at = mono_ns();
    printf("graph_launch_ns=%" PRIu64 "\n", launched_at);
    CHECK(CU(cuGraphLaunch)(x, cs) == CUDA_SUCCESS, "graph launched");
    CU(cuStreamSynchronize)(cs);
    uint64_t ns2 = 5000000;
    void *params[] = {&ns2};
    CUgraphNode extra = NULL;
    CUDA_KERNEL_NODE_PARAMS_v1 p1 = {kernel("busy"), 1, 1, 1, 1, 1, 1, 0, params, NULL};
    CU(cuGraphAddKernelNode)(&extra, g, NULL, 0, &p1);
    CUgraphExecUpdateResultInfo info;
    CHECK(CU(cuGraphExecUpdate_v2)(x, g, &info) == CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE &&
              info.result == CU_GRAPH_EXEC_UPDATE_ERROR_TOPOLOGY_CHANGED,
          "update with another topology fails");
    CU(cuGraphExecDestroy)(x);
    CU(cuGraphDestroy)(g);
}

static void cmd_burst(uint64_t ms, int n) {
    cuda_up();
    CUstream s = NULL;
    CU(cuStreamCreate)(&s, 0);
    uint64_t t0 = mono_ns();
    for (int i = 0; i < n; i++)
        launch_busy(ms * 1000000ull, s);
    CU(cuStreamSynchronize)(s);
    printf("burst_start_ns=%" PRIu64 "\nburst_end_ns=%" PRIu64 "\npid=%d\n", t0, mono_ns(),
           (int)getpid());
}

static void cmd_duty(uint64_t busy_ms, uint64_t idle_ms, uint64_t total_ms) {
    cuda_up();
    CUstream s = NULL;
    CU(cuStreamCreate)(&s, 0);
    uint64_t cycle = (busy_ms + idle_ms) * 1000000ull, t0 = mono_ns();
    printf("duty_start_ns=%" PRIu64 "\n", t0);
    for (uint64_t i = 0; i * cycle < total_ms * 1000000ull; i++) {
        sleep_until(t0 + i * cycle);
        launch_busy(busy_ms * 1000000ull, s);
    }
    CU(cuStreamSynchronize)(s);
    printf("duty_end_ns=%" PRIu64 "\npid=%d\n", mono_ns(), (int)getpid());
}

static void cmd_nvml_util(void) {
    NV(nvmlInit_v2)();
    nvmlDevice_t d = NULL;
    NV(nvmlDeviceGetHandleByIndex_v2)(0, &d);
    unsigned n = 0;
    nvmlReturn_t r = NV(nvmlDeviceGetProcessUtilization)(d, NULL, &n, 0);
    printf("size_rc=%d\nsize=%u\n", r, n);
    if (r == NVML_ERROR_NOT_SUPPORTED || r == NVML_ERROR_NOT_FOUND) {
        printf("util_rc=%d\n", r);
    } else {
        nvmlProcessUtilizationSample_t *sm = calloc(n + 1, sizeof *sm);
        unsigned cap = n;
        r = NV(nvmlDeviceGetProcessUtilization)(d, sm, &cap, 0);
        printf("util_rc=%d\n", r);
        unsigned long long newest = 0;
        for (unsigned i = 0; i < cap; i++) {
            printf("sample pid=%u ts=%llu sm=%u\n", sm[i].pid, sm[i].timeStamp, sm[i].smUtil);
            if (sm[i].timeStamp > newest)
                newest = sm[i].timeStamp;
        }
        unsigned c2 = n;
        printf("after_newest_rc=%d\n", NV(nvmlDeviceGetProcessUtilization)(d, sm, &c2, newest));
        c2 = n;
        nvmlReturn_t r2 = NV(nvmlDeviceGetProcessUtilization)(d, sm, &c2, newest - 1);
        int only_newest = r2 == NVML_SUCCESS;
        for (unsigned i = 0; i < c2 && only_newest; i++)
            only_newest = sm[i].timeStamp == newest;
        CHECK(only_newest && c2 >= 1, "lastSeen = newest-1 gives only the newest period");
        free(sm);
    }
    nvmlProcessesUtilizationInfo_t info;
    memset(&info, 0, sizeof info);
    info.version = nvmlProcessesUtilizationInfo_v1;
    r = NV(nvmlDeviceGetProcessesUtilizationInfo)(d, &info);
    printf("info_size_rc=%d\ninfo_size=%u\n", r, info.processSamplesCount);
    if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
        info.procUtilArray = calloc(info.processSamplesCount, sizeof *info.procUtilArray);
        r = NV(nvmlDeviceGetProcessesUtilizationInfo)(d, &info);
        printf("info_rc=%d\n", r);
        for (unsigned i = 0; i < info.processSamplesCount; i++)
            printf("info pid=%u ts=%llu sm=%u\n", info.procUtilArray[i].pid,
                   info.procUtilArray[i].timeStamp, info.procUtilArray[i].smUtil);
        free(info.procUtilArray);
    }
    nvmlUtilization_t u;
    NV(nvmlDeviceGetUtilizationRates)(d, &u);
    printf("device_util=%u\n", u.gpu);
}

static void cmd_noop_bench(long n) {
    cuda_up();
    CUfunction f = kernel("noop");
    __typeof__(&cuLaunchKernel) launch = CU(cuLaunchKernel);
    for (long i = 0; i < 1000; i++)
        launch(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
    uint64_t t0 = mono_ns();
    for (long i = 0; i < n; i++)
        launch(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
    uint64_t t1 = mono_ns();
    printf("noop_ns_per_launch=%.1f\n", (double)(t1 - t0) / (double)n);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: %s <command> [args]\n", argv[0]);
        return 2;
    }
    const char *c = argv[1];
    open_libs(1);
    if (!strcmp(c, "layout"))
        cmd_layout();
    else if (!strcmp(c, "procaddr"))
        cmd_procaddr();
    else if (!strcmp(c, "identity"))
        cmd_identity();
    else if (!strcmp(c, "mem-api"))
        cmd_mem_api();
    else if (!strcmp(c, "hold") && argc > 2)
        cmd_hold(strtoull(argv[2], NULL, 0));
    else if (!strcmp(c, "try-alloc") && argc > 2)
        cmd_try_alloc(strtoull(argv[2], NULL, 0));
    else if (!strcmp(c, "nvml-procs"))
        cmd_nvml_procs();
    else if (!strcmp(c, "timing"))
        cmd_timing();
    else if (!strcmp(c, "burst") && argc > 3)
        cmd_burst(strtoull(argv[2], NULL, 0), atoi(argv[3]));
    else if (!strcmp(c, "duty") && argc > 4)
        cmd_duty(strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0),
                 strtoull(argv[4], NULL, 0));
    else if (!strcmp(c, "nvml-util"))
        cmd_nvml_util();
    else if (!strcmp(c, "noop-bench") && argc > 2)
        cmd_noop_bench(atol(argv[2]));
    else {
        fprintf(stderr, "unknown command %s\n", c);
        return 2;
    }
    printf("DONE failures=%d\n", g_failures);
    return g_failures ? 1 : 0;
}
