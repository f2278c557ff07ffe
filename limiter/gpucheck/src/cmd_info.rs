//! `info` and `uuid`.

use crate::args::Args;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::ffi::*;
use crate::json::Line;
use crate::nvml::Nvml;
use crate::Global;

/// `uuid [--plain]`: NVML only (no CUDA context), so it is cheap and safe without the preload.
pub fn uuid(g: &Global, mut a: Args) -> Result<()> {
    let plain = a.flag("plain");
    a.finish()?;
    let nvml = Nvml::open(&g.nvml_lib)?;
    let d = nvml.device(g.device as u32)?;
    let uuid = nvml.uuid(d)?;
    if plain {
        println!("{uuid}");
        return Ok(());
    }
    Line::new("uuid")
        .set("index", g.device)
        .set("uuid", uuid)
        .set("minor", nvml.minor_number(d).ok())
        .set("name", nvml.name(d).ok())
        .emit();
    Ok(())
}

/// `info`: what the checks and the summary need to know about the card.
pub fn info(g: &Global, a: Args) -> Result<()> {
    a.finish()?;
    let mut line = Line::new("info");
    match Nvml::open(&g.nvml_lib) {
        Ok(nvml) => {
            line.put("nvml_lib", &nvml.lib.path);
            line.put("nvml_driver_version", nvml.driver_version().ok());
            match nvml.device(g.device as u32) {
                Ok(d) => {
                    line.put("uuid", nvml.uuid(d).ok());
                    line.put("name", nvml.name(d).ok());
                    line.put("minor", nvml.minor_number(d).ok());
                    match nvml.memory(d) {
                        Ok(m) => {
                            line.put("nvml_total_bytes", m.total);
                            line.put("nvml_used_bytes", m.used);
                        }
                        Err(e) => line.put("nvml_error", e.to_string()),
                    }
                }
                Err(e) => line.put("nvml_error", e.to_string()),
            }
        }
        Err(e) => line.put("nvml_error", e.to_string()),
    }
    let gpu = match Gpu::open(&g.cuda_lib, g.device) {
        Ok(gpu) => gpu,
        Err(e) => {
            line.put("error", e.to_string());
            line.emit();
            return Err(Error::Reported);
        }
    };
    let c = &gpu.cuda;
    line.put("cuda_lib", &c.lib.path);
    line.put("driver_version", c.driver_version().ok());
    line.put("device_name", c.device_name(gpu.dev).ok());
    line.put("physical_bytes", c.device_total_mem(gpu.dev).ok());
    line.put("sm_count", gpu.sm_count);
    let attr = |a| c.attribute(a, gpu.dev).ok();
    let cc = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .zip(attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        .map(|(a, b)| format!("{a}.{b}"));
    line.put("compute_capability", cc);
    line.put("clock_khz", attr(CU_DEVICE_ATTRIBUTE_CLOCK_RATE));
    line.put(
        "vmm_supported",
        attr(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED),
    );
    line.put(
        "mem_pools_supported",
        attr(CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED),
    );
    line.put("cuinit_ms", gpu.init_latency.as_secs_f64() * 1e3);
    line.emit();
    Ok(())
}
