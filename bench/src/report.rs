//! Results: one record per scenario (and baseline), printed as a table, written as NDJSON,
//! and drawn as an SVG chart of Nexus against its baseline.

use serde_json::{json, Value};

use crate::procs::Usage;

/// One side of one run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Side {
    pub(crate) bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) server: Usage,
    pub(crate) client: Usage,
}

impl Side {
    pub(crate) fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    pub(crate) fn cpu_s_per_gb(&self) -> f64 {
        (self.server.cpu_s + self.client.cpu_s) / (self.bytes as f64 / 1e9)
    }
}

/// A scenario's runs: Nexus and, when there is one, its baseline, interleaved in pairs.
pub(crate) struct Record {
    pub(crate) scenario: String,
    pub(crate) baseline: Option<String>,
    pub(crate) pairs: Vec<(Side, Option<Side>)>,
    /// Anything else worth keeping (time to first byte, RSS samples, ...).
    pub(crate) extra: Value,
    /// Why it was skipped, or what to know about it.
    pub(crate) note: Option<String>,
}

/// The median (the upper one of an even count); NaN for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn stats(v: Vec<f64>) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"min": round(min), "median": round(median(v)), "max": round(max)})
}

fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

impl Record {
    pub(crate) fn skipped(scenario: &str, baseline: Option<&str>, why: String) -> Record {
        eprintln!("{scenario}: skipped: {why}");
        Record {
            scenario: scenario.into(),
            baseline: baseline.map(str::to_string),
            pairs: Vec::new(),
            extra: Value::Null,
            note: Some(why),
        }
    }

    fn nexus(&self) -> Vec<Side> {
        self.pairs.iter().map(|p| p.0).collect()
    }

    fn base(&self) -> Vec<Side> {
        self.pairs.iter().filter_map(|p| p.1).collect()
    }

    /// Nexus/baseline throughput, per pair with a baseline.
    fn ratios(&self) -> Vec<f64> {
        self.pairs
            .iter()
            .filter_map(|(n, b)| b.map(|b| n.gbps() / b.gbps()))
            .collect()
    }

    pub(crate) fn ratio(&self) -> f64 {
        median(self.ratios())
    }

    pub(crate) fn gbps(&self) -> f64 {
        median(self.nexus().iter().map(Side::gbps).collect())
    }

    pub(crate) fn baseline_gbps(&self) -> f64 {
        median(self.base().iter().map(Side::gbps).collect())
    }

    /// The NDJSON object.
    pub(crate) fn to_json(&self) -> Value {
        let nexus = self.nexus();
        let base = self.base();
        let med =
            |sides: &[Side], f: fn(&Side) -> f64| round(median(sides.iter().map(f).collect()));
        json!({
            "scenario": self.scenario,
            "bytes": nexus.first().map(|s| s.bytes),
            "seconds": med(&nexus, |s| s.seconds),
            "gbps": med(&nexus, Side::gbps),
            "cpu_s_per_gb": med(&nexus, Side::cpu_s_per_gb),
            "peak_rss_mib": {
                "server": med(&nexus, |s| s.server.peak_rss_mib),
                "client": med(&nexus, |s| s.client.peak_rss_mib),
            },
            "baseline": self.baseline,
            "baseline_gbps": med(&base, Side::gbps),
            "baseline_cpu_s_per_gb": med(&base, Side::cpu_s_per_gb),
            "baseline_peak_rss_mib": {
                "server": med(&base, |s| s.server.peak_rss_mib),
                "client": med(&base, |s| s.client.peak_rss_mib),
            },
            "ratio": round(self.ratio()),
            "runs": {
                "count": nexus.len(),
                "gbps": stats(nexus.iter().map(Side::gbps).collect()),
                "baseline_gbps": stats(base.iter().map(Side::gbps).collect()),
                "ratio": stats(self.ratios()),
            },
            "extra": self.extra,
            "note": self.note,
        })
    }
}

/// The human table.
pub(crate) fn table(records: &[Record]) -> String {
    let mut out = String::from(
        "| scenario | Nexus GB/s | baseline | baseline GB/s | ratio (median) | Nexus CPU s/GB | baseline CPU s/GB | Nexus peak RSS MiB (server/client) | note |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |x: f64, digits: usize| {
        if x.is_finite() {
            format!("{x:.digits$}")
        } else {
            "-".to_string()
        }
    };
    for r in records {
        let nexus = r.nexus();
        let base = r.base();
        let cpu = |sides: &[Side]| median(sides.iter().map(Side::cpu_s_per_gb).collect());
        let rss = |pick: fn(&Side) -> f64| median(nexus.iter().map(pick).collect());
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |\n",
            r.scenario,
            f(r.gbps(), 2),
            r.baseline.as_deref().unwrap_or("-"),
            f(r.baseline_gbps(), 2),
            f(r.ratio(), 2),
            f(cpu(&nexus), 3),
            f(cpu(&base), 3),
            f(rss(|s| s.server.peak_rss_mib), 0),
            f(rss(|s| s.client.peak_rss_mib), 0),
            r.note.as_deref().unwrap_or(""),
        ));
    }
    out
}

/// An SVG bar chart from NDJSON records: per scenario with a baseline, Nexus and baseline
/// GB/s side by side, labelled with the ratio.
pub(crate) fn chart(records: &[Value]) -> String {
    let rows: Vec<(String, f64, f64, f64)> = records
        .iter()
        .filter_map(|r| {
            let label = format!("{} vs {}", r["scenario"].as_str()?, r["baseline"].as_str()?);
            Some((
                label,
                r["gbps"].as_f64()?,
                r["baseline_gbps"].as_f64()?,
                r["ratio"].as_f64()?,
            ))
        })
        .collect();
    let (left, bar, gap, width) = (250.0, 14.0, 12.0, 760.0);
    let top = 40.0;
    let height = top + rows.len() as f64 * (2.0 * bar + gap) + 40.0;
    let max = rows
        .iter()
        .map(|r| r.1.max(r.2))
        .fold(1.0f64, f64::max)
        .ceil();
    let scale = (width - left - 80.0) / max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Throughput, GB/s (median of interleaved runs): \
         <tspan fill=\"#1f77b4\">Nexus</tspan> vs <tspan fill=\"#aaaaaa\">baseline</tspan></text>\n"
    );
    for (i, (label, nexus, base, ratio)) in rows.iter().enumerate() {
        let y = top + i as f64 * (2.0 * bar + gap);
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar}\" fill=\"#1f77b4\"/>\n\
             <rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"{bar}\" fill=\"#aaaaaa\"/>\n\
             <text x=\"{:.1}\" y=\"{}\">{nexus:.2} ({ratio:.2}x)</text>\n\
             <text x=\"{:.1}\" y=\"{}\">{base:.2}</text>\n",
            left - 6.0,
            y + bar + 4.0,
            escape(label),
            nexus * scale,
            y + bar,
            base * scale,
            left + nexus * scale + 4.0,
            y + bar - 3.0,
            left + base * scale + 4.0,
            y + 2.0 * bar - 3.0,
        ));
    }
    let axis_y = height - 25.0;
    svg.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{axis_y}\" x2=\"{:.1}\" y2=\"{axis_y}\" stroke=\"black\"/>\n",
        left + max * scale
    ));
    for tick in 0..=(max as u32) {
        let x = left + f64::from(tick) * scale;
        svg.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>\n",
            axis_y + 15.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(bytes: u64, seconds: f64, cpu: f64) -> Side {
        Side {
            bytes,
            seconds,
            server: Usage {
                cpu_s: cpu,
                peak_rss_mib: 10.0,
            },
            client: Usage {
                cpu_s: cpu,
                peak_rss_mib: 20.0,
            },
        }
    }

    #[test]
    fn ratio_is_the_median_of_the_pairs_and_the_json_has_every_field() {
        let record = Record {
            scenario: "single".into(),
            baseline: Some("iperf3".into()),
            pairs: vec![
                (
                    side(4_000_000_000, 1.0, 0.5),
                    Some(side(5_000_000_000, 1.0, 0.5)),
                ),
                (
                    side(3_000_000_000, 1.0, 0.5),
                    Some(side(6_000_000_000, 1.0, 0.5)),
                ),
                (
                    side(4_500_000_000, 1.0, 0.5),
                    Some(side(5_000_000_000, 1.0, 0.5)),
                ),
            ],
            extra: Value::Null,
            note: None,
        };
        let j = record.to_json();
        // Pair ratios 0.8, 0.5, 0.9: the median of the pairs, with min and max kept.
        assert_eq!(j["ratio"], json!(0.8));
        assert_eq!(j["runs"]["ratio"]["min"], json!(0.5));
        assert_eq!(j["runs"]["ratio"]["max"], json!(0.9));
        assert_eq!(j["gbps"], json!(4.0));
        assert_eq!(j["baseline_gbps"], json!(5.0));
        assert_eq!(j["cpu_s_per_gb"], json!(0.25));
        assert_eq!(j["peak_rss_mib"]["client"], json!(20.0));
        for key in [
            "scenario",
            "bytes",
            "seconds",
            "baseline",
            "baseline_cpu_s_per_gb",
        ] {
            assert!(!j[key].is_null(), "{key}");
        }
        let svg = chart(&[j]);
        assert!(
            svg.contains("single vs iperf3") && svg.contains("(0.80x)"),
            "{svg}"
        );
    }
}
