//! Any text as a config file: it is read or refused naming the file, and
//! what is read resolves or is refused naming a setting; nothing panics.
#![no_main]

use gpe_core::{Config, RawSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match RawSettings::from_toml("config file f.toml", text) {
        Ok(raw) => {
            if let Err(e) = Config::resolve(raw, None) {
                assert!(e.to_string().contains('`'), "names no setting: {e}");
            }
        }
        Err(e) => assert!(e.to_string().starts_with("config file f.toml: "), "{e}"),
    }
});
