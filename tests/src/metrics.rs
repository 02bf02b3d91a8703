//! Parsing a Prometheus scrape (text 0.0.4 or OpenMetrics) into samples, and
//! checking one with promtool.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// Parsed Prometheus text exposition (0.0.4 or OpenMetrics).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub types: Vec<(String, String)>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics {
            text: text.to_owned(),
            ..Metrics::default()
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    m.types.push((n.to_owned(), t.to_owned()));
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name_labels, value) = match line.rfind(' ') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => continue,
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            let (name, labels) = match name_labels.find('{') {
                Some(i) => (
                    &name_labels[..i],
                    parse_labels(&name_labels[i + 1..name_labels.len() - 1]),
                ),
                None => (name_labels, BTreeMap::new()),
            };
            m.samples.push((name.to_owned(), labels, value));
        }
        m
    }

    /// All samples of `name`.
    pub fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// Values of the samples of `name` whose labels include all of `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect()
    }

    /// Sum of every sample of `name` whose labels include all of `labels`
    /// (`&[]`: the whole family); 0 when none matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().sum()
    }

    /// The value of the one sample of `name` whose labels include all of
    /// `labels`.
    ///
    /// # Panics
    /// If no sample or more than one matches.
    pub fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.matching(name, labels)[..] {
            [v] => v,
            ref other => panic!(
                "{name}{labels:?}: expected exactly one sample, found {}: {other:?}",
                other.len()
            ),
        }
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let after = after.strip_prefix('"').unwrap_or(after);
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(match n {
                            'n' => '\n',
                            o => o,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(key, val);
        rest = &after[end..];
    }
    out
}

/// `promtool check metrics` on `text`; returns (success, output).
pub fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (Debian package `prometheus`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    const TEXT: &str = "\
# TYPE gpe_http_requests counter
gpe_http_requests_total{method=\"GET\",route=\"/\",status=\"200\"} 3
gpe_http_requests_total{method=\"GET\",route=\"/a \\\"b\\\"\",status=\"404\"} 2
gpe_http_requests_total{method=\"POST\",route=\"/\",status=\"200\"} 5
gpe_master_workers 2
";

    #[test]
    fn sum_adds_every_matching_sample() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.sum("gpe_http_requests_total", &[]), 10.0);
        assert_eq!(m.sum("gpe_http_requests_total", &[("method", "GET")]), 5.0);
        assert_eq!(m.sum("gpe_http_requests_total", &[("method", "PUT")]), 0.0);
        assert!(m.matching("gpe_nothing", &[]).is_empty());
    }

    #[test]
    fn one_returns_the_single_match() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.one("gpe_master_workers", &[]), 2.0);
        assert_eq!(
            m.one("gpe_http_requests_total", &[("route", "/a \"b\"")]),
            2.0
        );
        assert_eq!(
            m.one(
                "gpe_http_requests_total",
                &[("method", "POST"), ("route", "/")]
            ),
            5.0
        );
    }

    #[test]
    #[should_panic(expected = "expected exactly one sample, found 2")]
    fn one_refuses_two_matches() {
        Metrics::parse(TEXT).one("gpe_http_requests_total", &[("route", "/")]);
    }

    #[test]
    #[should_panic(expected = "expected exactly one sample, found 0")]
    fn one_refuses_no_match() {
        Metrics::parse(TEXT).one("gpe_http_requests_total", &[("status", "500")]);
    }
}
