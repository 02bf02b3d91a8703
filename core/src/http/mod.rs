//! The HTTP layer every worker shares: the app interface ([`app`]), bodies
//! ([`body`]), where the app runs ([`run`]), one request ([`instrument`]),
//! its head limits ([`limits`]) and one connection ([`conn`]).

pub mod app;
pub mod body;
pub mod conn;
pub mod instrument;
pub mod limits;
pub mod run;
