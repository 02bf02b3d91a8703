//! The pid file, as in Gunicorn: refused when it names a live process, written
//! atomically, removed when dropped (in the process that wrote it) only while
//! it still holds our pid.

use std::io;
use std::path::{Path, PathBuf};

/// A pid file this process wrote.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    pid: u32,
}

impl Pidfile {
    /// Writes our pid to `path`.
    ///
    /// # Errors
    /// `AlreadyExists` when the file names another live process; IO errors.
    pub fn create(path: &Path) -> io::Result<Pidfile> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let alive = pid > 0
                    && pid as u32 != std::process::id()
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if alive {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "pidfile {} names process {pid}, which is still running",
                            path.display()
                        ),
                    ));
                }
            }
        }
        let pid = std::process::id();
        let tmp = path.with_extension(format!("tmp.{pid}"));
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, path)?;
        Ok(Pidfile {
            path: path.to_owned(),
            pid,
        })
    }

    /// Moves the file to `to` (after a binary upgrade, `PIDFILE.2` becomes
    /// `PIDFILE` once the old master is gone).
    ///
    /// # Errors
    /// `to` names another live process, or the rename fails.
    pub fn promote(&mut self, to: &Path) -> io::Result<()> {
        let fresh = Pidfile::create(to)?;
        drop(std::mem::replace(self, fresh));
        Ok(())
    }

    /// Removes the file if it still holds our pid (and this is the process
    /// that wrote it, not a forked child).
    fn remove(&self) {
        if self.pid != std::process::id() {
            return;
        }
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            == Some(self.pid);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_live_pid_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpe.pid");
        // pid 1 is always alive.
        std::fs::write(&path, "1\n").unwrap();
        let err = Pidfile::create(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        // A stale pid is replaced.
        std::fs::write(&path, "999999999\n").unwrap();
        let p = Pidfile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // Someone else's content is left alone.
        std::fs::write(&path, "12345\n").unwrap();
        p.remove();
        assert!(path.exists());
        std::fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        drop(p);
        assert!(!path.exists());
        // Promoting moves the file.
        let mut p = Pidfile::create(&path).unwrap();
        let to = dir.path().join("final.pid");
        p.promote(&to).unwrap();
        assert!(!path.exists() && to.exists());
        drop(p);
        assert!(!to.exists());
    }
}
