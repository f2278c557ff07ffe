//! `libvcuda.so`: the in-container GPU limiter.
//!
//! Loaded into every process of a shared-GPU container through a read-only
//! `/etc/ld.so.preload` that gpu-manager mounts. It does nothing at load (no constructors of
//! ours, no threads, no open files); the first CUDA or NVML symbol resolved through it (a call
//! of a hooked function, `dlsym` of a driver name, `cuGetProcAddress`, `nvmlInit`) initialises
//! it. Then:
//!
//! * **memory**: every allocation path is charged against the container's cap on that card
//!   before the driver sees it (`CUDA_ERROR_OUT_OF_MEMORY` over the cap), shared by all
//!   processes of the container through one region in its state dir; `cuMemGetInfo`,
//!   `cuDeviceTotalMem` and NVML report `min(cap, physical)` and the container's use;
//! * **compute**: every launch is charged its estimated GPU time against a token bucket refilled
//!   at the container's `vcuda-core` share, corrected by an NVML feedback loop.
//!
//! The decisions are pure code in `gm-limiter-core`; this crate is the FFI around them. See
//! `limiter/README.md`.

mod ffi;
mod hooks;
mod launch;
mod log;
mod mem;
mod real;
mod sampler;
mod shm;
mod spin;
mod state;
mod table;
