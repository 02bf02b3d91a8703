use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::settings::ENV_NOT_SETTINGS;
use super::*;
use crate::store::catalogue::DEFAULT_DURATION_BUCKETS;

pub(super) fn flags(args: &[&str]) -> Result<RawSettings, clap::Error> {
    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        s: RawSettings,
    }
    let mut v = vec!["x"];
    v.extend_from_slice(args);
    <P as clap::Parser>::try_parse_from(v).map(|p| p.s)
}

fn load_flags(args: &[&str]) -> Result<Config, ConfigError> {
    Config::load(flags(args).unwrap(), None, vec![])
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gpe.toml");
    std::fs::write(&f, text).unwrap();
    (dir, f)
}

#[test]
fn defaults() {
    let c = Config::load(RawSettings::default(), None, vec![]).unwrap();
    assert_eq!(
        c.binds,
        vec![BindAddr::Tcp("127.0.0.1:8000".parse().unwrap())]
    );
    assert_eq!(c.workers, 2);
    assert_eq!(c.worker, "sync");
    assert_eq!(c.threads, 4);
    assert_eq!(c.worker_connections, 1000);
    assert_eq!(c.max_requests, 0);
    assert_eq!(c.timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.graceful_timeout, Duration::from_secs(30));
    assert_eq!(c.keepalive, Duration::from_secs(2));
    assert_eq!(c.header_timeout, Duration::from_secs(10));
    assert_eq!(c.backlog, 2048);
    assert_eq!(c.limit_request_line, 4094);
    assert_eq!(c.limit_request_fields, 100);
    assert_eq!(c.limit_request_field_size, 8190);
    assert_eq!(c.max_body_size, 10 << 20);
    assert!(!c.reuse_port);
    assert!(c.idle_yield);
    assert_eq!(c.pidfile, None);
    assert_eq!(c.accesslog, None);
    assert_eq!(c.errorlog, LogTarget::Std);
    assert_eq!(c.unmatched_route, "unmatched");
    assert!(c.metrics);
    assert_eq!(c.metrics_bind.to_string(), "127.0.0.1:9091");
    assert_eq!(c.metrics_path, "/metrics");
    assert_eq!(c.metrics_dir, None);
    assert_eq!(c.metrics_max_connections, 64);
    assert_eq!(c.histogram_buckets, DEFAULT_DURATION_BUCKETS.to_vec());
    assert_eq!(c.metrics_max_series, 1000);
    assert_eq!(c.metrics_store_series, 16_384);
    assert_eq!(c.limit_request_head, 65_536);
    assert_eq!(c.max_head_bytes(), 65_536);
    let mut small = c.clone();
    small.limit_request_fields = 2;
    small.limit_request_field_size = 100;
    small.limit_request_line = 100;
    assert_eq!(small.max_head_bytes(), 8192);
    small.limit_request_fields = 10;
    small.limit_request_field_size = 1000;
    assert_eq!(small.max_head_bytes(), 10_122);
}

#[test]
fn the_store_must_hold_every_family_full() {
    // 6 × 100 + 4 × 2 = 608 series fit in 1024; 6 × 170 + 8 = 1028 do not.
    let c = load_flags(&[
        "--metrics-store-series",
        "1024",
        "--metrics-max-series",
        "100",
    ])
    .unwrap();
    assert_eq!((c.metrics_store_series, c.metrics_max_series), (1024, 100));
    let err = load_flags(&[
        "--metrics-store-series",
        "1024",
        "--metrics-max-series",
        "170",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("metrics_max_series"), "{err}");
    assert!(
        err.contains("at most 169 with `metrics_store_series` = 1024 and `workers` = 2"),
        "{err}"
    );
    // Each worker adds 4 series (one per per-slot family, the duration
    // histogram included): 6 × 165 + 4 × 10 = 1030 do not fit in 1024.
    let err = load_flags(&[
        "--metrics-store-series",
        "1024",
        "--metrics-max-series",
        "165",
        "--workers",
        "10",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "at most 164 with `metrics_store_series` = 1024 and `workers` = 10 (the store \
             must hold 6 families of it plus 4 series per worker)"
        ),
        "{err}"
    );
    let err = load_flags(&["--metrics-store-series", "1024"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("metrics_max_series"), "{err}");
    let err = load_flags(&["--metrics-store-series", "63"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("metrics_store_series"), "{err}");
}

#[test]
fn the_table_is_consistent() {
    let mut names = BTreeSet::new();
    let mut shorts = BTreeSet::new();
    for s in SETTINGS {
        assert!(names.insert(s.name), "{} twice", s.name);
        assert_eq!(s.env, format!("GPE_{}", s.name.to_ascii_uppercase()));
        assert!(!ENV_NOT_SETTINGS.contains(&s.env));
        if let Some(c) = s.flag.and_then(|f| f.short) {
            assert!(shorts.insert(c), "-{c} twice");
            assert!(!['c', 'h', 'V'].contains(&c), "-{c} is taken by gpe serve");
        }
        if let Kind::Int { min, max } = s.kind {
            assert!(min <= max, "{}", s.name);
        }
        assert!(
            !s.doc.ends_with('.'),
            "{}: one line without a full stop",
            s.name
        );
    }
}

#[test]
fn new_settings_come_from_every_source_and_are_checked() {
    let c = load_flags(&[
        "--unmatched-route",
        "path",
        "--header-timeout",
        "3",
        "--metrics-max-connections",
        "5",
    ])
    .unwrap();
    assert_eq!(c.unmatched_route, "path");
    assert_eq!(c.header_timeout, Duration::from_secs(3));
    assert_eq!(c.metrics_max_connections, 5);
    let e = env(&[("GPE_HEADER_TIMEOUT", "0")]);
    let err = Config::load(RawSettings::default(), None, e).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid value \"0\" for setting `header_timeout`: expected 1..=3600"
    );
    let err = load_flags(&["--metrics-max-connections", "0"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid value \"0\" for setting `metrics_max_connections`: expected 1..=1000000"
    );
}

#[test]
fn idle_yield_comes_from_every_source_and_must_be_a_boolean() {
    assert!(!load_flags(&["--idle-yield", "false"]).unwrap().idle_yield);
    let e = env(&[("GPE_IDLE_YIELD", "false")]);
    assert!(
        !Config::load(RawSettings::default(), None, e)
            .unwrap()
            .idle_yield
    );
    let e = env(&[("GPE_IDLE_YIELD", "maybe")]);
    let err = Config::load(RawSettings::default(), None, e).unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable GPE_IDLE_YIELD: setting `idle_yield`: expected true or false, found \"maybe\""
    );
}

#[test]
fn file_then_env_then_flags() {
    let (_dir, f) = file("workers = 3\nthreads = 7\nbind = [\"127.0.0.1:1\"]\nmetrics = false\n");
    let e = env(&[
        ("GPE_THREADS", "9"),
        ("GPE_BIND", "127.0.0.1:2,unix:/tmp/s"),
        ("HOME", "/root"),
        ("GPE_LISTEN_FDS", "3"),
    ]);
    let c = Config::load(flags(&["-w", "5"]).unwrap(), Some(f.clone()), e).unwrap();
    assert_eq!(c.workers, 5);
    assert_eq!(c.threads, 9);
    assert!(!c.metrics);
    assert_eq!(c.config_file, Some(f));
    assert_eq!(
        c.binds,
        vec![
            BindAddr::Tcp("127.0.0.1:2".parse().unwrap()),
            BindAddr::Unix("/tmp/s".into())
        ]
    );
}

#[test]
fn bad_values_name_their_setting() {
    let e = load_flags(&["-w", "0"]).unwrap_err();
    assert!(e.to_string().contains("`workers`"), "{e}");
    let e = load_flags(&["--bind", "nonsense"]).unwrap_err();
    assert!(e.to_string().contains("`bind`"), "{e}");
    let e = load_flags(&["-k", "fibers"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid value \"fibers\" for setting `worker`: expected sync, thread, eventloop, greenlet"
    );
    let e = Config::load(
        RawSettings::default(),
        Some("/nonexistent/gpe.toml".into()),
        vec![],
    )
    .unwrap_err();
    assert!(e.to_string().contains("config file"), "{e}");
    let e = Config::load(
        RawSettings::default(),
        None,
        env(&[("GPE_WORKERS", "many")]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("GPE_WORKERS"), "{e}");
    let e = load_flags(&["--histogram-buckets", "1,0.5"]).unwrap_err();
    assert!(e.to_string().contains("`histogram_buckets`"), "{e}");
    let e = load_flags(&["--metrics-bind", "unix:/tmp/m"]).unwrap_err();
    assert!(e.to_string().contains("`metrics_bind`"), "{e}");
    let e = flags(&["--timeout", "abc"]).err().unwrap();
    assert!(e.to_string().contains("--timeout"), "{e}");
}

#[test]
fn an_empty_bind_list_is_refused_not_defaulted() {
    let (_dir, f) = file("bind = []\n");
    let e = Config::load(RawSettings::default(), Some(f), vec![]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid value \"[]\" for setting `bind`: expected one or more addresses: \
         HOST:PORT, [IPV6]:PORT or unix:PATH"
    );
    let e = Config::load(RawSettings::default(), None, env(&[("GPE_BIND", "")])).unwrap_err();
    assert!(e.to_string().contains("`bind`"), "{e}");
}

#[test]
fn metrics_path_must_be_a_plain_path() {
    for bad in [
        "/a b", "metrics", "", "/healthz", "/readyz", "/a\tb", "/a\u{7f}",
    ] {
        let e = load_flags(&["--metrics-path", bad]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "invalid value {bad:?} for setting `metrics_path`: expected a path starting \
                 with / other than /healthz and /readyz, without blanks or control characters"
            )
        );
    }
    assert_eq!(
        load_flags(&["--metrics-path", "/m/x"])
            .unwrap()
            .metrics_path,
        "/m/x"
    );
    assert!(check("metrics_path", "/a b").is_err());
    assert!(check("metrics_path", "/ok").is_ok());
}

#[test]
fn file_errors_name_the_key() {
    let (_dir, f) = file("wokers = 3\n");
    let e = Config::load(RawSettings::default(), Some(f), vec![]).unwrap_err();
    assert!(e.to_string().contains("unknown setting `wokers`"), "{e}");
    let (_dir, f) = file("workers = \"many\"\n");
    let e = Config::load(RawSettings::default(), Some(f.clone()), vec![]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "config file {}: setting `workers`: expected a non-negative integer, found string",
            f.display()
        )
    );
    let (_dir, f) = file("timeout = -1\n");
    let e = Config::load(RawSettings::default(), Some(f), vec![]).unwrap_err();
    assert!(e.to_string().contains("setting `timeout`"), "{e}");
}

#[test]
fn unknown_gpe_variables_are_refused_except_the_upgrade_ones() {
    let e = Config::load(RawSettings::default(), None, env(&[("GPE_FOO", "1")])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment variable GPE_FOO: not a gpe setting (see docs/configuration.md)"
    );
    let ok = env(&[
        ("GPE_LISTEN_FDS", "3,4"),
        ("GPE_METRICS_FD", "5"),
        ("GPE_UPGRADE_FROM", "77"),
    ]);
    assert!(Config::load(RawSettings::default(), None, ok).is_ok());
}

#[test]
fn host_names_are_kept_for_bind_time() {
    let c = load_flags(&["-b", "localhost:8080", "--metrics-bind", "localhost:9"]).unwrap();
    let host = HostPort {
        host: "localhost".to_owned(),
        port: 8080,
    };
    assert_eq!(c.binds, vec![BindAddr::Host(host.clone())]);
    assert_eq!(c.binds[0].to_string(), "localhost:8080");
    assert_eq!(c.metrics_bind.to_string(), "localhost:9");
    // A name that cannot exist is a syntax error at once.
    let e = load_flags(&["-b", "no such host:80"]).unwrap_err();
    assert!(e.to_string().contains("`bind`"), "{e}");
    let e = load_flags(&["-b", "1.2.3.999:80"]).unwrap_err();
    assert!(e.to_string().contains("`bind`"), "{e}");
    // A well-formed name is not looked up until bound (`localhost` is in /etc/hosts).
    let local: SocketAddr = host.resolve().unwrap();
    assert_eq!(local.port(), 8080);
    assert!(local.ip().is_loopback(), "{local}");
}

#[test]
fn restart_only_settings_are_kept_and_named() {
    let old = load_flags(&["-w", "2"]).unwrap();
    let new = load_flags(&[
        "-w",
        "3",
        "-b",
        "127.0.0.1:1",
        "--metrics-max-connections",
        "9",
        "--header-timeout",
        "4",
        "--unmatched-route",
        "path",
    ])
    .unwrap();
    let (kept, names) = old.keep_restart_only(new);
    assert_eq!(names, vec!["bind", "metrics_max_connections"]);
    assert_eq!(kept.workers, 3);
    assert_eq!(kept.binds, old.binds);
    assert_eq!(kept.metrics_max_connections, 64);
    assert_eq!(kept.header_timeout, Duration::from_secs(4));
    assert_eq!(kept.unmatched_route, "path");
    let (same, names) = old.keep_restart_only(old.clone());
    assert!(names.is_empty());
    assert_eq!(same, old);
}

/// The cells of a markdown table row, split on `|` but not on `\|`.
fn cells(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.trim().trim_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                out.last_mut().unwrap().push('|');
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// The names in backticks in `text`.
fn ticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc.find(heading).unwrap_or_else(|| panic!("no {heading}"));
    let rest = &doc[start + heading.len()..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// docs/configuration.md documents exactly the table: every setting, with
/// its flag, environment variable, default and range, and the reload table
/// lists exactly the restart-only ones.
#[test]
fn the_docs_match_the_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let settings = section(&doc, "\n## Settings\n");
    let mut header = None;
    let mut documented = BTreeSet::new();
    let mut problems = Vec::new();
    for line in settings.lines().filter(|l| l.starts_with('|')) {
        let row = cells(line);
        if header.is_none() {
            assert_eq!(
                row,
                ["setting", "flag", "env", "default", "accepted", "meaning"]
            );
            header = Some(());
            continue;
        }
        if row[0].starts_with("---") {
            continue;
        }
        let name = row[0].trim_matches('`');
        documented.insert(name.to_owned());
        let Some(s) = setting(name) else {
            problems.push(format!("`{name}` is documented but not in the table"));
            continue;
        };
        let (flag, env, default, accepted) = (&row[1], &row[2], &row[3], &row[4]);
        if *env != format!("`{}`", s.env) {
            problems.push(format!("`{name}`: env {env}, table {}", s.env));
        }
        match s.default {
            Some(d)
                if default
                    .strip_prefix(&format!("`{d}`"))
                    .is_none_or(|rest| !(rest.is_empty() || rest.starts_with(" ("))) =>
            {
                problems.push(format!("`{name}`: default {default}, table `{d}`"))
            }
            None if !default.starts_with("none") => {
                problems.push(format!("`{name}`: default {default}, table none"))
            }
            _ => {}
        }
        match s.flag {
            Some(f) => {
                let long = format!("`--{}", name.replace('_', "-"));
                if !flag.contains(&long) {
                    problems.push(format!("`{name}`: flag {flag} lacks {long}`"));
                }
                if let Some(c) = f.short {
                    if !flag.starts_with(&format!("`-{c}`")) {
                        problems.push(format!("`{name}`: flag {flag} lacks `-{c}`"));
                    }
                }
            }
            None if flag.contains(&format!("--{}", name.replace('_', "-"))) => {
                problems.push(format!("`{name}` has no flag of its own, docs say {flag}"))
            }
            None => {}
        }
        let accepted_ok = match s.kind {
            Kind::Int { max: u64::MAX, .. } => accepted.starts_with("any `u64`"),
            Kind::Int { min, max } => accepted.starts_with(&format!("`{min}..={max}`")),
            Kind::Choice(words) => ticked(accepted) == words,
            Kind::Bool => accepted == "boolean",
            _ => true,
        };
        if !accepted_ok {
            problems.push(format!("`{name}`: accepted {accepted}, table {:?}", s.kind));
        }
    }
    for s in SETTINGS {
        if !documented.contains(s.name) {
            problems.push(format!("`{}` is not documented", s.name));
        }
    }
    // The reload table: applied by a reload | needs a restart.
    let reload = section(&doc, "\n## Reload (HUP)\n");
    let (mut applied, mut kept) = (BTreeSet::new(), BTreeSet::new());
    for line in reload.lines().filter(|l| l.starts_with("| `")) {
        let row = cells(line);
        applied.extend(
            ticked(&row[0])
                .into_iter()
                .filter_map(setting)
                .map(|s| s.name),
        );
        kept.extend(
            ticked(&row[1])
                .into_iter()
                .filter_map(setting)
                .map(|s| s.name),
        );
    }
    for s in SETTINGS {
        let (is, other) = if s.restart_only {
            (&kept, &applied)
        } else {
            (&applied, &kept)
        };
        if !is.contains(s.name) || other.contains(s.name) {
            let want = if s.restart_only { "restart" } else { "reload" };
            problems.push(format!(
                "`{}`: the reload table should list it under {want}",
                s.name
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md:\n{}",
        problems.join("\n")
    );
}

#[test]
fn app_metrics_tables_are_read_and_checked_naming_the_key() {
    let raw = RawSettings::from_toml(
        "f",
        "[app_metrics.app_depth]\ngauge = \"max\"\n[app_metrics.app_value]\nbuckets = [1, 2.5]\n",
    )
    .unwrap();
    let c = Config::resolve(raw, None).unwrap();
    assert_eq!(
        c.app_metrics["app_depth"].gauge,
        Some(crate::store::GaugeMode::Max)
    );
    assert_eq!(c.app_metrics["app_value"].buckets, Some(vec![1.0, 2.5]));
    for (text, needle) in [
        (
            "[app_metrics.a]\ngauge = \"avg\"\n",
            "`app_metrics.a.gauge`",
        ),
        (
            "[app_metrics.a]\nbuckets = [2, 1]\n",
            "`app_metrics.a.buckets`",
        ),
        (
            "[app_metrics.a]\nmode = 1\n",
            "`app_metrics.a.mode`: unknown key",
        ),
        (
            "[app_metrics.\"a-b\"]\ngauge = \"max\"\n",
            "[app_metrics.a-b]",
        ),
    ] {
        let e = RawSettings::from_toml("f", text).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let e = RawSettings::from_env(env(&[("GPE_APP_METRICS", "x")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config file"), "{e}");
    assert!(Config::resolve(RawSettings::default(), None)
        .unwrap()
        .app_metrics
        .is_empty());
}
