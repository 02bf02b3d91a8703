//! Request heads read by the sync worker before hyper sees the connection.
//!
//! The serving thread reads each waiting connection without blocking and
//! keeps what arrived. A head counts as complete when httparse says so; a
//! head that httparse refuses, one at the head budget (`max_head_bytes`), or
//! one cut by the client's FIN is handed over too, so that hyper gives the
//! answer it gives on every worker type (400, 431, or a counted disconnect).
//! hyper then reads the kept bytes first (`gpe_core::Rewind`).

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Instant;

use gpe_core::{Config, ConnectionGuard, Recorder, Stream};

/// Bytes read from a socket at a time.
const CHUNK: usize = 4096;
/// httparse's header slots, on the stack. A complete head with more fields
/// fails to parse here and so is handed to hyper, which applies
/// `limit_request_fields`.
const SLOTS: usize = 64;

/// What the head check needs, reused across connections.
#[derive(Debug)]
pub struct Head {
    /// The head budget: more is not read here.
    max: usize,
    /// What each read lands in: allocated and zeroed once, not per read.
    chunk: Box<[u8]>,
}

impl Head {
    /// The limits of `config`.
    pub fn new(config: &Config) -> Head {
        Head {
            max: config.max_head_bytes(),
            chunk: vec![0; CHUNK].into_boxed_slice(),
        }
    }

    /// Whether `buf` holds all a head needs, given that bytes from `new_from`
    /// on just arrived: the blank line that ends a head (looked for only in
    /// the new bytes, so that a trickled head costs linear time). After a
    /// first line that is not empty, that blank line ends the head for
    /// httparse, and so for hyper, whether the head parses or not (hyper
    /// answers a bad one). Only empty lines before the request line, which
    /// httparse skips (RFC 9112 §2.2), can hold a blank line ahead of the
    /// head: then a parse decides.
    fn complete(&self, buf: &[u8], new_from: usize) -> bool {
        if buf.len() >= self.max {
            return true;
        }
        let from = new_from.saturating_sub(3);
        let tail = &buf[from..];
        let ends = tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
        if !ends {
            return false;
        }
        if !buf.starts_with(b"\r") && !buf.starts_with(b"\n") {
            return true;
        }
        let mut slots = [const { MaybeUninit::uninit() }; SLOTS];
        !matches!(
            httparse::Request::new(&mut []).parse_with_uninit_headers(buf, &mut slots),
            Ok(httparse::Status::Partial)
        )
    }
}

/// What reading a waiting connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The head is not complete yet.
    More,
    /// Ready for hyper.
    Complete,
    /// Closed before a byte arrived, or failed: dropped without a word.
    Gone,
}

/// An accepted connection whose head is still arriving.
#[derive(Debug)]
pub struct Waiting {
    stream: Stream,
    peer: String,
    buf: Vec<u8>,
    /// When it was accepted: its head is due `header_timeout` later.
    pub since: Instant,
    /// Counts it in `gpe_worker_connections` while it waits.
    _open: ConnectionGuard,
}

impl Waiting {
    /// A connection just accepted (non-blocking, as `Listener::accept` gives it).
    pub fn new(stream: Stream, peer: String, recorder: Arc<Recorder>) -> Waiting {
        Waiting {
            stream,
            peer,
            buf: Vec::new(),
            since: Instant::now(),
            _open: ConnectionGuard::new(recorder),
        }
    }

    /// Reads what has arrived, up to the head budget.
    pub fn read(&mut self, head: &mut Head) -> Progress {
        loop {
            let room = head.max.saturating_sub(self.buf.len()).clamp(1, CHUNK);
            let chunk = &mut head.chunk[..room];
            let got = match &self.stream {
                Stream::Tcp(s) => (&*s).read(chunk),
                Stream::Unix(s) => (&*s).read(chunk),
            };
            match got {
                // The client's FIN: hyper answers what came before it (or
                // counts the cut head); nothing came: gone.
                Ok(0) if self.buf.is_empty() => return Progress::Gone,
                Ok(0) => return Progress::Complete,
                Ok(n) => {
                    let from = self.buf.len();
                    self.buf.extend_from_slice(&head.chunk[..n]);
                    if head.complete(&self.buf, from) {
                        return Progress::Complete;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::More,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Gone,
            }
        }
    }

    /// The stream, the peer and the bytes read so far, for hyper. The
    /// connection stops being counted here; `serve_io` counts it again.
    pub fn into_parts(self) -> (Stream, String, Vec<u8>) {
        (self.stream, self.peer, self.buf)
    }
}

impl AsFd for Waiting {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        Head {
            max: 8192,
            chunk: vec![0; CHUNK].into_boxed_slice(),
        }
    }

    #[test]
    fn a_head_is_complete_at_its_blank_line() {
        let h = head();
        let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..full.len() {
            assert!(!h.complete(&full[..cut], cut.saturating_sub(1)), "{cut}");
        }
        // Byte by byte, the last byte completes it.
        assert!(h.complete(full, full.len() - 1));
        assert!(h.complete(b"GET / HTTP/1.0\n\n", 0));
        // Empty lines before the request line do not end a head.
        assert!(!h.complete(b"\r\n\r\n", 0));
        assert!(!h.complete(b"\n\nGET / HTTP/1.1\r\n", 0));
        assert!(h.complete(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 0));
    }

    #[test]
    fn refused_and_oversized_heads_go_to_hyper() {
        let h = head();
        // More fields than httparse's slots: handed over whole, for hyper
        // to judge by `limit_request_fields`; not before its blank line.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for k in 0..SLOTS + 6 {
            many.extend_from_slice(format!("x-{k}: 1\r\n").as_bytes());
        }
        assert!(!h.complete(&many, 0));
        many.extend_from_slice(b"\r\n");
        assert!(h.complete(&many, 0));
        assert!(h.complete(b"\x01\x02 nonsense\r\n\r\n", 0));
        let big = vec![b'a'; 8192];
        assert!(h.complete(&big, 8000));
    }
}
