//! Facts about processes read from `/proc`: threads, resident memory, liveness.

/// Thread count of process `pid`.
pub fn threads_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Resident bytes of `pid` from `/proc/<pid>/statm`.
pub fn statm_rss(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some(pages * page)
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (up to `limit`) for `child` to exit; takes it out of the option when
/// it has, so that nothing kills it again later.
pub fn wait_child(
    child: &mut Option<std::process::Child>,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let c = child.as_mut()?;
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(st) = c.try_wait().unwrap() {
            *child = None;
            return Some(st);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// The parent pid and start time (clock ticks since boot) of `pid`, unless
/// it is gone or a zombie.
fn stat_of(pid: i32) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state, ppid, ... and starttime (field 22).
    let rest: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
    if rest.first() == Some(&"Z") {
        return None;
    }
    Some((rest.get(1)?.parse().ok()?, rest.get(19)?.parse().ok()?))
}

/// One process, known by its pid and its start time. The host is busy and
/// shared, so a pid read a moment ago may already name someone else's
/// process; [`Process::signal`] never signals such a stranger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    start: u64,
}

impl Process {
    /// `pid`, if it now lives.
    pub fn of(pid: i32) -> Option<Process> {
        stat_of(pid).map(|(_, start)| Process { pid, start })
    }

    /// `pid`, if it is now a live child of `parent`.
    pub fn child_of(parent: i32, pid: i32) -> Option<Process> {
        match stat_of(pid)? {
            (ppid, start) if ppid == parent => Some(Process { pid, start }),
            _ => None,
        }
    }

    /// Sends `sig` if this very process still lives; false otherwise. The
    /// signal goes through a pidfd opened before the start time is checked
    /// again, so a pid reused in between cannot be hit.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> bool {
        use nix::libc;
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
        // no memory is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        let Ok(fd) = i32::try_from(fd) else {
            return false;
        };
        if fd < 0 {
            return false;
        }
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if stat_of(self.pid).map(|(_, start)| start) != Some(self.start) {
            return false;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a valid pidfd, a signal number, no siginfo (null), no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0
    }
}

/// Sends `sig` to `pid` if it is a live child of `parent` (a server's
/// worker or exporter); false if it is not, or no longer.
pub fn signal_child(parent: i32, pid: i32, sig: nix::sys::signal::Signal) -> bool {
    Process::child_of(parent, pid).is_some_and(|p| p.signal(sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn only_the_process_itself_is_signalled() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert_eq!(Process::child_of(me + 1, pid), None, "not its parent");
        let p = Process::child_of(me, pid).expect("a child of this test");
        // A process with the same pid but another start time is a stranger.
        let stranger = Process {
            pid,
            start: p.start + 1,
        };
        assert!(!stranger.signal(Signal::SIGKILL));
        assert!(alive(pid));
        assert!(p.signal(Signal::SIGKILL));
        child.wait().unwrap();
        assert!(!p.signal(Signal::SIGKILL), "gone");
        assert!(!signal_child(me, pid, Signal::SIGKILL));
    }
}
