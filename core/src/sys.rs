//! The operating-system edge: fork, reaping with resource usage, and signal
//! delivery through a self-pipe. Every `unsafe` call of the master and the
//! worker bootstrap lives here.
//!
//! The signal handler is written by hand rather than taken from signal-hook:
//! signal-hook's registry is process-global state that a forked child inherits
//! and cannot reset to the default dispositions, while a pre-fork server must
//! hand each child clean defaults before it installs its own handlers.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

/// Write end of the current process' signal pipe, or -1.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Set by the handler after it has written to the pipe; cleared by
/// [`SignalPipe::drain`]. Lets a loop that is not polling the pipe check for
/// signals without a syscall.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    let saved = Errno::last_raw();
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local byte. A
        // full pipe (EAGAIN) drops the byte: the loop is awake already and will drain.
        unsafe {
            libc::write(fd, (&byte as *const u8).cast(), 1);
        }
        SIGNALLED.store(true, Ordering::Release);
    }
    Errno::set_raw(saved);
}

/// Signals delivered to this process, queued in a non-blocking pipe by a
/// handler that only writes one byte (the signal number).
#[derive(Debug)]
pub struct SignalPipe {
    read: OwnedFd,
    write: OwnedFd,
    signals: Vec<Signal>,
}

impl SignalPipe {
    /// Installs handlers for `signals`. Only one pipe may be installed per
    /// process at a time.
    ///
    /// # Errors
    /// Creating the pipe or installing a handler failed.
    pub fn install(signals: &[Signal]) -> io::Result<SignalPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        PIPE_WRITE.store(write.as_raw_fd(), Ordering::Relaxed);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for &sig in signals {
            // SAFETY: `on_signal` is async-signal-safe: it loads an atomic, calls
            // write(2) and saves/restores errno.
            unsafe { sigaction(sig, &action) }?;
        }
        let mut set = SigSet::empty();
        for &sig in signals {
            set.add(sig);
        }
        set.thread_unblock()?;
        Ok(SignalPipe {
            read,
            write,
            signals: signals.to_vec(),
        })
    }

    /// The read end, for poll(2) or an async reactor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Signals received since the last call, in arrival order.
    pub fn drain(&self) -> Vec<Signal> {
        // Cleared before reading: a signal that lands meanwhile sets it again,
        // so none is missed by [`SignalPipe::drain_if_signalled`].
        SIGNALLED.store(false, Ordering::Release);
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match nix::unistd::read(&self.read, &mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend(
                    buf[..n]
                        .iter()
                        .filter_map(|b| Signal::try_from(i32::from(*b)).ok()),
                ),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        out
    }

    /// Like [`SignalPipe::drain`], but without a syscall when no signal has
    /// arrived since the last drain.
    pub fn drain_if_signalled(&self) -> Vec<Signal> {
        if SIGNALLED.load(Ordering::Acquire) {
            self.drain()
        } else {
            Vec::new()
        }
    }

    /// Waits until a signal arrives or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
    }

    /// Restores default dispositions for this pipe's signals and closes it. A
    /// forked child calls this before installing handlers of its own.
    pub fn reset(self) {
        reset_dispositions(&self.signals);
        PIPE_WRITE.store(-1, Ordering::Relaxed);
        drop(self.write);
        drop(self.read);
    }
}

/// Blocks `signals` for the calling thread and returns the previous mask, to
/// be restored with [`restore_mask`]. The master forks with its signals
/// blocked, so a signal sent to a new child before it has reset its handlers
/// stays pending instead of running the master's handler in the child.
///
/// # Errors
/// pthread_sigmask(3) failed.
pub fn block(signals: &[Signal]) -> io::Result<SigSet> {
    let mut set = SigSet::empty();
    for &sig in signals {
        set.add(sig);
    }
    Ok(set.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)?)
}

/// Restores a signal mask saved by [`block`].
pub fn restore_mask(mask: &SigSet) {
    let _ = mask.thread_set_mask();
}

/// Sets `signals` back to their default action.
fn reset_dispositions(signals: &[Signal]) {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for &sig in signals {
        // SAFETY: installing SIG_DFL has no handler code to be unsafe about.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
}

extern "C" fn on_abort(_sig: libc::c_int) {
    // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(1) }
}

/// Makes SIGABRT (the master's heartbeat-timeout signal) end this process
/// with exit code 1 at once, without a core dump, as Gunicorn's workers do.
///
/// # Errors
/// sigaction(2) failed.
pub fn exit_on_abort() -> io::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_abort),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: `on_abort` only calls the async-signal-safe _exit(2).
    unsafe { sigaction(Signal::SIGABRT, &action) }?;
    Ok(())
}

/// The result of [`fork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent, with the child's pid.
    Parent(Pid),
    /// In the child.
    Child,
}

/// Forks the process.
///
/// # Safety
/// The calling process must be single-threaded (the master always is), so the
/// child cannot inherit a lock held by another thread.
///
/// # Errors
/// fork(2) failed (for example, process limit reached).
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: single-threaded per the caller's contract.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// exit(code).
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// A reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Its pid.
    pub pid: Pid,
    /// How it ended.
    pub ended: Ended,
    /// User + system CPU time it used, in nanoseconds.
    pub cpu_ns: u64,
}

/// Whether some child has exited and waits to be reaped (it is not reaped).
pub fn child_exited() -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    matches!(
        waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
        ),
        Ok(status) if status != WaitStatus::StillAlive
    )
}

/// Reaps one exited child without blocking; `Ok(None)` when none is ready.
///
/// # Errors
/// wait4(2) failed with something other than "no children".
pub fn reap_one() -> io::Result<Option<Reaped>> {
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed rusage is a valid value for the out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types.
    let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
    if pid == 0 {
        return Ok(None);
    }
    if pid < 0 {
        let err = Errno::last();
        return match err {
            Errno::ECHILD => Ok(None),
            Errno::EINTR => reap_one(),
            e => Err(e.into()),
        };
    }
    let ended = if libc::WIFEXITED(status) {
        Ended::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Ended::Signaled(libc::WTERMSIG(status))
    } else {
        // Stopped or continued: not an exit.
        return reap_one();
    };
    let tv = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000_000 + (t.tv_usec as u64) * 1_000;
    Ok(Some(Reaped {
        pid: Pid::from_raw(pid),
        ended,
        cpu_ns: tv(usage.ru_utime) + tv(usage.ru_stime),
    }))
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn send(pid: Pid, sig: Signal) {
    let _ = nix::sys::signal::kill(pid, sig);
}

/// Number of threads of this process, from `/proc/self/status`.
pub fn thread_count() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test drives the whole lifecycle so that no two tests of this binary
    // install process-wide handlers at once.
    #[test]
    fn signal_pipe_fork_and_reap() {
        let pipe = SignalPipe::install(&[Signal::SIGUSR2]).unwrap();
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        pipe.wait(Duration::from_secs(2));
        assert_eq!(pipe.drain(), vec![Signal::SIGUSR2, Signal::SIGUSR2]);
        // Drained: the cheap check finds nothing, then sees the next signal.
        assert_eq!(pipe.drain_if_signalled(), vec![]);
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        assert_eq!(pipe.drain_if_signalled(), vec![Signal::SIGUSR2]);
        assert_eq!(pipe.drain_if_signalled(), vec![]);
        pipe.reset();

        // SAFETY: the child only calls async-signal-safe functions before exiting.
        match unsafe { fork() }.unwrap() {
            Forked::Child => {
                if exit_on_abort().is_ok() {
                    let _ = nix::sys::signal::raise(Signal::SIGABRT);
                }
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(7) }
            }
            Forked::Parent(child) => {
                let reaped = loop {
                    if !child_exited() {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    if let Some(r) = reap_one().unwrap() {
                        break r;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                assert_eq!(reaped.pid, child);
                assert_eq!(reaped.ended, Ended::Exited(1), "SIGABRT exits with 1");
            }
        }
    }
}
