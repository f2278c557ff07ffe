//! openb trace files: the node list and a pod list (see `shared/data/openb/README.md`).
//!
//! Columns are found by name in the header, so column order does not matter and extra columns
//! (`qos`, `pod_phase`, the times) are ignored, as in the paper's simulator.
//!
//! | file | required columns | optional |
//! |---|---|---|
//! | nodes | `cpu_milli`, `memory_mib`, `gpu`, `model` | `sn` (name) |
//! | pods | `cpu_milli`, `memory_mib`, `num_gpu`, `gpu_milli` | `name`, `gpu_spec` |
//!
//! Mapping of a pod's GPU columns to our resource contract (DESIGN §1): `num_gpu` 0 is a
//! CPU-only pod (`gpu_milli` is then ignored, as the paper's converter does); `gpu_milli` 1000
//! is `num_gpu` whole cards (100 vcuda-core each); `gpu_milli` below 1000 is a share of one
//! card of `gpu_milli / 10` vcuda-core, so it must be a multiple of 10 and `num_gpu` must be 1.
//! `gpu_spec` is a `|`-separated list of allowed GPU models with
//! [`gm_core::annotations::ModelFilter`] semantics (for the openb model names, an exact,
//! case-insensitive match). The trace has no GPU memory: shares take no memory blocks.

use std::path::Path;

use gm_core::fgd::{Demand, TaskType, MAX_CARDS};
use gm_core::resources::CORES_PER_CARD;

/// One node of the node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceNode {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: u32,
    pub model: String,
}

/// One pod of a pod list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePod {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub demand: Demand,
    /// Allowed GPU models (empty = any).
    pub models: Vec<String>,
}

impl TracePod {
    /// GPU request in the trace's milli-GPU (1000 per card).
    pub fn gpu_milli(&self) -> u64 {
        self.demand.total_cores() * 10
    }

    /// The per-card milli-GPU (what the paper's tuning loop compares, see
    /// [`crate::sim::arrival_order`]).
    pub fn per_card_milli(&self) -> u64 {
        u64::from(self.demand.per_card()) * 10
    }

    /// The pod's FGD task type (CPU, GPU demand, models; no memory).
    pub fn task_type(&self) -> TaskType {
        TaskType::new(self.cpu_milli, self.demand, &self.models)
    }
}

/// A trace file that cannot be used: the file, the line (1 = header) and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read {path}: {problem}")]
    Read { path: String, problem: String },
    #[error("{path}:{line}: {problem}")]
    Line {
        path: String,
        line: usize,
        problem: String,
    },
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
}

/// Read and parse the node list.
pub fn read_nodes(path: &Path) -> Result<Vec<TraceNode>, TraceError> {
    let text = read(path)?;
    parse_nodes(&path.display().to_string(), &text)
}

/// Read and parse a pod list.
pub fn read_pods(path: &Path) -> Result<Vec<TracePod>, TraceError> {
    let text = read(path)?;
    parse_pods(&path.display().to_string(), &text)
}

fn read(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|e| TraceError::Read {
        path: path.display().to_string(),
        problem: e.to_string(),
    })
}

/// A parsed CSV: header columns and numbered rows.
struct Csv<'a> {
    path: &'a str,
    header: Vec<&'a str>,
    rows: Vec<(usize, Vec<&'a str>)>,
}

impl<'a> Csv<'a> {
    fn parse(path: &'a str, text: &'a str) -> Result<Self, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
        let (_, head) = lines.next().ok_or_else(|| TraceError::File {
            path: path.into(),
            problem: "the file is empty: expected a header line".into(),
        })?;
        let header: Vec<&str> = head.split(',').map(str::trim).collect();
        let mut rows = Vec::new();
        for (n, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            if line.contains('"') {
                return Err(TraceError::Line {
                    path: path.into(),
                    line: n,
                    problem: "quoted fields are not supported: use plain comma-separated values"
                        .into(),
                });
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != header.len() {
                return Err(TraceError::Line {
                    path: path.into(),
                    line: n,
                    problem: format!(
                        "{} fields, but the header has {} columns",
                        fields.len(),
                        header.len()
                    ),
                });
            }
            rows.push((n, fields));
        }
        Ok(Self { path, header, rows })
    }

    fn column(&self, name: &str) -> Result<usize, TraceError> {
        self.optional(name).ok_or_else(|| TraceError::Line {
            path: self.path.into(),
            line: 1,
            problem: format!(
                "the header has no column {name:?} (columns: {})",
                self.header.join(",")
            ),
        })
    }

    fn optional(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| *h == name)
    }

    fn error(&self, line: usize, problem: String) -> TraceError {
        TraceError::Line {
            path: self.path.into(),
            line,
            problem,
        }
    }

    fn number(&self, line: usize, fields: &[&str], col: usize) -> Result<u64, TraceError> {
        let v = fields[col];
        v.parse::<u64>().map_err(|_| {
            self.error(
                line,
                format!(
                    "{} is {v:?}: expected a non-negative whole number",
                    self.header[col]
                ),
            )
        })
    }
}

/// Parse a node list (`path` is only used in error messages).
pub fn parse_nodes(path: &str, text: &str) -> Result<Vec<TraceNode>, TraceError> {
    let csv = Csv::parse(path, text)?;
    let name = csv.optional("sn");
    let cpu = csv.column("cpu_milli")?;
    let mem = csv.column("memory_mib")?;
    let gpu = csv.column("gpu")?;
    let model = csv.column("model")?;
    let mut out = Vec::with_capacity(csv.rows.len());
    for (line, f) in &csv.rows {
        let gpus = csv.number(*line, f, gpu)?;
        if gpus > MAX_CARDS as u64 {
            return Err(csv.error(
                *line,
                format!("gpu is {gpus}: at most {MAX_CARDS} GPUs per node are supported"),
            ));
        }
        let m = f[model].to_string();
        if gpus > 0 && m.is_empty() {
            return Err(csv.error(*line, "model is empty on a node with GPUs".into()));
        }
        out.push(TraceNode {
            name: name
                .map(|c| f[c].to_string())
                .unwrap_or_else(|| format!("node-{:05}", line - 1)),
            cpu_milli: csv.number(*line, f, cpu)?,
            memory_mib: csv.number(*line, f, mem)?,
            gpus: gpus as u32,
            model: m,
        });
    }
    if out.is_empty() {
        return Err(TraceError::File {
            path: path.into(),
            problem: "no nodes: the file has a header but no rows".into(),
        });
    }
    Ok(out)
}

/// Parse a pod list (`path` is only used in error messages).
pub fn parse_pods(path: &str, text: &str) -> Result<Vec<TracePod>, TraceError> {
    let csv = Csv::parse(path, text)?;
    let name = csv.optional("name");
    let cpu = csv.column("cpu_milli")?;
    let mem = csv.column("memory_mib")?;
    let num = csv.column("num_gpu")?;
    let milli = csv.column("gpu_milli")?;
    let spec = csv.optional("gpu_spec");
    let mut out = Vec::with_capacity(csv.rows.len());
    for (line, f) in &csv.rows {
        let gpus = csv.number(*line, f, num)?;
        let per = csv.number(*line, f, milli)?;
        let demand = if gpus == 0 {
            Demand::CpuOnly
        } else if gpus > MAX_CARDS as u64 {
            return Err(csv.error(
                *line,
                format!("num_gpu is {gpus}: at most {MAX_CARDS} GPUs per pod are supported"),
            ));
        } else if per == 1000 {
            Demand::Whole { cards: gpus as u32 }
        } else if per == 0 || per > 1000 {
            return Err(csv.error(
                *line,
                format!(
                    "gpu_milli is {per} with num_gpu {gpus}: use 10-990 for a share of one GPU or 1000 for whole GPUs"
                ),
            ));
        } else if gpus > 1 {
            return Err(csv.error(
                *line,
                format!(
                    "num_gpu {gpus} with gpu_milli {per}: a share (gpu_milli < 1000) uses exactly one GPU"
                ),
            ));
        } else if per % 10 != 0 {
            return Err(csv.error(
                *line,
                format!(
                    "gpu_milli is {per}: a share must be a multiple of 10 milli-GPU (1 vcuda-core = 1/{CORES_PER_CARD} GPU)"
                ),
            ));
        } else {
            Demand::Share {
                cores: (per / 10) as u32,
            }
        };
        let models: Vec<String> = spec
            .map(|c| {
                f[c].split('|')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.push(TracePod {
            name: name
                .map(|c| f[c].to_string())
                .unwrap_or_else(|| format!("pod-{:06}", line - 1)),
            cpu_milli: csv.number(*line, f, cpu)?,
            memory_mib: csv.number(*line, f, mem)?,
            demand,
            models,
        });
    }
    if out.is_empty() {
        return Err(TraceError::File {
            path: path.into(),
            problem: "no pods: the file has a header but no rows".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str =
        "sn,cpu_milli,memory_mib,gpu,model\nn0,96000,393216,8,G2\nn1,8000,32768,1,V100M16\n";

    #[test]
    fn nodes_parse_by_column_name() {
        let n = parse_nodes("nodes.csv", NODES).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].name, "n0");
        assert_eq!(
            (n[0].cpu_milli, n[0].gpus, n[0].model.as_str()),
            (96000, 8, "G2")
        );
        let reordered = "model,gpu,memory_mib,cpu_milli\nT4,2,1024,4000\n";
        let n = parse_nodes("x", reordered).unwrap();
        assert_eq!(
            (n[0].cpu_milli, n[0].gpus, n[0].model.as_str()),
            (4000, 2, "T4")
        );
    }

    #[test]
    fn pod_gpu_columns_map_to_shares_and_whole_cards() {
        let text = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos\n\
                    a,6000,12288,1,460,,LS\n\
                    b,12000,16384,2,1000,V100M16|V100M32,LS\n\
                    c,2000,0,0,0,,BE\n";
        let p = parse_pods("pods.csv", text).unwrap();
        assert_eq!(p[0].demand, Demand::Share { cores: 46 });
        assert_eq!(p[0].gpu_milli(), 460);
        assert_eq!(p[1].demand, Demand::Whole { cards: 2 });
        assert_eq!(p[1].models, vec!["V100M16", "V100M32"]);
        assert_eq!(p[1].gpu_milli(), 2000);
        assert_eq!(p[2].demand, Demand::CpuOnly);
        assert_eq!(p[2].memory_mib, 0);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_problem() {
        let head = "name,cpu_milli,memory_mib,num_gpu,gpu_milli\n";
        let cases = [
            ("a,1000,1,1,455\n", "pods.csv:2: gpu_milli is 455: a share must be a multiple of 10"),
            ("a,1000,1,2,500\n", "pods.csv:2: num_gpu 2 with gpu_milli 500: a share (gpu_milli < 1000) uses exactly one GPU"),
            ("a,1000,1,1,0\n", "pods.csv:2: gpu_milli is 0 with num_gpu 1: use 10-990"),
            ("a,1000,1,1,1500\n", "pods.csv:2: gpu_milli is 1500"),
            ("a,-5,1,0,0\n", "pods.csv:2: cpu_milli is \"-5\": expected a non-negative whole number"),
            ("a,1000,1,0\n", "pods.csv:2: 4 fields, but the header has 5 columns"),
            ("a,1000,1,0,0\nb,x,1,0,0\n", "pods.csv:3: cpu_milli is \"x\""),
        ];
        for (rows, want) in cases {
            let e = parse_pods("pods.csv", &format!("{head}{rows}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{e:?} does not start with {want:?}");
        }
        let e = parse_pods("pods.csv", "name,cpu_milli,num_gpu,gpu_milli\na,1,0,0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pods.csv:1: the header has no column \"memory_mib\""),
            "{e}"
        );
        let e = parse_pods("pods.csv", "").unwrap_err().to_string();
        assert_eq!(e, "pods.csv: the file is empty: expected a header line");
        let e = parse_nodes("nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\nn,1,1,2,\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "nodes.csv:2: model is empty on a node with GPUs");
        let e = read_pods(Path::new("/nonexistent/pods.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read /nonexistent/pods.csv:"), "{e}");
    }
}
