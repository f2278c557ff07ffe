/*
 * fake_cuda_exec.c: modules, kernels, streams, events, stream capture and graphs of the fake
 * libcuda.so.1.
 *
 * Kernel timing model, by the name given to cuModuleGetFunction:
 *   "busy"          duration = *(uint64_t *)kernelParams[0] nanoseconds (no kernelParams:
 *                   CUDA_ERROR_INVALID_VALUE, so legacy cuLaunch* cannot launch it)
 *   "noop"          0 ns; the cheapest launch (no clock read, no ring entry): the benchmark
 *                   baseline
 *   "block_ns_<N>"  N ns per wave of blocks: duration = waves * N, waves = ceil(grid blocks /
 *                   (SMs * blocks_per_SM)), blocks_per_SM = max(1, threads_per_SM / threads
 *                   per block)
 *   anything else   as "block_ns_1000"
 * Grid and block dimensions must be >= 1 and a block at most 1024 threads.
 *
 * Launches are asynchronous: they only advance the model (fakegpu.h, "Time-slicing model")
 * and append (pid, device, start, end) to the shared ring. cuStreamSynchronize,
 * cuCtxSynchronize (all of this process's work on the device) and cuEventSynchronize sleep
 * until the model time; cuStreamQuery/cuEventQuery return CUDA_ERROR_NOT_READY before it.
 * An event records max(now, stream tail); cuEventElapsedTime is the difference in model time.
 *
 * Streams: NULL is the process's legacy default stream (CU_STREAM_LEGACY too), or, in the
 * _ptsz variants, the calling thread's per-thread stream (CU_STREAM_PER_THREAD everywhere),
 * each per device of the current context. Capture is refused on the legacy stream
 * (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED); while a stream captures, launches and graph
 * launches on it append kernel nodes to the capture graph instead of running, events recorded
 * on it are ignored and synchronising it fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED.
 * Graphs hold kernel nodes only (dependencies are accepted and ignored: nodes run in insertion
 * order); an executable graph is a copy of its kernels, run back to back on the stream
 * (fake_cuda_graph.c).
 */
#include "fake_cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RLX memory_order_relaxed

static struct fg_stream g_legacy[FAKEGPU_MAX_DEVICES];
static __thread struct fg_stream t_per_thread[FAKEGPU_MAX_DEVICES] FG_TLS_IE;
static _Atomic uint64_t g_dev_tail[FAKEGPU_MAX_DEVICES];
static pthread_mutex_t g_mod_lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((constructor)) static void exec_constructor(void) {
    for (int d = 0; d < FAKEGPU_MAX_DEVICES; d++)
        g_legacy[d].dev = d;
}

uint64_t fg_dev_tail(int dev) { return atomic_load(&g_dev_tail[dev]); }

static void atomic_max_u64(_Atomic uint64_t *a, uint64_t v) {
    uint64_t cur = atomic_load_explicit(a, RLX);
    while (cur < v && !atomic_compare_exchange_weak_explicit(a, &cur, v, RLX, RLX)) {
    }
}

static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

struct fg_stream *fg_resolve_stream(CUstream h, int ptsz, CUresult *err) {
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        int dev = fg_current_dev(err);
        if (dev < 0)
            return NULL;
        if (h == CU_STREAM_PER_THREAD || (h == NULL && ptsz)) {
            t_per_thread[dev].dev = dev;
            return &t_per_thread[dev];
        }
        return &g_legacy[dev];
    }
    if (!atomic_load_explicit(&fg_inited, RLX)) {
        *err = CUDA_ERROR_NOT_INITIALIZED;
        return NULL;
    }
    struct fg_stream *s = (struct fg_stream *)h;
    if (s->magic != FG_MAGIC_STREAM) {
        *err = CUDA_ERROR_INVALID_HANDLE;
        return NULL;
    }
    return s;
}

int fg_is_legacy(const struct fg_stream *s) {
    return s >= g_legacy && s < g_legacy + FAKEGPU_MAX_DEVICES;
}

/* ---- modules ---- */

static CUresult module_new(CUmodule *module) {
    CUresult err = CUDA_SUCCESS;
    if (fg_current_dev(&err) < 0)
        return err;
    struct fg_module *m = calloc(1, sizeof *m);
    if (!m)
        return CUDA_ERROR_OUT_OF_MEMORY;
    m->magic = FG_MAGIC_MODULE;
    *module = (CUmodule)m;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuModuleLoad(CUmodule *module, const char *fname) {
    FG_COUNT(cuModuleLoad);
    if (!module || !fname)
        return CUDA_ERROR_INVALID_VALUE;
    return module_new(module);
}

FG_EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image) {
    FG_COUNT(cuModuleLoadData);
    if (!module || !image)
        return CUDA_ERROR_INVALID_VALUE;
    return module_new(module);
}

FG_EXPORT CUresult cuModuleUnload(CUmodule hmod) {
    FG_COUNT(cuModuleUnload);
    struct fg_module *m = (struct fg_module *)hmod;
    if (!m || m->magic != FG_MAGIC_MODULE)
        return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&g_mod_lock);
    for (struct fg_func *f = m->funcs, *next; f; f = next) {
        next = f->next;
        f->magic = 0;
        free(f);
    }
    m->magic = 0;
    pthread_mutex_unlock(&g_mod_lock);
    free(m);
    return CUDA_SUCCESS;
}

static void parse_kernel_name(struct fg_func *f, const char *name) {
    snprintf(f->name, sizeof f->name, "%s", name);
    f->kind = FG_KERNEL_BLOCKS;
    f->block_ns = 1000;
    if (strcmp(name, "busy") == 0) {
        f->kind = FG_KERNEL_BUSY;
    } else if (strcmp(name, "noop") == 0) {
        f->kind = FG_KERNEL_NOOP;
    } else if (strncmp(name, "block_ns_", 9) == 0 && name[9]) {
        char *end = NULL;
        unsigned long long n = strtoull(name + 9, &end, 10);
        if (end && !*end)
            f->block_ns = n;
    }
}

FG_EXPORT CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) {
    FG_COUNT(cuModuleGetFunction);
    struct fg_module *m = (struct fg_module *)hmod;
    if (!hfunc || !name)
        return CUDA_ERROR_INVALID_VALUE;
    if (!m || m->magic != FG_MAGIC_MODULE)
        return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&g_mod_lock);
    struct fg_func *f = m->funcs;
    while (f && strcmp(f->name, name) != 0)
        f = f->next;
    if (!f && (f = calloc(1, sizeof *f)) != NULL) {
        f->magic = FG_MAGIC_FUNC;
        f->module = m;
        parse_kernel_name(f, name);
        f->next = m->funcs;
        m->funcs = f;
    }
    pthread_mutex_unlock(&g_mod_lock);
    if (!f)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *hfunc = (CUfunction)f;
    return CUDA_SUCCESS;
}

/* ---- the model ---- */

uint64_t fg_kernel_ns(const struct fg_kernel *k, int dev) {
    switch (k->func->kind) {
    case FG_KERNEL_BUSY:
        return k->busy_ns;
    case FG_KERNEL_NOOP:
        return 0;
    default:
        break;
    }
    const struct fakegpu_device *d = &fakegpu_state()->devices[dev];
    uint64_t grid = (uint64_t)k->grid[0] * k->grid[1] * k->grid[2];
    uint64_t threads = (uint64_t)k->block[0] * k->block[1] * k->block[2];
    uint64_t per_sm = d->threads_per_sm / threads;
    if (per_sm == 0)
        per_sm = 1;
    uint64_t per_wave = d->sms * per_sm;
    return (grid + per_wave - 1) / per_wave * k->func->block_ns;
}

void fg_run_kernel(struct fg_stream *s, uint64_t dur) {
    struct fakegpu_device *d = &fakegpu_state()->devices[s->dev];
    uint64_t tail = atomic_load_explicit(&s->tail, RLX);
    uint64_t end;
    if (dur == 0) {
        end = max_u64(tail, atomic_load_explicit(&d->device_free_at, RLX));
    } else {
        uint64_t now = fakegpu_now_ns();
        uint64_t dfa = atomic_load_explicit(&d->device_free_at, RLX);
        uint64_t start;
        do {
            start = max_u64(max_u64(now, dfa), tail);
            end = start + dur;
        } while (!atomic_compare_exchange_weak_explicit(&d->device_free_at, &dfa, end,
                                                        memory_order_acq_rel, RLX));
        fakegpu_ring_append(fakegpu_pid(), s->dev, start, end);
    }
    atomic_max_u64(&s->tail, end);
    atomic_max_u64(&g_dev_tail[s->dev], end);
}

/* Validate a kernel's shape and take the `busy` duration from its parameters. */
CUresult fg_prepare(struct fg_kernel *k, void **params) {
    const unsigned *g = k->grid, *b = k->block;
    if (!g[0] || !g[1] || !g[2] || !b[0] || !b[1] || !b[2])
        return CUDA_ERROR_INVALID_VALUE;
    if ((uint64_t)b[0] * b[1] * b[2] > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if (k->func->kind == FG_KERNEL_BUSY) {
        if (!params || !params[0])
            return CUDA_ERROR_INVALID_VALUE;
        memcpy(&k->busy_ns, params[0], sizeof k->busy_ns);
    }
    return CUDA_SUCCESS;
}

struct fg_node *fg_graph_add(struct fg_graph *g, const struct fg_kernel *k, CUcontext ctx) {
    struct fg_node *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->magic = FG_MAGIC_NODE;
    n->graph = g;
    n->k = *k;
    n->param_value = k->busy_ns;
    n->param_ptrs[0] = &n->param_value;
    n->ctx = ctx;
    pthread_mutex_lock(&g->lock);
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 8;
        struct fg_node **nodes = realloc(g->nodes, cap * sizeof *nodes);
        if (!nodes) {
            pthread_mutex_unlock(&g->lock);
            free(n);
            return NULL;
        }
        g->nodes = nodes;
        g->cap = cap;
    }
    g->nodes[g->n++] = n;
    pthread_mutex_unlock(&g->lock);
    return n;
}

static CUresult launch(CUfunction hf, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                       unsigned by, unsigned bz, unsigned shared, CUstream hs, void **params,
                       int ptsz) {
    struct fg_func *f = (struct fg_func *)hf;
    if (!atomic_load_explicit(&fg_inited, RLX))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!f || f->magic != FG_MAGIC_FUNC)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fg_kernel k = {f, {gx, gy, gz}, {bx, by, bz}, shared, 0};
    CUresult r = fg_prepare(&k, params);
    if (r != CUDA_SUCCESS)
        return r;
    struct fg_stream *s = fg_resolve_stream(hs, ptsz, &r);
    if (!s)
        return r;
    struct fg_graph *g = atomic_load_explicit(&s->capture, memory_order_acquire);
    if (__builtin_expect(g != NULL, 0))
        return fg_graph_add(g, &k, (CUcontext)fg_current_ctx()) ? CUDA_SUCCESS
                                                             : CUDA_ERROR_OUT_OF_MEMORY;
    fg_run_kernel(s, fg_kernel_ns(&k, s->dev));
    return CUDA_SUCCESS;
}

/* ---- launches ---- */

FG_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                  unsigned int gridDimZ, unsigned int blockDimX,
                                  unsigned int blockDimY, unsigned int blockDimZ,
                                  unsigned int sharedMemBytes, CUstream hStream,
                                  void **kernelParams, void **extra) {
    FG_COUNT(cuLaunchKernel);
    (void)extra;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                  sharedMemBytes, hStream, kernelParams, 0);
}

FG_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                       unsigned int gridDimY, unsigned int gridDimZ,
                                       unsigned int blockDimX, unsigned int blockDimY,
                                       unsigned int blockDimZ, unsigned int sharedMemBytes,
                                       CUstream hStream, void **kernelParams, void **extra) {
    FG_COUNT(cuLaunchKernel_ptsz);
    (void)extra;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                  sharedMemBytes, hStream, kernelParams, 1);
}

static CUresult launch_ex(const CUlaunchConfig *c, CUfunction f, void **kernelParams, int ptsz) {
    if (!c || (c->numAttrs && !c->attrs))
        return CUDA_ERROR_INVALID_VALUE;
    return launch(f, c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY,
                  c->blockDimZ, c->sharedMemBytes, c->hStream, kernelParams, ptsz);
}

FG_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                    void **kernelParams, void **extra) {
    FG_COUNT(cuLaunchKernelEx);
    (void)extra;
    return launch_ex(config, f, kernelParams, 0);
}

FG_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                         void **kernelParams, void **extra) {
    FG_COUNT(cuLaunchKernelEx_ptsz);
    (void)extra;
    return launch_ex(config, f, kernelParams, 1);
}

FG_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX,
                                             unsigned int gridDimY, unsigned int gridDimZ,
                                             unsigned int blockDimX, unsigned int blockDimY,
                                             unsigned int blockDimZ, unsigned int sharedMemBytes,
                                             CUstream hStream, void **kernelParams) {
    FG_COUNT(cuLaunchCooperativeKernel);
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                  sharedMemBytes, hStream, kernelParams, 0);
}

FG_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                                  unsigned int gridDimY, unsigned int gridDimZ,
                                                  unsigned int blockDimX, unsigned int blockDimY,
                                                  unsigned int blockDimZ,
                                                  unsigned int sharedMemBytes, CUstream hStream,
                                                  void **kernelParams) {
    FG_COUNT(cuLaunchCooperativeKernel_ptsz);
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                  sharedMemBytes, hStream, kernelParams, 1);
}

FG_EXPORT CUresult cuFuncSetBlockShape(CUfunction hfunc, int x, int y, int z) {
    FG_COUNT(cuFuncSetBlockShape);
    struct fg_func *f = (struct fg_func *)hfunc;
    if (!f || f->magic != FG_MAGIC_FUNC)
        return CUDA_ERROR_INVALID_HANDLE;
    if (x <= 0 || y <= 0 || z <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    f->shape[0] = (unsigned)x;
    f->shape[1] = (unsigned)y;
    f->shape[2] = (unsigned)z;
    return CUDA_SUCCESS;
}

static CUresult legacy_launch(CUfunction hf, int w, int h, CUstream hs) {
    struct fg_func *f = (struct fg_func *)hf;
    if (!f || f->magic != FG_MAGIC_FUNC)
        return CUDA_ERROR_INVALID_HANDLE;
    if (w <= 0 || h <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    return launch(hf, (unsigned)w, (unsigned)h, 1, f->shape[0], f->shape[1], f->shape[2], 0, hs,
                  NULL, 0);
}

FG_EXPORT CUresult cuLaunch(CUfunction f) {
    FG_COUNT(cuLaunch);
    return legacy_launch(f, 1, 1, NULL);
}

FG_EXPORT CUresult cuLaunchGrid(CUfunction f, int grid_width, int grid_height) {
    FG_COUNT(cuLaunchGrid);
    return legacy_launch(f, grid_width, grid_height, NULL);
}

FG_EXPORT CUresult cuLaunchGridAsync(CUfunction f, int grid_width, int grid_height,
                                     CUstream hStream) {
    FG_COUNT(cuLaunchGridAsync);
    return legacy_launch(f, grid_width, grid_height, hStream);
}

/* ---- streams ---- */

static CUresult stream_create(CUstream *ph) {
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    if (!ph)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_stream *s = calloc(1, sizeof *s);
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    s->magic = FG_MAGIC_STREAM;
    s->dev = dev;
    *ph = (CUstream)s;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags) {
    FG_COUNT(cuStreamCreate);
    (void)Flags;
    return stream_create(phStream);
}

FG_EXPORT CUresult cuStreamCreateWithPriority(CUstream *phStream, unsigned int flags,
                                              int priority) {
    FG_COUNT(cuStreamCreateWithPriority);
    (void)flags;
    (void)priority;
    return stream_create(phStream);
}

FG_EXPORT CUresult cuStreamDestroy_v2(CUstream hStream) {
    FG_COUNT(cuStreamDestroy_v2);
    struct fg_stream *s = (struct fg_stream *)hStream;
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!s || hStream == CU_STREAM_LEGACY || hStream == CU_STREAM_PER_THREAD ||
        s->magic != FG_MAGIC_STREAM)
        return CUDA_ERROR_INVALID_HANDLE;
    s->magic = 0;
    free(s);
    return CUDA_SUCCESS;
}

static CUresult stream_sync(CUstream h, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(h, ptsz, &err);
    if (!s)
        return err;
    if (atomic_load(&s->capture))
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    fakegpu_sleep_until(atomic_load(&s->tail));
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuStreamSynchronize(CUstream hStream) {
    FG_COUNT(cuStreamSynchronize);
    return stream_sync(hStream, 0);
}

FG_EXPORT CUresult cuStreamSynchronize_ptsz(CUstream hStream) {
    FG_COUNT(cuStreamSynchronize_ptsz);
    return stream_sync(hStream, 1);
}

static CUresult stream_query(CUstream h, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(h, ptsz, &err);
    if (!s)
        return err;
    return fakegpu_now_ns() < atomic_load(&s->tail) ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}

FG_EXPORT CUresult cuStreamQuery(CUstream hStream) {
    FG_COUNT(cuStreamQuery);
    return stream_query(hStream, 0);
}

FG_EXPORT CUresult cuStreamQuery_ptsz(CUstream hStream) {
    FG_COUNT(cuStreamQuery_ptsz);
    return stream_query(hStream, 1);
}

/* ---- events ---- */

static struct fg_event *event_of(CUevent h) {
    struct fg_event *e = (struct fg_event *)h;
    return e && e->magic == FG_MAGIC_EVENT ? e : NULL;
}

FG_EXPORT CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags) {
    FG_COUNT(cuEventCreate);
    CUresult err = CUDA_SUCCESS;
    if (fg_current_dev(&err) < 0)
        return err;
    if (!phEvent)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_event *e = calloc(1, sizeof *e);
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    e->magic = FG_MAGIC_EVENT;
    e->flags = Flags;
    *phEvent = (CUevent)e;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuEventDestroy_v2(CUevent hEvent) {
    FG_COUNT(cuEventDestroy_v2);
    struct fg_event *e = event_of(hEvent);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    e->magic = 0;
    free(e);
    return CUDA_SUCCESS;
}

static CUresult event_record(CUevent h, CUstream hs, int ptsz) {
    struct fg_event *e = event_of(h);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(hs, ptsz, &err);
    if (!s)
        return err;
    if (atomic_load(&s->capture))
        return CUDA_SUCCESS;
    atomic_store(&e->time_ns, max_u64(fakegpu_now_ns(), atomic_load(&s->tail)));
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuEventRecord(CUevent hEvent, CUstream hStream) {
    FG_COUNT(cuEventRecord);
    return event_record(hEvent, hStream, 0);
}

FG_EXPORT CUresult cuEventRecord_ptsz(CUevent hEvent, CUstream hStream) {
    FG_COUNT(cuEventRecord_ptsz);
    return event_record(hEvent, hStream, 1);
}

FG_EXPORT CUresult cuEventQuery(CUevent hEvent) {
    FG_COUNT(cuEventQuery);
    struct fg_event *e = event_of(hEvent);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    return fakegpu_now_ns() < atomic_load(&e->time_ns) ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}

FG_EXPORT CUresult cuEventSynchronize(CUevent hEvent) {
    FG_COUNT(cuEventSynchronize);
    struct fg_event *e = event_of(hEvent);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    fakegpu_sleep_until(atomic_load(&e->time_ns));
    return CUDA_SUCCESS;
}

static CUresult elapsed(float *ms, CUevent hs, CUevent he) {
    struct fg_event *a = event_of(hs), *b = event_of(he);
    if (!ms)
        return CUDA_ERROR_INVALID_VALUE;
    if (!a || !b || (a->flags & CU_EVENT_DISABLE_TIMING) || (b->flags & CU_EVENT_DISABLE_TIMING))
        return CUDA_ERROR_INVALID_HANDLE;
    uint64_t ta = atomic_load(&a->time_ns), tb = atomic_load(&b->time_ns);
    if (!ta || !tb)
        return CUDA_ERROR_INVALID_HANDLE;
    uint64_t now = fakegpu_now_ns();
    if (now < ta || now < tb)
        return CUDA_ERROR_NOT_READY;
    *ms = (float)(((double)tb - (double)ta) / 1e6);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd) {
    FG_COUNT(cuEventElapsedTime);
    return elapsed(pMilliseconds, hStart, hEnd);
}

FG_EXPORT CUresult cuEventElapsedTime_v2(float *pMilliseconds, CUevent hStart, CUevent hEnd) {
    FG_COUNT(cuEventElapsedTime_v2);
    return elapsed(pMilliseconds, hStart, hEnd);
}

