//! `gpe top`: a live terminal view of a running server, read from its
//! `/metrics` URL or straight from its metrics directory.
//!
//! A reader thread fetches once a second (each fetch bounded by a timeout)
//! and hands each result over a channel; the screen thread redraws every
//! second and answers keys whatever the reader is doing, so a slow scrape
//! never freezes the screen.

mod expo;
mod source;
mod ui;
mod view;

use std::io::IsTerminal as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use nix::sys::signal::Signal;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use expo::Exposition;
use source::{Fetcher, Source, TlsFiles, DEFAULT_URL};
use ui::Screen;
use view::{Reading, View};

/// How often the screen is redrawn and the source read.
const TICK: Duration = Duration::from_secs(1);

/// How long one read of a URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// `gpe top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// Print one table (one line per worker slot) and exit, for scripts
    #[arg(long)]
    pub once: bool,
    /// PEM file of the CA(s) to trust for an https:// source
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,
    /// PEM client certificate (chain) for an https:// source that asks for one
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key of `--cert`
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// The server's metrics URL (`http[s]://[user:password@]host:port/path`)
    /// or its metrics directory
    #[arg(value_name = "URL | DIR", default_value = DEFAULT_URL)]
    pub source: String,
}

/// Runs `gpe top`.
///
/// # Errors
/// A source that cannot be parsed; with `--once`, a read that fails; without
/// it, a terminal that cannot be set up.
pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let source = Source::parse(&args.source).map_err(anyhow::Error::msg)?;
    let shown = source.shown();
    let tls = TlsFiles {
        cacert: args.cacert,
        cert: args.cert,
        key: args.key,
    };
    let fetcher = Fetcher::new(source, FETCH_TIMEOUT, &tls).map_err(anyhow::Error::msg)?;
    if args.once {
        let text = fetcher.fetch().map_err(anyhow::Error::msg)?;
        let reading = Reading {
            expo: Exposition::parse(&text),
            at: Instant::now(),
        };
        let table = view::once_table(&View::new(&reading, None));
        use std::io::Write as _;
        // A closed stdout (`gpe top --once | head -1`) is not an error.
        let _ = std::io::stdout().lock().write_all(table.as_bytes());
        return Ok(());
    }
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("gpe top needs a terminal; use `gpe top --once` in scripts");
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("gpe-top-reader".into())
        .spawn(move || loop {
            let started = Instant::now();
            let r = fetcher.fetch();
            if tx.send((r, Instant::now())).is_err() {
                return;
            }
            std::thread::sleep(TICK.saturating_sub(started.elapsed()));
        })
        .context("starting the reader thread")?;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let result = watch(&mut terminal, &rx, shown);
    ratatui::restore();
    result
}

/// The screen loop: until `q`.
fn watch(
    terminal: &mut ratatui::DefaultTerminal,
    rx: &mpsc::Receiver<(Result<String, String>, Instant)>,
    shown: String,
) -> anyhow::Result<()> {
    let mut screen = Screen {
        source: shown,
        ..Screen::default()
    };
    let mut last: Option<Reading> = None;
    let mut next_draw = Instant::now();
    let mut dirty = true;
    loop {
        while let Ok((r, at)) = rx.try_recv() {
            match r {
                Ok(text) => {
                    let now = Reading {
                        expo: Exposition::parse(&text),
                        at,
                    };
                    let v = View::new(&now, last.as_ref());
                    screen.local_master = v.local_master();
                    screen.view = Some(v);
                    screen.updated = Some(at);
                    screen.error = None;
                    last = Some(now);
                }
                Err(e) => screen.error = Some(e),
            }
            dirty = true;
        }
        if dirty || Instant::now() >= next_draw {
            terminal.draw(|f| ui::draw(f, &screen))?;
            next_draw = Instant::now() + TICK;
            dirty = false;
        }
        // Wake for a key, a new reading (checked every 100 ms) or the redraw.
        let wait = next_draw
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        if !event::poll(wait)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            dirty = true; // a resize
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let signal = match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Char('s') => {
                screen.sort = screen.sort.next();
                None
            }
            KeyCode::Char('+') => Some(Signal::SIGTTIN),
            KeyCode::Char('-') => Some(Signal::SIGTTOU),
            KeyCode::Char('r') => Some(Signal::SIGHUP),
            _ => None,
        };
        if let Some(sig) = signal {
            screen.note = Some(send(screen.local_master, sig));
        }
        dirty = true;
    }
}

/// Sends `sig` to the local master; says what happened.
fn send(master: Option<u32>, sig: Signal) -> String {
    let Some(pid) = master else {
        return format!("{sig}: no local master to signal");
    };
    let Ok(raw) = i32::try_from(pid) else {
        return format!("{sig}: pid {pid} out of range");
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), sig) {
        Ok(()) => format!(
            "sent {} to master {pid}",
            sig.as_str().trim_start_matches("SIG")
        ),
        Err(e) => format!("{sig} to master {pid} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_local_master_means_no_signal() {
        assert_eq!(
            send(None, Signal::SIGHUP),
            "SIGHUP: no local master to signal"
        );
        // WINCH is ignored by default: the test process lives on.
        let me = std::process::id();
        assert_eq!(
            send(Some(me), Signal::SIGWINCH),
            format!("sent WINCH to master {me}")
        );
    }
}
