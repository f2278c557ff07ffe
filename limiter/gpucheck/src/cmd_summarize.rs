//! `summarize`: one verdict line from the JSON lines `run.sh` collected, found by their tags.
//!
//! Tags (set by `run.sh` through `--tag`): `info`, `routing_preload`, `mem_preload`,
//! `sampler_mem_preload`, `nvidia_smi_preload`, `share_{small,large}_{base,30}`,
//! `share_small_30_ptsz`, `sampler_<share tag>`, `tenant_30`, `tenant_70`,
//! `overhead_{none,100,30}`. Whatever is absent is listed under `"missing"`.

use crate::args::Args;
use crate::error::{Error, Result};
use crate::json::{parse, Line, Value};

#[derive(Debug)]
struct Lines(Vec<Value>);

impl Lines {
    fn find(&self, check: &str, tag: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|v| v.str("check") == Some(check) && v.str("tag") == Some(tag))
    }
    fn all(&self, check: &str, tag: &str) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|v| v.str("check") == Some(check) && v.str("tag") == Some(tag))
            .collect()
    }
}

/// Completions per second, steady state when available.
fn rate(v: &Value) -> Option<f64> {
    v.num("completions_per_s_steady")
        .or_else(|| v.num("completions_per_s"))
}

/// The per-PID entry of a sampler summary.
fn sampler_pid(s: &Value, pid: f64) -> Option<&Value> {
    s.arr("pids")?.iter().find(|p| p.num("pid") == Some(pid))
}

pub fn summarize(lines: &[Value], target: f64, tol: f64, max_added_ns: f64) -> Value {
    let l = Lines(lines.to_vec());
    let mut out = Line::new("summary");
    let mut missing: Vec<String> = Vec::new();
    let mut verdicts: Vec<bool> = Vec::new();
    let mut need = |name: &str, present: bool| {
        if !present {
            missing.push(name.to_string());
        }
        present
    };

    // Errors anywhere (string "error" fields).
    let errors: Vec<Value> = lines
        .iter()
        .filter_map(|v| {
            let e = v.str("error")?;
            Some(Value::Str(format!(
                "{}/{}: {e}",
                v.str("tag").unwrap_or("-"),
                v.str("check").unwrap_or("-")
            )))
        })
        .collect();
    out.put("errors", errors.len());

    // Routing.
    let routing: Vec<&Value> = l
        .all("routing", "routing_preload")
        .into_iter()
        .chain(l.all("routing_pair", "routing_preload"))
        .collect();
    if need("routing_preload", !routing.is_empty()) {
        let pass = routing.iter().all(|v| v.bool("pass") == Some(true));
        out.put("routing_pass", pass);
        verdicts.push(pass);
    }

    // Memory.
    let physical = l.find("info", "info").and_then(|v| v.num("physical_bytes"));
    out.put("physical_bytes", physical);
    if let Some(mi) = l.find("mem_info", "mem_preload") {
        let cap = mi.num("cap_bytes").unwrap_or(0.0);
        let expected = physical.map_or(cap, |p| cap.min(p));
        let pass = mi.num("meminfo_total_bytes") == Some(expected)
            && mi.num("device_total_bytes") == Some(expected)
            && mi
                .num("meminfo_free_bytes")
                .zip(mi.num("meminfo_total_bytes"))
                .is_some_and(|(f, t)| f <= t);
        out.put("mem_cap_bytes", cap);
        out.put("mem_expected_total_bytes", expected);
        out.put("mem_totals_pass", pass);
        out.put("mem_nvml_total_pass", mi.bool("nvml_total_pass"));
        verdicts.push(pass);
    } else {
        need("mem_info", false);
    }
    let caps = l.all("mem_cap", "mem_preload");
    if need("mem_cap", !caps.is_empty()) {
        let mut paths = Vec::new();
        for c in &caps {
            let pass = c.bool("pass") == Some(true);
            verdicts.push(pass);
            paths.push(Value::from(
                Line::obj()
                    .set("path", c.str("path"))
                    .set("obtained_bytes", c.num("obtained_bytes"))
                    .set("error", c.num("error"))
                    .set("pass", pass),
            ));
        }
        out.put("mem_paths", Value::Arr(paths));
        let pid = caps[0].num("pid");
        let cap = caps[0].num("cap_bytes").unwrap_or(0.0);
        let chunk = caps
            .iter()
            .filter_map(|c| c.num("chunk_bytes"))
            .fold(0.0, f64::max);
        match (l.find("sampler_summary", "sampler_mem_preload"), pid) {
            (Some(s), Some(pid)) => {
                let peak = sampler_pid(s, pid).and_then(|p| p.num("used_max_bytes"));
                out.put("mem_peak_nvml_bytes", peak);
                let pass = peak.is_some_and(|p| p <= cap + chunk);
                out.put("mem_peak_pass", pass);
                verdicts.push(pass);
            }
            _ => {
                need("sampler_mem_preload", false);
            }
        }
        if let Some(smi) = l.find("nvidia_smi", "nvidia_smi_preload") {
            let total = smi.num("total_mib").map(|m| m * 1048576.0);
            let expected = physical.map_or(cap, |p| cap.min(p));
            // nvidia-smi prints MiB, rounded down.
            let pass = total.is_some_and(|t| (expected - t).abs() < 1048576.0);
            out.put("nvidia_smi_total_bytes", total);
            out.put("nvidia_smi_pass", pass);
            verdicts.push(pass);
        } else {
            need("nvidia_smi_preload", false);
        }
    }

    // Compute share.
    for (name, limited, base) in [
        ("small", "share_small_30", "share_small_base"),
        ("large", "share_large_30", "share_large_base"),
        ("small_ptsz", "share_small_30_ptsz", "share_small_base"),
    ] {
        let (Some(lv), Some(bv)) = (l.find("share", limited), l.find("share", base)) else {
            need(limited, false);
            continue;
        };
        let ratio = rate(lv)
            .zip(rate(bv))
            .and_then(|(a, b)| (b > 0.0).then(|| a / b));
        let pass = ratio.is_some_and(|r| (r - target).abs() <= tol);
        out.put(&format!("share_{name}_ratio"), ratio);
        out.put(
            &format!("share_{name}_busy_fraction"),
            lv.num("busy_fraction"),
        );
        out.put(
            &format!("share_{name}_base_busy_fraction"),
            bv.num("busy_fraction"),
        );
        out.put(&format!("share_{name}_pass"), pass);
        verdicts.push(pass);
        if let Some(s) = l.find("sampler_summary", &format!("sampler_{limited}")) {
            out.put(
                &format!("share_{name}_nvml_gpu_util_mean"),
                s.num("gpu_util_mean"),
            );
            out.put(
                &format!("share_{name}_nvml_gpu_util_p95"),
                s.num("gpu_util_p95"),
            );
            out.put(
                &format!("share_{name}_nvml_gpu_util_mae"),
                s.num("gpu_util_mae"),
            );
            out.put(&format!("share_{name}_nvml_settle_s"), s.num("settle_s"));
            let sm = lv
                .num("pid")
                .and_then(|p| sampler_pid(s, p))
                .and_then(|p| p.num("sm_mean"));
            out.put(&format!("share_{name}_nvml_pid_sm_mean"), sm);
        }
    }

    // Two tenants, 30/70.
    match (l.find("share", "tenant_30"), l.find("share", "tenant_70")) {
        (Some(a), Some(b)) => {
            let (ra, rb) = (rate(a), rate(b));
            let frac = ra
                .zip(rb)
                .and_then(|(x, y)| (x + y > 0.0).then(|| x / (x + y)));
            let pass = frac.is_some_and(|f| (f - 0.30).abs() <= tol);
            out.put("tenants_fraction_30", frac);
            out.put("tenants_busy_30", a.num("busy_fraction"));
            out.put("tenants_busy_70", b.num("busy_fraction"));
            if let Some(s) = l.find("sampler_summary", "sampler_tenants") {
                let sm = |v: &Value| {
                    v.num("pid")
                        .and_then(|p| sampler_pid(s, p))
                        .and_then(|p| p.num("sm_mean"))
                };
                out.put("tenants_nvml_sm_mean_30", sm(a));
                out.put("tenants_nvml_sm_mean_70", sm(b));
                out.put("tenants_nvml_gpu_util_mean", s.num("gpu_util_mean"));
            }
            out.put("tenants_pass", pass);
            verdicts.push(pass);
        }
        _ => {
            need("tenants", false);
        }
    }

    // Launch overhead.
    if let Some(none) = l.find("overhead", "overhead_none") {
        for t in ["100", "30"] {
            let Some(v) = l.find("overhead", &format!("overhead_{t}")) else {
                need(&format!("overhead_{t}"), false);
                continue;
            };
            let added = v
                .num("launch_ns_p50")
                .zip(none.num("launch_ns_p50"))
                .map(|(a, b)| a - b);
            let added_alloc = v
                .num("alloc_free_ns_p50")
                .zip(none.num("alloc_free_ns_p50"))
                .map(|(a, b)| a - b);
            let pass = added.is_some_and(|a| a < max_added_ns);
            out.put(&format!("overhead_{t}_added_launch_ns_p50"), added);
            out.put(
                &format!("overhead_{t}_added_alloc_free_ns_p50"),
                added_alloc,
            );
            out.put(&format!("overhead_{t}_cuinit_ms"), v.num("cuinit_ms"));
            out.put(&format!("overhead_{t}_pass"), pass);
            verdicts.push(pass);
        }
        out.put("overhead_none_launch_ns_p50", none.num("launch_ns_p50"));
        out.put("overhead_none_cuinit_ms", none.num("cuinit_ms"));
    } else {
        need("overhead_none", false);
    }

    let pass = missing.is_empty() && !verdicts.is_empty() && verdicts.iter().all(|&v| v);
    out.put("missing", missing);
    out.put("error_list", Value::Arr(errors));
    out.put("pass", pass);
    out.value()
}

pub fn run(mut a: Args) -> Result<()> {
    let file = a.required("file")?;
    let target: f64 = a.num("target", 0.30)?;
    let tol: f64 = a.num("tolerance", 0.05)?;
    let max_added: f64 = a.num("max-added-ns", 1000.0)?;
    a.finish()?;
    let text =
        std::fs::read_to_string(&file).map_err(|e| Error::Other(format!("reading {file}: {e}")))?;
    // Lines that are not JSON objects (stray tool output) are skipped.
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|s| parse(s.trim()).ok())
        .filter(|v| matches!(v, Value::Obj(_)))
        .collect();
    let v = summarize(&lines, target, tol, max_added);
    let pass = v.bool("pass") == Some(true);
    println!("{}", v.to_json());
    if pass {
        Ok(())
    } else {
        Err(Error::Reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(check: &str, tag: &str, kv: &[(&str, Value)]) -> Value {
        let mut l = Line::obj().set("check", check).set("tag", tag);
        for (k, v) in kv {
            l.put(k, v.clone());
        }
        l.value()
    }

    fn n(x: f64) -> Value {
        Value::Num(x)
    }

    fn good_run() -> Vec<Value> {
        let gib = 1024.0 * 1048576.0;
        let pid_entry = Line::obj()
            .set("pid", 11u32)
            .set("used_max_bytes", 7.9 * gib)
            .set("sm_mean", 30.0)
            .value();
        vec![
            obj("info", "info", &[("physical_bytes", n(140.0 * gib))]),
            obj("routing", "routing_preload", &[("pass", Value::Bool(true))]),
            obj(
                "routing_pair",
                "routing_preload",
                &[("pass", Value::Bool(true))],
            ),
            obj(
                "mem_info",
                "mem_preload",
                &[
                    ("cap_bytes", n(8.0 * gib)),
                    ("meminfo_total_bytes", n(8.0 * gib)),
                    ("meminfo_free_bytes", n(7.0 * gib)),
                    ("device_total_bytes", n(8.0 * gib)),
                ],
            ),
            obj(
                "mem_cap",
                "mem_preload",
                &[
                    ("pid", n(11.0)),
                    ("path", "cuMemAlloc_v2".into()),
                    ("cap_bytes", n(8.0 * gib)),
                    ("chunk_bytes", n(0.25 * gib)),
                    ("obtained_bytes", n(7.5 * gib)),
                    ("error", n(2.0)),
                    ("pass", Value::Bool(true)),
                ],
            ),
            obj(
                "sampler_summary",
                "sampler_mem_preload",
                &[("pids", Value::Arr(vec![pid_entry]))],
            ),
            obj(
                "nvidia_smi",
                "nvidia_smi_preload",
                &[("total_mib", n(8192.0))],
            ),
            obj(
                "share",
                "share_small_base",
                &[("completions_per_s_steady", n(1000.0))],
            ),
            obj(
                "share",
                "share_small_30",
                &[("completions_per_s_steady", n(310.0))],
            ),
            obj(
                "share",
                "share_large_base",
                &[("completions_per_s_steady", n(5.0))],
            ),
            obj(
                "share",
                "share_large_30",
                &[("completions_per_s_steady", n(1.4))],
            ),
            obj(
                "share",
                "share_small_30_ptsz",
                &[("completions_per_s_steady", n(290.0))],
            ),
            obj(
                "share",
                "tenant_30",
                &[("completions_per_s_steady", n(300.0))],
            ),
            obj(
                "share",
                "tenant_70",
                &[("completions_per_s_steady", n(700.0))],
            ),
            obj(
                "overhead",
                "overhead_none",
                &[
                    ("launch_ns_p50", n(2000.0)),
                    ("alloc_free_ns_p50", n(5000.0)),
                ],
            ),
            obj(
                "overhead",
                "overhead_100",
                &[
                    ("launch_ns_p50", n(2100.0)),
                    ("alloc_free_ns_p50", n(5200.0)),
                ],
            ),
            obj(
                "overhead",
                "overhead_30",
                &[
                    ("launch_ns_p50", n(2500.0)),
                    ("alloc_free_ns_p50", n(5300.0)),
                ],
            ),
        ]
    }

    #[test]
    fn a_good_run_passes() {
        let v = summarize(&good_run(), 0.30, 0.05, 1000.0);
        assert_eq!(
            v.arr("missing").map(<[Value]>::len),
            Some(0),
            "{}",
            v.to_json()
        );
        assert_eq!(v.bool("pass"), Some(true), "{}", v.to_json());
        assert!((v.num("share_small_ratio").unwrap() - 0.31).abs() < 1e-9);
        assert!((v.num("tenants_fraction_30").unwrap() - 0.30).abs() < 1e-9);
        assert_eq!(v.num("overhead_30_added_launch_ns_p50"), Some(500.0));
    }

    #[test]
    fn a_missed_share_or_missing_step_fails() {
        let mut lines = good_run();
        lines[8] = obj(
            "share",
            "share_small_30",
            &[("completions_per_s_steady", n(600.0))],
        );
        let v = summarize(&lines, 0.30, 0.05, 1000.0);
        assert_eq!(v.bool("share_small_pass"), Some(false));
        assert_eq!(v.bool("pass"), Some(false));

        let lines: Vec<Value> = good_run()
            .into_iter()
            .filter(|v| v.str("tag") != Some("tenant_70"))
            .collect();
        let v = summarize(&lines, 0.30, 0.05, 1000.0);
        assert_eq!(v.bool("pass"), Some(false));
        assert!(v
            .arr("missing")
            .unwrap()
            .contains(&Value::Str("tenants".into())));
    }

    #[test]
    fn error_lines_are_listed() {
        let mut lines = good_run();
        lines.push(obj(
            "share",
            "share_large_30",
            &[("error", "cuInit failed: 100 (CUDA_ERROR_NO_DEVICE)".into())],
        ));
        let v = summarize(&lines, 0.30, 0.05, 1000.0);
        assert_eq!(v.num("errors"), Some(1.0));
    }
}
