//! The HTTP layer every worker shares: the app interface ([`app`]), bodies
//! ([`body`]), where the app runs ([`run`]), one request ([`instrument`]),
//! the header lines it checks, found in one walk (`head`), its head limits
//! ([`limits`]) and one connection ([`conn`]): its http/1
//! deadlines ([`deadline`]) and HTTP/2 ([`h2`]).

/// The methods of a hyper `Write` impl for a wrapper whose writes go
/// straight to its `io` field (the wrappers differ only in how they read).
macro_rules! write_through_io {
    () => {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }

        fn is_write_vectored(&self) -> bool {
            self.io.is_write_vectored()
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
        }
    };
}

pub mod app;
pub mod body;
pub mod conn;
pub mod deadline;
pub mod h2;
mod head;
pub mod instrument;
pub mod limits;
pub mod run;
