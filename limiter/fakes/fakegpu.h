/*
 * fakegpu.h: the simulated GPUs shared by the fake libcuda.so.1 and libnvidia-ml.so.1.
 *
 * The state lives in a file mapped MAP_SHARED, so every process of a test (and both fakes)
 * sees the same devices. The file is created, sized and initialised exactly once, under
 * flock(LOCK_EX), by the first process that maps it; a file with another magic, version or
 * size is reinitialised. After initialisation the profile fields are read-only; everything
 * written concurrently is a lock-free 64-bit C11 atomic (readers of the file, such as the Rust
 * test support, read it with plain 8-byte loads).
 *
 * Environment (read once per process; the profile only by the process that initialises):
 *   FAKEGPU_STATE          path of the state file; unset: an anonymous MAP_SHARED mapping
 *                          (one device per process, shared only with fork()ed children)
 *   FAKEGPU_DEVICES        number of devices, 1..4 (default 1)
 *   FAKEGPU_SMS            SMs per device (default 132)
 *   FAKEGPU_THREADS_PER_SM max resident threads per SM (default 2048)
 *   FAKEGPU_MEM_BYTES      physical memory per device (default 150323855360 = 140 GiB)
 *   FAKEGPU_CTX_OVERHEAD   bytes charged to a process on a device while it has a context there
 *                          (default 0)
 *   FAKEGPU_DRIVER_VERSION cuDriverGetVersion (default 12080)
 *
 * Layout (all little-endian u64 unless noted; offsets pinned by _Static_assert below and by
 * the Rust reader in limiter/tests/support/mod.rs):
 *   fakegpu_state   header, then devices[4], procs[256], ring_write, ring[65536]
 *   device d        UUID bytes 46 41 4b 45 d0 0d 40 00 80 00 00 00 00 00 00 (0x10 + d), i.e.
 *                   NVML "GPU-46414b45-d00d-4000-8000-0000000000{10+d}"; name "Fake H200".
 *   procs[i]        pid 0 = free, FAKEGPU_PID_RECLAIMING = being reclaimed; used[d] bytes and
 *                   contexts[d] live contexts of that pid on device d. A pid is live while
 *                   kill(pid, 0) does not fail with ESRCH; dead slots are reclaimed (their bytes
 *                   returned to the device) by the next allocation that would not fit, by
 *                   cuMemGetInfo and by NVML's memory and process queries.
 *   ring            kernel executions in model time. Writer: i = ring_write++ (fetch_add), then
 *                   entry[i % FAKEGPU_RING_SIZE]: seq = 0, pid_dev, start_ns, end_ns, seq = i + 1
 *                   (release). A reader takes entry j only if seq == j + 1 before and after
 *                   reading the fields (wrap or a racing writer otherwise). pid_dev =
 *                   pid | device << 32. Times are CLOCK_MONOTONIC nanoseconds.
 *
 * Time-slicing model: one kernel at a time per device. A launch at `now` on a stream starts at
 * max(now, device_free_at, stream_tail), ends `duration` later; device_free_at and the stream
 * tail become the end (CAS loop). Zero-length kernels do not touch device_free_at or the ring.
 */
#ifndef FAKEGPU_H
#define FAKEGPU_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define FAKEGPU_MAGIC 0x31555047454b4146ULL /* "FAKEGPU1" */
#define FAKEGPU_VERSION 1u
#define FAKEGPU_MAX_DEVICES 4
#define FAKEGPU_MAX_PROCS 256
#define FAKEGPU_RING_SIZE 65536u
#define FAKEGPU_PID_RECLAIMING UINT64_MAX
#define FAKEGPU_GRANULARITY (2ull << 20)

/* Offsets (bytes) for readers in other languages. */
#define FAKEGPU_OFF_DEVICES 64
#define FAKEGPU_DEVICE_SIZE 192
#define FAKEGPU_OFF_PROCS (FAKEGPU_OFF_DEVICES + FAKEGPU_MAX_DEVICES * FAKEGPU_DEVICE_SIZE)
#define FAKEGPU_PROC_SIZE 72
#define FAKEGPU_OFF_RING_WRITE (FAKEGPU_OFF_PROCS + FAKEGPU_MAX_PROCS * FAKEGPU_PROC_SIZE)
#define FAKEGPU_OFF_RING (FAKEGPU_OFF_RING_WRITE + 64)
#define FAKEGPU_RING_ENTRY_SIZE 32
#define FAKEGPU_STATE_SIZE (FAKEGPU_OFF_RING + FAKEGPU_RING_SIZE * FAKEGPU_RING_ENTRY_SIZE)

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free to be shared");

struct fakegpu_device {          /* offset in device */
    uint64_t sms;                /* 0 */
    uint64_t threads_per_sm;     /* 8 */
    uint64_t mem_bytes;          /* 16 */
    uint64_t ctx_overhead;       /* 24 */
    uint8_t uuid[16];            /* 32 */
    char name[64];               /* 48 */
    _Atomic uint64_t used_bytes; /* 112: charged bytes of all processes not yet reclaimed */
    _Atomic uint64_t next_addr;  /* 120: bump pointer for device addresses */
    _Atomic uint64_t device_free_at; /* 128: model time when the last queued kernel ends */
    _Atomic uint64_t compute_mode;   /* 136: nvmlComputeMode_t */
    uint64_t reserved[6];            /* 144..192 */
};

struct fakegpu_proc {
    _Atomic uint64_t pid;                           /* 0 */
    _Atomic uint64_t used[FAKEGPU_MAX_DEVICES];     /* 8 */
    _Atomic uint64_t contexts[FAKEGPU_MAX_DEVICES]; /* 40 */
};

struct fakegpu_ring_entry {
    _Atomic uint64_t seq;      /* 0: index + 1 once complete */
    _Atomic uint64_t pid_dev;  /* 8 */
    _Atomic uint64_t start_ns; /* 16 */
    _Atomic uint64_t end_ns;   /* 24 */
};

struct fakegpu_state {
    uint64_t magic;             /* 0 */
    uint64_t version;           /* 8 */
    uint64_t size;              /* 16 */
    uint64_t device_count;      /* 24 */
    uint64_t driver_version;    /* 32 */
    int64_t realtime_offset_ns; /* 40: CLOCK_REALTIME - CLOCK_MONOTONIC at initialisation */
    uint64_t reserved[2];       /* 48 */
    struct fakegpu_device devices[FAKEGPU_MAX_DEVICES];
    struct fakegpu_proc procs[FAKEGPU_MAX_PROCS];
    _Atomic uint64_t ring_write;
    uint64_t ring_write_pad[7];
    struct fakegpu_ring_entry ring[FAKEGPU_RING_SIZE];
};

_Static_assert(offsetof(struct fakegpu_state, devices) == FAKEGPU_OFF_DEVICES, "layout");
_Static_assert(sizeof(struct fakegpu_device) == FAKEGPU_DEVICE_SIZE, "layout");
_Static_assert(offsetof(struct fakegpu_device, used_bytes) == 112, "layout");
_Static_assert(offsetof(struct fakegpu_device, device_free_at) == 128, "layout");
_Static_assert(offsetof(struct fakegpu_state, procs) == FAKEGPU_OFF_PROCS, "layout");
_Static_assert(sizeof(struct fakegpu_proc) == FAKEGPU_PROC_SIZE, "layout");
_Static_assert(offsetof(struct fakegpu_state, ring_write) == FAKEGPU_OFF_RING_WRITE, "layout");
_Static_assert(offsetof(struct fakegpu_state, ring) == FAKEGPU_OFF_RING, "layout");
_Static_assert(sizeof(struct fakegpu_ring_entry) == FAKEGPU_RING_ENTRY_SIZE, "layout");
_Static_assert(sizeof(struct fakegpu_state) == FAKEGPU_STATE_SIZE, "layout");

/* ---- helpers shared by both fakes (fakegpu_state.c; hidden, not exported) ---- */
#define FG_HIDDEN __attribute__((visibility("hidden")))
#define FG_EXPORT __attribute__((visibility("default")))

/* The mapped state (initialised on first call; aborts with a message if it cannot be mapped). */
FG_HIDDEN struct fakegpu_state *fakegpu_state(void);
/* This process's pid, cached (refreshed in fork children). */
FG_HIDDEN uint64_t fakegpu_pid(void);
FG_HIDDEN uint64_t fakegpu_now_ns(void); /* CLOCK_MONOTONIC */
FG_HIDDEN void fakegpu_sleep_until(uint64_t mono_ns);
/* Unsigned integer from the environment, or `def` when unset or unparsable. */
FG_HIDDEN uint64_t fakegpu_env_u64(const char *name, uint64_t def);
/* This process's slot (claimed on first use; NULL when all slots hold live processes). */
FG_HIDDEN struct fakegpu_proc *fakegpu_my_proc(void);
/* Reserve bytes on a device for this process: 0, or -1 when physical memory is exhausted. */
FG_HIDDEN int fakegpu_charge(int dev, uint64_t bytes);
FG_HIDDEN void fakegpu_uncharge(int dev, uint64_t bytes);
/* Return the bytes of dead processes' slots to their devices. */
FG_HIDDEN void fakegpu_reclaim_dead(void);
FG_HIDDEN int fakegpu_pid_alive(uint64_t pid);
/* A fresh device address range of `bytes` (2 MiB aligned, never handed out twice). */
FG_HIDDEN uint64_t fakegpu_next_addr(int dev, uint64_t bytes);
/* Record a kernel execution in the ring. */
FG_HIDDEN void fakegpu_ring_append(uint64_t pid, int dev, uint64_t start_ns, uint64_t end_ns);
/* The UUID bytes of device d. */
FG_HIDDEN void fakegpu_uuid(int dev, uint8_t out[16]);

/*
 * Busy time per pid on `dev` overlapping [from_ns, to_ns), from the ring (newest entries
 * first, at most FAKEGPU_RING_SIZE). Fills up to `cap` (pid, busy_ns) pairs, returns how many.
 */
struct fakegpu_busy {
    uint64_t pid;
    uint64_t busy_ns;
};
FG_HIDDEN size_t fakegpu_busy_by_pid(int dev, uint64_t from_ns, uint64_t to_ns,
                                     struct fakegpu_busy *out, size_t cap);

#endif
