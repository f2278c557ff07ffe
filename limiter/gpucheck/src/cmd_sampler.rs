//! `sampler`: NVML-only observer, run WITHOUT the preload next to a preloaded check, so that
//! it sees the unhooked device utilisation and per-process numbers. It stops after `--seconds`
//! or as soon as `--stop-file` exists, whichever comes first, and then prints its summary.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::args::Args;
use crate::error::{Error, Result};
use crate::json::{Line, Value};
use crate::nvml::Nvml;
use crate::stats;
use crate::Global;

#[derive(Debug, Default)]
struct PerPid {
    sm: Vec<f64>,
    stamps: Vec<u64>,
    used_max: Option<u64>,
    intervals_seen: usize,
}

/// Where the steady state starts: the first index `i` such that every `window`-interval
/// rolling mean from `i` on stays within `tol` of `target`.
pub fn settle_index(v: &[f64], target: f64, tol: f64, window: usize) -> Option<usize> {
    let w = window.max(1);
    if v.len() < w {
        return None;
    }
    let means: Vec<f64> = v
        .windows(w)
        .map(|x| x.iter().sum::<f64>() / w as f64)
        .collect();
    let mut first_ok = None;
    for (i, m) in means.iter().enumerate().rev() {
        if (m - target).abs() <= tol {
            first_ok = Some(i);
        } else {
            break;
        }
    }
    first_ok
}

pub fn run(g: &Global, mut a: Args) -> Result<()> {
    let seconds: f64 = a.num("seconds", 15.0)?;
    let interval = Duration::from_millis(a.num("interval-ms", 100u64)?.max(1));
    let filter: Option<Vec<u32>> = a
        .opt("pid-filter")?
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| {
                    x.parse()
                        .map_err(|_| Error::Other(format!("--pid-filter: bad pid {x:?}")))
                })
                .collect::<Result<Vec<u32>>>()
        })
        .transpose()?;
    let target: Option<f64> = a
        .opt("target")?
        .map(|v| {
            v.parse()
                .map_err(|_| Error::Other(format!("--target: {v:?}")))
        })
        .transpose()?;
    let quiet = a.flag("quiet");
    let stop_file = a.opt("stop-file")?;
    a.finish()?;

    let nvml = Nvml::open(&g.nvml_lib)?;
    let dev = nvml.device(g.device as u32)?;
    let wanted = |pid: u32| filter.as_ref().is_none_or(|f| f.contains(&pid));

    let mut pids: BTreeMap<u32, PerPid> = BTreeMap::new();
    let mut gpu_all: Vec<f64> = Vec::new();
    let mut gpu_active: Vec<f64> = Vec::new();
    let mut first_active_ms: Option<f64> = None;
    let mut active_t_ms: Vec<f64> = Vec::new();
    let mut last_stamp: u64 = 0;
    let mut errors = 0usize;
    let t0 = Instant::now();
    let end = Duration::from_secs_f64(seconds.max(0.0));
    let mut next = t0;
    while t0.elapsed() < end
        && !stop_file
            .as_ref()
            .is_some_and(|f| std::path::Path::new(f).exists())
    {
        let t_ms = t0.elapsed().as_secs_f64() * 1e3;
        let util = nvml.utilization(dev);
        let procs = nvml.compute_processes(dev).unwrap_or_default();
        let samples = nvml.process_utilization(dev, last_stamp);
        let mut line = Line::new("sample");
        line.put("t_ms", t_ms);
        match &util {
            Ok(u) => {
                line.put("gpu_util", u.gpu);
                line.put("mem_util", u.memory);
                gpu_all.push(u.gpu as f64);
            }
            Err(e) => {
                errors += 1;
                line.put("util_error", e.to_string());
            }
        }
        // Latest sample per pid in this interval.
        let mut sm_now: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
        match &samples {
            Ok(ss) => {
                for s in ss {
                    last_stamp = last_stamp.max(s.time_stamp_us);
                    if !wanted(s.pid) {
                        continue;
                    }
                    let e = pids.entry(s.pid).or_default();
                    if !e.stamps.contains(&s.time_stamp_us) {
                        e.stamps.push(s.time_stamp_us);
                        e.sm.push(s.sm_util as f64);
                    }
                    sm_now.insert(s.pid, (s.sm_util, s.mem_util));
                }
            }
            Err(e) => {
                errors += 1;
                line.put("proc_util_error", e.to_string());
            }
        }
        let mut active = false;
        let mut plist: Vec<Value> = Vec::new();
        for p in procs.iter().filter(|p| wanted(p.pid)) {
            active = true;
            let e = pids.entry(p.pid).or_default();
            e.intervals_seen += 1;
            if let Some(u) = p.used_bytes {
                e.used_max = Some(e.used_max.map_or(u, |m| m.max(u)));
            }
            let util = sm_now.get(&p.pid).copied();
            plist.push(
                Line::obj()
                    .set("pid", p.pid)
                    .set("used_bytes", p.used_bytes)
                    .set("sm", util.map(|u| u.0))
                    .set("mem", util.map(|u| u.1))
                    .value(),
            );
        }
        if active {
            first_active_ms.get_or_insert(t_ms);
            if let Ok(u) = &util {
                gpu_active.push(u.gpu as f64);
                active_t_ms.push(t_ms);
            }
        }
        line.put("procs", Value::Arr(plist));
        if !quiet {
            line.emit();
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }

    let per_pid: Vec<Value> = pids
        .iter()
        .map(|(pid, p)| {
            let mut st = p.stamps.clone();
            st.sort_unstable();
            let gaps: Vec<f64> = st.windows(2).map(|w| (w[1] - w[0]) as f64 / 1e3).collect();
            Line::obj()
                .set("pid", *pid)
                .set("sm_mean", stats::mean(&p.sm))
                .set("sm_p95", stats::percentile(&p.sm, 95.0))
                .set("sm_samples", p.sm.len())
                .set("nvml_sample_period_ms", stats::median(&gaps))
                .set("used_max_bytes", p.used_max)
                .set("intervals_seen", p.intervals_seen)
                .value()
        })
        .collect();
    let mut s = Line::new("sampler_summary");
    s.put("seconds", seconds);
    s.put("interval_ms", interval.as_millis() as u64);
    s.put("intervals", gpu_all.len());
    s.put("intervals_active", gpu_active.len());
    s.put("gpu_util_mean", stats::mean(&gpu_active));
    s.put("gpu_util_p95", stats::percentile(&gpu_active, 95.0));
    s.put("gpu_util_mean_all", stats::mean(&gpu_all));
    if let Some(t) = target {
        let abs: Vec<f64> = gpu_active.iter().map(|x| (x - t).abs()).collect();
        s.put("target", t);
        s.put("gpu_util_mae", stats::mean(&abs));
        let window = (1000 / interval.as_millis().max(1)) as usize;
        let settle = settle_index(&gpu_active, t, 5.0, window)
            .and_then(|i| Some((active_t_ms.get(i)? - first_active_ms?) / 1e3));
        s.put("settle_s", settle);
    }
    s.put("nvml_errors", errors);
    s.put("pids", Value::Arr(per_pid));
    s.emit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_once_the_rolling_mean_stays_in_band() {
        let mut v = vec![100.0; 5];
        v.extend(std::iter::repeat_n(30.0, 20));
        // Window 3: the first all-30 window starts at index 5; a window with one 100 and two
        // 30s (mean 53) is out of band.
        assert_eq!(settle_index(&v, 30.0, 5.0, 3), Some(5));
        assert_eq!(settle_index(&[30.0; 10], 30.0, 5.0, 3), Some(0));
        assert_eq!(settle_index(&[100.0; 10], 30.0, 5.0, 3), None);
        assert_eq!(settle_index(&[30.0], 30.0, 5.0, 3), None);
        // A late excursion moves the settle point past it.
        let mut w = vec![30.0; 10];
        w[8] = 90.0;
        assert_eq!(settle_index(&w, 30.0, 5.0, 1), Some(9));
    }
}
