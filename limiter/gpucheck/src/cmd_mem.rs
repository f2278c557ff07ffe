//! `mem`: the memory cap through every allocation path the limiter charges.

use std::time::Duration;

use crate::args::Args;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::ffi::*;
use crate::json::Line;
use crate::nvml::Nvml;
use crate::Global;

#[derive(Debug)]
struct Opts {
    cap: u64,
    chunk: u64,
    max: u64,
    physical: Option<u64>,
    slack: u64,
    hold: Duration,
}

/// NVML as this (preloaded) process sees it: the hooked view.
struct HookedNvml {
    nvml: Nvml,
    dev: NvmlDevice,
}

impl HookedNvml {
    fn open(g: &Global) -> Result<HookedNvml> {
        let nvml = Nvml::open(&g.nvml_lib)?;
        let dev = nvml.device(g.device as u32)?;
        Ok(HookedNvml { nvml, dev })
    }

    /// Adds `{prefix}nvml_total_bytes`, `…used…`, `…free…`, `…pid_used_bytes`.
    fn observe(this: &Result<HookedNvml>, line: &mut Line, prefix: &str) {
        let h = match this {
            Ok(h) => h,
            Err(e) => {
                line.put("nvml_error", e.to_string());
                return;
            }
        };
        match h.nvml.memory(h.dev) {
            Ok(m) => {
                line.put(&format!("{prefix}nvml_total_bytes"), m.total);
                line.put(&format!("{prefix}nvml_used_bytes"), m.used);
                line.put(&format!("{prefix}nvml_free_bytes"), m.free);
            }
            Err(e) => line.put("nvml_error", e.to_string()),
        }
        match h.nvml.compute_processes(h.dev) {
            Ok(ps) => {
                let me = std::process::id();
                let used = ps.iter().find(|p| p.pid == me).and_then(|p| p.used_bytes);
                line.put(&format!("{prefix}nvml_pid_used_bytes"), used);
                line.put(&format!("{prefix}nvml_processes"), ps.len());
            }
            Err(e) => line.put("nvml_procs_error", e.to_string()),
        }
    }
}

pub fn run(g: &Global, mut a: Args) -> Result<()> {
    let cap = a
        .bytes("cap-bytes")?
        .ok_or_else(|| Error::Other("--cap-bytes is required".into()))?;
    let chunk = a.bytes("chunk-bytes")?.unwrap_or(256 << 20).max(1);
    let o = Opts {
        cap,
        chunk,
        max: a
            .bytes("max-bytes")?
            .unwrap_or(cap.saturating_mul(2).saturating_add(1 << 30)),
        physical: a.bytes("physical-bytes")?,
        slack: a.bytes("slack-bytes")?.unwrap_or(2 << 30),
        hold: Duration::from_millis(a.num("hold-ms", 300u64)?),
    };
    let paths = a
        .opt("paths")?
        .unwrap_or_else(|| "alloc,async,vmm".to_string());
    a.finish()?;
    let paths: Vec<&str> = paths
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    for p in &paths {
        if !matches!(*p, "alloc" | "async" | "vmm") {
            return Err(Error::Other(format!(
                "--paths: unknown path {p:?} (alloc, async, vmm)"
            )));
        }
    }

    let gpu = Gpu::open(&g.cuda_lib, g.device)?;
    let nvml = HookedNvml::open(g);
    let mut all_pass = info_line(&gpu, &nvml, &o)?;

    for p in paths {
        let mut line = Line::new("mem_cap");
        line.put("cap_bytes", o.cap);
        line.put("chunk_bytes", o.chunk);
        line.put("max_bytes", o.max);
        let r = match p {
            "alloc" => path_alloc(&gpu, &nvml, &o, &mut line),
            "async" => path_async(&gpu, &nvml, &o, &mut line),
            _ => path_vmm(&gpu, &nvml, &o, &mut line),
        };
        let pass = match r {
            Ok(pass) => pass,
            Err(e) => {
                line.put("error_text", e.to_string());
                line.put("pass", false);
                false
            }
        };
        all_pass &= pass;
        line.emit();
    }
    if all_pass {
        Ok(())
    } else {
        Err(Error::Reported)
    }
}

/// (a) what the process is told about the card's memory.
fn info_line(gpu: &Gpu, nvml: &Result<HookedNvml>, o: &Opts) -> Result<bool> {
    let (free, total) = gpu.cuda.mem_get_info()?;
    let dev_total = gpu.cuda.device_total_mem(gpu.dev)?;
    let expected = o.physical.map_or(o.cap, |p| o.cap.min(p));
    let mut line = Line::new("mem_info");
    line.put("cap_bytes", o.cap);
    line.put("physical_bytes", o.physical);
    line.put("expected_total_bytes", expected);
    line.put("meminfo_total_bytes", total);
    line.put("meminfo_free_bytes", free);
    line.put("device_total_bytes", dev_total);
    HookedNvml::observe(nvml, &mut line, "");
    let nvml_total = match nvml {
        Ok(h) => h.nvml.memory(h.dev).ok().map(|m| m.total),
        Err(_) => None,
    };
    line.put("nvml_total_pass", nvml_total.map(|t| t == expected));
    let pass = total == expected && dev_total == expected && free <= total;
    line.put("pass", pass);
    line.emit();
    Ok(pass)
}

/// Fields shared by every path once the loop stopped; returns the pass verdict.
fn finish(
    gpu: &Gpu,
    nvml: &Result<HookedNvml>,
    o: &Opts,
    line: &mut Line,
    obtained: u64,
    count: usize,
    stop: Option<Error>,
) -> bool {
    line.put("obtained_bytes", obtained);
    line.put("chunks", count);
    let code = stop.as_ref().and_then(Error::code);
    let stopped_at_max = stop.is_none();
    line.put("error", code);
    line.put("error_text", stop.as_ref().map(|e| e.to_string()));
    line.put("stopped_at_max", stopped_at_max);
    std::thread::sleep(o.hold);
    match gpu.cuda.mem_get_info() {
        Ok((free, total)) => {
            line.put("peak_meminfo_free_bytes", free);
            line.put("peak_meminfo_total_bytes", total);
        }
        Err(e) => line.put("peak_meminfo_error", e.to_string()),
    }
    HookedNvml::observe(nvml, line, "peak_");
    code == Some(CUDA_ERROR_OUT_OF_MEMORY)
        && obtained <= o.cap
        && obtained.saturating_add(o.slack) >= o.cap
}

/// Adds `after_free_meminfo_free_bytes` and `pass`.
fn after_free(gpu: &Gpu, line: &mut Line, freed: Result<()>, verdict: bool) -> bool {
    let freed_ok = freed.is_ok();
    if let Err(e) = freed {
        line.put("free_error", e.to_string());
    }
    line.put(
        "after_free_meminfo_free_bytes",
        gpu.cuda.mem_get_info().ok().map(|(f, _)| f),
    );
    let pass = verdict && freed_ok;
    line.put("pass", pass);
    pass
}

/// (b) `cuMemAlloc_v2` chunks until failure.
fn path_alloc(gpu: &Gpu, nvml: &Result<HookedNvml>, o: &Opts, line: &mut Line) -> Result<bool> {
    line.put("path", "cuMemAlloc_v2");
    let c = &gpu.cuda;
    let mut ptrs = Vec::new();
    let mut stop = None;
    while (ptrs.len() as u64 + 1) * o.chunk <= o.max {
        match c.mem_alloc(o.chunk as usize) {
            Ok(p) => ptrs.push(p),
            Err(e) => {
                stop = Some(e);
                break;
            }
        }
    }
    let obtained = ptrs.len() as u64 * o.chunk;
    let verdict = finish(gpu, nvml, o, line, obtained, ptrs.len(), stop);
    let freed = ptrs.iter().try_for_each(|&p| c.mem_free(p));
    Ok(after_free(gpu, line, freed, verdict))
}

/// (c) `cuMemAllocAsync` on the default pool, the stream synchronised after each chunk.
fn path_async(gpu: &Gpu, nvml: &Result<HookedNvml>, o: &Opts, line: &mut Line) -> Result<bool> {
    line.put("path", "cuMemAllocAsync");
    let c = &gpu.cuda;
    if c.attribute(CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, gpu.dev)? == 0 {
        return Err(Error::Other(
            "memory pools not supported on this device".into(),
        ));
    }
    let stream = c.stream_create()?;
    let pool = c.default_mem_pool(gpu.dev)?;
    let mut ptrs = Vec::new();
    let mut stop = None;
    while (ptrs.len() as u64 + 1) * o.chunk <= o.max {
        match c
            .mem_alloc_async(o.chunk as usize, stream)
            .and_then(|p| c.stream_synchronize(stream).map(|_| p))
        {
            Ok(p) => ptrs.push(p),
            Err(e) => {
                stop = Some(e);
                break;
            }
        }
    }
    let obtained = ptrs.len() as u64 * o.chunk;
    let verdict = finish(gpu, nvml, o, line, obtained, ptrs.len(), stop);
    let freed = ptrs
        .iter()
        .try_for_each(|&p| c.mem_free_async(p, stream))
        .and_then(|_| c.stream_synchronize(stream))
        .and_then(|_| c.mem_pool_trim_to(pool, 0));
    Ok(after_free(gpu, line, freed, verdict))
}

/// (c) `cuMemCreate` + `cuMemAddressReserve` + `cuMemMap` (+ `cuMemSetAccess`), chunks rounded
/// up to the allocation granularity.
fn path_vmm(gpu: &Gpu, nvml: &Result<HookedNvml>, o: &Opts, line: &mut Line) -> Result<bool> {
    line.put("path", "cuMemCreate");
    let c = &gpu.cuda;
    if c.attribute(
        CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        gpu.dev,
    )? == 0
    {
        return Err(Error::Other(
            "virtual memory management not supported on this device".into(),
        ));
    }
    let prop = CUmemAllocationProp::device(gpu.dev);
    let gran = c.allocation_granularity(&prop)?.max(1);
    let chunk = o.chunk.div_ceil(gran) * gran;
    line.put("granularity_bytes", gran);
    line.put("chunk_bytes", chunk);
    let max_chunks = (o.max / chunk).max(1);
    let va_size = (max_chunks * chunk) as usize;
    let va = c.mem_address_reserve(va_size, gran as usize)?;
    let mut handles: Vec<CUmemGenericAllocationHandle> = Vec::new();
    let mut mapped = 0u64;
    let mut stop = None;
    while (handles.len() as u64) < max_chunks {
        let h = match c.mem_create(chunk as usize, &prop) {
            Ok(h) => h,
            Err(e) => {
                stop = Some(e);
                break;
            }
        };
        handles.push(h);
        let at = va + handles.len() as u64 * chunk - chunk;
        if let Err(e) = c.mem_map(at, chunk as usize, h) {
            stop = Some(e);
            break;
        }
        mapped += 1;
        if let Err(e) = c.mem_set_access_rw(at, chunk as usize, gpu.dev) {
            stop = Some(e);
            break;
        }
    }
    let obtained = handles.len() as u64 * chunk;
    line.put("mapped_chunks", mapped);
    let verdict = finish(gpu, nvml, o, line, obtained, handles.len(), stop);
    let freed = (0..mapped)
        .try_for_each(|i| c.mem_unmap(va + i * chunk, chunk as usize))
        .and_then(|_| handles.iter().try_for_each(|&h| c.mem_release(h)))
        .and_then(|_| c.mem_address_free(va, va_size));
    Ok(after_free(gpu, line, freed, verdict))
}
