//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! a few families, no client library needed. One `# HELP` and `# TYPE` per
//! family, before its samples; label values and help text escaped as the
//! format says (`\\`, `\"`, `\n`).

use super::Histogram;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A text exposition being written, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Start a family: its `# HELP` and `# TYPE` lines. Its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family (`name` may carry a histogram's
    /// `_bucket`, `_sum` or `_count` suffix).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// A whole histogram family: cumulative `_bucket`s up to `+Inf`, then
    /// `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            self.sample(&bucket, &[("le", &number(*bound))], cumulative as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A sample value or bucket bound as the format spells it: Go's float
/// syntax, with `+Inf`, `-Inf` and `NaN`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escapes() {
        let mut e = Exposition::new();
        e.family("qlive_x", Kind::Gauge, "a \\ help\nline")
            .sample("qlive_x", &[], 1.0)
            .sample("qlive_x", &[("a", "q\"uo\\te\n"), ("b", "")], 0.25);
        assert_eq!(
            e.finish(),
            "# HELP qlive_x a \\\\ help\\nline\n# TYPE qlive_x gauge\nqlive_x 1\n\
             qlive_x{a=\"q\\\"uo\\\\te\\n\",b=\"\"} 0.25\n"
        );
    }

    #[test]
    fn histogram_is_cumulative_and_ends_at_inf() {
        let mut h = Histogram::new(&[0.01, 0.1]);
        for v in [0.005, 0.05, 0.05, 3.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.histogram("qlive_h_seconds", "h", &h);
        let text = e.finish();
        assert!(
            text.contains("qlive_h_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("qlive_h_seconds_bucket{le=\"0.1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("qlive_h_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("qlive_h_seconds_sum 3.105\n"), "{text}");
        assert!(text.contains("qlive_h_seconds_count 4\n"), "{text}");
    }

    #[test]
    fn numbers() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(0.0025), "0.0025");
        assert_eq!(number(1_700_000_000.0), "1700000000");
    }
}
