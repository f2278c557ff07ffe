/*
 * fake_cuda_mem.c: device memory of the fake libcuda.so.1.
 *
 * Every charge goes to the shared state (fakegpu_charge: the device's physical capacity,
 * shared by all processes, and this process's per-pid bytes that NVML reports). Exceeding the
 * capacity returns CUDA_ERROR_OUT_OF_MEMORY. This process remembers what it allocated in a
 * hash table keyed by (address or handle) | kind, so frees of unknown pointers return
 * CUDA_ERROR_INVALID_VALUE, and destroying a context frees what was allocated in it.
 *
 *  - Device addresses: 2 MiB aligned from a shared per-device bump pointer (never reused).
 *    The 32-bit v1 entry points (cuMemAlloc, cuMemAllocPitch) hand out 64 KiB aligned
 *    addresses below 4 GiB from a process-local counter that wraps.
 *  - Pitch: roundup(WidthInBytes, 512); bytes = pitch * Height; ElementSizeBytes 4, 8 or 16.
 *  - Arrays: Width * max(Height,1) * max(Depth,1) * NumChannels * bytes per element (formats
 *    UNSIGNED/SIGNED_INT8/16/32, HALF, FLOAT; others CUDA_ERROR_INVALID_VALUE); mipmapped
 *    arrays add every smaller level (each dimension halved, at least 1).
 *  - VMM: cuMemCreate charges only a CU_MEM_LOCATION_TYPE_DEVICE location, on location.id;
 *    size must be a multiple of the 2 MiB granularity. The bytes are uncharged once the handle
 *    is released and no mapping of it is left. cuMemAddressReserve hands out VA only.
 *  - Pools: handles only; allocations from a pool are charged on the pool's device, frees are
 *    immediate (nothing is retained, so cuMemPoolTrimTo has nothing to trim).
 *  - Host memory (cuMemAllocHost_v2, cuMemHostAlloc): malloc, not charged; cuMemFreeHost: free.
 *  - Copies are no-ops.
 */
#include "fake_cuda_internal.h"

#include <stdlib.h>
#include <string.h>

enum { K_MEM = 1, K_ARRAY, K_MIPMAP, K_VMM, K_RESERVE, K_MAP };

struct ent {
    uint64_t key; /* 0: empty */
    uint64_t size;
    struct fg_ctx *ctx;
    uint64_t aux; /* K_MAP: key of the VMM handle */
    int dev;      /* -1: not charged */
    int maps;     /* K_VMM: live mappings */
    int released; /* K_VMM */
};

static pthread_mutex_t g_mem_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ent *g_tab;
static size_t g_cap, g_n;
static uint64_t g_v1_next = 0x10000000ull;
static uint64_t g_handle_next = 0x10;
static uint64_t g_va_next = 0x600000000000ull;
static struct fg_pool g_default_pool[FAKEGPU_MAX_DEVICES];

void fg_mem_reset_after_fork(void) {
    pthread_mutex_init(&g_mem_lock, NULL);
    free(g_tab);
    g_tab = NULL;
    g_cap = g_n = 0;
}

static size_t slot_of(uint64_t key) {
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & (g_cap - 1);
}

static struct ent *find(uint64_t key) {
    if (!g_cap)
        return NULL;
    for (size_t i = slot_of(key);; i = (i + 1) & (g_cap - 1)) {
        if (g_tab[i].key == key)
            return &g_tab[i];
        if (g_tab[i].key == 0)
            return NULL;
    }
}

static void insert_raw(struct ent *tab, size_t cap, const struct ent *e) {
    size_t i = (size_t)((e->key * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
    while (tab[i].key)
        i = (i + 1) & (cap - 1);
    tab[i] = *e;
}

static int insert(const struct ent *e) {
    if ((g_n + 1) * 2 > g_cap) {
        size_t cap = g_cap ? g_cap * 2 : 1024;
        struct ent *tab = calloc(cap, sizeof *tab);
        if (!tab)
            return -1;
        for (size_t i = 0; i < g_cap; i++)
            if (g_tab[i].key)
                insert_raw(tab, cap, &g_tab[i]);
        free(g_tab);
        g_tab = tab;
        g_cap = cap;
    }
    insert_raw(g_tab, g_cap, e);
    g_n++;
    return 0;
}

static void erase(struct ent *e) {
    size_t i = (size_t)(e - g_tab);
    g_tab[i].key = 0;
    g_n--;
    /* backward-shift the following cluster */
    for (size_t j = (i + 1) & (g_cap - 1); g_tab[j].key; j = (j + 1) & (g_cap - 1)) {
        struct ent moved = g_tab[j];
        g_tab[j].key = 0;
        insert_raw(g_tab, g_cap, &moved);
    }
}

static void uncharge_ent(const struct ent *e) {
    if (e->dev >= 0)
        fakegpu_uncharge(e->dev, e->size);
}

void fg_mem_free_ctx(struct fg_ctx *ctx) {
    pthread_mutex_lock(&g_mem_lock);
    for (size_t i = 0; i < g_cap;) {
        struct ent *e = &g_tab[i];
        int k = (int)(e->key & 7);
        if (e->key && e->ctx == ctx && (k == K_MEM || k == K_ARRAY || k == K_MIPMAP)) {
            uncharge_ent(e);
            erase(e); /* may move a later entry into slot i: look at it again */
            continue;
        }
        i++;
    }
    pthread_mutex_unlock(&g_mem_lock);
}

/* Charge and record one allocation in the current context; *out gets the address/handle. */
static CUresult alloc(int dev, uint64_t bytes, int kind, int v1, unsigned long long *out) {
    struct ent e = {.size = bytes, .ctx = fg_current_ctx(), .dev = dev};
    if (dev >= 0 && fakegpu_charge(dev, bytes) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mem_lock);
    uint64_t v;
    if (kind == K_MEM && v1) {
        uint64_t span = (bytes + 0xffff) & ~0xffffull;
        for (;;) {
            if (g_v1_next + span > 0xf0000000ull)
                g_v1_next = 0x10000000ull;
            v = g_v1_next;
            g_v1_next += span;
            if (!find(v | K_MEM))
                break;
        }
    } else if (kind == K_MEM) {
        v = fakegpu_next_addr(dev, bytes);
    } else if (kind == K_RESERVE) {
        v = g_va_next;
        g_va_next += (bytes + FAKEGPU_GRANULARITY - 1) & ~(FAKEGPU_GRANULARITY - 1);
    } else {
        v = 0xfa0000000000ull + (g_handle_next << 4);
        g_handle_next++;
    }
    e.key = v | (uint64_t)kind;
    int failed = insert(&e);
    pthread_mutex_unlock(&g_mem_lock);
    if (failed) {
        if (dev >= 0)
            fakegpu_uncharge(dev, bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = v;
    return CUDA_SUCCESS;
}

/* Uncharge and forget one allocation of `kind`; CUDA_ERROR_INVALID_VALUE if unknown. */
static CUresult release(uint64_t v, int kind, CUresult unknown) {
    pthread_mutex_lock(&g_mem_lock);
    struct ent *e = find(v | (uint64_t)kind);
    if (!e || (v & 7)) {
        pthread_mutex_unlock(&g_mem_lock);
        return unknown;
    }
    uncharge_ent(e);
    erase(e);
    pthread_mutex_unlock(&g_mem_lock);
    return CUDA_SUCCESS;
}

static CUresult dev_alloc(CUdeviceptr *dptr, uint64_t bytes, int v1) {
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    if (!dptr || bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    return alloc(dev, bytes, K_MEM, v1, dptr);
}

FG_EXPORT CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    FG_COUNT(cuMemAlloc);
    if (!dptr)
        return CUDA_ERROR_INVALID_VALUE;
    CUdeviceptr p = 0;
    CUresult r = dev_alloc(&p, bytesize, 1);
    if (r == CUDA_SUCCESS)
        *dptr = (CUdeviceptr_v1)p;
    return r;
}

FG_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    FG_COUNT(cuMemAlloc_v2);
    return dev_alloc(dptr, bytesize, 0);
}

static CUresult pitch_alloc(CUdeviceptr *dptr, uint64_t *pitch, uint64_t width, uint64_t height,
                            unsigned elem, int v1) {
    if (!dptr || !pitch || width == 0 || height == 0 || (elem != 4 && elem != 8 && elem != 16))
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t p = (width + 511) & ~511ull;
    CUresult r = dev_alloc(dptr, p * height, v1);
    if (r == CUDA_SUCCESS)
        *pitch = p;
    return r;
}

FG_EXPORT CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pPitch,
                                   unsigned int WidthInBytes, unsigned int Height,
                                   unsigned int ElementSizeBytes) {
    FG_COUNT(cuMemAllocPitch);
    if (!dptr || !pPitch)
        return CUDA_ERROR_INVALID_VALUE;
    CUdeviceptr p = 0;
    uint64_t pitch = 0;
    CUresult r = pitch_alloc(&p, &pitch, WidthInBytes, Height, ElementSizeBytes, 1);
    if (r == CUDA_SUCCESS) {
        *dptr = (CUdeviceptr_v1)p;
        *pPitch = (unsigned int)pitch;
    }
    return r;
}

FG_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes,
                                      size_t Height, unsigned int ElementSizeBytes) {
    FG_COUNT(cuMemAllocPitch_v2);
    if (!pPitch)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t pitch = 0;
    CUresult r = pitch_alloc(dptr, &pitch, WidthInBytes, Height, ElementSizeBytes, 0);
    if (r == CUDA_SUCCESS)
        *pPitch = (size_t)pitch;
    return r;
}

FG_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    FG_COUNT(cuMemAllocManaged);
    if (flags != 1 && flags != 2) /* CU_MEM_ATTACH_GLOBAL, CU_MEM_ATTACH_HOST */
        return CUDA_ERROR_INVALID_VALUE;
    return dev_alloc(dptr, bytesize, 0);
}

static CUresult async_alloc(CUdeviceptr *dptr, size_t bytesize, struct fg_pool *pool,
                            CUstream hStream, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(hStream, ptsz, &err);
    if (!s)
        return err;
    if (pool && pool->magic != FG_MAGIC_POOL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dptr || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    return alloc(pool ? pool->dev : s->dev, bytesize, K_MEM, 0, dptr);
}

FG_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream) {
    FG_COUNT(cuMemAllocAsync);
    return async_alloc(dptr, bytesize, NULL, hStream, 0);
}

FG_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream) {
    FG_COUNT(cuMemAllocAsync_ptsz);
    return async_alloc(dptr, bytesize, NULL, hStream, 1);
}

FG_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                           CUstream hStream) {
    FG_COUNT(cuMemAllocFromPoolAsync);
    if (!pool)
        return CUDA_ERROR_INVALID_VALUE;
    return async_alloc(dptr, bytesize, (struct fg_pool *)pool, hStream, 0);
}

FG_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                                CUmemoryPool pool, CUstream hStream) {
    FG_COUNT(cuMemAllocFromPoolAsync_ptsz);
    if (!pool)
        return CUDA_ERROR_INVALID_VALUE;
    return async_alloc(dptr, bytesize, (struct fg_pool *)pool, hStream, 1);
}

static CUresult dev_free(CUdeviceptr p) {
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (p == 0)
        return CUDA_SUCCESS;
    return release(p, K_MEM, CUDA_ERROR_INVALID_VALUE);
}

FG_EXPORT CUresult cuMemFree(CUdeviceptr_v1 dptr) {
    FG_COUNT(cuMemFree);
    return dev_free(dptr);
}

FG_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    FG_COUNT(cuMemFree_v2);
    return dev_free(dptr);
}

static CUresult async_free(CUdeviceptr dptr, CUstream hStream, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    if (!fg_resolve_stream(hStream, ptsz, &err))
        return err;
    return dev_free(dptr);
}

FG_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) {
    FG_COUNT(cuMemFreeAsync);
    return async_free(dptr, hStream, 0);
}

FG_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream) {
    FG_COUNT(cuMemFreeAsync_ptsz);
    return async_free(dptr, hStream, 1);
}

static CUresult mem_info(uint64_t *fr, uint64_t *total) {
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    fakegpu_reclaim_dead();
    struct fakegpu_device *d = &fakegpu_state()->devices[dev];
    uint64_t used = atomic_load(&d->used_bytes);
    *total = d->mem_bytes;
    *fr = used >= d->mem_bytes ? 0 : d->mem_bytes - used;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuMemGetInfo(unsigned int *free_, unsigned int *total) {
    FG_COUNT(cuMemGetInfo);
    if (!free_ || !total)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t f = 0, t = 0;
    CUresult r = mem_info(&f, &t);
    if (r == CUDA_SUCCESS) {
        *free_ = f > UINT32_MAX ? UINT32_MAX : (unsigned int)f;
        *total = t > UINT32_MAX ? UINT32_MAX : (unsigned int)t;
    }
    return r;
}

FG_EXPORT CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) {
    FG_COUNT(cuMemGetInfo_v2);
    if (!free_ || !total)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t f = 0, t = 0;
    CUresult r = mem_info(&f, &t);
    if (r == CUDA_SUCCESS) {
        *free_ = (size_t)f;
        *total = (size_t)t;
    }
    return r;
}

/* ---- arrays ---- */

static uint64_t format_bytes(CUarray_format f) {
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8:
        return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF:
        return 2;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT:
        return 4;
    default:
        return 0;
    }
}

static uint64_t max1(uint64_t x) { return x ? x : 1; }

/* Bytes of an array with `levels` mipmap levels; 0 for an invalid description. */
static uint64_t array_bytes(uint64_t w, uint64_t h, uint64_t d, CUarray_format f, unsigned ch,
                            unsigned levels) {
    uint64_t bpe = format_bytes(f);
    if (!bpe || w == 0 || (ch != 1 && ch != 2 && ch != 4) || levels == 0)
        return 0;
    uint64_t total = 0;
    for (unsigned l = 0; l < levels && l < 64; l++) {
        uint64_t lw = max1(w >> l), lh = h ? max1(h >> l) : 1, ld = d ? max1(d >> l) : 1;
        total += lw * lh * ld * ch * bpe;
    }
    return total;
}

static CUresult array_create(CUarray *handle_out, uint64_t bytes) {
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    if (!handle_out || bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    unsigned long long h = 0;
    CUresult r = alloc(dev, bytes, K_ARRAY, 0, &h);
    if (r == CUDA_SUCCESS)
        *handle_out = (CUarray)(uintptr_t)h;
    return r;
}

FG_EXPORT CUresult cuArrayCreate(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR_v1 *a) {
    FG_COUNT(cuArrayCreate);
    if (!a)
        return CUDA_ERROR_INVALID_VALUE;
    return array_create(pHandle, array_bytes(a->Width, a->Height, 0, a->Format, a->NumChannels, 1));
}

FG_EXPORT CUresult cuArrayCreate_v2(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR *a) {
    FG_COUNT(cuArrayCreate_v2);
    if (!a)
        return CUDA_ERROR_INVALID_VALUE;
    return array_create(pHandle, array_bytes(a->Width, a->Height, 0, a->Format, a->NumChannels, 1));
}

FG_EXPORT CUresult cuArray3DCreate(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR_v1 *a) {
    FG_COUNT(cuArray3DCreate);
    if (!a)
        return CUDA_ERROR_INVALID_VALUE;
    return array_create(
        pHandle, array_bytes(a->Width, a->Height, a->Depth, a->Format, a->NumChannels, 1));
}

FG_EXPORT CUresult cuArray3DCreate_v2(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *a) {
    FG_COUNT(cuArray3DCreate_v2);
    if (!a)
        return CUDA_ERROR_INVALID_VALUE;
    return array_create(
        pHandle, array_bytes(a->Width, a->Height, a->Depth, a->Format, a->NumChannels, 1));
}

FG_EXPORT CUresult cuArrayDestroy(CUarray hArray) {
    FG_COUNT(cuArrayDestroy);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    return release((uint64_t)(uintptr_t)hArray, K_ARRAY, CUDA_ERROR_INVALID_HANDLE);
}

FG_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *pHandle,
                                          const CUDA_ARRAY3D_DESCRIPTOR *a,
                                          unsigned int numMipmapLevels) {
    FG_COUNT(cuMipmappedArrayCreate);
    CUresult err = CUDA_SUCCESS;
    int dev = fg_current_dev(&err);
    if (dev < 0)
        return err;
    if (!a || !pHandle)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t bytes =
        array_bytes(a->Width, a->Height, a->Depth, a->Format, a->NumChannels, numMipmapLevels);
    if (bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    unsigned long long h = 0;
    CUresult r = alloc(dev, bytes, K_MIPMAP, 0, &h);
    if (r == CUDA_SUCCESS)
        *pHandle = (CUmipmappedArray)(uintptr_t)h;
    return r;
}

FG_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray hMipmappedArray) {
    FG_COUNT(cuMipmappedArrayDestroy);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    return release((uint64_t)(uintptr_t)hMipmappedArray, K_MIPMAP, CUDA_ERROR_INVALID_HANDLE);
}

/* ---- virtual memory management ---- */

FG_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                               const CUmemAllocationProp *prop, unsigned long long flags) {
    FG_COUNT(cuMemCreate);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!handle || !prop || flags != 0 || size == 0 || size % FAKEGPU_GRANULARITY)
        return CUDA_ERROR_INVALID_VALUE;
    int dev = -1;
    if (prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE) {
        if (prop->location.id < 0 || prop->location.id >= fg_device_count())
            return CUDA_ERROR_INVALID_DEVICE;
        dev = prop->location.id;
    }
    return alloc(dev, size, K_VMM, 0, handle);
}

/* Drop a VMM handle once it is released and unmapped (g_mem_lock held). */
static void vmm_maybe_drop(struct ent *h) {
    if (h->released && h->maps == 0) {
        uncharge_ent(h);
        erase(h);
    }
}

FG_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    FG_COUNT(cuMemRelease);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g_mem_lock);
    struct ent *h = (handle & 7) ? NULL : find(handle | K_VMM);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (h && !h->released) {
        h->released = 1;
        vmm_maybe_drop(h);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}

FG_EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment,
                                       CUdeviceptr addr, unsigned long long flags) {
    FG_COUNT(cuMemAddressReserve);
    (void)alignment;
    (void)addr;
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!ptr || size == 0 || size % FAKEGPU_GRANULARITY || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    return alloc(-1, size, K_RESERVE, 0, ptr);
}

FG_EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    FG_COUNT(cuMemAddressFree);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g_mem_lock);
    struct ent *e = (ptr & 7) ? NULL : find(ptr | K_RESERVE);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (e && e->size == size) {
        erase(e);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}

FG_EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                            CUmemGenericAllocationHandle handle, unsigned long long flags) {
    FG_COUNT(cuMemMap);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (ptr == 0 || (ptr & 7) || size == 0 || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mem_lock);
    CUresult r = CUDA_SUCCESS;
    struct ent *h = (handle & 7) ? NULL : find(handle | K_VMM);
    if (!h || h->released)
        r = CUDA_ERROR_INVALID_HANDLE;
    else if (offset + size > h->size || find(ptr | K_MAP))
        r = CUDA_ERROR_INVALID_VALUE;
    else {
        h->maps++;
        struct ent m = {.key = ptr | K_MAP, .size = size, .aux = handle | K_VMM, .dev = -1};
        if (insert(&m) != 0) {
            h = find(handle | K_VMM);
            h->maps--;
            r = CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}

FG_EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    FG_COUNT(cuMemUnmap);
    (void)size;
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g_mem_lock);
    struct ent *m = (ptr & 7) ? NULL : find(ptr | K_MAP);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (m) {
        uint64_t hk = m->aux;
        erase(m);
        struct ent *h = find(hk);
        if (h) {
            h->maps--;
            vmm_maybe_drop(h);
        }
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}

FG_EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc,
                                  size_t count) {
    FG_COUNT(cuMemSetAccess);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (ptr == 0 || size == 0 || !desc || count == 0)
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuMemGetAllocationGranularity(size_t *granularity,
                                                 const CUmemAllocationProp *prop,
                                                 CUmemAllocationGranularity_flags option) {
    FG_COUNT(cuMemGetAllocationGranularity);
    (void)option;
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!granularity || !prop)
        return CUDA_ERROR_INVALID_VALUE;
    *granularity = FAKEGPU_GRANULARITY;
    return CUDA_SUCCESS;
}

/* ---- pools ---- */

FG_EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool_out, CUdevice dev) {
    FG_COUNT(cuDeviceGetDefaultMemPool);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool_out)
        return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= fg_device_count())
        return CUDA_ERROR_INVALID_DEVICE;
    g_default_pool[dev].magic = FG_MAGIC_POOL;
    g_default_pool[dev].dev = dev;
    *pool_out = (CUmemoryPool)&g_default_pool[dev];
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *poolProps) {
    FG_COUNT(cuMemPoolCreate);
    if (!atomic_load(&fg_inited))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool || !poolProps || poolProps->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    if (poolProps->location.id < 0 || poolProps->location.id >= fg_device_count())
        return CUDA_ERROR_INVALID_DEVICE;
    struct fg_pool *p = calloc(1, sizeof *p);
    if (!p)
        return CUDA_ERROR_OUT_OF_MEMORY;
    p->magic = FG_MAGIC_POOL;
    p->dev = poolProps->location.id;
    *pool = (CUmemoryPool)p;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuMemPoolDestroy(CUmemoryPool pool) {
    FG_COUNT(cuMemPoolDestroy);
    struct fg_pool *p = (struct fg_pool *)pool;
    if (!p || p->magic != FG_MAGIC_POOL)
        return CUDA_ERROR_INVALID_VALUE;
    if (p >= g_default_pool && p < g_default_pool + FAKEGPU_MAX_DEVICES)
        return CUDA_ERROR_INVALID_VALUE; /* the default pool cannot be destroyed */
    p->magic = 0;
    free(p);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep) {
    FG_COUNT(cuMemPoolTrimTo);
    (void)minBytesToKeep;
    struct fg_pool *p = (struct fg_pool *)pool;
    if (!p || p->magic != FG_MAGIC_POOL)
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

/* ---- host memory and copies ---- */

FG_EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t bytesize) {
    FG_COUNT(cuMemAllocHost_v2);
    if (!pp || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    *pp = malloc(bytesize);
    return *pp ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

FG_EXPORT CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags) {
    FG_COUNT(cuMemHostAlloc);
    (void)Flags;
    if (!pp || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    *pp = malloc(bytesize);
    return *pp ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

FG_EXPORT CUresult cuMemFreeHost(void *p) {
    FG_COUNT(cuMemFreeHost);
    free(p);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount) {
    FG_COUNT(cuMemcpyHtoD_v2);
    (void)dstDevice;
    (void)srcHost;
    (void)ByteCount;
    return atomic_load(&fg_inited) ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

FG_EXPORT CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
    FG_COUNT(cuMemcpyDtoH_v2);
    (void)dstHost;
    (void)srcDevice;
    (void)ByteCount;
    return atomic_load(&fg_inited) ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}
