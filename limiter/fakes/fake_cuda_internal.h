/*
 * fake_cuda_internal.h: process-local objects of the fake libcuda.so.1, shared by its source
 * files (fake_cuda.c, fake_cuda_mem.c, fake_cuda_exec.c, fake_cuda_procaddr.c). Nothing here
 * is exported. No exported function of the fake calls another exported function: they all
 * call the static/hidden helpers here, so an interposer (the limiter) never sees the fake's
 * internal calls. The library must be linked with -Wl,-Bsymbolic so that the addresses
 * cuGetProcAddress hands out are the fake's own definitions even when a preloaded library
 * exports the same names.
 */
#ifndef FAKEGPU_CUDA_INTERNAL_H
#define FAKEGPU_CUDA_INTERNAL_H

#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "cuda_api.h"
#include "fakegpu.h"

/* Every exported CUDA function of the fake, in cuda_api.h order. */
#define FG_CUDA_FUNCS(X) \
    X(cuInit) \
    X(cuDriverGetVersion) \
    X(cuDeviceGet) \
    X(cuDeviceGetCount) \
    X(cuDeviceGetName) \
    X(cuDeviceGetUuid) \
    X(cuDeviceGetUuid_v2) \
    X(cuDeviceGetAttribute) \
    X(cuDeviceTotalMem) \
    X(cuDeviceTotalMem_v2) \
    X(cuDevicePrimaryCtxRetain) \
    X(cuDevicePrimaryCtxRelease) \
    X(cuDevicePrimaryCtxRelease_v2) \
    X(cuDevicePrimaryCtxReset) \
    X(cuDevicePrimaryCtxReset_v2) \
    X(cuCtxCreate) \
    X(cuCtxCreate_v2) \
    X(cuCtxCreate_v3) \
    X(cuCtxCreate_v4) \
    X(cuCtxDestroy_v2) \
    X(cuCtxSetCurrent) \
    X(cuCtxGetCurrent) \
    X(cuCtxGetDevice) \
    X(cuCtxSynchronize) \
    X(cuCtxPushCurrent_v2) \
    X(cuCtxPopCurrent_v2) \
    X(cuMemAlloc) \
    X(cuMemAlloc_v2) \
    X(cuMemAllocPitch) \
    X(cuMemAllocPitch_v2) \
    X(cuMemAllocManaged) \
    X(cuMemAllocAsync) \
    X(cuMemAllocAsync_ptsz) \
    X(cuMemAllocFromPoolAsync) \
    X(cuMemAllocFromPoolAsync_ptsz) \
    X(cuMemFree) \
    X(cuMemFree_v2) \
    X(cuMemFreeAsync) \
    X(cuMemFreeAsync_ptsz) \
    X(cuMemGetInfo) \
    X(cuMemGetInfo_v2) \
    X(cuArrayCreate) \
    X(cuArrayCreate_v2) \
    X(cuArray3DCreate) \
    X(cuArray3DCreate_v2) \
    X(cuArrayDestroy) \
    X(cuMipmappedArrayCreate) \
    X(cuMipmappedArrayDestroy) \
    X(cuMemCreate) \
    X(cuMemRelease) \
    X(cuMemAddressReserve) \
    X(cuMemAddressFree) \
    X(cuMemMap) \
    X(cuMemUnmap) \
    X(cuMemSetAccess) \
    X(cuMemGetAllocationGranularity) \
    X(cuDeviceGetDefaultMemPool) \
    X(cuMemPoolCreate) \
    X(cuMemPoolDestroy) \
    X(cuMemPoolTrimTo) \
    X(cuMemAllocHost_v2) \
    X(cuMemFreeHost) \
    X(cuMemHostAlloc) \
    X(cuMemcpyHtoD_v2) \
    X(cuMemcpyDtoH_v2) \
    X(cuModuleLoad) \
    X(cuModuleLoadData) \
    X(cuModuleUnload) \
    X(cuModuleGetFunction) \
    X(cuLaunchKernel) \
    X(cuLaunchKernel_ptsz) \
    X(cuLaunchKernelEx) \
    X(cuLaunchKernelEx_ptsz) \
    X(cuLaunchCooperativeKernel) \
    X(cuLaunchCooperativeKernel_ptsz) \
    X(cuFuncSetBlockShape) \
    X(cuLaunch) \
    X(cuLaunchGrid) \
    X(cuLaunchGridAsync) \
    X(cuStreamCreate) \
    X(cuStreamCreateWithPriority) \
    X(cuStreamDestroy_v2) \
    X(cuStreamSynchronize) \
    X(cuStreamSynchronize_ptsz) \
    X(cuStreamQuery) \
    X(cuStreamQuery_ptsz) \
    X(cuEventCreate) \
    X(cuEventDestroy_v2) \
    X(cuEventRecord) \
    X(cuEventRecord_ptsz) \
    X(cuEventQuery) \
    X(cuEventSynchronize) \
    X(cuEventElapsedTime) \
    X(cuEventElapsedTime_v2) \
    X(cuStreamBeginCapture) \
    X(cuStreamBeginCapture_ptsz) \
    X(cuStreamBeginCapture_v2) \
    X(cuStreamBeginCapture_v2_ptsz) \
    X(cuStreamEndCapture) \
    X(cuStreamEndCapture_ptsz) \
    X(cuStreamIsCapturing) \
    X(cuStreamIsCapturing_ptsz) \
    X(cuGraphCreate) \
    X(cuGraphDestroy) \
    X(cuGraphAddKernelNode) \
    X(cuGraphAddKernelNode_v2) \
    X(cuGraphKernelNodeGetParams) \
    X(cuGraphKernelNodeGetParams_v2) \
    X(cuGraphGetNodes) \
    X(cuGraphInstantiate) \
    X(cuGraphInstantiate_v2) \
    X(cuGraphInstantiateWithFlags) \
    X(cuGraphInstantiateWithParams) \
    X(cuGraphInstantiateWithParams_ptsz) \
    X(cuGraphExecDestroy) \
    X(cuGraphLaunch) \
    X(cuGraphLaunch_ptsz) \
    X(cuGraphExecUpdate) \
    X(cuGraphExecUpdate_v2) \
    X(cuGetProcAddress) \
    X(cuGetProcAddress_v2) \
    /* end */

enum fg_func_index {
#define FG_ENUM(name) FGC_##name,
    FG_CUDA_FUNCS(FG_ENUM)
#undef FG_ENUM
    FGC_COUNT
};

/*
 * The hot thread-locals (context stack, per-thread streams: about 230 bytes) use the
 * initial-exec model, which fits glibc's surplus static TLS even when the fake is dlopen()ed,
 * and avoids a __tls_get_addr call per launch.
 */
#define FG_TLS_IE __attribute__((tls_model("initial-exec")))

/* Per-function call counters: one relaxed atomic increment per call. */
FG_HIDDEN extern _Atomic uint64_t fg_counts[FGC_COUNT];
#define FG_COUNT(name) atomic_fetch_add_explicit(&fg_counts[FGC_##name], 1, memory_order_relaxed)

#define FG_MAGIC_CTX 0x43545831u
#define FG_MAGIC_STREAM 0x53545231u
#define FG_MAGIC_EVENT 0x45564e31u
#define FG_MAGIC_MODULE 0x4d4f4431u
#define FG_MAGIC_FUNC 0x46554e31u
#define FG_MAGIC_GRAPH 0x47524131u
#define FG_MAGIC_NODE 0x4e4f4431u
#define FG_MAGIC_EXEC 0x45584531u
#define FG_MAGIC_POOL 0x504f4f31u

struct fg_ctx {
    uint32_t magic;
    int dev;
    int primary;
    unsigned refs; /* primary contexts: retain count */
};

struct fg_graph;
struct fg_stream {
    uint32_t magic;
    int dev;
    _Atomic uint64_t tail;               /* model time when the stream's last work ends */
    struct fg_graph *_Atomic capture;    /* non-NULL while capturing */
};

struct fg_event {
    uint32_t magic;
    unsigned flags;
    _Atomic uint64_t time_ns; /* 0: never recorded */
};

enum fg_kernel_kind { FG_KERNEL_BUSY, FG_KERNEL_NOOP, FG_KERNEL_BLOCKS };
struct fg_module;
struct fg_func {
    uint32_t magic;
    enum fg_kernel_kind kind;
    uint64_t block_ns;
    unsigned shape[3]; /* cuFuncSetBlockShape */
    struct fg_module *module;
    struct fg_func *next;
    char name[64];
};
struct fg_module {
    uint32_t magic;
    struct fg_func *funcs;
};

/* One kernel as the model runs it. */
struct fg_kernel {
    struct fg_func *func;
    unsigned grid[3];
    unsigned block[3];
    unsigned shared;
    uint64_t busy_ns; /* `busy` kernels: the duration taken from kernelParams[0] */
};

struct fg_node {
    uint32_t magic;
    struct fg_graph *graph;
    struct fg_kernel k;
    uint64_t param_value;  /* what kernelParams[0] pointed at */
    void *param_ptrs[1];   /* kernelParams handed back by cuGraphKernelNodeGetParams */
    CUcontext ctx;
};

struct fg_graph {
    uint32_t magic;
    pthread_mutex_t lock;
    size_t n, cap;
    struct fg_node **nodes;
    struct fg_stream *capturing; /* the stream capturing into this graph */
};

struct fg_exec {
    uint32_t magic;
    size_t n;
    struct fg_kernel *k;
};

struct fg_pool {
    uint32_t magic;
    int dev;
};

/* fake_cuda.c */
FG_HIDDEN extern _Atomic int fg_inited;
FG_HIDDEN int fg_device_count(void);
FG_HIDDEN struct fg_ctx *fg_current_ctx(void);
/* The current context's device, or -1 (then *err is set). */
FG_HIDDEN int fg_current_dev(CUresult *err);

/* fake_cuda_mem.c */
FG_HIDDEN void fg_mem_free_ctx(struct fg_ctx *ctx);
FG_HIDDEN void fg_mem_reset_after_fork(void);

/* fake_cuda_exec.c */
/* Resolve a stream handle; ptsz: NULL means the per-thread stream. NULL on error (*err). */
FG_HIDDEN struct fg_stream *fg_resolve_stream(CUstream h, int ptsz, CUresult *err);
FG_HIDDEN uint64_t fg_dev_tail(int dev);
FG_HIDDEN int fg_is_legacy(const struct fg_stream *s);
/* Validate a kernel's shape; `busy` kernels take their duration from params[0]. */
FG_HIDDEN CUresult fg_prepare(struct fg_kernel *k, void **params);
FG_HIDDEN uint64_t fg_kernel_ns(const struct fg_kernel *k, int dev);
/* Advance the model by one kernel of `dur` ns on the stream. */
FG_HIDDEN void fg_run_kernel(struct fg_stream *s, uint64_t dur);
/* Append a kernel node (NULL when out of memory). */
FG_HIDDEN struct fg_node *fg_graph_add(struct fg_graph *g, const struct fg_kernel *k,
                                       CUcontext ctx);

#endif
