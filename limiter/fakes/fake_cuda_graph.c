/*
 * fake_cuda_graph.c: graphs and stream capture of the fake libcuda.so.1 (the model is
 * described in fake_cuda_exec.c).
 */
#include "fake_cuda_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- graphs ---- */

static struct fg_graph *graph_new(void) {
    struct fg_graph *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->magic = FG_MAGIC_GRAPH;
    pthread_mutex_init(&g->lock, NULL);
    return g;
}

static struct fg_graph *graph_of(CUgraph h) {
    struct fg_graph *g = (struct fg_graph *)h;
    return g && g->magic == FG_MAGIC_GRAPH ? g : NULL;
}

FG_EXPORT CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags) {
    FG_COUNT(cuGraphCreate);
    if (!phGraph || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_graph *g = graph_new();
    if (!g)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *phGraph = (CUgraph)g;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGraphDestroy(CUgraph hGraph) {
    FG_COUNT(cuGraphDestroy);
    struct fg_graph *g = graph_of(hGraph);
    if (!g || g->capturing)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < g->n; i++) {
        g->nodes[i]->magic = 0;
        free(g->nodes[i]);
    }
    free(g->nodes);
    pthread_mutex_destroy(&g->lock);
    g->magic = 0;
    free(g);
    return CUDA_SUCCESS;
}

static CUresult add_kernel_node(CUgraphNode *ph, CUgraph hg, const CUgraphNode *deps, size_t nd,
                                CUfunction func, const unsigned grid[3], const unsigned block[3],
                                unsigned shared, void **params, CUcontext ctx) {
    struct fg_graph *g = graph_of(hg);
    struct fg_func *f = (struct fg_func *)func;
    if (!ph || !g || (nd && !deps))
        return CUDA_ERROR_INVALID_VALUE;
    if (!f || f->magic != FG_MAGIC_FUNC)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_kernel k = {f, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, shared,
                          0};
    CUresult r = fg_prepare(&k, params);
    if (r != CUDA_SUCCESS)
        return r;
    struct fg_node *n = fg_graph_add(g, &k, ctx);
    if (!n)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *ph = (CUgraphNode)n;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGraphAddKernelNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                                        const CUgraphNode *dependencies, size_t numDependencies,
                                        const CUDA_KERNEL_NODE_PARAMS_v1 *p) {
    FG_COUNT(cuGraphAddKernelNode);
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    unsigned grid[3] = {p->gridDimX, p->gridDimY, p->gridDimZ};
    unsigned block[3] = {p->blockDimX, p->blockDimY, p->blockDimZ};
    return add_kernel_node(phGraphNode, hGraph, dependencies, numDependencies, p->func, grid,
                           block, p->sharedMemBytes, p->kernelParams, NULL);
}

FG_EXPORT CUresult cuGraphAddKernelNode_v2(CUgraphNode *phGraphNode, CUgraph hGraph,
                                           const CUgraphNode *dependencies,
                                           size_t numDependencies,
                                           const CUDA_KERNEL_NODE_PARAMS_v2 *p) {
    FG_COUNT(cuGraphAddKernelNode_v2);
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    if (!p->func && p->kern)
        return CUDA_ERROR_NOT_SUPPORTED;
    unsigned grid[3] = {p->gridDimX, p->gridDimY, p->gridDimZ};
    unsigned block[3] = {p->blockDimX, p->blockDimY, p->blockDimZ};
    return add_kernel_node(phGraphNode, hGraph, dependencies, numDependencies, p->func, grid,
                           block, p->sharedMemBytes, p->kernelParams, p->ctx);
}

static struct fg_node *node_of(CUgraphNode h) {
    struct fg_node *n = (struct fg_node *)h;
    return n && n->magic == FG_MAGIC_NODE ? n : NULL;
}

#define FILL_NODE_PARAMS(p, n)                                                                  \
    do {                                                                                        \
        (p)->func = (CUfunction)(n)->k.func;                                                    \
        (p)->gridDimX = (n)->k.grid[0];                                                         \
        (p)->gridDimY = (n)->k.grid[1];                                                         \
        (p)->gridDimZ = (n)->k.grid[2];                                                         \
        (p)->blockDimX = (n)->k.block[0];                                                       \
        (p)->blockDimY = (n)->k.block[1];                                                       \
        (p)->blockDimZ = (n)->k.block[2];                                                       \
        (p)->sharedMemBytes = (n)->k.shared;                                                    \
        (p)->kernelParams = (n)->k.func->kind == FG_KERNEL_BUSY ? (n)->param_ptrs : NULL;       \
        (p)->extra = NULL;                                                                      \
    } while (0)

FG_EXPORT CUresult cuGraphKernelNodeGetParams(CUgraphNode hNode,
                                              CUDA_KERNEL_NODE_PARAMS_v1 *nodeParams) {
    FG_COUNT(cuGraphKernelNodeGetParams);
    struct fg_node *n = node_of(hNode);
    if (!n || !nodeParams)
        return CUDA_ERROR_INVALID_VALUE;
    FILL_NODE_PARAMS(nodeParams, n);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGraphKernelNodeGetParams_v2(CUgraphNode hNode,
                                                 CUDA_KERNEL_NODE_PARAMS_v2 *nodeParams) {
    FG_COUNT(cuGraphKernelNodeGetParams_v2);
    struct fg_node *n = node_of(hNode);
    if (!n || !nodeParams)
        return CUDA_ERROR_INVALID_VALUE;
    FILL_NODE_PARAMS(nodeParams, n);
    nodeParams->kern = NULL;
    nodeParams->ctx = n->ctx;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGraphGetNodes(CUgraph hGraph, CUgraphNode *nodes, size_t *numNodes) {
    FG_COUNT(cuGraphGetNodes);
    struct fg_graph *g = graph_of(hGraph);
    if (!g || !numNodes)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g->lock);
    if (nodes)
        for (size_t i = 0; i < g->n && i < *numNodes; i++)
            nodes[i] = (CUgraphNode)g->nodes[i];
    *numNodes = g->n;
    pthread_mutex_unlock(&g->lock);
    return CUDA_SUCCESS;
}

/* Copy a graph's kernels (for instantiate and update); -1 when out of memory. */
static int copy_kernels(struct fg_graph *g, struct fg_kernel **out, size_t *n) {
    pthread_mutex_lock(&g->lock);
    struct fg_kernel *k = calloc(g->n ? g->n : 1, sizeof *k);
    if (k)
        for (size_t i = 0; i < g->n; i++)
            k[i] = g->nodes[i]->k;
    *n = g->n;
    pthread_mutex_unlock(&g->lock);
    *out = k;
    return k ? 0 : -1;
}

static CUresult instantiate(CUgraphExec *ph, CUgraph hg) {
    struct fg_graph *g = graph_of(hg);
    if (!ph || !g)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_exec *x = calloc(1, sizeof *x);
    if (!x || copy_kernels(g, &x->k, &x->n) != 0) {
        free(x);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    x->magic = FG_MAGIC_EXEC;
    *ph = (CUgraphExec)x;
    return CUDA_SUCCESS;
}

static CUresult instantiate_log(CUgraphExec *ph, CUgraph hg, CUgraphNode *err, char *log,
                                size_t size) {
    if (err)
        *err = NULL;
    if (log && size)
        log[0] = 0;
    return instantiate(ph, hg);
}

FG_EXPORT CUresult cuGraphInstantiate(CUgraphExec *phGraphExec, CUgraph hGraph,
                                      CUgraphNode *phErrorNode, char *logBuffer,
                                      size_t bufferSize) {
    FG_COUNT(cuGraphInstantiate);
    return instantiate_log(phGraphExec, hGraph, phErrorNode, logBuffer, bufferSize);
}

FG_EXPORT CUresult cuGraphInstantiate_v2(CUgraphExec *phGraphExec, CUgraph hGraph,
                                         CUgraphNode *phErrorNode, char *logBuffer,
                                         size_t bufferSize) {
    FG_COUNT(cuGraphInstantiate_v2);
    return instantiate_log(phGraphExec, hGraph, phErrorNode, logBuffer, bufferSize);
}

FG_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph,
                                               unsigned long long flags) {
    FG_COUNT(cuGraphInstantiateWithFlags);
    (void)flags;
    return instantiate(phGraphExec, hGraph);
}

static CUresult instantiate_params(CUgraphExec *ph, CUgraph hg, CUDA_GRAPH_INSTANTIATE_PARAMS *p) {
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    p->hErrNode_out = NULL;
    CUresult r = instantiate(ph, hg);
    p->result_out = r == CUDA_SUCCESS ? 0 : 1;
    return r;
}

FG_EXPORT CUresult cuGraphInstantiateWithParams(CUgraphExec *phGraphExec, CUgraph hGraph,
                                                CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams) {
    FG_COUNT(cuGraphInstantiateWithParams);
    return instantiate_params(phGraphExec, hGraph, instantiateParams);
}

FG_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(
    CUgraphExec *phGraphExec, CUgraph hGraph, CUDA_GRAPH_INSTANTIATE_PARAMS *instantiateParams) {
    FG_COUNT(cuGraphInstantiateWithParams_ptsz);
    return instantiate_params(phGraphExec, hGraph, instantiateParams);
}

static struct fg_exec *exec_of(CUgraphExec h) {
    struct fg_exec *x = (struct fg_exec *)h;
    return x && x->magic == FG_MAGIC_EXEC ? x : NULL;
}

FG_EXPORT CUresult cuGraphExecDestroy(CUgraphExec hGraphExec) {
    FG_COUNT(cuGraphExecDestroy);
    struct fg_exec *x = exec_of(hGraphExec);
    if (!x)
        return CUDA_ERROR_INVALID_VALUE;
    x->magic = 0;
    free(x->k);
    free(x);
    return CUDA_SUCCESS;
}

static CUresult graph_launch(CUgraphExec h, CUstream hs, int ptsz) {
    struct fg_exec *x = exec_of(h);
    if (!x)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(hs, ptsz, &err);
    if (!s)
        return err;
    struct fg_graph *g = atomic_load(&s->capture);
    for (size_t i = 0; i < x->n; i++) {
        if (g) {
            if (!fg_graph_add(g, &x->k[i], (CUcontext)fg_current_ctx()))
                return CUDA_ERROR_OUT_OF_MEMORY;
        } else {
            fg_run_kernel(s, fg_kernel_ns(&x->k[i], s->dev));
        }
    }
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) {
    FG_COUNT(cuGraphLaunch);
    return graph_launch(hGraphExec, hStream, 0);
}

FG_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream) {
    FG_COUNT(cuGraphLaunch_ptsz);
    return graph_launch(hGraphExec, hStream, 1);
}

/* Same node count: take the graph's kernels; otherwise the topology changed. */
static CUresult exec_update(CUgraphExec hx, CUgraph hg, CUgraphExecUpdateResult *result) {
    struct fg_exec *x = exec_of(hx);
    struct fg_graph *g = graph_of(hg);
    *result = CU_GRAPH_EXEC_UPDATE_ERROR;
    if (!x || !g)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_kernel *k = NULL;
    size_t n = 0;
    if (copy_kernels(g, &k, &n) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    if (n != x->n) {
        free(k);
        *result = CU_GRAPH_EXEC_UPDATE_ERROR_TOPOLOGY_CHANGED;
        return CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE;
    }
    free(x->k);
    x->k = k;
    *result = CU_GRAPH_EXEC_UPDATE_SUCCESS;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuGraphExecUpdate(CUgraphExec hGraphExec, CUgraph hGraph,
                                     CUgraphNode *hErrorNode_out,
                                     CUgraphExecUpdateResult *updateResult_out) {
    FG_COUNT(cuGraphExecUpdate);
    if (!hErrorNode_out || !updateResult_out)
        return CUDA_ERROR_INVALID_VALUE;
    *hErrorNode_out = NULL;
    return exec_update(hGraphExec, hGraph, updateResult_out);
}

FG_EXPORT CUresult cuGraphExecUpdate_v2(CUgraphExec hGraphExec, CUgraph hGraph,
                                        CUgraphExecUpdateResultInfo *resultInfo) {
    FG_COUNT(cuGraphExecUpdate_v2);
    if (!resultInfo)
        return CUDA_ERROR_INVALID_VALUE;
    resultInfo->errorNode = NULL;
    resultInfo->errorFromNode = NULL;
    return exec_update(hGraphExec, hGraph, &resultInfo->result);
}

/* ---- stream capture ---- */

static CUresult begin_capture(CUstream h, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(h, ptsz, &err);
    if (!s)
        return err;
    if (fg_is_legacy(s))
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (atomic_load(&s->capture))
        return CUDA_ERROR_ILLEGAL_STATE;
    struct fg_graph *g = graph_new();
    if (!g)
        return CUDA_ERROR_OUT_OF_MEMORY;
    g->capturing = s;
    atomic_store_explicit(&s->capture, g, memory_order_release);
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuStreamBeginCapture(CUstream hStream) {
    FG_COUNT(cuStreamBeginCapture);
    return begin_capture(hStream, 0);
}

FG_EXPORT CUresult cuStreamBeginCapture_ptsz(CUstream hStream) {
    FG_COUNT(cuStreamBeginCapture_ptsz);
    return begin_capture(hStream, 1);
}

FG_EXPORT CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode) {
    FG_COUNT(cuStreamBeginCapture_v2);
    (void)mode;
    return begin_capture(hStream, 0);
}

FG_EXPORT CUresult cuStreamBeginCapture_v2_ptsz(CUstream hStream, CUstreamCaptureMode mode) {
    FG_COUNT(cuStreamBeginCapture_v2_ptsz);
    (void)mode;
    return begin_capture(hStream, 1);
}

static CUresult end_capture(CUstream h, CUgraph *ph, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(h, ptsz, &err);
    if (!s)
        return err;
    if (!ph)
        return CUDA_ERROR_INVALID_VALUE;
    struct fg_graph *g = atomic_exchange(&s->capture, NULL);
    if (!g)
        return CUDA_ERROR_ILLEGAL_STATE;
    g->capturing = NULL;
    *ph = (CUgraph)g;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuStreamEndCapture(CUstream hStream, CUgraph *phGraph) {
    FG_COUNT(cuStreamEndCapture);
    return end_capture(hStream, phGraph, 0);
}

FG_EXPORT CUresult cuStreamEndCapture_ptsz(CUstream hStream, CUgraph *phGraph) {
    FG_COUNT(cuStreamEndCapture_ptsz);
    return end_capture(hStream, phGraph, 1);
}

static CUresult is_capturing(CUstream h, CUstreamCaptureStatus *st, int ptsz) {
    CUresult err = CUDA_SUCCESS;
    struct fg_stream *s = fg_resolve_stream(h, ptsz, &err);
    if (!s)
        return err;
    if (!st)
        return CUDA_ERROR_INVALID_VALUE;
    *st = atomic_load(&s->capture) ? CU_STREAM_CAPTURE_STATUS_ACTIVE
                                   : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

FG_EXPORT CUresult cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus *captureStatus) {
    FG_COUNT(cuStreamIsCapturing);
    return is_capturing(hStream, captureStatus, 0);
}

FG_EXPORT CUresult cuStreamIsCapturing_ptsz(CUstream hStream,
                                            CUstreamCaptureStatus *captureStatus) {
    FG_COUNT(cuStreamIsCapturing_ptsz);
    return is_capturing(hStream, captureStatus, 1);
}
