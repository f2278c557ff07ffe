/*
 * A fake libnvidia-ml.so for gm-backend's tests.
 *
 * It exports the NVML functions the nvml backend calls (through nvml-wrapper 0.13 /
 * nvml-wrapper-sys 0.10, which resolve symbols lazily by name) and answers them from a small
 * line-based spec file. The Rust tests generate that file from the same YAML node description
 * the simulated backend reads, so both backends can be compared.
 *
 * Spec file: $FAKE_NVML_SPEC if set, else `fake_nvml.spec` in the directory of this library
 * (so each test can copy the library and its spec into its own directory: every copy is a
 * separate instance with its own state).
 *
 * Spec lines (whitespace-separated; `#` starts a comment line). Card numbers are positions
 * in the order of the `card` lines, which is also the NVML enumeration order.
 *
 *   driver <version>
 *   numa_api unsupported                        nvmlDeviceGetNumaNodeId -> NOT_SUPPORTED
 *   card <busId> <uuid> <minor> <numa|-1> <memoryMiB> <name...>
 *   topo <i> <j> <level>                        NVML topology level (10,20,30,40,50)
 *   nvlink <i> <remoteBusId> <count> <pciDeviceIdHex>
 *   proc <i> <pid> <usedMiB> <smPercent> <startMs> <endMs|->
 *   util <i> <atMs> <smPercent> <memoryUsedMiB>
 *   event <i> <atMs> xid <code> | dbe | lost | recovered
 *   events_supported <i> <maskDecimal>          default: single|double bit ECC + XID
 *
 * Time is counted from the first nvmlInit_v2. Between a `lost` event and the next `recovered`
 * event a card answers NVML_ERROR_GPU_IS_LOST to everything except nvmlDeviceGetUUID and
 * nvmlDeviceGetPciInfo_v3 (its identity stays readable), and each event set it is registered
 * in returns NVML_ERROR_GPU_IS_LOST once from nvmlEventSetWait_v2. Without a `util` sample a
 * card's utilisation is the sum of its running processes (memory capped at the card's memory,
 * SM at 100 %), like the simulated backend.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

/* ---- NVML ABI subset ---------------------------------------------------------------------- */

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

enum {
    EV_SINGLE_BIT_ECC = 1,
    EV_DOUBLE_BIT_ECC = 2,
    EV_XID = 8,
};

#define MAX_CARDS 64
#define MAX_LINKS 18
#define MAX_PROCS 1024
#define MAX_UTILS 4096
#define MAX_EVENTS 1024
#define MIB 1048576ULL

typedef struct card card_t;
typedef card_t *nvmlDevice_t;
typedef struct eventset eventset_t;
typedef eventset_t *nvmlEventSet_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

/* ---- State -------------------------------------------------------------------------------- */

struct card {
    char bus_id[32];
    char uuid[96];
    char name[96];
    unsigned int minor;
    long long numa;
    unsigned long long memory_mib;
    int nlinks;
    char link_remote[MAX_LINKS][32];
    unsigned int link_devid[MAX_LINKS];
    unsigned long long supported_events;
    int topo[MAX_CARDS];
};

typedef struct {
    int card;
    unsigned int pid;
    unsigned long long used_mib;
    unsigned int sm;
    long long start_ms;
    long long end_ms; /* -1: never */
} proc_t;

typedef struct {
    int card;
    long long at_ms;
    unsigned int sm;
    unsigned long long mem_mib;
} util_t;

enum { K_XID, K_DBE, K_LOST, K_RECOVERED };

typedef struct {
    int card;
    long long at_ms;
    int kind;
    unsigned long long code;
    int order;
} event_t;

struct eventset {
    unsigned long long mask[MAX_CARDS];
    long long registered_ms[MAX_CARDS];
    unsigned char done[MAX_EVENTS];
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int init_count;
static int loaded;
static struct timespec start;
static char driver_version[80] = "550.54.15";
static int numa_unsupported;
static card_t cards[MAX_CARDS];
static int ncards;
static proc_t procs[MAX_PROCS];
static int nprocs;
static util_t utils[MAX_UTILS];
static int nutils;
static event_t events[MAX_EVENTS];
static int nevents;

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)(t.tv_sec - start.tv_sec) * 1000 + (t.tv_nsec - start.tv_nsec) / 1000000;
}

static unsigned long long unix_us(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + (unsigned long long)tv.tv_usec;
}

static void sleep_ms(long long ms) {
    struct timespec t;
    if (ms < 1) ms = 1;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000000;
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
}

static int card_index(nvmlDevice_t d) {
    if (d < cards || d >= cards + ncards) return -1;
    return (int)(d - cards);
}

/* Is card c lost at time t? The latest lost/recovered event at or before t decides. */
static int lost_at(int c, long long t) {
    int lost = 0;
    for (int k = 0; k < nevents; k++) {
        if (events[k].card != c || events[k].at_ms > t) continue;
        if (events[k].kind == K_LOST) lost = 1;
        if (events[k].kind == K_RECOVERED) lost = 0;
    }
    return lost;
}

static int active(const proc_t *p, long long t) {
    return p->start_ms <= t && (p->end_ms < 0 || t < p->end_ms);
}

/* Utilisation of card c at time t. */
static void usage_at(int c, long long t, unsigned int *sm, unsigned long long *mem_mib) {
    const util_t *best = NULL;
    for (int k = 0; k < nutils; k++) {
        if (utils[k].card == c && utils[k].at_ms <= t && (!best || utils[k].at_ms >= best->at_ms))
            best = &utils[k];
    }
    if (best) {
        *sm = best->sm;
        *mem_mib = best->mem_mib;
        return;
    }
    unsigned int s = 0;
    unsigned long long m = 0;
    for (int k = 0; k < nprocs; k++) {
        if (procs[k].card == c && active(&procs[k], t)) {
            s += procs[k].sm;
            m += procs[k].used_mib;
        }
    }
    *sm = s > 100 ? 100 : s;
    *mem_mib = m > cards[c].memory_mib ? cards[c].memory_mib : m;
}

/* ---- Spec loading ------------------------------------------------------------------------- */

static int fail_line(const char *path, int line, const char *what) {
    fprintf(stderr, "fake NVML: %s:%d: %s\n", path, line, what);
    return -1;
}

static int parse_card_ref(const char *tok, int *out) {
    char *end;
    long v = strtol(tok, &end, 10);
    if (*end || v < 0 || v >= ncards) return -1;
    *out = (int)v;
    return 0;
}

static int cmp_events(const void *a, const void *b) {
    const event_t *x = a, *y = b;
    if (x->at_ms != y->at_ms) return x->at_ms < y->at_ms ? -1 : 1;
    return x->order - y->order;
}

static int spec_path(char *out, size_t len) {
    const char *env = getenv("FAKE_NVML_SPEC");
    if (env && *env) {
        snprintf(out, len, "%s", env);
        return 0;
    }
    Dl_info info;
    if (!dladdr((void *)&spec_path, &info) || !info.dli_fname) return -1;
    const char *slash = strrchr(info.dli_fname, '/');
    if (!slash) {
        snprintf(out, len, "fake_nvml.spec");
    } else {
        snprintf(out, len, "%.*s/fake_nvml.spec", (int)(slash - info.dli_fname), info.dli_fname);
    }
    return 0;
}

static int load_spec(void) {
    char path[4096];
    if (spec_path(path, sizeof path) != 0) {
        fprintf(stderr, "fake NVML: cannot tell where the library lives to find its spec\n");
        return -1;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "fake NVML: cannot open spec %s: %s\n", path, strerror(errno));
        return -1;
    }
    char buf[1024];
    int line = 0;
    while (fgets(buf, sizeof buf, f)) {
        line++;
        buf[strcspn(buf, "\r\n")] = 0;
        char *tok[16];
        int n = 0;
        char *save = NULL;
        char *rest_of_name = NULL;
        for (char *t = strtok_r(buf, " \t", &save); t && n < 16; t = strtok_r(NULL, " \t", &save)) {
            tok[n++] = t;
            if (n == 7 && strcmp(tok[0], "card") == 0) {
                /* The name is the rest of the line, spaces included. */
                rest_of_name = t;
                if (save && *save) rest_of_name[strlen(rest_of_name)] = ' ';
                break;
            }
        }
        if (n == 0 || tok[0][0] == '#') continue;
        int c = 0;
        if (strcmp(tok[0], "driver") == 0 && n == 2) {
            snprintf(driver_version, sizeof driver_version, "%s", tok[1]);
        } else if (strcmp(tok[0], "numa_api") == 0 && n == 2) {
            numa_unsupported = strcmp(tok[1], "unsupported") == 0;
        } else if (strcmp(tok[0], "card") == 0 && n == 7) {
            if (ncards >= MAX_CARDS) { fclose(f); return fail_line(path, line, "too many cards"); }
            card_t *k = &cards[ncards];
            memset(k, 0, sizeof *k);
            snprintf(k->bus_id, sizeof k->bus_id, "%s", tok[1]);
            snprintf(k->uuid, sizeof k->uuid, "%s", tok[2]);
            k->minor = (unsigned int)strtoul(tok[3], NULL, 10);
            k->numa = strtoll(tok[4], NULL, 10);
            k->memory_mib = strtoull(tok[5], NULL, 10);
            snprintf(k->name, sizeof k->name, "%s", rest_of_name);
            k->supported_events = EV_SINGLE_BIT_ECC | EV_DOUBLE_BIT_ECC | EV_XID;
            for (int j = 0; j < MAX_CARDS; j++) k->topo[j] = 50;
            ncards++;
        } else if (strcmp(tok[0], "topo") == 0 && n == 4) {
            int j;
            if (parse_card_ref(tok[1], &c) || parse_card_ref(tok[2], &j)) {
                fclose(f);
                return fail_line(path, line, "bad card number");
            }
            cards[c].topo[j] = cards[j].topo[c] = atoi(tok[3]);
        } else if (strcmp(tok[0], "nvlink") == 0 && n == 5) {
            if (parse_card_ref(tok[1], &c)) { fclose(f); return fail_line(path, line, "bad card number"); }
            int count = atoi(tok[3]);
            unsigned int devid = (unsigned int)strtoul(tok[4], NULL, 16);
            for (int k = 0; k < count; k++) {
                if (cards[c].nlinks >= MAX_LINKS) { fclose(f); return fail_line(path, line, "more than 18 NVLinks"); }
                snprintf(cards[c].link_remote[cards[c].nlinks], 32, "%s", tok[2]);
                cards[c].link_devid[cards[c].nlinks] = devid;
                cards[c].nlinks++;
            }
        } else if (strcmp(tok[0], "proc") == 0 && n == 7) {
            if (parse_card_ref(tok[1], &c) || nprocs >= MAX_PROCS) { fclose(f); return fail_line(path, line, "bad proc line"); }
            proc_t *p = &procs[nprocs++];
            p->card = c;
            p->pid = (unsigned int)strtoul(tok[2], NULL, 10);
            p->used_mib = strtoull(tok[3], NULL, 10);
            p->sm = (unsigned int)strtoul(tok[4], NULL, 10);
            p->start_ms = strtoll(tok[5], NULL, 10);
            p->end_ms = strcmp(tok[6], "-") == 0 ? -1 : strtoll(tok[6], NULL, 10);
        } else if (strcmp(tok[0], "util") == 0 && n == 5) {
            if (parse_card_ref(tok[1], &c) || nutils >= MAX_UTILS) { fclose(f); return fail_line(path, line, "bad util line"); }
            util_t *u = &utils[nutils++];
            u->card = c;
            u->at_ms = strtoll(tok[2], NULL, 10);
            u->sm = (unsigned int)strtoul(tok[3], NULL, 10);
            u->mem_mib = strtoull(tok[4], NULL, 10);
        } else if (strcmp(tok[0], "event") == 0 && n >= 4) {
            if (parse_card_ref(tok[1], &c) || nevents >= MAX_EVENTS) { fclose(f); return fail_line(path, line, "bad event line"); }
            event_t *e = &events[nevents];
            e->card = c;
            e->at_ms = strtoll(tok[2], NULL, 10);
            e->order = nevents;
            e->code = 0;
            if (strcmp(tok[3], "xid") == 0 && n == 5) {
                e->kind = K_XID;
                e->code = strtoull(tok[4], NULL, 10);
            } else if (strcmp(tok[3], "dbe") == 0) {
                e->kind = K_DBE;
            } else if (strcmp(tok[3], "lost") == 0) {
                e->kind = K_LOST;
            } else if (strcmp(tok[3], "recovered") == 0) {
                e->kind = K_RECOVERED;
            } else {
                fclose(f);
                return fail_line(path, line, "unknown event kind");
            }
            nevents++;
        } else if (strcmp(tok[0], "events_supported") == 0 && n == 3) {
            if (parse_card_ref(tok[1], &c)) { fclose(f); return fail_line(path, line, "bad card number"); }
            cards[c].supported_events = strtoull(tok[2], NULL, 10);
        } else {
            fclose(f);
            return fail_line(path, line, "unknown or malformed line");
        }
    }
    fclose(f);
    qsort(events, (size_t)nevents, sizeof events[0], cmp_events);
    return 0;
}

/* ---- Helpers for the API ------------------------------------------------------------------ */

#define REQUIRE_INIT()                                       \
    do {                                                     \
        if (init_count <= 0) return NVML_ERROR_UNINITIALIZED; \
    } while (0)

/* Resolve a handle; fails for unknown handles and (unless allow_lost) lost cards. */
static nvmlReturn_t resolve(nvmlDevice_t d, int allow_lost, int *c) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    *c = card_index(d);
    if (*c < 0) return NVML_ERROR_INVALID_ARGUMENT;
    if (!allow_lost && lost_at(*c, now_ms())) return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

static void fill_pci(nvmlPciInfo_t *p, const char *bus_id, unsigned int devid) {
    memset(p, 0, sizeof *p);
    unsigned int domain = 0, bus = 0, dev = 0, fn = 0;
    sscanf(bus_id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn);
    snprintf(p->busId, sizeof p->busId, "%s", bus_id);
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%04x:%02x:%02x.%x", domain & 0xffff, bus, dev, fn);
    p->domain = domain;
    p->bus = bus;
    p->device = dev;
    p->pciDeviceId = devid;
    p->pciSubSystemId = 0x16c110de;
}

static nvmlReturn_t copy_str(char *dst, unsigned int len, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ---- API ---------------------------------------------------------------------------------- */

nvmlReturn_t nvmlInit_v2(void) {
    pthread_mutex_lock(&mu);
    if (!loaded) {
        if (load_spec() != 0) {
            ncards = nprocs = nutils = nevents = 0;
            pthread_mutex_unlock(&mu);
            return NVML_ERROR_UNKNOWN;
        }
        loaded = 1;
        clock_gettime(CLOCK_MONOTONIC, &start);
    }
    init_count++;
    pthread_mutex_unlock(&mu);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&mu);
    if (init_count <= 0) {
        pthread_mutex_unlock(&mu);
        return NVML_ERROR_UNINITIALIZED;
    }
    init_count--;
    pthread_mutex_unlock(&mu);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    REQUIRE_INIT();
    return copy_str(version, length, driver_version);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    REQUIRE_INIT();
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = (unsigned int)ncards;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    REQUIRE_INIT();
    if (!device || index >= (unsigned int)ncards) return NVML_ERROR_INVALID_ARGUMENT;
    if (lost_at((int)index, now_ms())) return NVML_ERROR_GPU_IS_LOST;
    *device = &cards[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    REQUIRE_INIT();
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    for (int c = 0; c < ncards; c++) {
        if (strcmp(cards[c].uuid, uuid) == 0) {
            if (lost_at(c, now_ms())) return NVML_ERROR_GPU_IS_LOST;
            *device = &cards[c];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    int c;
    nvmlReturn_t r = resolve(device, 1, &c);
    if (r) return r;
    return copy_str(uuid, length, cards[c].uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    return copy_str(name, length, cards[c].name);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != ((unsigned int)sizeof(nvmlMemory_v2_t) | (2u << 24)))
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned int sm;
    unsigned long long used;
    usage_at(c, now_ms(), &sm, &used);
    memory->total = cards[c].memory_mib * MIB;
    memory->reserved = 0;
    memory->used = used * MIB;
    memory->free = memory->total - memory->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    int c;
    nvmlReturn_t r = resolve(device, 1, &c);
    if (r) return r;
    if (!pci) return NVML_ERROR_INVALID_ARGUMENT;
    fill_pci(pci, cards[c].bus_id, 0x233010de);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!minor) return NVML_ERROR_INVALID_ARGUMENT;
    *minor = cards[c].minor;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!node) return NVML_ERROR_INVALID_ARGUMENT;
    if (numa_unsupported) return NVML_ERROR_NOT_SUPPORTED;
    *node = (unsigned int)cards[c].numa; /* -1 becomes 0xFFFFFFFF, as NVML reports "none" */
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t a, nvmlDevice_t b, int *level) {
    int x, y;
    nvmlReturn_t r = resolve(a, 0, &x);
    if (r) return r;
    r = resolve(b, 0, &y);
    if (r) return r;
    if (!level || x == y) return NVML_ERROR_INVALID_ARGUMENT;
    *level = cards[x].topo[y];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, int *is_active) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!is_active || link >= MAX_LINKS) return NVML_ERROR_INVALID_ARGUMENT;
    if (cards[c].nlinks == 0) return NVML_ERROR_NOT_SUPPORTED;
    *is_active = (int)link < cards[c].nlinks ? 1 : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link,
                                                 nvmlPciInfo_t *pci) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!pci || link >= MAX_LINKS) return NVML_ERROR_INVALID_ARGUMENT;
    if ((int)link >= cards[c].nlinks) return NVML_ERROR_NOT_SUPPORTED;
    fill_pci(pci, cards[c].link_remote[link], cards[c].link_devid[link]);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *u) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!u) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int sm;
    unsigned long long used;
    usage_at(c, now_ms(), &sm, &used);
    u->gpu = sm;
    u->memory = sm / 2;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    long long t = now_ms();
    unsigned int n = 0;
    for (int k = 0; k < nprocs; k++)
        if (procs[k].card == c && active(&procs[k], t)) n++;
    if (!infos) {
        *count = n;
        return n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (*count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int i = 0;
    for (int k = 0; k < nprocs; k++) {
        if (procs[k].card != c || !active(&procs[k], t)) continue;
        infos[i].pid = procs[k].pid;
        infos[i].usedGpuMemory = procs[k].used_mib * MIB;
        infos[i].gpuInstanceId = 0xFFFFFFFFu;
        infos[i].computeInstanceId = 0xFFFFFFFFu;
        i++;
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                             nvmlProcessUtilizationSample_t *samples,
                                             unsigned int *count,
                                             unsigned long long last_seen) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    long long t = now_ms();
    unsigned long long stamp = unix_us();
    unsigned int n = 0;
    for (int k = 0; k < nprocs; k++)
        if (procs[k].card == c && active(&procs[k], t) && stamp > last_seen) n++;
    if (n == 0) {
        *count = 0;
        return NVML_ERROR_NOT_FOUND;
    }
    if (!samples || *count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int i = 0;
    for (int k = 0; k < nprocs; k++) {
        if (procs[k].card != c || !active(&procs[k], t)) continue;
        samples[i].pid = procs[k].pid;
        samples[i].timeStamp = stamp;
        samples[i].smUtil = procs[k].sm;
        samples[i].memUtil = 0;
        samples[i].encUtil = 0;
        samples[i].decUtil = 0;
        i++;
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!types) return NVML_ERROR_INVALID_ARGUMENT;
    if (cards[c].supported_events == 0) return NVML_ERROR_NOT_SUPPORTED;
    *types = cards[c].supported_events;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    REQUIRE_INIT();
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof(eventset_t));
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    REQUIRE_INIT();
    free(set);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                      nvmlEventSet_t set) {
    int c;
    nvmlReturn_t r = resolve(device, 0, &c);
    if (r) return r;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    if (types & ~cards[c].supported_events) return NVML_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&mu);
    set->mask[c] |= types;
    set->registered_ms[c] = now_ms();
    pthread_mutex_unlock(&mu);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                 unsigned int timeout_ms) {
    REQUIRE_INIT();
    if (!set || !data) return NVML_ERROR_INVALID_ARGUMENT;
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        pthread_mutex_lock(&mu);
        long long t = now_ms();
        long long next_due = -1;
        for (int k = 0; k < nevents; k++) {
            event_t *e = &events[k];
            int c = e->card;
            if (set->done[k] || set->mask[c] == 0 || e->at_ms < set->registered_ms[c]) continue;
            if (e->at_ms > t) {
                if (next_due < 0 || e->at_ms < next_due) next_due = e->at_ms;
                continue;
            }
            set->done[k] = 1;
            if (e->kind == K_LOST) {
                pthread_mutex_unlock(&mu);
                return NVML_ERROR_GPU_IS_LOST;
            }
            unsigned long long type = e->kind == K_XID ? EV_XID : e->kind == K_DBE ? EV_DOUBLE_BIT_ECC : 0;
            if (!(type & set->mask[c])) continue;
            data->device = &cards[c];
            data->eventType = type;
            data->eventData = e->kind == K_XID ? e->code : 0;
            data->gpuInstanceId = 0xFFFFFFFFu;
            data->computeInstanceId = 0xFFFFFFFFu;
            pthread_mutex_unlock(&mu);
            return NVML_SUCCESS;
        }
        pthread_mutex_unlock(&mu);
        if (t >= deadline) return NVML_ERROR_TIMEOUT;
        long long wake = deadline;
        if (next_due >= 0 && next_due < wake) wake = next_due;
        sleep_ms(wake - t);
    }
}
