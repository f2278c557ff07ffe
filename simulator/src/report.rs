//! Metrics over replays: bucketing by arrived workload (fgd.md §1.5), aggregation over seeds,
//! and the outputs (text table, JSON object, per-step CSV, SVG plot).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;

use crate::policy::SimPolicy;
use crate::sim::{SeedRun, Step};

/// Largest arrived-workload bucket (percent of GPU capacity).
pub const MAX_X: usize = 130;

/// Arrived workload of a step, percent of GPU capacity.
pub fn arrived_pct(s: &Step, capacity_milli: u64) -> f64 {
    s.arrived_milli as f64 * 100.0 / capacity_milli as f64
}

/// GPU allocation ratio of a step, percent of GPU capacity.
pub fn alloc_pct(s: &Step, capacity_milli: u64) -> f64 {
    s.used_milli as f64 * 100.0 / capacity_milli as f64
}

/// Fragmentation of a step, percent of GPU capacity ("Frag / Total").
pub fn frag_pct(s: &Step, capacity_milli: u64) -> f64 {
    s.frag_milli * 100.0 / capacity_milli as f64
}

/// Bucket a per-step value by arrived workload, as the paper's analysis scripts do: for each
/// integer x = 0..=130, the mean over the steps whose arrived workload rounds (half to even) to
/// x; if there are none, the mean over the steps within x ± 1; `None` if still none.
pub fn bucket(
    steps: &[Step],
    capacity_milli: u64,
    value: impl Fn(&Step) -> f64,
) -> Vec<Option<f64>> {
    let mut sum = [0.0f64; MAX_X + 1];
    let mut count = [0usize; MAX_X + 1];
    let xs: Vec<f64> = steps
        .iter()
        .map(|s| arrived_pct(s, capacity_milli))
        .collect();
    for (s, &x) in steps.iter().zip(&xs) {
        let r = x.round_ties_even();
        if (0.0..=MAX_X as f64).contains(&r) {
            sum[r as usize] += value(s);
            count[r as usize] += 1;
        }
    }
    (0..=MAX_X)
        .map(|x| {
            if count[x] > 0 {
                return Some(sum[x] / count[x] as f64);
            }
            let near: Vec<f64> = steps
                .iter()
                .zip(&xs)
                .filter(|(_, &a)| (a - x as f64).abs() <= 1.0)
                .map(|(s, _)| value(s))
                .collect();
            (!near.is_empty()).then(|| near.iter().sum::<f64>() / near.len() as f64)
        })
        .collect()
}

/// Median of the finite values (NaN if none).
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Mean of the finite values (NaN if none).
pub fn mean(v: &[f64]) -> f64 {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The p-th percentile (0..=100, nearest rank) of integer samples.
pub fn percentile(samples: &[u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One policy's results over its seeds.
#[derive(Debug, Clone)]
pub struct PolicySummary {
    pub policy: SimPolicy,
    pub seeds: Vec<u64>,
    /// Per seed: allocation ratio (%) at 100 % and 130 % arrived (NaN when not reached).
    pub alloc_100: Vec<f64>,
    pub alloc_130: Vec<f64>,
    /// Per seed: fragmentation / capacity (%) at 100 % and 130 % arrived.
    pub frag_100: Vec<f64>,
    pub frag_130: Vec<f64>,
    /// Per seed: pods submitted and pods that could not be placed.
    pub pods: Vec<usize>,
    pub failed: Vec<usize>,
    /// Per seed: replay wall time in seconds.
    pub replay_secs: Vec<f64>,
    /// Decision latency over every pod of every seed, microseconds.
    pub decision_us_p50: f64,
    pub decision_us_p99: f64,
    /// Per seed: bucketed allocation ratio, x = 0..=130.
    pub alloc_series: Vec<Vec<Option<f64>>>,
    /// Per seed: bucketed fragmentation / capacity, x = 0..=130.
    pub frag_series: Vec<Vec<Option<f64>>>,
}

impl PolicySummary {
    /// Summarise the runs of one policy (all runs must be of that policy).
    pub fn from_runs(policy: SimPolicy, runs: &[SeedRun]) -> Self {
        let mut s = Self {
            policy,
            seeds: Vec::new(),
            alloc_100: Vec::new(),
            alloc_130: Vec::new(),
            frag_100: Vec::new(),
            frag_130: Vec::new(),
            pods: Vec::new(),
            failed: Vec::new(),
            replay_secs: Vec::new(),
            decision_us_p50: 0.0,
            decision_us_p99: 0.0,
            alloc_series: Vec::new(),
            frag_series: Vec::new(),
        };
        let mut all_ns = Vec::new();
        for r in runs {
            let cap = r.capacity_milli;
            let alloc = bucket(&r.steps, cap, |st| alloc_pct(st, cap));
            let frag = bucket(&r.steps, cap, |st| frag_pct(st, cap));
            s.seeds.push(r.seed);
            s.alloc_100.push(alloc[100].unwrap_or(f64::NAN));
            s.alloc_130.push(alloc[130].unwrap_or(f64::NAN));
            s.frag_100.push(frag[100].unwrap_or(f64::NAN));
            s.frag_130.push(frag[130].unwrap_or(f64::NAN));
            s.pods.push(r.steps.len());
            s.failed.push(r.failed());
            s.replay_secs.push(r.elapsed.as_secs_f64());
            s.alloc_series.push(alloc);
            s.frag_series.push(frag);
            all_ns.extend_from_slice(&r.decision_ns);
        }
        s.decision_us_p50 = percentile(&all_ns, 50.0) as f64 / 1000.0;
        s.decision_us_p99 = percentile(&all_ns, 99.0) as f64 / 1000.0;
        s
    }

    /// Median over seeds of the bucketed allocation ratio at each x.
    pub fn median_alloc_series(&self) -> Vec<Option<f64>> {
        median_series(&self.alloc_series)
    }

    /// The `--json` object.
    pub fn json(&self) -> JsonReport {
        JsonReport {
            policy: self.policy.name().to_string(),
            seeds: self.seeds.len(),
            alloc_ratio_at_100: Stat::of(&self.alloc_100),
            alloc_ratio_at_130: Stat::of(&self.alloc_130),
            decision_us_p50: round3(self.decision_us_p50),
            decision_us_p99: round3(self.decision_us_p99),
        }
    }
}

fn median_series(series: &[Vec<Option<f64>>]) -> Vec<Option<f64>> {
    (0..=MAX_X)
        .map(|x| {
            let v: Vec<f64> = series.iter().filter_map(|s| s[x]).collect();
            (!v.is_empty()).then(|| median(&v))
        })
        .collect()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Median and mean over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub mean: f64,
}

impl Stat {
    fn of(v: &[f64]) -> Self {
        Self {
            median: round3(median(v)),
            mean: round3(mean(v)),
        }
    }
}

/// The object `--json` prints (ratios in percent; NaN, when a bucket was never reached, prints
/// as `null`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonReport {
    pub policy: String,
    pub seeds: usize,
    pub alloc_ratio_at_100: Stat,
    pub alloc_ratio_at_130: Stat,
    pub decision_us_p50: f64,
    pub decision_us_p99: f64,
}

fn fmt_pct(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "n/a".into()
    }
}

/// The human-readable report: one row per policy.
pub fn text_table(summaries: &[PolicySummary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<15} {:>5}  {:>17}  {:>17}  {:>17}  {:>8}  {:>8}  {:>9}  {:>9}",
        "policy",
        "seeds",
        "alloc@100 med/avg",
        "alloc@130 med/avg",
        "frag@100 / @130",
        "failed",
        "p50 µs",
        "p99 µs",
        "s/seed"
    );
    for s in summaries {
        let failed: Vec<f64> = s.failed.iter().map(|&f| f as f64).collect();
        let _ = writeln!(
            out,
            "{:<15} {:>5}  {:>8} / {:>6}  {:>8} / {:>6}  {:>8} / {:>6}  {:>8.0}  {:>8.1}  {:>9.1}  {:>9.2}",
            s.policy.name(),
            s.seeds.len(),
            fmt_pct(median(&s.alloc_100)),
            fmt_pct(mean(&s.alloc_100)),
            fmt_pct(median(&s.alloc_130)),
            fmt_pct(mean(&s.alloc_130)),
            fmt_pct(median(&s.frag_100)),
            fmt_pct(median(&s.frag_130)),
            median(&failed),
            s.decision_us_p50,
            s.decision_us_p99,
            mean(&s.replay_secs),
        );
    }
    let _ = writeln!(
        out,
        "(alloc = GPU allocation ratio %, frag = fragmentation / capacity %, both bucketed at 100 % and 130 % arrived workload; failed = median pods not placed; p50/p99 = per-pod decision latency)"
    );
    out
}

/// Write the per-step CSV of every run.
pub fn write_steps_csv(path: &Path, runs: &[SeedRun]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        w,
        "policy,seed,step,pod,node,arrived_pct,alloc_pct,frag_pct,decision_us"
    )?;
    for r in runs {
        let cap = r.capacity_milli;
        for (i, s) in r.steps.iter().enumerate() {
            writeln!(
                w,
                "{},{},{},{},{},{:.4},{:.4},{:.4},{:.3}",
                r.policy,
                r.seed,
                i,
                s.pod,
                s.node.map(|n| n.to_string()).unwrap_or_default(),
                arrived_pct(s, cap),
                alloc_pct(s, cap),
                frag_pct(s, cap),
                r.decision_ns.get(i).copied().unwrap_or(0) as f64 / 1000.0
            )?;
        }
    }
    w.flush()
}

/// Write the bucketed series of every policy and seed.
pub fn write_buckets_csv(path: &Path, summaries: &[PolicySummary]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "policy,seed,arrived_pct,alloc_pct,frag_pct")?;
    let cell = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
    for s in summaries {
        for (k, seed) in s.seeds.iter().enumerate() {
            for x in 0..=MAX_X {
                writeln!(
                    w,
                    "{},{},{},{},{}",
                    s.policy,
                    seed,
                    x,
                    cell(s.alloc_series[k][x]),
                    cell(s.frag_series[k][x])
                )?;
            }
        }
    }
    w.flush()
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// An SVG plot of the median (over seeds) allocation ratio against arrived workload, one line
/// per policy, with the ideal `y = x` for reference.
pub fn svg_plot(summaries: &[PolicySummary], title: &str) -> String {
    let (w, h) = (900.0, 560.0);
    let (l, r, t, b) = (70.0, 190.0, 40.0, 55.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |x: f64| l + x / MAX_X as f64 * pw;
    let sy = |y: f64| t + (1.0 - y / 100.0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        l + pw / 2.0,
        escape(title)
    );
    for i in 0..=13 {
        let x = f64::from(i) * 10.0;
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#ddd"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
            sx(x),
            t,
            t + ph,
            t + ph + 16.0,
            x
        );
    }
    for i in 0..=10 {
        let y = f64::from(i) * 10.0;
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            l,
            sy(y),
            l + pw,
            l - 6.0,
            sy(y) + 4.0,
            y
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">arrived workload (% of GPU capacity)</text>"##,
        l + pw / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">GPU allocation ratio (%)</text>"##,
        t + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="4 4"/>"##,
        sx(0.0),
        sy(0.0),
        sx(100.0),
        sy(100.0)
    );
    for (k, sum) in summaries.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<String> = sum
            .median_alloc_series()
            .iter()
            .enumerate()
            .filter_map(|(x, v)| v.map(|y| format!("{:.1},{:.1}", sx(x as f64), sy(y))))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = t + 10.0 + k as f64 * 20.0;
        let at100 = median(&sum.alloc_100);
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{color}" stroke-width="3"/><text x="{3:.1}" y="{4:.1}">{5} ({6})</text>"#,
            l + pw + 12.0,
            ly,
            l + pw + 34.0,
            l + pw + 40.0,
            ly + 4.0,
            escape(sum.policy.name()),
            fmt_pct(at100)
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(arrived: u64, used: u64) -> Step {
        Step {
            pod: 0,
            placed: true,
            node: Some(0),
            arrived_milli: arrived,
            used_milli: used,
            frag_milli: 0.0,
        }
    }

    #[test]
    fn buckets_average_the_steps_that_round_to_each_percent() {
        // Capacity 1000 milli: 1 milli = 0.1 %.
        let steps = [
            step(995, 900),  // 99.5 % rounds (half to even) to 100
            step(1004, 950), // 100.4 % -> 100
            step(1005, 960), // 100.5 % -> 100 (half to even)
            step(1015, 970), // 101.5 % -> 102
        ];
        let b = bucket(&steps, 1000, |s| alloc_pct(s, 1000));
        assert_eq!(b[100], Some((90.0 + 95.0 + 96.0) / 3.0));
        assert_eq!(b[102], Some(97.0));
        // 101 has no step of its own: the steps within ±1 % (100.4, 100.5, 101.5) stand in.
        assert_eq!(b[101], Some((95.0 + 96.0 + 97.0) / 3.0));
        // 98 is within 1 of 99.5? No (1.5 away): nothing.
        assert_eq!(b[98], None);
        assert_eq!(b.len(), MAX_X + 1);
    }

    #[test]
    fn medians_means_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[f64::NAN]).is_nan());
        assert_eq!(mean(&[1.0, f64::NAN, 3.0]), 2.0);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
