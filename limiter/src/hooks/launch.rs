//! Launch hooks: every launch path (legacy and per-thread streams, `Ex`, cooperative, the
//! legacy `cuLaunch*` API and CUDA graphs) goes through the bucket. Launches recorded into a
//! stream capture are not charged; the graph is charged when it is launched.

use std::ffi::{c_int, c_uint};

use crate::ffi::*;
use crate::launch::{self, plan, run};
use crate::table::cuda::real;

fn blocks(x: c_uint, y: c_uint, z: c_uint) -> u64 {
    u64::from(x.max(1))
        .saturating_mul(u64::from(y.max(1)))
        .saturating_mul(u64::from(z.max(1)))
}

fn threads(x: c_uint, y: c_uint, z: c_uint) -> u32 {
    blocks(x, y, z).min(u64::from(u32::MAX)) as u32
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: CUstream,
    params: *mut Void,
    extra: *mut Void,
) -> CUresult {
    let Some(real) = real::cuLaunchKernel() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(f as usize, blocks(gx, gy, gz), threads(bx, by, bz), stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, false, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: CUstream,
    params: *mut Void,
    extra: *mut Void,
) -> CUresult {
    let Some(real) = real::cuLaunchKernel_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(f as usize, blocks(gx, gy, gz), threads(bx, by, bz), stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, true, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra)
    })
}

fn config_shape(cfg: *const CUlaunchConfig) -> (u64, u32, CUstream) {
    // SAFETY: the application's config pointer, valid for this call; only read.
    match unsafe { cfg.as_ref() } {
        Some(c) => (
            blocks(c.grid_dim_x, c.grid_dim_y, c.grid_dim_z),
            threads(c.block_dim_x, c.block_dim_y, c.block_dim_z),
            c.h_stream,
        ),
        None => (1, 1, std::ptr::null_mut()),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx(
    cfg: *const CUlaunchConfig,
    f: CUfunction,
    params: *mut Void,
    extra: *mut Void,
) -> CUresult {
    let Some(real) = real::cuLaunchKernelEx() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let (g, b, stream) = config_shape(cfg);
    let p = plan(f as usize, g, b, stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, false, || unsafe { real(cfg, f, params, extra) })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    cfg: *const CUlaunchConfig,
    f: CUfunction,
    params: *mut Void,
    extra: *mut Void,
) -> CUresult {
    let Some(real) = real::cuLaunchKernelEx_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let (g, b, stream) = config_shape(cfg);
    let p = plan(f as usize, g, b, stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, true, || unsafe { real(cfg, f, params, extra) })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: CUstream,
    params: *mut Void,
) -> CUresult {
    let Some(real) = real::cuLaunchCooperativeKernel() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(f as usize, blocks(gx, gy, gz), threads(bx, by, bz), stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, false, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, smem, stream, params)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel_ptsz(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: CUstream,
    params: *mut Void,
) -> CUresult {
    let Some(real) = real::cuLaunchCooperativeKernel_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(f as usize, blocks(gx, gy, gz), threads(bx, by, bz), stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, true, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, smem, stream, params)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunch(f: CUfunction) -> CUresult {
    let Some(real) = real::cuLaunch() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(f as usize, 1, 256, std::ptr::null_mut());
    // SAFETY: forwards the caller's argument unchanged to the real function.
    run(p, std::ptr::null_mut(), false, || unsafe { real(f) })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchGrid(f: CUfunction, w: c_int, h: c_int) -> CUresult {
    let Some(real) = real::cuLaunchGrid() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(
        f as usize,
        blocks(w.max(1) as c_uint, h.max(1) as c_uint, 1),
        256,
        std::ptr::null_mut(),
    );
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, std::ptr::null_mut(), false, || unsafe { real(f, w, h) })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchGridAsync(
    f: CUfunction,
    w: c_int,
    h: c_int,
    stream: CUstream,
) -> CUresult {
    let Some(real) = real::cuLaunchGridAsync() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(
        f as usize,
        blocks(w.max(1) as c_uint, h.max(1) as c_uint, 1),
        256,
        stream,
    );
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, false, || unsafe { real(f, w, h, stream) })
}

/// A graph launch is charged like one kernel keyed by the executable graph: its cost is the
/// event-measured duration of its launches (a prior of one wave until the first measurement).
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: CUgraphExec, stream: CUstream) -> CUresult {
    let Some(real) = real::cuGraphLaunch() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(exec as usize, 0, 0, stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, false, || unsafe { real(exec, stream) })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(exec: CUgraphExec, stream: CUstream) -> CUresult {
    let Some(real) = real::cuGraphLaunch_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let p = plan(exec as usize, 0, 0, stream);
    // SAFETY: forwards the caller's arguments unchanged to the real function.
    run(p, stream, true, || unsafe { real(exec, stream) })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture(stream: CUstream) -> CUresult {
    let Some(real) = real::cuStreamBeginCapture() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's argument unchanged.
    let r = unsafe { real(stream) };
    if r == CUDA_SUCCESS {
        launch::capture_began(stream);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(stream: CUstream, mode: c_int) -> CUresult {
    let Some(real) = real::cuStreamBeginCapture_v2() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    // SAFETY: forwards the caller's arguments unchanged.
    let r = unsafe { real(stream, mode) };
    if r == CUDA_SUCCESS {
        launch::capture_began(stream);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(stream: CUstream, graph: *mut CUgraph) -> CUresult {
    let Some(real) = real::cuStreamEndCapture() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    launch::capture_ended(stream);
    // SAFETY: forwards the caller's arguments unchanged.
    unsafe { real(stream, graph) }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture_ptsz(
    stream: CUstream,
    graph: *mut CUgraph,
) -> CUresult {
    let Some(real) = real::cuStreamEndCapture_ptsz() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    launch::capture_ended(stream);
    // SAFETY: forwards the caller's arguments unchanged.
    unsafe { real(stream, graph) }
}
