//! The driver API through `dlopen("libcuda.so.1")`, with safe wrappers for what the checks use.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::{Duration, Instant};

use crate::dl::Lib;
use crate::error::{cuda_error_name, Error, Result};
use crate::ffi::*;
use crate::ptx;

/// Every driver entry point gpucheck resolves, by exact versioned name. `None` when absent;
/// the check that needs it reports `Error::Missing`.
#[derive(Debug)]
pub struct Cuda {
    pub lib: Lib,
    init: Option<FnInit>,
    driver_get_version: Option<FnDriverGetVersion>,
    device_get: Option<FnDeviceGet>,
    device_get_attribute: Option<FnDeviceGetAttribute>,
    device_get_name: Option<FnDeviceGetName>,
    primary_ctx_retain: Option<FnPrimaryCtxRetain>,
    ctx_set_current: Option<FnCtxSetCurrent>,
    ctx_synchronize: Option<FnCtxSynchronize>,
    module_load_data: Option<FnModuleLoadData>,
    module_load_data_ex: Option<FnModuleLoadDataEx>,
    module_get_function: Option<FnModuleGetFunction>,
    launch_kernel: Option<FnLaunchKernel>,
    launch_kernel_ptsz: Option<FnLaunchKernel>,
    stream_create: Option<FnStreamCreate>,
    stream_synchronize: Option<FnStreamSynchronize>,
    event_create: Option<FnEventCreate>,
    event_record: Option<FnEventRecord>,
    event_synchronize: Option<FnEventSynchronize>,
    event_elapsed_time: Option<FnEventElapsedTime>,
    mem_alloc: Option<FnMemAlloc>,
    mem_free: Option<FnMemFree>,
    mem_get_info: Option<FnMemGetInfo>,
    device_total_mem: Option<FnDeviceTotalMem>,
    mem_alloc_async: Option<FnMemAllocAsync>,
    mem_free_async: Option<FnMemFreeAsync>,
    device_get_default_mem_pool: Option<FnDeviceGetDefaultMemPool>,
    mem_pool_trim_to: Option<FnMemPoolTrimTo>,
    mem_create: Option<FnMemCreate>,
    mem_release: Option<FnMemRelease>,
    mem_address_reserve: Option<FnMemAddressReserve>,
    mem_map: Option<FnMemMap>,
    mem_unmap: Option<FnMemUnmap>,
    mem_address_free: Option<FnMemAddressFree>,
    mem_set_access: Option<FnMemSetAccess>,
    mem_get_allocation_granularity: Option<FnMemGetAllocationGranularity>,
    get_proc_address_v2: Option<FnGetProcAddressV2>,
    get_error_name: Option<FnGetErrorName>,
}

/// Which launch entry point to use: `cuLaunchKernel` or its per-thread-default-stream twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchApi {
    Legacy,
    Ptsz,
}

impl LaunchApi {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "legacy" | "default" => Ok(LaunchApi::Legacy),
            "ptsz" | "per-thread" => Ok(LaunchApi::Ptsz),
            _ => Err(Error::Other(format!(
                "--api must be legacy or ptsz, not {s:?}"
            ))),
        }
    }
    pub fn symbol(self) -> &'static str {
        match self {
            LaunchApi::Legacy => "cuLaunchKernel",
            LaunchApi::Ptsz => "cuLaunchKernel_ptsz",
        }
    }
}

/// Path of the driver: `--cuda-lib`, else `GPUCHECK_CUDA_LIB`, else `libcuda.so.1`.
pub fn default_path() -> String {
    std::env::var("GPUCHECK_CUDA_LIB")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "libcuda.so.1".to_string())
}

impl Cuda {
    pub fn load(path: &str) -> Result<Cuda> {
        let lib = Lib::open(path)?;
        // SAFETY: each field's function-pointer type is declared from the C prototype of the
        // symbol named next to it (cuda.h), so the casts inside `Lib::sym` are sound.
        let cuda = unsafe {
            Cuda {
                init: lib.sym(c"cuInit"),
                driver_get_version: lib.sym(c"cuDriverGetVersion"),
                device_get: lib.sym(c"cuDeviceGet"),
                device_get_attribute: lib.sym(c"cuDeviceGetAttribute"),
                device_get_name: lib.sym(c"cuDeviceGetName"),
                primary_ctx_retain: lib.sym(c"cuDevicePrimaryCtxRetain"),
                ctx_set_current: lib.sym(c"cuCtxSetCurrent"),
                ctx_synchronize: lib.sym(c"cuCtxSynchronize"),
                module_load_data: lib.sym(c"cuModuleLoadData"),
                module_load_data_ex: lib.sym(c"cuModuleLoadDataEx"),
                module_get_function: lib.sym(c"cuModuleGetFunction"),
                launch_kernel: lib.sym(c"cuLaunchKernel"),
                launch_kernel_ptsz: lib.sym(c"cuLaunchKernel_ptsz"),
                stream_create: lib.sym(c"cuStreamCreate"),
                stream_synchronize: lib.sym(c"cuStreamSynchronize"),
                event_create: lib.sym(c"cuEventCreate"),
                event_record: lib.sym(c"cuEventRecord"),
                event_synchronize: lib.sym(c"cuEventSynchronize"),
                event_elapsed_time: lib.sym(c"cuEventElapsedTime"),
                mem_alloc: lib.sym(c"cuMemAlloc_v2"),
                mem_free: lib.sym(c"cuMemFree_v2"),
                mem_get_info: lib.sym(c"cuMemGetInfo_v2"),
                device_total_mem: lib.sym(c"cuDeviceTotalMem_v2"),
                mem_alloc_async: lib.sym(c"cuMemAllocAsync"),
                mem_free_async: lib.sym(c"cuMemFreeAsync"),
                device_get_default_mem_pool: lib.sym(c"cuDeviceGetDefaultMemPool"),
                mem_pool_trim_to: lib.sym(c"cuMemPoolTrimTo"),
                mem_create: lib.sym(c"cuMemCreate"),
                mem_release: lib.sym(c"cuMemRelease"),
                mem_address_reserve: lib.sym(c"cuMemAddressReserve"),
                mem_map: lib.sym(c"cuMemMap"),
                mem_unmap: lib.sym(c"cuMemUnmap"),
                mem_address_free: lib.sym(c"cuMemAddressFree"),
                mem_set_access: lib.sym(c"cuMemSetAccess"),
                mem_get_allocation_granularity: lib.sym(c"cuMemGetAllocationGranularity"),
                get_proc_address_v2: lib.sym(c"cuGetProcAddress_v2"),
                get_error_name: lib.sym(c"cuGetErrorName"),
                lib,
            }
        };
        Ok(cuda)
    }

    fn need<F: Copy>(&self, f: Option<F>, sym: &'static str) -> Result<F> {
        f.ok_or_else(|| Error::Missing {
            lib: self.lib.path.clone(),
            sym,
        })
    }

    /// The driver's name for `code`, falling back to our table.
    pub fn error_name(&self, code: CUresult) -> String {
        if let Some(f) = self.get_error_name {
            let mut p: *const c_char = std::ptr::null();
            // SAFETY: cuGetErrorName(CUresult, const char**) writes a pointer to a static string.
            let r = unsafe { f(code, &mut p) };
            if r == CUDA_SUCCESS && !p.is_null() {
                // SAFETY: on success `p` points to a static NUL-terminated string.
                return unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
            }
        }
        cuda_error_name(code).to_string()
    }

    fn check(&self, func: &'static str, r: CUresult) -> Result<()> {
        if r == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(Error::Cuda {
                func,
                code: r,
                name: self.error_name(r),
            })
        }
    }

    pub fn init(&self) -> Result<()> {
        let f = self.need(self.init, "cuInit")?;
        // SAFETY: cuInit(unsigned int Flags); 0 is the only valid flag value.
        let r = unsafe { f(0) };
        self.check("cuInit", r)
    }

    pub fn driver_version(&self) -> Result<i32> {
        let f = self.need(self.driver_get_version, "cuDriverGetVersion")?;
        let mut v: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        let r = unsafe { f(&mut v) };
        self.check("cuDriverGetVersion", r).map(|_| v)
    }

    pub fn device_get(&self, ordinal: i32) -> Result<CUdevice> {
        let f = self.need(self.device_get, "cuDeviceGet")?;
        let mut d: CUdevice = 0;
        // SAFETY: writes one CUdevice through a valid pointer.
        let r = unsafe { f(&mut d, ordinal) };
        self.check("cuDeviceGet", r).map(|_| d)
    }

    pub fn attribute(&self, attr: c_int, dev: CUdevice) -> Result<i32> {
        let f = self.need(self.device_get_attribute, "cuDeviceGetAttribute")?;
        let mut v: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        let r = unsafe { f(&mut v, attr, dev) };
        self.check("cuDeviceGetAttribute", r).map(|_| v)
    }

    pub fn device_name(&self, dev: CUdevice) -> Result<String> {
        let f = self.need(self.device_get_name, "cuDeviceGetName")?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `buf`.
        let r = unsafe { f(buf.as_mut_ptr(), buf.len() as c_int, dev) };
        self.check("cuDeviceGetName", r)?;
        Ok(c_buf_to_string(&buf))
    }

    pub fn primary_ctx_retain(&self, dev: CUdevice) -> Result<CUcontext> {
        let f = self.need(self.primary_ctx_retain, "cuDevicePrimaryCtxRetain")?;
        let mut c: CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle through a valid pointer.
        let r = unsafe { f(&mut c, dev) };
        self.check("cuDevicePrimaryCtxRetain", r).map(|_| c)
    }

    pub fn ctx_set_current(&self, ctx: CUcontext) -> Result<()> {
        let f = self.need(self.ctx_set_current, "cuCtxSetCurrent")?;
        // SAFETY: `ctx` is a context handle returned by the driver.
        let r = unsafe { f(ctx) };
        self.check("cuCtxSetCurrent", r)
    }

    pub fn ctx_synchronize(&self) -> Result<()> {
        let f = self.need(self.ctx_synchronize, "cuCtxSynchronize")?;
        // SAFETY: no arguments; acts on the current context.
        let r = unsafe { f() };
        self.check("cuCtxSynchronize", r)
    }

    /// `cuModuleLoadData`; on failure, retries through `cuModuleLoadDataEx` only to fetch the
    /// JIT error log for the message.
    pub fn module_load_ptx(&self, image: &CStr) -> Result<CUmodule> {
        let f = self.need(self.module_load_data, "cuModuleLoadData")?;
        let mut m: CUmodule = std::ptr::null_mut();
        // SAFETY: `image` is a NUL-terminated PTX text that outlives the call.
        let r = unsafe { f(&mut m, image.as_ptr().cast()) };
        if r == CUDA_SUCCESS {
            return Ok(m);
        }
        let base = Error::Cuda {
            func: "cuModuleLoadData",
            code: r,
            name: self.error_name(r),
        };
        let Some(ex) = self.module_load_data_ex else {
            return Err(base);
        };
        let mut err_log = vec![0u8; 8192];
        let mut info_log = vec![0u8; 8192];
        let mut opts = [
            CU_JIT_ERROR_LOG_BUFFER,
            CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            CU_JIT_INFO_LOG_BUFFER,
            CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        ];
        // The size options take the value itself, cast to a pointer (cuda.h convention).
        let mut vals: [*mut c_void; 4] = [
            err_log.as_mut_ptr().cast(),
            err_log.len() as *mut c_void,
            info_log.as_mut_ptr().cast(),
            info_log.len() as *mut c_void,
        ];
        let mut m2: CUmodule = std::ptr::null_mut();
        // SAFETY: 4 options with matching values; the log buffers are writable for the sizes
        // given and outlive the call.
        let r2 = unsafe {
            ex(
                &mut m2,
                image.as_ptr().cast(),
                4,
                opts.as_mut_ptr(),
                vals.as_mut_ptr(),
            )
        };
        if r2 == CUDA_SUCCESS {
            return Ok(m2);
        }
        let log = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).trim().to_string()
        };
        Err(Error::Other(format!(
            "{base}; JIT error log: {:?}; info log: {:?}",
            log(&err_log),
            log(&info_log)
        )))
    }

    pub fn module_get_function(&self, m: CUmodule, name: &CStr) -> Result<CUfunction> {
        let f = self.need(self.module_get_function, "cuModuleGetFunction")?;
        let mut func: CUfunction = std::ptr::null_mut();
        // SAFETY: `m` is a loaded module; `name` is NUL-terminated.
        let r = unsafe { f(&mut func, m, name.as_ptr()) };
        self.check("cuModuleGetFunction", r).map(|_| func)
    }

    /// The launch entry point for `api`, resolved once so hot loops do not re-check it.
    pub fn launcher(&self, api: LaunchApi) -> Result<Launcher> {
        let f = match api {
            LaunchApi::Legacy => self.need(self.launch_kernel, "cuLaunchKernel")?,
            LaunchApi::Ptsz => self.need(self.launch_kernel_ptsz, "cuLaunchKernel_ptsz")?,
        };
        Ok(Launcher {
            f,
            name: api.symbol(),
        })
    }

    pub fn stream_create(&self) -> Result<CUstream> {
        let f = self.need(self.stream_create, "cuStreamCreate")?;
        let mut s: CUstream = std::ptr::null_mut();
        // SAFETY: writes one stream handle through a valid pointer.
        let r = unsafe { f(&mut s, CU_STREAM_NON_BLOCKING) };
        self.check("cuStreamCreate", r).map(|_| s)
    }

    pub fn stream_synchronize(&self, s: CUstream) -> Result<()> {
        let f = self.need(self.stream_synchronize, "cuStreamSynchronize")?;
        // SAFETY: `s` is a stream of the current context (or NULL, the default stream).
        let r = unsafe { f(s) };
        self.check("cuStreamSynchronize", r)
    }

    pub fn event_create(&self) -> Result<CUevent> {
        let f = self.need(self.event_create, "cuEventCreate")?;
        let mut e: CUevent = std::ptr::null_mut();
        // SAFETY: writes one event handle through a valid pointer.
        let r = unsafe { f(&mut e, CU_EVENT_DEFAULT) };
        self.check("cuEventCreate", r).map(|_| e)
    }

    pub fn event_record(&self, e: CUevent, s: CUstream) -> Result<()> {
        let f = self.need(self.event_record, "cuEventRecord")?;
        // SAFETY: `e` and `s` are handles of the current context.
        let r = unsafe { f(e, s) };
        self.check("cuEventRecord", r)
    }

    pub fn event_synchronize(&self, e: CUevent) -> Result<()> {
        let f = self.need(self.event_synchronize, "cuEventSynchronize")?;
        // SAFETY: `e` is an event of the current context.
        let r = unsafe { f(e) };
        self.check("cuEventSynchronize", r)
    }

    /// Milliseconds between two completed events.
    pub fn event_elapsed_ms(&self, start: CUevent, end: CUevent) -> Result<f32> {
        let f = self.need(self.event_elapsed_time, "cuEventElapsedTime")?;
        let mut ms: f32 = 0.0;
        // SAFETY: writes one float; both events belong to the current context.
        let r = unsafe { f(&mut ms, start, end) };
        self.check("cuEventElapsedTime", r).map(|_| ms)
    }

    pub fn mem_alloc(&self, bytes: usize) -> Result<CUdeviceptr> {
        let f = self.need(self.mem_alloc, "cuMemAlloc_v2")?;
        let mut p: CUdeviceptr = 0;
        // SAFETY: writes one device pointer through a valid pointer.
        let r = unsafe { f(&mut p, bytes) };
        self.check("cuMemAlloc_v2", r).map(|_| p)
    }

    pub fn mem_free(&self, p: CUdeviceptr) -> Result<()> {
        let f = self.need(self.mem_free, "cuMemFree_v2")?;
        // SAFETY: `p` came from cuMemAlloc_v2 and is freed once.
        let r = unsafe { f(p) };
        self.check("cuMemFree_v2", r)
    }

    /// `(free, total)`.
    pub fn mem_get_info(&self) -> Result<(u64, u64)> {
        let f = self.need(self.mem_get_info, "cuMemGetInfo_v2")?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two size_t values through valid pointers.
        let r = unsafe { f(&mut free, &mut total) };
        self.check("cuMemGetInfo_v2", r)
            .map(|_| (free as u64, total as u64))
    }

    pub fn device_total_mem(&self, dev: CUdevice) -> Result<u64> {
        let f = self.need(self.device_total_mem, "cuDeviceTotalMem_v2")?;
        let mut t = 0usize;
        // SAFETY: writes one size_t through a valid pointer.
        let r = unsafe { f(&mut t, dev) };
        self.check("cuDeviceTotalMem_v2", r).map(|_| t as u64)
    }

    pub fn mem_alloc_async(&self, bytes: usize, s: CUstream) -> Result<CUdeviceptr> {
        let f = self.need(self.mem_alloc_async, "cuMemAllocAsync")?;
        let mut p: CUdeviceptr = 0;
        // SAFETY: writes one device pointer; `s` is a stream of the current context.
        let r = unsafe { f(&mut p, bytes, s) };
        self.check("cuMemAllocAsync", r).map(|_| p)
    }

    pub fn mem_free_async(&self, p: CUdeviceptr, s: CUstream) -> Result<()> {
        let f = self.need(self.mem_free_async, "cuMemFreeAsync")?;
        // SAFETY: `p` came from cuMemAllocAsync and is freed once.
        let r = unsafe { f(p, s) };
        self.check("cuMemFreeAsync", r)
    }

    pub fn default_mem_pool(&self, dev: CUdevice) -> Result<CUmemoryPool> {
        let f = self.need(
            self.device_get_default_mem_pool,
            "cuDeviceGetDefaultMemPool",
        )?;
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes one pool handle through a valid pointer.
        let r = unsafe { f(&mut pool, dev) };
        self.check("cuDeviceGetDefaultMemPool", r).map(|_| pool)
    }

    pub fn mem_pool_trim_to(&self, pool: CUmemoryPool, keep: usize) -> Result<()> {
        let f = self.need(self.mem_pool_trim_to, "cuMemPoolTrimTo")?;
        // SAFETY: `pool` is the device's default pool.
        let r = unsafe { f(pool, keep) };
        self.check("cuMemPoolTrimTo", r)
    }

    pub fn allocation_granularity(&self, prop: &CUmemAllocationProp) -> Result<u64> {
        let f = self.need(
            self.mem_get_allocation_granularity,
            "cuMemGetAllocationGranularity",
        )?;
        let mut g = 0usize;
        // SAFETY: `prop` is a valid CUmemAllocationProp; writes one size_t.
        let r = unsafe { f(&mut g, prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) };
        self.check("cuMemGetAllocationGranularity", r)
            .map(|_| g as u64)
    }

    pub fn mem_create(
        &self,
        bytes: usize,
        prop: &CUmemAllocationProp,
    ) -> Result<CUmemGenericAllocationHandle> {
        let f = self.need(self.mem_create, "cuMemCreate")?;
        let mut h: CUmemGenericAllocationHandle = 0;
        // SAFETY: `prop` is a valid CUmemAllocationProp; writes one handle; flags must be 0.
        let r = unsafe { f(&mut h, bytes, prop, 0) };
        self.check("cuMemCreate", r).map(|_| h)
    }

    pub fn mem_release(&self, h: CUmemGenericAllocationHandle) -> Result<()> {
        let f = self.need(self.mem_release, "cuMemRelease")?;
        // SAFETY: `h` came from cuMemCreate and is released once.
        let r = unsafe { f(h) };
        self.check("cuMemRelease", r)
    }

    pub fn mem_address_reserve(&self, bytes: usize, align: usize) -> Result<CUdeviceptr> {
        let f = self.need(self.mem_address_reserve, "cuMemAddressReserve")?;
        let mut p: CUdeviceptr = 0;
        // SAFETY: writes one device address; no fixed address requested; flags must be 0.
        let r = unsafe { f(&mut p, bytes, align, 0, 0) };
        self.check("cuMemAddressReserve", r).map(|_| p)
    }

    pub fn mem_map(
        &self,
        va: CUdeviceptr,
        bytes: usize,
        h: CUmemGenericAllocationHandle,
    ) -> Result<()> {
        let f = self.need(self.mem_map, "cuMemMap")?;
        // SAFETY: `va..va+bytes` lies in a range we reserved; `h` is a live allocation of at
        // least `bytes`; offset and flags 0.
        let r = unsafe { f(va, bytes, 0, h, 0) };
        self.check("cuMemMap", r)
    }

    pub fn mem_unmap(&self, va: CUdeviceptr, bytes: usize) -> Result<()> {
        let f = self.need(self.mem_unmap, "cuMemUnmap")?;
        // SAFETY: unmaps a range we mapped.
        let r = unsafe { f(va, bytes) };
        self.check("cuMemUnmap", r)
    }

    pub fn mem_address_free(&self, va: CUdeviceptr, bytes: usize) -> Result<()> {
        let f = self.need(self.mem_address_free, "cuMemAddressFree")?;
        // SAFETY: frees exactly the range we reserved, once.
        let r = unsafe { f(va, bytes) };
        self.check("cuMemAddressFree", r)
    }

    pub fn mem_set_access_rw(&self, va: CUdeviceptr, bytes: usize, dev: CUdevice) -> Result<()> {
        let f = self.need(self.mem_set_access, "cuMemSetAccess")?;
        let desc = CUmemAccessDesc {
            location: CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: dev,
            },
            flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: one valid descriptor; the range is mapped.
        let r = unsafe { f(va, bytes, &desc, 1) };
        self.check("cuMemSetAccess", r)
    }

    /// `cuGetProcAddress_v2(symbol, &pfn, cudaVersion, flags, &status)` →
    /// `(CUresult, pfn, status)`; the raw result is returned, not turned into an error.
    pub fn get_proc_address(
        &self,
        symbol: &str,
        version: i32,
        flags: u64,
    ) -> Result<(i32, *mut c_void, i32)> {
        let f = self.need(self.get_proc_address_v2, "cuGetProcAddress_v2")?;
        let name = CString::new(symbol).map_err(|_| Error::Other("symbol contains NUL".into()))?;
        let mut pfn: *mut c_void = std::ptr::null_mut();
        let mut status: CUdriverProcAddressQueryResult = -1;
        // SAFETY: `name` is NUL-terminated; `pfn` and `status` are valid out-pointers.
        let r = unsafe { f(name.as_ptr(), &mut pfn, version, flags, &mut status) };
        Ok((r, pfn, status))
    }
}

/// A resolved launch entry point.
#[derive(Debug, Clone, Copy)]
pub struct Launcher {
    f: FnLaunchKernel,
    pub name: &'static str,
}

impl Launcher {
    /// Launch `func` with a 1-D grid of `grid` blocks of `block` threads. `params` is the
    /// `kernelParams` array: one pointer per kernel argument, each pointing at the value.
    pub fn launch(
        &self,
        cuda: &Cuda,
        func: CUfunction,
        grid: u32,
        block: u32,
        stream: CUstream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let p = if params.is_empty() {
            std::ptr::null_mut()
        } else {
            params.as_mut_ptr()
        };
        // SAFETY: `func` is a kernel of the current context whose parameter list matches
        // `params` (callers pass one pointer per argument, pointing at a live value of the
        // declared type); no shared memory; `extra` is NULL.
        let r = unsafe {
            (self.f)(
                func,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                stream,
                p,
                std::ptr::null_mut(),
            )
        };
        cuda.check(self.name, r)
    }
}

/// The three kernels of the PTX module.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    pub busy: CUfunction,
    pub work: CUfunction,
    pub noop: CUfunction,
}

/// Which spin kernel a share run uses (see `ptx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spin {
    /// `busy(cycles)`: spins on `%clock64` (wall time on the SM).
    Clock,
    /// `work(iters)`: a fixed number of iterations (GPU time received).
    Work,
}

impl Spin {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "clock" | "busy" => Ok(Spin::Clock),
            "work" => Ok(Spin::Work),
            _ => Err(Error::Other(format!(
                "--kernel must be clock or work, not {s:?}"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Spin::Clock => "busy",
            Spin::Work => "work",
        }
    }
    /// What one unit of the kernel argument is.
    pub fn unit(self) -> &'static str {
        match self {
            Spin::Clock => "cycles",
            Spin::Work => "iterations",
        }
    }
}

/// What a spin launch needs besides grid and duration.
#[derive(Debug, Clone, Copy)]
pub struct Spinner {
    pub kernels: Kernels,
    pub spin: Spin,
    pub launcher: Launcher,
    pub stream: CUstream,
}

/// A device with its primary context current.
#[derive(Debug)]
pub struct Gpu {
    pub cuda: Cuda,
    pub dev: CUdevice,
    pub sm_count: u32,
    pub init_latency: Duration,
    kernels: Option<Kernels>,
}

impl Gpu {
    /// Load the driver, `cuInit` (timed), device, primary context.
    pub fn open(cuda_path: &str, ordinal: i32) -> Result<Gpu> {
        let cuda = Cuda::load(cuda_path)?;
        let t0 = Instant::now();
        cuda.init()?;
        let init_latency = t0.elapsed();
        let dev = cuda.device_get(ordinal)?;
        let ctx = cuda.primary_ctx_retain(dev)?;
        cuda.ctx_set_current(ctx)?;
        let sm = cuda.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)?;
        Ok(Gpu {
            cuda,
            dev,
            sm_count: sm.max(1) as u32,
            init_latency,
            kernels: None,
        })
    }

    /// JIT the PTX module (once) and look the kernels up.
    pub fn kernels(&mut self) -> Result<Kernels> {
        if let Some(k) = self.kernels {
            return Ok(k);
        }
        let module = self.cuda.module_load_ptx(ptx::KERNELS)?;
        let k = Kernels {
            busy: self.cuda.module_get_function(module, ptx::BUSY)?,
            work: self.cuda.module_get_function(module, ptx::WORK)?,
            noop: self.cuda.module_get_function(module, ptx::NOOP)?,
        };
        self.kernels = Some(k);
        Ok(k)
    }

    /// Launch `busy(units)` or `work(units)` on `grid` single-thread blocks.
    pub fn launch_spin(&self, s: &Spinner, grid: u32, units: u64) -> Result<()> {
        let f = match s.spin {
            Spin::Clock => s.kernels.busy,
            Spin::Work => s.kernels.work,
        };
        let mut arg: u64 = units;
        let mut params = [(&mut arg as *mut u64).cast::<c_void>()];
        s.launcher
            .launch(&self.cuda, f, grid, 1, s.stream, &mut params)
    }

    /// Launch `noop()` on one single-thread block.
    pub fn launch_noop(&self, k: &Kernels, l: &Launcher, stream: CUstream) -> Result<()> {
        l.launch(&self.cuda, k.noop, 1, 1, stream, &mut [])
    }

    /// Event-timed milliseconds of one `spin(units)` launch on `grid` blocks. A gate kernel
    /// (`gate_units`, one block) is queued first so that the timed launch is already queued when
    /// the start event runs: host-side delays (a throttling limiter) do not count.
    fn timed(
        &self,
        s: &Spinner,
        grid: u32,
        units: u64,
        gate_units: u64,
        ev: (CUevent, CUevent),
    ) -> Result<f64> {
        if gate_units > 0 {
            self.launch_spin(s, 1, gate_units)?;
        }
        self.cuda.event_record(ev.0, s.stream)?;
        self.launch_spin(s, grid, units)?;
        self.cuda.event_record(ev.1, s.stream)?;
        self.cuda.event_synchronize(ev.1)?;
        Ok(self.cuda.event_elapsed_ms(ev.0, ev.1)? as f64)
    }

    /// Units of `spin` per millisecond (one block): a warm-up, a rough probe scaled until it
    /// takes >= 5 ms, then the fastest of three gated ~10 ms launches (a delay only ever makes a
    /// launch look slower, so the fastest is the least disturbed).
    pub fn calibrate(&self, s: &Spinner) -> Result<f64> {
        let ev = (self.cuda.event_create()?, self.cuda.event_create()?);
        let mut units: u64 = match s.spin {
            Spin::Clock => 2_000_000,
            Spin::Work => 20_000,
        };
        self.launch_spin(s, 1, units)?;
        self.cuda.stream_synchronize(s.stream)?;
        let mut ms = 0.0;
        for _ in 0..8 {
            ms = self.timed(s, 1, units, 0, ev)?;
            if ms >= 5.0 {
                break;
            }
            let grow = if ms > 0.05 {
                (6.0 / ms).clamp(2.0, 100.0)
            } else {
                100.0
            };
            units = ((units as f64) * grow).min(1.0e12) as u64;
        }
        if ms <= 0.0 {
            return Err(Error::Other(
                "calibration: the spin kernel took no measurable time".into(),
            ));
        }
        let rough = units as f64 / ms;
        let probe = (rough * 10.0).max(1.0) as u64;
        let gate = (rough * 20.0).max(1.0) as u64;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = self.timed(s, 1, probe, gate, ev)?;
            if t > 0.0 && t < best {
                best = t;
            }
        }
        if !best.is_finite() {
            return Err(Error::Other(
                "calibration: no timed launch completed".into(),
            ));
        }
        Ok(probe as f64 / best)
    }

    /// Event-timed milliseconds of one gated launch on the full `grid`.
    pub fn measure_kernel_ms(
        &self,
        s: &Spinner,
        grid: u32,
        units: u64,
        units_per_ms: f64,
    ) -> Result<f64> {
        let ev = (self.cuda.event_create()?, self.cuda.event_create()?);
        let gate = (units_per_ms * 20.0) as u64;
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            best = best.min(self.timed(s, grid, units, gate, ev)?);
        }
        Ok(best)
    }
}

/// A NUL-terminated C buffer as a `String`.
pub fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
