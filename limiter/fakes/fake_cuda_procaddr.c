/*
 * fake_cuda_procaddr.c: cuGetProcAddress and cuGetProcAddress_v2 of the fake libcuda.so.1.
 *
 * `symbol` is a base name. The answer is the newest exact variant of that base whose
 * introduction version is <= cudaVersion (table below, versions as in the CUDA headers:
 * 1000 * major + 10 * minor). flags: 0 (CU_GET_PROC_ADDRESS_DEFAULT) and 1 (LEGACY_STREAM)
 * give the legacy-stream function, 2 (PER_THREAD_DEFAULT_STREAM) its _ptsz twin where the fake
 * exports one (otherwise the legacy function, as the driver does for functions without a
 * twin); other flags: CUDA_ERROR_INVALID_VALUE.
 *
 * Unknown base (exact names such as "cuMemAlloc_v2" included): CUDA_ERROR_NOT_FOUND, *pfn =
 * NULL, symbolStatus CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND. Known base but every variant newer
 * than cudaVersion: CUDA_ERROR_NOT_FOUND, *pfn = NULL, VERSION_NOT_SUFFICIENT. Found: SUCCESS.
 * The pointers are the fake's own exports (the library is linked -Bsymbolic), so they equal
 * dlsym(handle_of_the_fake, exact_name).
 */
#include "fake_cuda_internal.h"

#include <string.h>

struct proc_entry {
    const char *base;
    const char *exact; /* for diagnostics */
    int version;
    void *fn;
    void *ptsz; /* per-thread twin or NULL */
};

#define E(base, exact, ver) {#base, #exact, ver, (void *)&exact, NULL}
#define EP(base, exact, ver, twin) {#base, #exact, ver, (void *)&exact, (void *)&twin}

static const struct proc_entry g_table[] = {
    E(cuInit, cuInit, 2000),
    E(cuDriverGetVersion, cuDriverGetVersion, 2020),
    E(cuDeviceGet, cuDeviceGet, 2000),
    E(cuDeviceGetCount, cuDeviceGetCount, 2000),
    E(cuDeviceGetName, cuDeviceGetName, 2000),
    E(cuDeviceGetUuid, cuDeviceGetUuid, 9020),
    E(cuDeviceGetUuid, cuDeviceGetUuid_v2, 11040),
    E(cuDeviceGetAttribute, cuDeviceGetAttribute, 2000),
    E(cuDeviceTotalMem, cuDeviceTotalMem, 2000),
    E(cuDeviceTotalMem, cuDeviceTotalMem_v2, 3020),
    E(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain, 7000),
    E(cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease, 7000),
    E(cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2, 11000),
    E(cuDevicePrimaryCtxReset, cuDevicePrimaryCtxReset, 7000),
    E(cuDevicePrimaryCtxReset, cuDevicePrimaryCtxReset_v2, 11000),
    E(cuCtxCreate, cuCtxCreate, 2000),
    E(cuCtxCreate, cuCtxCreate_v2, 3020),
    E(cuCtxCreate, cuCtxCreate_v3, 11040),
    E(cuCtxCreate, cuCtxCreate_v4, 12050),
    E(cuCtxDestroy, cuCtxDestroy_v2, 4000),
    E(cuCtxSetCurrent, cuCtxSetCurrent, 4000),
    E(cuCtxGetCurrent, cuCtxGetCurrent, 4000),
    E(cuCtxGetDevice, cuCtxGetDevice, 2000),
    E(cuCtxSynchronize, cuCtxSynchronize, 2000),
    E(cuCtxPushCurrent, cuCtxPushCurrent_v2, 4000),
    E(cuCtxPopCurrent, cuCtxPopCurrent_v2, 4000),
    E(cuMemAlloc, cuMemAlloc, 2000),
    E(cuMemAlloc, cuMemAlloc_v2, 3020),
    E(cuMemAllocPitch, cuMemAllocPitch, 2000),
    E(cuMemAllocPitch, cuMemAllocPitch_v2, 3020),
    E(cuMemAllocManaged, cuMemAllocManaged, 6000),
    EP(cuMemAllocAsync, cuMemAllocAsync, 11020, cuMemAllocAsync_ptsz),
    EP(cuMemAllocFromPoolAsync, cuMemAllocFromPoolAsync, 11020, cuMemAllocFromPoolAsync_ptsz),
    E(cuMemFree, cuMemFree, 2000),
    E(cuMemFree, cuMemFree_v2, 3020),
    EP(cuMemFreeAsync, cuMemFreeAsync, 11020, cuMemFreeAsync_ptsz),
    E(cuMemGetInfo, cuMemGetInfo, 2000),
    E(cuMemGetInfo, cuMemGetInfo_v2, 3020),
    E(cuArrayCreate, cuArrayCreate, 2000),
    E(cuArrayCreate, cuArrayCreate_v2, 3020),
    E(cuArray3DCreate, cuArray3DCreate, 2000),
    E(cuArray3DCreate, cuArray3DCreate_v2, 3020),
    E(cuArrayDestroy, cuArrayDestroy, 2000),
    E(cuMipmappedArrayCreate, cuMipmappedArrayCreate, 5000),
    E(cuMipmappedArrayDestroy, cuMipmappedArrayDestroy, 5000),
    E(cuMemCreate, cuMemCreate, 10020),
    E(cuMemRelease, cuMemRelease, 10020),
    E(cuMemAddressReserve, cuMemAddressReserve, 10020),
    E(cuMemAddressFree, cuMemAddressFree, 10020),
    E(cuMemMap, cuMemMap, 10020),
    E(cuMemUnmap, cuMemUnmap, 10020),
    E(cuMemSetAccess, cuMemSetAccess, 10020),
    E(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity, 10020),
    E(cuDeviceGetDefaultMemPool, cuDeviceGetDefaultMemPool, 11020),
    E(cuMemPoolCreate, cuMemPoolCreate, 11020),
    E(cuMemPoolDestroy, cuMemPoolDestroy, 11020),
    E(cuMemPoolTrimTo, cuMemPoolTrimTo, 11020),
    E(cuMemAllocHost, cuMemAllocHost_v2, 3020),
    E(cuMemFreeHost, cuMemFreeHost, 2000),
    E(cuMemHostAlloc, cuMemHostAlloc, 2020),
    E(cuMemcpyHtoD, cuMemcpyHtoD_v2, 3020),
    E(cuMemcpyDtoH, cuMemcpyDtoH_v2, 3020),
    E(cuModuleLoad, cuModuleLoad, 2000),
    E(cuModuleLoadData, cuModuleLoadData, 2000),
    E(cuModuleUnload, cuModuleUnload, 2000),
    E(cuModuleGetFunction, cuModuleGetFunction, 2000),
    EP(cuLaunchKernel, cuLaunchKernel, 4000, cuLaunchKernel_ptsz),
    EP(cuLaunchKernelEx, cuLaunchKernelEx, 11060, cuLaunchKernelEx_ptsz),
    EP(cuLaunchCooperativeKernel, cuLaunchCooperativeKernel, 9000,
       cuLaunchCooperativeKernel_ptsz),
    E(cuFuncSetBlockShape, cuFuncSetBlockShape, 2000),
    E(cuLaunch, cuLaunch, 2000),
    E(cuLaunchGrid, cuLaunchGrid, 2000),
    E(cuLaunchGridAsync, cuLaunchGridAsync, 2000),
    E(cuStreamCreate, cuStreamCreate, 2000),
    E(cuStreamCreateWithPriority, cuStreamCreateWithPriority, 5050),
    E(cuStreamDestroy, cuStreamDestroy_v2, 4000),
    EP(cuStreamSynchronize, cuStreamSynchronize, 2000, cuStreamSynchronize_ptsz),
    EP(cuStreamQuery, cuStreamQuery, 2000, cuStreamQuery_ptsz),
    E(cuEventCreate, cuEventCreate, 2000),
    E(cuEventDestroy, cuEventDestroy_v2, 4000),
    EP(cuEventRecord, cuEventRecord, 2000, cuEventRecord_ptsz),
    E(cuEventQuery, cuEventQuery, 2000),
    E(cuEventSynchronize, cuEventSynchronize, 2000),
    E(cuEventElapsedTime, cuEventElapsedTime, 2000),
    E(cuEventElapsedTime, cuEventElapsedTime_v2, 12080),
    EP(cuStreamBeginCapture, cuStreamBeginCapture, 10000, cuStreamBeginCapture_ptsz),
    EP(cuStreamBeginCapture, cuStreamBeginCapture_v2, 10010, cuStreamBeginCapture_v2_ptsz),
    EP(cuStreamEndCapture, cuStreamEndCapture, 10000, cuStreamEndCapture_ptsz),
    EP(cuStreamIsCapturing, cuStreamIsCapturing, 10000, cuStreamIsCapturing_ptsz),
    E(cuGraphCreate, cuGraphCreate, 10000),
    E(cuGraphDestroy, cuGraphDestroy, 10000),
    E(cuGraphAddKernelNode, cuGraphAddKernelNode, 10000),
    E(cuGraphAddKernelNode, cuGraphAddKernelNode_v2, 12000),
    E(cuGraphKernelNodeGetParams, cuGraphKernelNodeGetParams, 10000),
    E(cuGraphKernelNodeGetParams, cuGraphKernelNodeGetParams_v2, 12000),
    E(cuGraphGetNodes, cuGraphGetNodes, 10000),
    E(cuGraphInstantiate, cuGraphInstantiate, 10000),
    E(cuGraphInstantiate, cuGraphInstantiate_v2, 11000),
    E(cuGraphInstantiate, cuGraphInstantiateWithFlags, 12000),
    E(cuGraphInstantiateWithFlags, cuGraphInstantiateWithFlags, 11040),
    EP(cuGraphInstantiateWithParams, cuGraphInstantiateWithParams, 12000,
       cuGraphInstantiateWithParams_ptsz),
    E(cuGraphExecDestroy, cuGraphExecDestroy, 10000),
    EP(cuGraphLaunch, cuGraphLaunch, 10000, cuGraphLaunch_ptsz),
    E(cuGraphExecUpdate, cuGraphExecUpdate, 10020),
    E(cuGraphExecUpdate, cuGraphExecUpdate_v2, 12000),
    E(cuGetProcAddress, cuGetProcAddress, 11030),
    E(cuGetProcAddress, cuGetProcAddress_v2, 12000),
};

static CUresult lookup(const char *symbol, void **pfn, int version, cuuint64_t flags,
                       CUdriverProcAddressQueryResult *status) {
    if (!symbol || !pfn || flags > CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)
        return CUDA_ERROR_INVALID_VALUE;
    const struct proc_entry *best = NULL;
    int known = 0;
    for (size_t i = 0; i < sizeof g_table / sizeof g_table[0]; i++) {
        const struct proc_entry *e = &g_table[i];
        if (strcmp(e->base, symbol) != 0)
            continue;
        known = 1;
        if (e->version <= version && (!best || e->version > best->version))
            best = e;
    }
    *pfn = NULL;
    if (!best) {
        if (status)
            *status = known ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
                            : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = (flags == CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM && best->ptsz) ? best->ptsz
                                                                                 : best->fn;
    if (status)
        *status = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                    cuuint64_t flags) {
    FG_COUNT(cuGetProcAddress);
    return lookup(symbol, pfn, cudaVersion, flags, NULL);
}

FG_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                       cuuint64_t flags,
                                       CUdriverProcAddressQueryResult *symbolStatus) {
    FG_COUNT(cuGetProcAddress_v2);
    return lookup(symbol, pfn, cudaVersion, flags, symbolStatus);
}
