//! `share`: completions per second and GPU-busy fraction of spin kernels.
//!
//! * `small`: ~`kernel-ms` kernels on SM count × 4 single-thread blocks, `depth` kept in flight
//!   through a ring of events (each slot waits for its previous kernel before relaunching).
//! * `large`: one long kernel (default 200 ms) and `cuCtxSynchronize` per iteration, the shape
//!   that launch-side throttles are weakest against.

use std::time::{Duration, Instant};

use crate::args::Args;
use crate::cuda::{Gpu, LaunchApi, Spin, Spinner};
use crate::error::{Error, Result};
use crate::ffi::CUevent;
use crate::json::Line;
use crate::stats;
use crate::Global;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Small,
    Large,
}

/// Completions counted per wall-clock second since the first launch.
#[derive(Debug, Default)]
struct Timeline {
    per_s: Vec<u64>,
}

impl Timeline {
    fn add(&mut self, since_start: Duration) {
        let s = since_start.as_secs() as usize;
        if self.per_s.len() <= s {
            self.per_s.resize(s + 1, 0);
        }
        self.per_s[s] += 1;
    }
}

fn parse_opt<T: std::str::FromStr>(a: &mut Args, name: &str) -> Result<Option<T>> {
    a.opt(name)?
        .map(|v| {
            v.parse()
                .map_err(|_| Error::Other(format!("--{name}: not a number: {v:?}")))
        })
        .transpose()
}

/// Sleep until the wall clock reaches `at` (Unix epoch, ms); at most 60 s, so a bad value
/// cannot hang the run.
fn wait_until_epoch_ms(at: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(at);
    if at > now {
        std::thread::sleep(Duration::from_millis((at - now).min(60_000)));
    }
}

pub fn run(g: &Global, mut a: Args) -> Result<()> {
    let seconds: f64 = a.num("seconds", 12.0)?;
    let shape = match a.opt("shape")?.as_deref().unwrap_or("small") {
        "small" => Shape::Small,
        "large" => Shape::Large,
        s => {
            return Err(Error::Other(format!(
                "--shape must be small or large, not {s:?}"
            )))
        }
    };
    let kernel_ms: f64 = a.num("kernel-ms", if shape == Shape::Small { 2.0 } else { 200.0 })?;
    let depth: usize = a.num("depth", 8usize)?.max(1);
    let spin = Spin::parse(a.opt("kernel")?.as_deref().unwrap_or("clock"))?;
    let api = LaunchApi::parse(a.opt("api")?.as_deref().unwrap_or("legacy"))?;
    let grid_opt: Option<u32> = parse_opt(&mut a, "grid")?;
    let given_rate: Option<f64> = parse_opt(&mut a, "units-per-ms")?;
    let given_alone: Option<f64> = parse_opt(&mut a, "kernel-ms-alone")?;
    let start_at_ms: Option<u64> = parse_opt(&mut a, "start-at-ms")?;
    let calibrate_only = a.flag("calibrate-only");
    a.finish()?;
    if !(seconds > 0.0 && kernel_ms > 0.0) {
        return Err(Error::Other(
            "--seconds and --kernel-ms must be positive".into(),
        ));
    }

    let mut gpu = Gpu::open(&g.cuda_lib, g.device)?;
    let k = gpu.kernels()?;
    let c = &gpu.cuda;
    let l = c.launcher(api)?;
    let stream = c.stream_create()?;
    let grid = grid_opt.unwrap_or(gpu.sm_count * 4).max(1);

    let sp = Spinner {
        kernels: k,
        spin,
        launcher: l,
        stream,
    };
    // Calibrate here, or take the numbers a solo calibration run printed (concurrent tenants
    // would otherwise calibrate against each other).
    let units_per_ms = match given_rate {
        Some(r) if r > 0.0 => r,
        _ => gpu.calibrate(&sp)?,
    };
    let units = (units_per_ms * kernel_ms).max(1.0) as u64;
    let kernel_ms_measured = match (given_rate, given_alone) {
        (Some(_), Some(ms)) => ms,
        (Some(_), None) => kernel_ms,
        _ => gpu.measure_kernel_ms(&sp, grid, units, units_per_ms)?,
    };
    if calibrate_only {
        Line::new("calibration")
            .set("kernel", spin.name())
            .set("api", l.name)
            .set("grid", grid)
            .set("kernel_ms_target", kernel_ms)
            .set("units", units)
            .set("unit", spin.unit())
            .set("units_per_ms", units_per_ms)
            .set("kernel_ms_measured", kernel_ms_measured)
            .emit();
        return Ok(());
    }
    if let Some(at) = start_at_ms {
        wait_until_epoch_ms(at);
    }

    let slots = if shape == Shape::Small { depth } else { 1 };
    let mut ring: Vec<(CUevent, CUevent)> = Vec::with_capacity(slots);
    for _ in 0..slots {
        ring.push((c.event_create()?, c.event_create()?));
    }

    let mut timeline = Timeline::default();
    let mut launched: u64 = 0;
    let mut completed: u64 = 0;
    let mut event_ms_sum = 0.0f64;
    let mut in_launch = Duration::ZERO;
    let mut launch_ns: Vec<f64> = Vec::new();
    let budget = Duration::from_secs_f64(seconds);
    let t0 = Instant::now();
    let retire = |slot: usize,
                  completed: &mut u64,
                  event_ms_sum: &mut f64,
                  tl: &mut Timeline|
     -> Result<()> {
        let (s, e) = ring[slot];
        c.event_synchronize(e)?;
        *event_ms_sum += c.event_elapsed_ms(s, e)? as f64;
        *completed += 1;
        tl.add(t0.elapsed());
        Ok(())
    };
    while t0.elapsed() < budget {
        let slot = (launched % slots as u64) as usize;
        if launched >= slots as u64 {
            retire(slot, &mut completed, &mut event_ms_sum, &mut timeline)?;
        }
        let (s, e) = ring[slot];
        c.event_record(s, stream)?;
        let tl0 = Instant::now();
        gpu.launch_spin(&sp, grid, units)?;
        let dt = tl0.elapsed();
        in_launch += dt;
        launch_ns.push(dt.as_nanos() as f64);
        c.event_record(e, stream)?;
        launched += 1;
        if shape == Shape::Large {
            c.ctx_synchronize()?;
            retire(0, &mut completed, &mut event_ms_sum, &mut timeline)?;
            launched = 0;
        }
    }
    // Drain the ring in launch order.
    if shape == Shape::Small {
        let inflight = launched.min(slots as u64);
        for i in 0..inflight {
            let slot = ((launched - inflight + i) % slots as u64) as usize;
            retire(slot, &mut completed, &mut event_ms_sum, &mut timeline)?;
        }
    }
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;

    let per_s = timeline.per_s;
    // Steady state: whole seconds after the first two (controller settling), last partial
    // second dropped.
    let full = (seconds.floor() as usize).min(per_s.len());
    let steady: Vec<f64> = per_s.iter().take(full).skip(2).map(|&n| n as f64).collect();

    let mut line = Line::new("share");
    line.put(
        "shape",
        if shape == Shape::Small {
            "small"
        } else {
            "large"
        },
    );
    line.put("kernel", spin.name());
    line.put("api", l.name);
    line.put("seconds", seconds);
    line.put("grid", grid);
    line.put("depth", slots);
    line.put("sm_count", gpu.sm_count);
    line.put("kernel_ms_target", kernel_ms);
    line.put("units", units);
    line.put("unit", spin.unit());
    line.put("units_per_ms", units_per_ms);
    line.put("calibrated_here", given_rate.is_none());
    line.put("kernel_ms_measured", kernel_ms_measured);
    line.put("completions", completed);
    line.put("wall_ms", wall_ms);
    line.put("completions_per_s", completed as f64 / (wall_ms / 1e3));
    line.put("completions_per_s_steady", stats::mean(&steady));
    // GPU-busy fraction from the calibrated kernel time (robust to host-side delays) and from
    // the event pairs (which also count GPU idle time while the host was held in a launch).
    line.put(
        "busy_fraction",
        completed as f64 * kernel_ms_measured / wall_ms,
    );
    line.put("event_busy_fraction", event_ms_sum / wall_ms);
    line.put(
        "host_in_launch_fraction",
        in_launch.as_secs_f64() * 1e3 / wall_ms,
    );
    line.put("launch_ns_p50", stats::median(&launch_ns));
    line.put("launch_ns_p99", stats::percentile(&launch_ns, 99.0));
    line.put("per_s", per_s);
    line.put("cuinit_ms", gpu.init_latency.as_secs_f64() * 1e3);
    line.emit();
    Ok(())
}
