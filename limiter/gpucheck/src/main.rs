//! `gpucheck`: the limiter's check on a real GPU, with only the NVIDIA driver installed.
//!
//! Driver API through `dlopen("libcuda.so.1")`, NVML through `dlopen("libnvidia-ml.so.1")`,
//! kernels as embedded PTX. Every measurement is one JSON line on stdout; failures are JSON
//! lines too (`{"check":…,"error":"…"}`) with exit code 1. See README.md.

mod args;
mod cmd_config;
mod cmd_info;
mod cmd_mem;
mod cmd_overhead;
mod cmd_routing;
mod cmd_sampler;
mod cmd_share;
mod cmd_summarize;
mod cuda;
mod dl;
mod error;
mod ffi;
mod json;
mod nvml;
mod ptx;
mod stats;

use args::Args;
use error::{Error, Result};
use json::Line;

const USAGE: &str = "\
usage: gpucheck [--cuda-lib PATH] [--nvml-lib PATH] [--device N] [--tag NAME] COMMAND [OPTIONS]

commands:
  info                                     driver, device, memory, SM count (NVML + driver API)
  uuid [--plain]                           the device UUID via NVML
  mem --cap-bytes N [--chunk-bytes 256MiB] [--max-bytes N] [--physical-bytes N]
      [--slack-bytes 2GiB] [--hold-ms 300] [--paths alloc,async,vmm]
  share [--seconds 12] [--kernel-ms 2] [--depth 8] [--shape small|large]
        [--kernel clock|work] [--api legacy|ptsz] [--grid N] [--calibrate-only]
        [--units-per-ms X [--kernel-ms-alone MS]] [--start-at-ms UNIX_MS]
  overhead [--launches 200000] [--batch 1000] [--alloc-pairs 10000] [--alloc-bytes 1MiB]
           [--api legacy|ptsz]
  routing [--expect-object SUBSTR] [--cuda-version N]
  sampler [--seconds 15] [--interval-ms 100] [--pid-filter PID,PID] [--target PCT] [--quiet]
          [--stop-file PATH]
  write-config --out PATH --uuid GPU-... --cores N [--core-limit N] --memory-bytes N
               [--index 0] [--minor 0] [--mode hard|soft]
  summarize --file RESULTS.jsonl

environment: GPUCHECK_CUDA_LIB, GPUCHECK_NVML_LIB override the library paths.";

/// Global options shared by every command.
#[derive(Debug, Clone)]
pub struct Global {
    pub cuda_lib: String,
    pub nvml_lib: String,
    pub device: i32,
}

fn run(argv: Vec<String>) -> (String, Result<()>) {
    let mut a = Args::new(argv);
    let global = (|| -> Result<(Global, Option<String>)> {
        let cuda_lib = a.opt("cuda-lib")?.unwrap_or_else(cuda::default_path);
        let nvml_lib = a.opt("nvml-lib")?.unwrap_or_else(nvml::default_path);
        let device = a.num("device", 0i32)?;
        let tag = a.opt("tag")?;
        Ok((
            Global {
                cuda_lib,
                nvml_lib,
                device,
            },
            tag,
        ))
    })();
    let (g, tag) = match global {
        Ok(x) => x,
        Err(e) => return ("gpucheck".into(), Err(e)),
    };
    json::set_tag(tag);
    let mut rest = a.into_rest();
    if rest.is_empty() {
        eprintln!("{USAGE}");
        return (
            "gpucheck".into(),
            Err(Error::Other(
                "no command given (`gpucheck help` lists them)".into(),
            )),
        );
    }
    let cmd = rest.remove(0);
    let a = Args::new(rest);
    let r = match cmd.as_str() {
        "info" => cmd_info::info(&g, a),
        "uuid" => cmd_info::uuid(&g, a),
        "mem" => cmd_mem::run(&g, a),
        "share" => cmd_share::run(&g, a),
        "overhead" => cmd_overhead::run(&g, a),
        "routing" => cmd_routing::run(&g, a),
        "sampler" => cmd_sampler::run(&g, a),
        "write-config" => cmd_config::run(a),
        "summarize" => cmd_summarize::run(a),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("{USAGE}");
            Err(Error::Other(format!(
                "unknown command {other:?} (`gpucheck help` lists them)"
            )))
        }
    };
    (cmd, r)
}

fn main() {
    // Never a Rust panic message: a panic (there should be none) becomes one JSON error line
    // and exit code 1.
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "panic".to_string()
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        Line::new("gpucheck")
            .set("error", format!("internal error: {msg}{at}"))
            .emit();
        std::process::exit(1);
    }));
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, r) = run(argv);
    match r {
        Ok(()) => {}
        Err(Error::Reported) => std::process::exit(1),
        Err(e) => {
            Line::new(&cmd).set("error", e.to_string()).emit();
            std::process::exit(1);
        }
    }
}
