//! A reader of the Prometheus text exposition (0.0.4) into flat samples.
//!
//! Written by hand because the one maintained crate for it,
//! `prometheus-parse`, matches label sets with `\{[^}]+\}` and so cannot read
//! a label value holding `}`, which every route template does
//! (`route="/users/{id}"`). This reader follows the format's escaping rules
//! (`\\`, `\"`, `\n` inside quoted values) and skips a line it cannot read
//! instead of failing the whole scrape.

/// One sample line: its name, its labels in order, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, with any `_total`, `_bucket`, `_sum` or `_count` suffix.
    pub name: String,
    /// Label names and values, in the order written.
    pub labels: Vec<(String, String)>,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of an exposition, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// The samples, comments and blank lines left out.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Reads `text`; lines that are not valid samples are skipped.
    pub fn parse(text: &str) -> Exposition {
        Exposition {
            samples: text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(parse_line)
                .collect(),
        }
    }

    /// The samples named `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the first sample named `name` without labels.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.named(name)
            .find(|s| s.labels.is_empty())
            .map(|s| s.value)
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        v => v.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim_start();
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    // The value, then an optional timestamp.
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `name="value",...}` and returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut Vec<(String, String)>) -> Option<&'a str> {
    loop {
        s = s.trim_start().trim_start_matches(',').trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some(rest);
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (i, '"') => break i + 1,
                (_, c) => value.push(c),
            }
        };
        out.push((key, value));
        s = &s[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_values_and_escapes() {
        let e = Exposition::parse(concat!(
            "# HELP x y\n",
            "# TYPE gpe_http_requests_total counter\n",
            "gpe_http_requests_total{method=\"GET\",route=\"/users/{id}\",status=\"200\"} 7\n",
            "odd{a=\"x \\\"q\\\" \\\\ \\n}\",b=\"\"} 1.5e3 1700000000\n",
            "\n",
            "gpe_master_workers 4\n",
            "inf{le=\"+Inf\"} +Inf\n",
            "broken{a=\"never closed} 1\n",
            "novalue\n",
        ));
        assert_eq!(e.samples.len(), 4);
        let r = &e.samples[0];
        assert_eq!(r.name, "gpe_http_requests_total");
        assert_eq!(r.label("route"), Some("/users/{id}"));
        assert_eq!(r.label("status"), Some("200"));
        assert_eq!(r.value, 7.0);
        assert_eq!(e.samples[1].label("a"), Some("x \"q\" \\ \n}"));
        assert_eq!(e.samples[1].label("b"), Some(""));
        assert_eq!(e.samples[1].value, 1500.0);
        assert_eq!(e.scalar("gpe_master_workers"), Some(4.0));
        assert_eq!(e.samples[3].value, f64::INFINITY);
        assert_eq!(e.scalar("missing"), None);
    }
}
