use super::*;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

fn resolve(
    flags: &[(&'static str, &str)],
    defines: &[(&str, &str)],
    env_pairs: &[(&str, &str)],
    file: Option<&str>,
) -> Result<Values, BadValue> {
    let lookup = env(env_pairs);
    Values::resolve(&Sources {
        flags: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        defines: defines
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        env: Some(&lookup),
        file: file.map(|text| (PathBuf::from("nexus.properties"), text.to_string())),
    })
}

#[test]
fn environment_names_follow_the_rule() {
    assert_eq!(
        env_name("burst.nexus.server.port"),
        "BURST_NEXUS_SERVER_PORT"
    );
    for p in PROPERTIES {
        assert!(p.name.starts_with("burst.nexus."), "{}", p.name);
        assert_eq!(PROPERTIES.iter().filter(|q| q.name == p.name).count(), 1);
    }
}

#[test]
fn the_original_names_have_their_original_defaults() {
    let v = resolve(&[], &[], &[], None).unwrap();
    for (name, default) in [
        ("burst.nexus.client.pool.stale.ms", "3600000"),
        ("burst.nexus.client.cache.tender.ms", "600000"),
        ("burst.nexus.server.port", "1270"),
        ("burst.nexus.pipe.size", "100"),
        ("burst.nexus.stream.timeout.ms", "60000"),
        ("burst.nexus.stream.parcel.packer.concurrency", "2"),
    ] {
        assert_eq!(v.raw(name), Some((default, Origin::Default)), "{name}");
    }
    // Computed defaults: the number of cores.
    assert_eq!(v.raw("burst.nexus.client.threads"), None);
    assert_eq!(v.raw("burst.nexus.server.threads"), None);
}

#[test]
fn every_default_parses_as_its_type() {
    let v = resolve(&[], &[], &[], None).unwrap();
    for p in PROPERTIES.iter().filter(|p| !p.default.is_empty()) {
        let ok = match p.ty {
            Type::Integer => v.positive::<u64>(p.name).is_ok(),
            Type::Size => v.size(p.name).is_ok(),
            Type::Millis => v.millis(p.name).is_ok(),
            Type::Bool => v.parse::<bool>(p.name).is_ok(),
            Type::Address => v.parse::<std::net::IpAddr>(p.name).is_ok(),
            Type::SocketAddress => v.parse::<std::net::SocketAddr>(p.name).is_ok(),
            Type::Path | Type::Choice | Type::Text => true,
        };
        assert!(ok, "default of {} does not parse as {:?}", p.name, p.ty);
    }
}

#[test]
fn precedence_is_flag_define_env_file_default() {
    let file = "burst.nexus.server.port=1000\nburst.nexus.pipe.size=5\nburst.nexus.server.threads=9\nburst.nexus.stream.chunk.size=4096\n";
    let e = [
        ("BURST_NEXUS_SERVER_PORT", "2000"),
        ("BURST_NEXUS_PIPE_SIZE", "7"),
        ("BURST_NEXUS_SERVER_THREADS", "8"),
    ];
    let v = resolve(
        &[("burst.nexus.server.port", "3000")],
        &[
            ("burst.nexus.server.port", "4000"),
            ("burst.nexus.server.threads", "3"),
        ],
        &e,
        Some(file),
    )
    .unwrap();
    assert_eq!(
        v.raw("burst.nexus.server.port"),
        Some(("3000", Origin::Flag))
    );
    assert_eq!(
        v.raw("burst.nexus.server.threads"),
        Some(("3", Origin::Define))
    );
    assert_eq!(v.raw("burst.nexus.pipe.size"), Some(("7", Origin::Env)));
    assert_eq!(
        v.raw("burst.nexus.stream.chunk.size"),
        Some(("4096", Origin::File))
    );
    assert_eq!(
        v.raw("burst.nexus.stream.timeout.ms"),
        Some(("60000", Origin::Default))
    );
}

#[test]
fn the_original_stale_name_is_an_alias_and_the_canonical_name_wins() {
    let stale = |v: &Values| {
        v.raw("burst.nexus.client.pool.stale.ms")
            .map(|r| r.0.to_string())
    };
    let v = resolve(&[], &[], &[("NEXUS_CLIENT_POOL_STALE_MS", "1500")], None).unwrap();
    assert_eq!(stale(&v).as_deref(), Some("1500"));
    let both = [
        ("NEXUS_CLIENT_POOL_STALE_MS", "1500"),
        ("BURST_NEXUS_CLIENT_POOL_STALE_MS", "2500"),
    ];
    let v = resolve(&[], &[], &both, None).unwrap();
    assert_eq!(stale(&v).as_deref(), Some("2500"));
    let defines = [
        ("burst.nexus.client.pool.stale.ms", "7"),
        ("nexus.client.pool.stale.ms", "9"),
    ];
    let v = resolve(&[], &defines, &[], None).unwrap();
    assert_eq!(stale(&v).as_deref(), Some("7"));
    let v = resolve(&[], &defines[1..], &[], None).unwrap();
    assert_eq!(stale(&v).as_deref(), Some("9"));
    let v = resolve(&[], &[], &[], Some("nexus.client.pool.stale.ms = 11\n")).unwrap();
    assert_eq!(stale(&v).as_deref(), Some("11"));
}

#[test]
fn bad_values_name_the_variable_and_the_value() {
    for (var, value) in [
        ("BURST_NEXUS_SERVER_PORT", "abc"),
        ("BURST_NEXUS_SERVER_PORT", "-1"),
        ("BURST_NEXUS_STREAM_TIMEOUT_MS", "0"),
    ] {
        let v = resolve(&[], &[], &[(var, value)], None).unwrap();
        let name = PROPERTIES
            .iter()
            .find(|p| env_name(p.name) == var)
            .unwrap()
            .name;
        let err = match var {
            "BURST_NEXUS_SERVER_PORT" => v.parse::<u16>(name).map(|_| ()),
            _ => v.millis(name).map(|_| ()),
        }
        .unwrap_err()
        .to_string();
        assert!(err.contains(var) && err.contains(value), "{err}");
    }
}

#[test]
fn a_properties_file_is_checked_line_by_line() {
    let text = "# comment\n! also a comment\n\n  burst.nexus.server.port =  1300 \n";
    let pairs = parse_properties_file(Path::new("f"), text).unwrap();
    assert_eq!(
        pairs,
        vec![("burst.nexus.server.port".into(), "1300".into())]
    );
    let err = parse_properties_file(Path::new("f"), "burst.nexus.server.port 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("f:1:"), "{err}");
    let err = parse_properties_file(Path::new("f"), "\nburst.nexus.server.prot=1\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("f:2") && err.contains("did you mean burst.nexus.server.port"),
        "{err}"
    );
    // A bad value from the file names the file.
    let v = resolve(&[], &[], &[], Some("burst.nexus.server.port=x\n")).unwrap();
    let err = v
        .parse::<u16>("burst.nexus.server.port")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nexus.properties") && err.contains("\"x\""),
        "{err}"
    );
}

#[test]
fn unknown_defines_are_refused_with_a_suggestion() {
    let err = resolve(&[], &[("burst.nexus.pipe.sise", "1")], &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean burst.nexus.pipe.size"), "{err}");
}

#[test]
fn secrets_are_redacted_and_unknown_variables_get_a_suggestion() {
    let v = resolve(&[], &[], &[("BURST_NEXUS_AUTH_SECRET", "hunter2")], None).unwrap();
    let described = v.describe();
    let secret = described
        .iter()
        .find(|d| d.0.name == "burst.nexus.auth.secret")
        .unwrap();
    assert_eq!((secret.1.as_str(), secret.2), ("<redacted>", "env"));
    assert_eq!(v.secret().unwrap().unwrap(), b"hunter2");
    let unknown =
        Values::unknown_env(["BURST_NEXUS_SERVER_PROT".to_string(), "HOME".into()].into_iter());
    assert_eq!(
        unknown,
        vec![(
            "BURST_NEXUS_SERVER_PROT".into(),
            "BURST_NEXUS_SERVER_PORT".into()
        )]
    );
}

#[test]
fn the_readme_table_is_the_property_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start =
        readme.find("<!-- properties:start -->\n").unwrap() + "<!-- properties:start -->\n".len();
    let end = readme.find("<!-- properties:end -->").unwrap();
    let expected = markdown_table();
    assert!(
        readme[start..end] == expected,
        "README.md's configuration table is out of date; replace it with `nexus config --markdown`:\n{expected}"
    );
}

#[test]
fn the_deploy_environment_file_lists_every_property() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/nexus.env");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text == env_file(),
        "deploy/systemd/nexus.env is out of date; regenerate it with `nexus config --env-file`"
    );
}

#[test]
fn sizes_take_units_and_empty_values_mean_the_default() {
    let v = resolve(
        &[],
        &[
            ("burst.nexus.stream.chunk.size", "256KiB"),
            ("burst.nexus.server.threads", ""),
            ("burst.nexus.admin.address", ""),
        ],
        &[("BURST_NEXUS_SERVER_PORT", "  ")],
        Some("burst.nexus.pipe.size=\n"),
    )
    .unwrap();
    assert_eq!(
        v.size("burst.nexus.stream.chunk.size").unwrap(),
        Some(256 << 10)
    );
    assert_eq!(
        v.raw("burst.nexus.server.threads"),
        None,
        "empty: the default"
    );
    assert_eq!(
        v.raw("burst.nexus.server.port"),
        Some(("1270", Origin::Default))
    );
    assert_eq!(
        v.raw("burst.nexus.pipe.size"),
        Some(("100", Origin::Default))
    );
    // An empty address keeps its meaning: none.
    assert_eq!(
        v.raw("burst.nexus.admin.address"),
        Some(("", Origin::Define))
    );
    for bad in ["1.5MiB", "0", "10 GB", "-1", "1gib"] {
        let v = resolve(&[], &[], &[("BURST_NEXUS_STREAM_CHUNK_SIZE", bad)], None).unwrap();
        let err = v
            .size("burst.nexus.stream.chunk.size")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BURST_NEXUS_STREAM_CHUNK_SIZE") && err.contains(bad),
            "{err}"
        );
    }
}
