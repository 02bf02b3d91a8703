//! The error log (standard error, optionally redirected into a file) and the
//! access log (one line per request). Both reopen their files on USR1, so a
//! renamed log keeps nothing open and a new file appears at the old path.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::Mutex;

use crate::config::LogTarget;

/// Writes one error-log line: time, pid, level, message.
pub fn write_line(level: &str, args: std::fmt::Arguments<'_>) {
    let now = httpdate::fmt_http_date(std::time::SystemTime::now());
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "[{now}] [{}] [{level}] {args}", std::process::id());
}

/// Logs an informational line to the error log.
#[macro_export]
macro_rules! log_info {
    ($($t:tt)*) => { $crate::write_line("INFO", format_args!($($t)*)) };
}

/// Logs a warning to the error log.
#[macro_export]
macro_rules! log_warn {
    ($($t:tt)*) => { $crate::write_line("WARNING", format_args!($($t)*)) };
}

/// Logs an error to the error log.
#[macro_export]
macro_rules! log_error {
    ($($t:tt)*) => { $crate::write_line("ERROR", format_args!($($t)*)) };
}

fn open_append(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Points standard error at the error log file (no-op for `-`). Called at
/// start and again on USR1.
///
/// # Errors
/// The file cannot be opened or dup2(2) fails.
pub fn open_errorlog(target: &LogTarget) -> io::Result<()> {
    if let LogTarget::File(path) = target {
        let file = open_append(path)?;
        nix::unistd::dup2_stderr(&file)?;
    }
    Ok(())
}

/// The access log of one worker process.
#[derive(Debug)]
pub struct AccessLog {
    target: LogTarget,
    file: Mutex<Option<File>>,
}

impl AccessLog {
    /// Opens the access log.
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub fn open(target: LogTarget) -> io::Result<AccessLog> {
        let file = match &target {
            LogTarget::Std => None,
            LogTarget::File(p) => Some(open_append(p)?),
        };
        Ok(AccessLog {
            target,
            file: Mutex::new(file),
        })
    }

    /// Reopens the file at its configured path (after log rotation).
    ///
    /// # Errors
    /// The file cannot be opened; the old handle is kept.
    pub fn reopen(&self) -> io::Result<()> {
        if let LogTarget::File(p) = &self.target {
            let new = open_append(p)?;
            *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
        }
        Ok(())
    }

    /// Appends one formatted line (the newline is added).
    pub fn write(&self, args: std::fmt::Arguments<'_>) {
        let mut line = Vec::with_capacity(160);
        let _ = line.write_fmt(args);
        line.push(b'\n');
        match &mut *self.file.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => {
                let _ = f.write_all(&line);
            }
            None => {
                let _ = io::stdout().lock().write_all(&line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_reopens_after_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(LogTarget::File(path.clone())).unwrap();
        log.write(format_args!("one"));
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.write(format_args!("two"));
        log.reopen().unwrap();
        log.write(format_args!("three"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }
}
