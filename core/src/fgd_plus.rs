//! `fgd+`: FGD with a packing tie-break (see `docs/simulator.md` for the method, the
//! experiments and the numbers).
//!
//! FGD ranks nodes by the fragmentation gradient Δ. Many nodes have (almost) the same Δ — every
//! node with a free card gives a whole-card pod the same Δ, every node whose cards are all taken
//! gives a CPU-only pod Δ = 0 — and the paper leaves those ties to kube-scheduler. `fgd+` ranks
//! by the gradient rounded to a granularity, then breaks ties by a packing rule, so pods that
//! FGD considers equivalent go where they leave the least behind:
//!
//! 1. primary key: `−round(Δ / granularity)` (Δ in vcuda-core); with
//!    [`Primary::Paper`] the paper's `trunc(100·sigmoid(−Δ/1000 milli))` instead;
//! 2. secondary key ([`Secondary`]): by default best fit — the least CPU and GPU left on the node
//!    after the placement, each normalised by the largest node spec;
//! 3. anything still equal is left to the caller (the simulator uses its node order).
//!
//! The card of a share is the one with the smallest exact gradient, as in FGD.

use std::fmt;
use std::str::FromStr;

use crate::fgd::{paper_score, CardPick, Demand, Fgd, Measure, NodeAccess};

/// How nodes are ranked first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Primary {
    /// `−round(Δ / granularity)`, Δ in vcuda-core (granularity > 0).
    Rounded { granularity: f64 },
    /// The paper's truncated sigmoid score.
    Paper,
}

/// How nodes with equal primary keys are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secondary {
    /// Leave ties to the caller.
    None,
    /// Least `½·cpu_left/max_cpu + ½·gpu_left/max_gpu` after the placement.
    BestFit,
    /// Least idle GPU capacity left on the node after the placement.
    GpuLeft,
    /// Least idle share of the node's GPU capacity after the placement (fullest node).
    GpuFraction,
}

/// Knobs of `fgd+`; [`PlusConfig::default`] is the published policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlusConfig {
    /// Fragmentation measure of the gradient.
    pub measure: Measure,
    pub primary: Primary,
    pub secondary: Secondary,
    /// Largest node CPU, milli-cores (best-fit normaliser).
    pub max_cpu_milli: u64,
    /// Largest node GPU capacity, vcuda-core (best-fit normaliser).
    pub max_gpu_cores: u64,
}

impl Default for PlusConfig {
    fn default() -> Self {
        Self {
            measure: Measure::Copies,
            primary: Primary::Rounded { granularity: 10.0 },
            secondary: Secondary::None,
            max_cpu_milli: 128_000,
            max_gpu_cores: 800,
        }
    }
}

/// A `fgd+` configuration string that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fgd+ setting {0:?}: use comma-separated key=value with measure=copies|paper, primary=paper or primary=<granularity in vcuda-core, > 0>, secondary=best-fit|gpu-left|gpu-fraction|none, max-cpu=<milli-cores>, max-gpu=<vcuda-core>")]
pub struct PlusConfigError(pub String);

impl FromStr for PlusConfig {
    type Err = PlusConfigError;
    /// `primary=4,secondary=best-fit,max-cpu=128000,max-gpu=800` (any subset; the rest default).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut c = PlusConfig::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let err = || PlusConfigError(part.to_string());
            let (k, v) = part.split_once('=').ok_or_else(err)?;
            let v = v.trim();
            match k.trim() {
                "measure" => {
                    c.measure = match v {
                        "paper" => Measure::Paper,
                        "copies" => Measure::Copies,
                        _ => return Err(err()),
                    }
                }
                "primary" if v == "paper" => c.primary = Primary::Paper,
                "primary" => {
                    let g: f64 = v.parse().map_err(|_| err())?;
                    if !(g.is_finite() && g > 0.0) {
                        return Err(err());
                    }
                    c.primary = Primary::Rounded { granularity: g };
                }
                "secondary" => {
                    c.secondary = match v {
                        "best-fit" => Secondary::BestFit,
                        "gpu-left" => Secondary::GpuLeft,
                        "gpu-fraction" => Secondary::GpuFraction,
                        "none" => Secondary::None,
                        _ => return Err(err()),
                    }
                }
                "max-cpu" => c.max_cpu_milli = v.parse().ok().filter(|&x| x > 0).ok_or_else(err)?,
                "max-gpu" => c.max_gpu_cores = v.parse().ok().filter(|&x| x > 0).ok_or_else(err)?,
                _ => return Err(err()),
            }
        }
        Ok(c)
    }
}

impl fmt::Display for PlusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self.measure {
            Measure::Paper => "paper",
            Measure::Copies => "copies",
        };
        write!(f, "measure={m},")?;
        match self.primary {
            Primary::Paper => f.write_str("primary=paper")?,
            Primary::Rounded { granularity } => write!(f, "primary={granularity}")?,
        }
        let sec = match self.secondary {
            Secondary::None => "none",
            Secondary::BestFit => "best-fit",
            Secondary::GpuLeft => "gpu-left",
            Secondary::GpuFraction => "gpu-fraction",
        };
        write!(
            f,
            ",secondary={sec},max-cpu={},max-gpu={}",
            self.max_cpu_milli, self.max_gpu_cores
        )
    }
}

/// The `fgd+` policy over a compiled target workload.
#[derive(Debug, Clone)]
pub struct FgdPlus {
    fgd: Fgd,
    config: PlusConfig,
}

/// `fgd+`'s verdict on one node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlusChoice {
    /// Ranking key: higher is better; equal keys are equally good.
    pub key: i64,
    /// Fragmentation gradient, vcuda-core.
    pub delta: f64,
    /// Cards to use (bit i = card i).
    pub cards: u64,
}

/// Range of the secondary key.
const SECONDARY_SPAN: i64 = 1 << 24;

impl FgdPlus {
    pub fn new(fgd: Fgd) -> Self {
        Self::with_config(fgd, PlusConfig::default())
    }

    /// `fgd` is used with the measure of `config`.
    pub fn with_config(fgd: Fgd, config: PlusConfig) -> Self {
        Self {
            fgd: fgd.with_measure(config.measure),
            config,
        }
    }

    pub fn fgd(&self) -> &Fgd {
        &self.fgd
    }

    pub fn config(&self) -> PlusConfig {
        self.config
    }

    /// Score one node for a pod; `None` when it does not fit. Arguments as for
    /// [`Fgd::evaluate`]; `base` is the node's fragmentation under this policy's measure
    /// (`self.fgd().fragmentation(..)`).
    #[allow(clippy::too_many_arguments)]
    pub fn score(
        &self,
        access: &NodeAccess,
        cpu_free: u64,
        free: &[u32],
        base: f64,
        pod_cpu: u64,
        demand: Demand,
        eligible: u64,
    ) -> Option<PlusChoice> {
        let e = self.fgd.evaluate(
            access,
            cpu_free,
            free,
            base,
            pod_cpu,
            demand,
            eligible,
            CardPick::Exact,
        )?;
        let primary = match self.config.primary {
            Primary::Paper => paper_score(e.delta),
            Primary::Rounded { granularity } => -(e.delta / granularity).round() as i64,
        };
        let cpu_left = cpu_free.saturating_sub(pod_cpu) as f64;
        let gpu_left = (free.iter().map(|&x| u64::from(x)).sum::<u64>())
            .saturating_sub(demand.total_cores()) as f64;
        let c = &self.config;
        let leftover = match c.secondary {
            Secondary::None => 0.0,
            Secondary::BestFit => {
                0.5 * cpu_left / c.max_cpu_milli as f64 + 0.5 * gpu_left / c.max_gpu_cores as f64
            }
            Secondary::GpuLeft => gpu_left / c.max_gpu_cores as f64,
            Secondary::GpuFraction => {
                gpu_left / (free.len().max(1) as f64 * f64::from(crate::resources::CORES_PER_CARD))
            }
        };
        let secondary = ((1.0 - leftover.clamp(0.0, 1.0)) * (SECONDARY_SPAN - 1) as f64) as i64;
        Some(PlusChoice {
            key: primary
                .saturating_mul(SECONDARY_SPAN)
                .saturating_add(secondary),
            delta: e.delta,
            cards: e.cards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fgd::{TargetWorkload, TaskType};

    fn plus(config: PlusConfig) -> FgdPlus {
        let w = TargetWorkload::select(
            [
                (
                    TaskType::new(1000, Demand::Share { cores: 50 }, [""; 0]),
                    1.0,
                ),
                (
                    TaskType::new(4000, Demand::Whole { cards: 1 }, [""; 0]),
                    1.0,
                ),
            ],
            1.0,
        )
        .unwrap();
        FgdPlus::with_config(Fgd::new(w), config)
    }

    #[test]
    fn settings_parse_print_and_reject_nonsense() {
        let c: PlusConfig = "primary=paper,secondary=best-fit,measure=paper"
            .parse()
            .unwrap();
        assert_eq!(c.primary, Primary::Paper);
        assert_eq!(c.secondary, Secondary::BestFit);
        assert_eq!(c.measure, Measure::Paper);
        assert_eq!(c.to_string().parse::<PlusConfig>().unwrap(), c);
        assert_eq!("".parse::<PlusConfig>().unwrap(), PlusConfig::default());
        for bad in [
            "primary=0",
            "primary=x",
            "secondary=worst",
            "speed=1",
            "measure",
        ] {
            let e = bad.parse::<PlusConfig>().unwrap_err().to_string();
            assert!(e.contains("use comma-separated key=value"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_smaller_gradient_ranks_higher_and_ties_fall_to_the_secondary_key() {
        let p = plus(PlusConfig {
            measure: Measure::Paper,
            primary: Primary::Rounded { granularity: 10.0 },
            secondary: Secondary::BestFit,
            ..PlusConfig::default()
        });
        let acc = p.fgd().access_uniform("T4", 2);
        let share = Demand::Share { cores: 50 };
        let score = |cpu: u64, free: &[u32]| {
            let base = p.fgd().fragmentation(&acc, cpu, free);
            p.score(&acc, cpu, free, base, 1000, share, u64::MAX)
                .unwrap()
        };
        // Filling a half-used card beats opening a fresh one.
        let half = score(8000, &[50, 100]);
        let fresh = score(8000, &[100, 100]);
        assert!(half.delta < fresh.delta && half.key > fresh.key);
        assert_eq!(half.cards, 1);
        // Same gradient, less CPU left afterwards: best fit prefers it.
        let lean = score(5000, &[50, 100]);
        assert_eq!(lean.delta, half.delta);
        assert!(lean.key > half.key);
        // With no secondary key they tie.
        let p2 = plus(PlusConfig {
            secondary: Secondary::None,
            ..p.config()
        });
        let k = |cpu| {
            let base = p2.fgd().fragmentation(&acc, cpu, &[50, 100]);
            p2.score(&acc, cpu, &[50, 100], base, 1000, share, u64::MAX)
                .unwrap()
                .key
        };
        assert_eq!(k(5000), k(8000));
    }
}
