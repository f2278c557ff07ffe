/*
 * fake_cuda.c: a fake CUDA driver (libcuda.so.1) for testing the limiter without a GPU.
 *
 * Built from fake_cuda.c, fake_cuda_mem.c, fake_cuda_exec.c, fake_cuda_procaddr.c and
 * fakegpu_state.c with -shared -fPIC -Wl,-soname,libcuda.so.1 -Wl,-Bsymbolic. The simulated
 * devices are shared with other processes and with the fake NVML through FAKEGPU_STATE (see
 * fakegpu.h for that file and the profile variables FAKEGPU_DEVICES, FAKEGPU_SMS,
 * FAKEGPU_THREADS_PER_SM, FAKEGPU_MEM_BYTES, FAKEGPU_CTX_OVERHEAD, FAKEGPU_DRIVER_VERSION).
 *
 * What it models:
 *  - Devices: name "Fake H200", attributes MULTIPROCESSOR_COUNT (16),
 *    MAX_THREADS_PER_MULTIPROCESSOR (39), MAX_THREADS_PER_BLOCK (1) = 1024; other attributes 0.
 *  - Contexts: primary (retain/release/reset) and created ones, a per-thread context stack.
 *    While a process has at least one live context on a device it is charged
 *    FAKEGPU_CTX_OVERHEAD there, and NVML lists it. Destroying a context (or releasing a
 *    primary context to zero, or resetting it) frees the device memory allocated in it.
 *    cuDevicePrimaryCtxReset keeps the context (and its overhead charge) alive.
 *  - Memory (fake_cuda_mem.c): physical capacity per device, shared by all processes;
 *    exceeding it returns CUDA_ERROR_OUT_OF_MEMORY (2). Stream-ordered allocations are charged
 *    and freed at once (pools retain nothing, cuMemPoolTrimTo has nothing to do), also while a
 *    stream is capturing. Host allocations use malloc and are not charged.
 *  - Kernels and time (fake_cuda_exec.c): a timing model by function name, launches advance a
 *    shared model clock and synchronisation sleeps until model time; see that file.
 *  - cuGetProcAddress/_v2 (fake_cuda_procaddr.c): base name + version + flags to exact export.
 *
 * Errors follow the driver where cheap: CUDA_ERROR_NOT_INITIALIZED (3) before cuInit,
 * CUDA_ERROR_INVALID_CONTEXT (201) for memory, stream and launch calls without a current
 * context, CUDA_ERROR_INVALID_DEVICE (101), CUDA_ERROR_INVALID_HANDLE (400) for bad handles,
 * CUDA_ERROR_INVALID_VALUE (1) for bad arguments and unknown device pointers.
 *
 * Test hooks: uint64_t fakegpu_call_count(const char *exact_name) (calls of that exact export
 * in this process; unknown names give 0) and void fakegpu_reset_counts(void).
 */
#include "fake_cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Atomic uint64_t fg_counts[FGC_COUNT];
_Atomic int fg_inited;

static const char *const fg_names[FGC_COUNT] = {
#define FG_NAME(name) #name,
    FG_CUDA_FUNCS(FG_NAME)
#undef FG_NAME
};

FG_EXPORT uint64_t fakegpu_call_count(const char *exact_name) {
    if (!exact_name)
        return 0;
    for (int i = 0; i < FGC_COUNT; i++)
        if (strcmp(fg_names[i], exact_name) == 0)
            return atomic_load_explicit(&fg_counts[i], memory_order_relaxed);
    return 0;
}

FG_EXPORT void fakegpu_reset_counts(void) {
    for (int i = 0; i < FGC_COUNT; i++)
        atomic_store_explicit(&fg_counts[i], 0, memory_order_relaxed);
}

/* ---- process-local context state ---- */

#define FG_STACK_DEPTH 16
static __thread struct fg_ctx *t_stack[FG_STACK_DEPTH] FG_TLS_IE;
static __thread int t_depth FG_TLS_IE;
static pthread_mutex_t g_ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fg_ctx g_primary[FAKEGPU_MAX_DEVICES];
static unsigned g_live_ctx[FAKEGPU_MAX_DEVICES]; /* under g_ctx_lock */

static void after_fork_child(void) {
    pthread_mutex_init(&g_ctx_lock, NULL);
    memset(g_primary, 0, sizeof g_primary);
    memset(g_live_ctx, 0, sizeof g_live_ctx);
    t_depth = 0;
    atomic_store(&fg_inited, 0);
    fg_mem_reset_after_fork();
}

__attribute__((constructor)) static void fg_constructor(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
}

int fg_device_count(void) { return (int)fakegpu_state()->device_count; }

static int valid_dev(CUdevice d) { return d >= 0 && d < fg_device_count(); }

#define REQUIRE_INIT()                                                                   \
    do {                                                                                 \
        if (!atomic_load_explicit(&fg_inited, memory_order_relaxed))                     \
            return CUDA_ERROR_NOT_INITIALIZED;                                           \
    } while (0)

struct fg_ctx *fg_current_ctx(void) { return t_depth ? t_stack[t_depth - 1] : NULL; }

int fg_current_dev(CUresult *err) {
    if (!atomic_load_explicit(&fg_inited, memory_order_relaxed)) {
        *err = CUDA_ERROR_NOT_INITIALIZED;
        return -1;
    }
    struct fg_ctx *c = fg_current_ctx();
    if (!c) {
        *err = CUDA_ERROR_INVALID_CONTEXT;
        return -1;
    }
    return c->dev;
}

/* A context on dev becomes live (g_ctx_lock held): the first one charges the overhead. */
static CUresult ctx_live_locked(int dev) {
    CUresult r = CUDA_SUCCESS;
    if (g_live_ctx[dev] == 0) {
        uint64_t ovh = fakegpu_state()->devices[dev].ctx_overhead;
        if (ovh && fakegpu_charge(dev, ovh) != 0)
            r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (r == CUDA_SUCCESS) {
        g_live_ctx[dev]++;
        struct fakegpu_proc *p = fakegpu_my_proc();
        if (p)
            atomic_fetch_add(&p->contexts[dev], 1);
    }
    return r;
}

static CUresult ctx_live(int dev) {
    pthread_mutex_lock(&g_ctx_lock);
    CUresult r = ctx_live_locked(dev);
    pthread_mutex_unlock(&g_ctx_lock);
    return r;
}

static void ctx_dead(int dev) {
    pthread_mutex_lock(&g_ctx_lock);
    if (g_live_ctx[dev] > 0) {
        g_live_ctx[dev]--;
        struct fakegpu_proc *p = fakegpu_my_proc();
        if (p)
            atomic_fetch_sub(&p->contexts[dev], 1);
        if (g_live_ctx[dev] == 0)
            fakegpu_uncharge(dev, fakegpu_state()->devices[dev].ctx_overhead);
    }
    pthread_mutex_unlock(&g_ctx_lock);
}

static void stack_remove(struct fg_ctx *c) {
    for (int i = t_depth - 1; i >= 0; i--) {
        if (t_stack[i] == c) {
            memmove(&t_stack[i], &t_stack[i + 1], (size_t)(t_depth - 1 - i) * sizeof c);
            t_depth--;
            return;
        }
    }
}

static CUresult push(struct fg_ctx *c) {
    if (t_depth == FG_STACK_DEPTH)
        return CUDA_ERROR_UNKNOWN;
    t_stack[t_depth++] = c;
    return CUDA_SUCCESS;
}

/* ---- initialisation and devices ---- */

FG_EXPORT CUresult cuInit(unsigned int flags) {
    FG_COUNT(cuInit);
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    fakegpu_state();
    atomic_store(&fg_inited, 1);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDriverGetVersion(int *driverVersion) {
    FG_COUNT(cuDriverGetVersion);
    if (!driverVersion)
        return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = (int)fakegpu_state()->driver_version;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    FG_COUNT(cuDeviceGet);
    REQUIRE_INIT();
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(ordinal))
        return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceGetCount(int *count) {
    FG_COUNT(cuDeviceGetCount);
    REQUIRE_INIT();
    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    *count = fg_device_count();
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    FG_COUNT(cuDeviceGetName);
    REQUIRE_INIT();
    if (!name || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", fakegpu_state()->devices[dev].name);
    return CUDA_SUCCESS;
}

static CUresult get_uuid(CUuuid *uuid, CUdevice dev) {
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!uuid)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    memcpy(uuid->bytes, fakegpu_state()->devices[dev].uuid, 16);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) {
    FG_COUNT(cuDeviceGetUuid);
    return get_uuid(uuid, dev);
}

FG_EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) {
    FG_COUNT(cuDeviceGetUuid_v2);
    return get_uuid(uuid, dev);
}

FG_EXPORT CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
    FG_COUNT(cuDeviceGetAttribute);
    REQUIRE_INIT();
    if (!pi)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    const struct fakegpu_device *d = &fakegpu_state()->devices[dev];
    switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT:
        *pi = (int)d->sms;
        break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR:
        *pi = (int)d->threads_per_sm;
        break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK:
        *pi = 1024;
        break;
    default:
        *pi = 0;
    }
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    FG_COUNT(cuDeviceTotalMem);
    REQUIRE_INIT();
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    uint64_t m = fakegpu_state()->devices[dev].mem_bytes;
    *bytes = m > UINT32_MAX ? UINT32_MAX : (unsigned int)m;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    FG_COUNT(cuDeviceTotalMem_v2);
    REQUIRE_INIT();
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)fakegpu_state()->devices[dev].mem_bytes;
    return CUDA_SUCCESS;
}

/* ---- primary contexts ---- */

FG_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    FG_COUNT(cuDevicePrimaryCtxRetain);
    REQUIRE_INIT();
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    struct fg_ctx *c = &g_primary[dev];
    pthread_mutex_lock(&g_ctx_lock);
    if (c->refs == 0) {
        CUresult r = ctx_live_locked(dev);
        if (r != CUDA_SUCCESS) {
            pthread_mutex_unlock(&g_ctx_lock);
            return r;
        }
    }
    c->magic = FG_MAGIC_CTX;
    c->dev = dev;
    c->primary = 1;
    c->refs++;
    pthread_mutex_unlock(&g_ctx_lock);
    *pctx = (CUcontext)c;
    return CUDA_SUCCESS;
}

static CUresult primary_release(CUdevice dev) {
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    struct fg_ctx *c = &g_primary[dev];
    pthread_mutex_lock(&g_ctx_lock);
    if (c->refs == 0) {
        pthread_mutex_unlock(&g_ctx_lock);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    unsigned left = --c->refs;
    pthread_mutex_unlock(&g_ctx_lock);
    if (left == 0) {
        fg_mem_free_ctx(c);
        ctx_dead(dev);
    }
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice dev) {
    FG_COUNT(cuDevicePrimaryCtxRelease);
    return primary_release(dev);
}

FG_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    FG_COUNT(cuDevicePrimaryCtxRelease_v2);
    return primary_release(dev);
}

static CUresult primary_reset(CUdevice dev) {
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    fg_mem_free_ctx(&g_primary[dev]);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuDevicePrimaryCtxReset(CUdevice dev) {
    FG_COUNT(cuDevicePrimaryCtxReset);
    return primary_reset(dev);
}

FG_EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev) {
    FG_COUNT(cuDevicePrimaryCtxReset_v2);
    return primary_reset(dev);
}

/* ---- created contexts ---- */

static CUresult ctx_create(CUcontext *pctx, CUdevice dev) {
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    if (t_depth == FG_STACK_DEPTH)
        return CUDA_ERROR_UNKNOWN;
    struct fg_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = ctx_live(dev);
    if (r != CUDA_SUCCESS) {
        free(c);
        return r;
    }
    c->magic = FG_MAGIC_CTX;
    c->dev = dev;
    push(c);
    *pctx = (CUcontext)c;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    FG_COUNT(cuCtxCreate);
    (void)flags;
    return ctx_create(pctx, dev);
}

FG_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    FG_COUNT(cuCtxCreate_v2);
    (void)flags;
    return ctx_create(pctx, dev);
}

FG_EXPORT CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray,
                                  int numParams, unsigned int flags, CUdevice dev) {
    FG_COUNT(cuCtxCreate_v3);
    (void)flags;
    if (numParams < 0 || (numParams > 0 && !paramsArray))
        return CUDA_ERROR_INVALID_VALUE;
    return ctx_create(pctx, dev);
}

FG_EXPORT CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams,
                                  unsigned int flags, CUdevice dev) {
    FG_COUNT(cuCtxCreate_v4);
    (void)flags;
    if (ctxCreateParams &&
        (ctxCreateParams->numExecAffinityParams < 0 ||
         (ctxCreateParams->numExecAffinityParams > 0 && !ctxCreateParams->execAffinityParams)))
        return CUDA_ERROR_INVALID_VALUE;
    return ctx_create(pctx, dev);
}

static int valid_ctx(const struct fg_ctx *c) { return c && c->magic == FG_MAGIC_CTX; }

FG_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx) {
    FG_COUNT(cuCtxDestroy_v2);
    REQUIRE_INIT();
    struct fg_ctx *c = (struct fg_ctx *)ctx;
    if (!valid_ctx(c) || c->primary)
        return CUDA_ERROR_INVALID_CONTEXT;
    stack_remove(c);
    fg_mem_free_ctx(c);
    ctx_dead(c->dev);
    c->magic = 0;
    free(c);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    FG_COUNT(cuCtxSetCurrent);
    REQUIRE_INIT();
    struct fg_ctx *c = (struct fg_ctx *)ctx;
    if (!c) {
        if (t_depth)
            t_depth--;
        return CUDA_SUCCESS;
    }
    if (!valid_ctx(c))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth)
        t_stack[t_depth - 1] = c;
    else
        push(c);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx) {
    FG_COUNT(cuCtxGetCurrent);
    REQUIRE_INIT();
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    *pctx = (CUcontext)fg_current_ctx();
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCtxGetDevice(CUdevice *device) {
    FG_COUNT(cuCtxGetDevice);
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    *device = dev;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCtxSynchronize(void) {
    FG_COUNT(cuCtxSynchronize);
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    fakegpu_sleep_until(fg_dev_tail(dev));
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    FG_COUNT(cuCtxPushCurrent_v2);
    REQUIRE_INIT();
    struct fg_ctx *c = (struct fg_ctx *)ctx;
    if (!valid_ctx(c))
        return CUDA_ERROR_INVALID_CONTEXT;
    return push(c);
}

FG_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx) {
    FG_COUNT(cuCtxPopCurrent_v2);
    REQUIRE_INIT();
    if (t_depth == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    struct fg_ctx *c = t_stack[--t_depth];
    if (pctx)
        *pctx = (CUcontext)c;
    return CUDA_SUCCESS;
}
