//! Drawing one screen of `gpe top` with ratatui.

use std::time::Instant;

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::view::{Slot, View};

/// The order of the worker rows; `s` cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// By slot number.
    #[default]
    Slot,
    /// Busiest first (requests per second).
    Rate,
    /// Most CPU first.
    Cpu,
    /// Largest resident memory first.
    Memory,
}

impl Sort {
    /// The next order.
    pub fn next(self) -> Sort {
        match self {
            Sort::Slot => Sort::Rate,
            Sort::Rate => Sort::Cpu,
            Sort::Cpu => Sort::Memory,
            Sort::Memory => Sort::Slot,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::Slot => "slot",
            Sort::Rate => "req/s",
            Sort::Cpu => "cpu",
            Sort::Memory => "rss",
        }
    }

    fn key(self, s: &Slot) -> f64 {
        match self {
            Sort::Slot => 0.0,
            Sort::Rate => s.rate.unwrap_or(0.0),
            Sort::Cpu => s.cpu_pct.unwrap_or(0.0),
            Sort::Memory => s.rss.unwrap_or(0.0),
        }
    }
}

/// What the screen shows besides the view.
#[derive(Debug, Default)]
pub struct Screen {
    /// The source as shown.
    pub source: String,
    /// The latest view, if a read has succeeded.
    pub view: Option<View>,
    /// When that read finished.
    pub updated: Option<Instant>,
    /// Why the latest read failed, if it did.
    pub error: Option<String>,
    /// The master's pid when it is local (keys may signal it).
    pub local_master: Option<u32>,
    /// The order of the worker rows.
    pub sort: Sort,
    /// What the last key did.
    pub note: Option<String>,
}

fn dash(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// `5.2M`-style bytes.
pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// `340µs`, `12.5ms`, `250ms`, `1.20s`, `12.3s`: at most six columns below
/// 1000 s.
pub fn seconds(s: f64) -> String {
    let us = s * 1e6;
    if us < 999.5 {
        format!("{us:.0}µs")
    } else if us < 99_950.0 {
        format!("{:.1}ms", s * 1e3)
    } else if us < 999_500.0 {
        format!("{:.0}ms", s * 1e3)
    } else if s < 9.995 {
        format!("{s:.2}s")
    } else {
        format!("{s:.1}s")
    }
}

/// Requests per second: `12.5`, and whole numbers from 100 on (`1234`), so
/// that five columns hold up to 99999.
fn per_second(r: f64) -> String {
    if r < 99.95 {
        format!("{r:.1}")
    } else {
        format!("{r:.0}")
    }
}

/// `45s`, `3m04s`, `2h05m`, `3d04h`.
pub fn uptime(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

fn counts(title: &str, items: &[(String, f64)]) -> Line<'static> {
    let mut spans = vec![Span::styled(
        format!("{title:<9}"),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    for (k, v) in items {
        let style = if *v > 0.0 {
            Style::new().fg(Color::Yellow)
        } else {
            Style::new()
        };
        spans.push(Span::styled(format!("{k} {v:.0}"), style));
        spans.push(Span::raw("  "));
    }
    Line::from(spans)
}

/// Draws `screen` on `f`.
pub fn draw(f: &mut Frame<'_>, screen: &Screen) {
    let empty = View::default();
    let v = screen.view.as_ref().unwrap_or(&empty);
    let mut slots: Vec<&Slot> = v.slots.iter().collect();
    if screen.sort != Sort::Slot {
        slots.sort_by(|a, b| screen.sort.key(b).total_cmp(&screen.sort.key(a)));
    }
    let rows = u16::try_from(slots.len()).unwrap_or(u16::MAX);
    let t = &v.total;
    let total = Line::from(vec![
        Span::styled("Total    ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "req/s {}  requests {:.0}  in-flight {}  errors {:.0} ({})  p50 {}  p99 {}",
            dash(t.rate, |x| format!("{x:.1}")),
            t.requests,
            dash(v.in_flight, |x| format!("{x:.0}")),
            t.errors,
            dash(t.error_ratio, pct),
            dash(t.p50, seconds),
            dash(t.p99, seconds),
        )),
    ]);
    let summary_lines = vec![
        total,
        counts("Restarts", &v.exits),
        counts("Signals", &v.signals),
    ];
    // Each line takes as many rows as it wraps to at this width.
    let width = usize::from(f.area().width.max(1));
    let summary_rows: usize = summary_lines
        .iter()
        .map(|l| l.width().max(1).div_ceil(width))
        .sum();
    let summary_rows = u16::try_from(summary_rows).unwrap_or(u16::MAX);
    let [head, status, workers, summary, routes, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(rows.saturating_add(2)),
        Constraint::Length(summary_rows.saturating_add(1)),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let master = match (v.master_pid, screen.local_master) {
        (_, Some(p)) => format!("master {p} (local)"),
        (Some(p), None) => format!("master {p} (not local: keys off)"),
        (None, None) => "master unknown (keys off)".to_owned(),
    };
    let workers_line = format!(
        "workers {}/{}",
        dash(v.workers, |x| format!("{x:.0}")),
        dash(v.desired, |x| format!("{x:.0}"))
    );
    let age = screen.updated.map_or_else(
        || "no reading yet".to_owned(),
        |t| format!("read {:.0}s ago", t.elapsed().as_secs_f64().floor()),
    );
    f.render_widget(
        Paragraph::new(format!(
            "gpe top  {}  {master}  {workers_line}  {age}",
            screen.source
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        head,
    );
    if let Some(e) = &screen.error {
        f.render_widget(
            Paragraph::new(format!("error: {e}")).style(Style::new().fg(Color::Red)),
            status,
        );
    }

    let header = Row::new([
        "SLOT", "PID", "STATE", "REQ/S", "P50", "P99", "REQUESTS", "INFL", "CONN", "RSS", "CPU%",
        "UPTIME",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body = slots.iter().map(|s| {
        let state = s.state.clone().unwrap_or_else(|| "gone".to_owned());
        let style = match state.as_str() {
            "busy" => Style::new().fg(Color::Green),
            "booting" | "draining" => Style::new().fg(Color::Yellow),
            "gone" => Style::new().fg(Color::DarkGray),
            _ => Style::new(),
        };
        Row::new([
            s.slot.to_string(),
            s.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            state,
            dash(s.rate, per_second),
            dash(s.p50, seconds),
            dash(s.p99, seconds),
            format!("{:.0}", s.requests),
            dash(s.in_flight, |x| format!("{x:.0}")),
            dash(s.connections, |x| format!("{x:.0}")),
            dash(s.rss, bytes),
            dash(s.cpu_pct, |x| format!("{x:.1}")),
            dash(s.uptime, uptime),
        ])
        .style(style)
    });
    // 80 columns with the spaces between: seven-digit pids, `draining`,
    // six-column durations, bytes and uptimes.
    let widths = [
        Constraint::Length(4),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(6),
    ];
    f.render_widget(
        Table::new(body, widths).header(header).block(
            Block::new()
                .borders(Borders::TOP)
                .title(format!(" Workers (sort: {}) ", screen.sort.label())),
        ),
        workers,
    );

    f.render_widget(
        Paragraph::new(summary_lines)
            .wrap(Wrap { trim: false })
            .block(Block::new().borders(Borders::TOP)),
        summary,
    );

    let header = Row::new(["ROUTE", "REQ/S", "REQUESTS", "ERRORS", "ERR%", "P50", "P99"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let body = v.routes.iter().map(|r| {
        let style = if r.error_ratio.is_some_and(|e| e > 0.0) {
            Style::new().fg(Color::Red)
        } else {
            Style::new()
        };
        Row::new([
            r.route.clone(),
            dash(r.rate, per_second),
            format!("{:.0}", r.requests),
            format!("{:.0}", r.errors),
            dash(r.error_ratio, pct),
            dash(r.p50, seconds),
            dash(r.p99, seconds),
        ])
        .style(style)
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(8),
    ];
    f.render_widget(
        Table::new(body, widths).header(header).block(
            Block::new()
                .borders(Borders::TOP)
                .title(" Routes (rates and latency over the last second) "),
        ),
        routes,
    );

    // The keys, shorter when there is a note to show beside them.
    let foot_text = match &screen.note {
        Some(n) => format!("s sort  +/- workers  r reload  q quit   {n}"),
        None => "s sort  +/- workers (TTIN/TTOU)  r reload (HUP)  q quit".to_owned(),
    };
    f.render_widget(
        Paragraph::new(foot_text).style(Style::new().add_modifier(Modifier::REVERSED)),
        foot,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_as_people_write_them() {
        assert_eq!(bytes(512.0), "512B");
        assert_eq!(bytes(5.5 * 1024.0 * 1024.0), "5.5M");
        assert_eq!(seconds(0.00034), "340µs");
        assert_eq!(seconds(0.0125), "12.5ms");
        assert_eq!(seconds(1.2), "1.20s");
        assert_eq!(seconds(0.0999), "99.9ms");
        assert_eq!(seconds(0.09996), "100ms");
        assert_eq!(seconds(0.9996), "1.00s");
        assert_eq!(seconds(12.34), "12.3s");
        assert_eq!(seconds(0.0009996), "1.0ms");
        assert_eq!(per_second(12.34), "12.3");
        assert_eq!(per_second(99.96), "100");
        assert_eq!(per_second(12345.6), "12346");
        assert_eq!(uptime(45.9), "45s");
        assert_eq!(uptime(184.0), "3m04s");
        assert_eq!(uptime(7500.0), "2h05m");
        assert_eq!(uptime(3.0 * 86400.0 + 4.0 * 3600.0), "3d04h");
    }

    #[test]
    fn an_80_column_screen_wraps_the_counts_instead_of_cutting_them() {
        use ratatui::backend::TestBackend;
        let names = |n: &[&str]| n.iter().map(|s| ((*s).to_owned(), 0.0)).collect();
        let view = View {
            exits: names(&[
                "crash",
                "timeout",
                "max_requests",
                "reload",
                "scale_down",
                "shutdown",
                "boot_error",
            ]),
            signals: names(&[
                "HUP", "USR1", "USR2", "CHLD", "TTIN", "TTOU", "TERM", "INT", "QUIT", "WINCH",
            ]),
            slots: vec![Slot {
                slot: 0,
                pid: Some(4_194_304),
                state: Some("draining".into()),
                rate: Some(1234.4),
                p50: Some(0.0015),
                p99: Some(0.25),
                requests: 12_345_678.0,
                in_flight: Some(12.0),
                connections: Some(1000.0),
                rss: Some(123.4 * 1024.0 * 1024.0),
                cpu_pct: Some(100.0),
                uptime: Some(23.0 * 3600.0 + 5.0 * 60.0),
                ..Slot::default()
            }],
            ..View::default()
        };
        let screen = Screen {
            source: "http://127.0.0.1:9091/metrics".into(),
            view: Some(view),
            ..Screen::default()
        };
        let mut t = ratatui::Terminal::new(TestBackend::new(80, 24)).unwrap();
        t.draw(|f| draw(f, &screen)).unwrap();
        let buf = t.backend().buffer();
        let text: String = (0..24)
            .map(|y| {
                let row: String = (0..80).map(|x| buf[(x, y)].symbol().to_owned()).collect();
                row + "\n"
            })
            .collect();
        // Every worker column at its full width: nothing cut at 80.
        for want in [
            "SLOT PID     STATE    REQ/S P50    P99    REQUESTS INFL CONN RSS    CPU%  UPTIME",
            "0    4194304 draining 1234  1.5ms  250ms  12345678 12   1000 123.4M 100.0 23h05m",
            "boot_error 0",
            "WINCH 0",
            "q quit",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }

    #[test]
    fn sort_cycles_through_every_order() {
        let mut s = Sort::default();
        let mut seen = vec![s];
        for _ in 0..3 {
            s = s.next();
            seen.push(s);
        }
        assert_eq!(seen, [Sort::Slot, Sort::Rate, Sort::Cpu, Sort::Memory]);
        assert_eq!(s.next(), Sort::Slot);
    }
}
