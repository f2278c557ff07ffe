//! NVML through `dlopen("libnvidia-ml.so.1")`.

use std::ffi::{c_char, c_uint};

use crate::cuda::c_buf_to_string;
use crate::dl::Lib;
use crate::error::{Error, Result};
use crate::ffi::*;

#[derive(Debug)]
pub struct Nvml {
    pub lib: Lib,
    init: Option<FnNvmlInit>,
    get_handle_by_index: Option<FnNvmlGetHandleByIndex>,
    get_memory_info: Option<FnNvmlGetMemoryInfo>,
    get_utilization_rates: Option<FnNvmlGetUtilizationRates>,
    get_compute_running_processes: Option<FnNvmlGetComputeRunningProcesses>,
    get_process_utilization: Option<FnNvmlGetProcessUtilization>,
    get_uuid: Option<FnNvmlGetString>,
    get_name: Option<FnNvmlGetString>,
    get_minor_number: Option<FnNvmlGetMinorNumber>,
    system_get_driver_version: Option<FnNvmlSystemGetDriverVersion>,
}

/// Path of NVML: `--nvml-lib`, else `GPUCHECK_NVML_LIB`, else `libnvidia-ml.so.1`.
pub fn default_path() -> String {
    std::env::var("GPUCHECK_NVML_LIB")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "libnvidia-ml.so.1".to_string())
}

/// One entry of `nvmlDeviceGetComputeRunningProcesses_v3`.
#[derive(Debug, Clone, Copy)]
pub struct Proc {
    pub pid: u32,
    /// `None` when NVML reports `NVML_VALUE_NOT_AVAILABLE`.
    pub used_bytes: Option<u64>,
}

/// One `nvmlProcessUtilizationSample_t`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub pid: u32,
    pub time_stamp_us: u64,
    pub sm_util: u32,
    pub mem_util: u32,
}

impl Nvml {
    /// Load the library and `nvmlInit_v2`.
    pub fn open(path: &str) -> Result<Nvml> {
        let lib = Lib::open(path)?;
        // SAFETY: each field's function-pointer type is declared from the nvml.h prototype of
        // the symbol named next to it.
        let nvml = unsafe {
            Nvml {
                init: lib.sym(c"nvmlInit_v2"),
                get_handle_by_index: lib.sym(c"nvmlDeviceGetHandleByIndex_v2"),
                get_memory_info: lib.sym(c"nvmlDeviceGetMemoryInfo"),
                get_utilization_rates: lib.sym(c"nvmlDeviceGetUtilizationRates"),
                get_compute_running_processes: lib.sym(c"nvmlDeviceGetComputeRunningProcesses_v3"),
                get_process_utilization: lib.sym(c"nvmlDeviceGetProcessUtilization"),
                get_uuid: lib.sym(c"nvmlDeviceGetUUID"),
                get_name: lib.sym(c"nvmlDeviceGetName"),
                get_minor_number: lib.sym(c"nvmlDeviceGetMinorNumber"),
                system_get_driver_version: lib.sym(c"nvmlSystemGetDriverVersion"),
                lib,
            }
        };
        let f = nvml.need(nvml.init, "nvmlInit_v2")?;
        // SAFETY: nvmlInit_v2 takes no arguments.
        let r = unsafe { f() };
        check("nvmlInit_v2", r)?;
        Ok(nvml)
    }

    fn need<F: Copy>(&self, f: Option<F>, sym: &'static str) -> Result<F> {
        f.ok_or_else(|| Error::Missing {
            lib: self.lib.path.clone(),
            sym,
        })
    }

    pub fn device(&self, index: u32) -> Result<NvmlDevice> {
        let f = self.need(self.get_handle_by_index, "nvmlDeviceGetHandleByIndex_v2")?;
        let mut d: NvmlDevice = std::ptr::null_mut();
        // SAFETY: writes one handle through a valid pointer.
        let r = unsafe { f(index, &mut d) };
        check("nvmlDeviceGetHandleByIndex_v2", r).map(|_| d)
    }

    pub fn memory(&self, d: NvmlDevice) -> Result<NvmlMemory> {
        let f = self.need(self.get_memory_info, "nvmlDeviceGetMemoryInfo")?;
        let mut m = NvmlMemory::default();
        // SAFETY: `d` is a device handle from NVML; writes one nvmlMemory_t.
        let r = unsafe { f(d, &mut m) };
        check("nvmlDeviceGetMemoryInfo", r).map(|_| m)
    }

    pub fn utilization(&self, d: NvmlDevice) -> Result<NvmlUtilization> {
        let f = self.need(self.get_utilization_rates, "nvmlDeviceGetUtilizationRates")?;
        let mut u = NvmlUtilization::default();
        // SAFETY: `d` is a device handle from NVML; writes one nvmlUtilization_t.
        let r = unsafe { f(d, &mut u) };
        check("nvmlDeviceGetUtilizationRates", r).map(|_| u)
    }

    /// Compute processes on the device and their used memory.
    pub fn compute_processes(&self, d: NvmlDevice) -> Result<Vec<Proc>> {
        let f = self.need(
            self.get_compute_running_processes,
            "nvmlDeviceGetComputeRunningProcesses_v3",
        )?;
        let mut cap: usize = 64;
        for _ in 0..4 {
            let mut buf = vec![NvmlProcessInfo::default(); cap];
            let mut count = cap as c_uint;
            // SAFETY: `buf` holds `count` writable entries of the v3 layout.
            let r = unsafe { f(d, &mut count, buf.as_mut_ptr()) };
            if r == NVML_ERROR_INSUFFICIENT_SIZE {
                cap = (count as usize).max(cap) * 2;
                continue;
            }
            check("nvmlDeviceGetComputeRunningProcesses_v3", r)?;
            buf.truncate((count as usize).min(cap));
            return Ok(buf
                .iter()
                .map(|p| Proc {
                    pid: p.pid,
                    used_bytes: (p.used_gpu_memory != NVML_VALUE_NOT_AVAILABLE)
                        .then_some(p.used_gpu_memory),
                })
                .collect());
        }
        Err(Error::Nvml {
            func: "nvmlDeviceGetComputeRunningProcesses_v3",
            code: NVML_ERROR_INSUFFICIENT_SIZE,
        })
    }

    /// Per-process samples newer than `since_us`; empty when there are none
    /// (`NVML_ERROR_NOT_FOUND`).
    pub fn process_utilization(&self, d: NvmlDevice, since_us: u64) -> Result<Vec<ProcSample>> {
        let f = self.need(
            self.get_process_utilization,
            "nvmlDeviceGetProcessUtilization",
        )?;
        let mut cap: usize = 256;
        for _ in 0..4 {
            let mut buf = vec![NvmlProcessUtilizationSample::default(); cap];
            let mut count = cap as c_uint;
            // SAFETY: `buf` holds `count` writable samples.
            let r = unsafe { f(d, buf.as_mut_ptr(), &mut count, since_us) };
            if r == NVML_ERROR_NOT_FOUND {
                return Ok(Vec::new());
            }
            if r == NVML_ERROR_INSUFFICIENT_SIZE {
                cap = (count as usize).max(cap) * 2;
                continue;
            }
            check("nvmlDeviceGetProcessUtilization", r)?;
            buf.truncate((count as usize).min(cap));
            return Ok(buf
                .iter()
                .map(|s| ProcSample {
                    pid: s.pid,
                    time_stamp_us: s.time_stamp,
                    sm_util: s.sm_util,
                    mem_util: s.mem_util,
                })
                .collect());
        }
        Err(Error::Nvml {
            func: "nvmlDeviceGetProcessUtilization",
            code: NVML_ERROR_INSUFFICIENT_SIZE,
        })
    }

    fn string(
        &self,
        f: Option<FnNvmlGetString>,
        sym: &'static str,
        d: NvmlDevice,
    ) -> Result<String> {
        let f = self.need(f, sym)?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: NVML writes at most `len` bytes, NUL-terminated.
        let r = unsafe { f(d, buf.as_mut_ptr(), buf.len() as c_uint) };
        check(sym, r)?;
        Ok(c_buf_to_string(&buf))
    }

    pub fn uuid(&self, d: NvmlDevice) -> Result<String> {
        self.string(self.get_uuid, "nvmlDeviceGetUUID", d)
    }

    pub fn name(&self, d: NvmlDevice) -> Result<String> {
        self.string(self.get_name, "nvmlDeviceGetName", d)
    }

    pub fn minor_number(&self, d: NvmlDevice) -> Result<u32> {
        let f = self.need(self.get_minor_number, "nvmlDeviceGetMinorNumber")?;
        let mut m: c_uint = 0;
        // SAFETY: writes one unsigned int.
        let r = unsafe { f(d, &mut m) };
        check("nvmlDeviceGetMinorNumber", r).map(|_| m)
    }

    pub fn driver_version(&self) -> Result<String> {
        let f = self.need(self.system_get_driver_version, "nvmlSystemGetDriverVersion")?;
        let mut buf = [0 as c_char; 96];
        // SAFETY: NVML writes at most `len` bytes, NUL-terminated.
        let r = unsafe { f(buf.as_mut_ptr(), buf.len() as c_uint) };
        check("nvmlSystemGetDriverVersion", r)?;
        Ok(c_buf_to_string(&buf))
    }
}

fn check(func: &'static str, r: NvmlReturn) -> Result<()> {
    if r == NVML_SUCCESS {
        Ok(())
    } else {
        Err(Error::Nvml { func, code: r })
    }
}
