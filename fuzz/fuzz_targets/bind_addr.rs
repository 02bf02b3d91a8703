//! Any text as a `bind` or `metrics_bind` address: it parses to an address
//! that prints back to itself, or it is refused naming the setting.
#![no_main]

use gpe_core::{BindAddr, TcpAddr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match BindAddr::parse("bind", text) {
        Ok(addr) => assert_eq!(BindAddr::parse("bind", &addr.to_string()).ok(), Some(addr)),
        Err(e) => assert!(e.to_string().contains("`bind`"), "{e}"),
    }
    match TcpAddr::parse("metrics_bind", text) {
        Ok(addr) => assert_eq!(
            TcpAddr::parse("metrics_bind", &addr.to_string()).ok(),
            Some(addr)
        ),
        Err(e) => assert!(e.to_string().contains("`metrics_bind`"), "{e}"),
    }
});
