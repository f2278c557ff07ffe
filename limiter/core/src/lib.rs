//! The limiter's pure decisions, with no I/O and no dependencies, shared by `libvcuda.so`
//! (the reader) and gpu-manager (the writer of the config).
//!
//! * [`config`]: the fixed binary layout of `vcuda.cfg`, written by gpu-manager beside
//!   `limits.json` and read by the limiter at its first CUDA or NVML call.
//! * [`region`]: the layout of the per-container shared region (buckets, process slots).
//! * [`controller`]: the compute-share controller (token bucket in GPU time + NVML feedback).
//! * [`cost`]: bytes charged for arrays and pitched allocations.
//! * [`hostpids`]: the host pids of a container's GPU processes, published by gpu-manager.
//! * [`symbols`]: exact driver symbol names and their families, for `cuGetProcAddress` routing.

#![forbid(unsafe_code)]

pub mod config;
pub mod controller;
pub mod cost;
pub mod hostpids;
pub mod region;
pub mod symbols;
