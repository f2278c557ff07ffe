//! Exposition formats: the Prometheus text format (through the `prometheus` crate's encoder)
//! and OpenMetrics text, chosen from the request's `Accept` header.

use std::fmt::Write as _;

use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{Encoder as _, TextEncoder};

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which text format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

/// Encoding failed (a family the encoder cannot represent).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode metric family {family}: {problem}")]
pub struct EncodeError {
    /// The family's name.
    pub family: String,
    /// What was wrong.
    pub problem: String,
}

impl Format {
    /// Choose from an `Accept` header: OpenMetrics when the client accepts
    /// `application/openmetrics-text` at least as much as the Prometheus text format (as
    /// Prometheus itself asks), the Prometheus text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let mut q_open = 0.0_f64;
        let mut q_text = 0.0_f64;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0_f64;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse::<f64>().unwrap_or(0.0).clamp(0.0, 1.0);
                    }
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => q_open = q_open.max(q),
                "text/plain" | "text/*" | "*/*" => q_text = q_text.max(q),
                _ => {}
            }
        }
        if q_open > 0.0 && q_open >= q_text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// Write `families` in `format`.
pub fn encode(families: &[MetricFamily], format: Format) -> Result<String, EncodeError> {
    match format {
        Format::Prometheus => {
            let mut buf = Vec::with_capacity(families.len() * 1024);
            TextEncoder::new()
                .encode(families, &mut buf)
                .map_err(|e| EncodeError {
                    family: "(text encoder)".into(),
                    problem: e.to_string(),
                })?;
            String::from_utf8(buf).map_err(|e| EncodeError {
                family: "(text encoder)".into(),
                problem: e.to_string(),
            })
        }
        Format::OpenMetrics => encode_openmetrics(families),
    }
}

/// OpenMetrics text: counters are named without `_total` with `_total` samples; gauges named
/// `*_info` whose samples are all 1 become `info` families; the text ends with `# EOF`.
fn encode_openmetrics(families: &[MetricFamily]) -> Result<String, EncodeError> {
    let mut out = String::with_capacity(families.len() * 1024);
    for mf in families {
        let name = mf.name();
        let metrics = mf.get_metric();
        let (family, kind, suffix) = match mf.get_field_type() {
            MetricType::COUNTER => (
                name.strip_suffix("_total").unwrap_or(name),
                "counter",
                "_total",
            ),
            MetricType::GAUGE
                if name.ends_with("_info")
                    && metrics.iter().all(|m| m.get_gauge().get_value() == 1.0) =>
            {
                (name.strip_suffix("_info").unwrap_or(name), "info", "_info")
            }
            MetricType::GAUGE => (name, "gauge", ""),
            other => {
                return Err(EncodeError {
                    family: name.to_string(),
                    problem: format!("{other:?} families are not supported by this encoder"),
                })
            }
        };
        let _ = writeln!(out, "# TYPE {family} {kind}");
        if !mf.help().is_empty() {
            let _ = writeln!(out, "# HELP {family} {}", escape(mf.help()));
        }
        for m in metrics {
            let value = match mf.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            };
            out.push_str(family);
            out.push_str(suffix);
            let labels = m.get_label();
            if !labels.is_empty() {
                out.push('{');
                for (i, lp) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(lp.name());
                    out.push_str("=\"");
                    out.push_str(&escape(lp.value()));
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            out.push_str(&number(value));
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    Ok(out)
}

fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return s.into();
    }
    let mut e = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => e.push_str("\\\\"),
            '"' => e.push_str("\\\""),
            '\n' => e.push_str("\\n"),
            c => e.push(c),
        }
    }
    e.into()
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::proto::{Counter, Gauge, LabelPair, Metric};

    fn family(name: &str, kind: MetricType, samples: &[(&[(&str, &str)], f64)]) -> MetricFamily {
        let mut mf = MetricFamily::default();
        mf.set_name(name.into());
        mf.set_help(format!("help of {name} with \"quotes\" and a \\ backslash"));
        mf.set_field_type(kind);
        for (labels, v) in samples {
            let mut m = Metric::from_label(
                labels
                    .iter()
                    .map(|(n, val)| {
                        let mut lp = LabelPair::default();
                        lp.set_name((*n).into());
                        lp.set_value((*val).into());
                        lp
                    })
                    .collect(),
            );
            if kind == MetricType::COUNTER {
                let mut c = Counter::default();
                c.set_value(*v);
                m.set_counter(c);
            } else {
                let mut g = Gauge::default();
                g.set_value(*v);
                m.set_gauge(g);
            }
            mf.mut_metric().push(m);
        }
        mf
    }

    #[test]
    fn prometheus_scrapers_get_openmetrics_and_others_get_text() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some("text/plain;q=1, application/openmetrics-text;q=0.5")),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text; q=0")),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("Application/OpenMetrics-Text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_ends_with_eof() {
        let fams = [
            family(
                "x_errors_total",
                MetricType::COUNTER,
                &[(&[("gpu", "gpu0")], 3.0)],
            ),
            family(
                "x_card_info",
                MetricType::GAUGE,
                &[(&[("model", "T4")], 1.0)],
            ),
            family(
                "x_used",
                MetricType::GAUGE,
                &[(&[("pod", "a\"b\\c\nd")], 0.3)],
            ),
        ];
        let text = encode(&fams, Format::OpenMetrics).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "# TYPE x_errors counter",
                "# HELP x_errors help of x_errors_total with \\\"quotes\\\" and a \\\\ backslash",
                "x_errors_total{gpu=\"gpu0\"} 3",
                "# TYPE x_card info",
                "# HELP x_card help of x_card_info with \\\"quotes\\\" and a \\\\ backslash",
                "x_card_info{model=\"T4\"} 1",
                "# TYPE x_used gauge",
                "# HELP x_used help of x_used with \\\"quotes\\\" and a \\\\ backslash",
                "x_used{pod=\"a\\\"b\\\\c\\nd\"} 0.3",
                "# EOF",
            ]
        );
    }

    #[test]
    fn an_info_gauge_with_a_value_other_than_one_stays_a_gauge() {
        let fams = [family("y_info", MetricType::GAUGE, &[(&[], 2.0)])];
        let text = encode(&fams, Format::OpenMetrics).unwrap_or_default();
        assert!(text.starts_with("# TYPE y_info gauge\n"), "{text}");
        assert!(text.contains("\ny_info 2\n"), "{text}");
    }

    #[test]
    fn prometheus_text_keeps_the_total_suffix_on_counter_families() {
        let fams = [family("x_errors_total", MetricType::COUNTER, &[(&[], 3.0)])];
        let text = encode(&fams, Format::Prometheus).unwrap_or_default();
        assert!(
            text.contains("# TYPE x_errors_total counter\nx_errors_total 3\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn special_values_are_written_the_openmetrics_way() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(5120.0), "5120");
    }
}
