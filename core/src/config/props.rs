//! Property tests: arbitrary input to the config file parser, the environment
//! reader, the flag setter and the address parsers never panics, and is either
//! accepted or refused with an error that names the setting (or the file).

use proptest::prelude::*;

use super::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any setting of the table.
fn a_setting() -> impl Strategy<Value = Setting> {
    proptest::sample::select(SETTINGS)
}

/// Values shaped like the real ones, and anything at all.
fn a_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        "[0-9a-z.:/\\[\\]-]{0,24}",
        "[0-9.,]{0,24}",
        any::<String>(),
    ]
}

fn names_the_setting(e: &ConfigError, s: &Setting) -> bool {
    e.to_string().contains(&format!("`{}`", s.name))
}

/// Resolving must either succeed or name `s`, the only setting given.
fn resolves_or_names(raw: RawSettings, s: &Setting) -> Result<(), TestCaseError> {
    if let Err(e) = Config::resolve(raw, None) {
        prop_assert!(names_the_setting(&e, s), "{e}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_config_file_text_parses_or_names_the_file(text in any::<String>()) {
        if let Err(e) = RawSettings::from_toml("config file f.toml", &text) {
            prop_assert!(e.to_string().starts_with("config file f.toml: "), "{e}");
        }
    }

    #[test]
    fn a_file_setting_is_read_or_refused_naming_it(s in a_setting(), v in a_value(), quote in any::<bool>()) {
        let text = if quote {
            format!("{} = {:?}\n", s.name, v)
        } else {
            format!("{} = {v}\n", s.name)
        };
        match RawSettings::from_toml("config file f.toml", &text) {
            Ok(raw) => resolves_or_names(raw, &s)?,
            Err(e) => {
                let msg = e.to_string();
                // A value that is not TOML fails in the TOML parser, which names the key's line.
                prop_assert!(msg.starts_with("config file f.toml: "), "{msg}");
            }
        }
    }

    #[test]
    fn an_environment_value_is_read_or_refused_naming_it(s in a_setting(), v in a_value()) {
        match RawSettings::from_env(vec![(s.env.to_owned(), v)]) {
            Ok(raw) => resolves_or_names(raw, &s)?,
            Err(e) => prop_assert!(e.to_string().contains(s.env), "{e}"),
        }
    }

    #[test]
    fn a_flag_value_is_read_or_refused_naming_it(s in a_setting(), v in a_value()) {
        let mut raw = RawSettings::default();
        match raw.set(s.name, &v) {
            Ok(()) => resolves_or_names(raw, &s)?,
            Err(e) => prop_assert!(names_the_setting(&e, &s), "{e}"),
        }
    }

    #[test]
    fn any_bind_address_parses_or_names_bind(text in prop_oneof![
        any::<String>(),
        "(unix:)?[a-z0-9.:\\[\\]%_-]{0,30}",
        "[a-z0-9.-]{1,20}:[0-9]{1,6}",
        "\\[[0-9a-f:]{0,20}\\]:[0-9]{1,6}",
    ]) {
        match BindAddr::parse("bind", &text) {
            Ok(addr) => {
                // What parses prints back to the same address.
                prop_assert_eq!(BindAddr::parse("bind", &addr.to_string()).ok(), Some(addr));
            }
            Err(e) => prop_assert!(e.to_string().contains("`bind`"), "{e}"),
        }
        match TcpAddr::parse("metrics_bind", &text) {
            Ok(addr) => {
                prop_assert_eq!(TcpAddr::parse("metrics_bind", &addr.to_string()).ok(), Some(addr));
            }
            Err(e) => prop_assert!(e.to_string().contains("`metrics_bind`"), "{e}"),
        }
    }
}
