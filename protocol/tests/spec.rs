//! PROTOCOL.md and the code agree: every frame type and error code the code knows has its
//! entry in the spec, with the same number.
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed assertion here.

fn spec() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    std::fs::read_to_string(path).expect("PROTOCOL.md at the repository root")
}

#[test]
fn every_frame_type_has_its_section() {
    let spec = spec();
    for t in nexus_protocol::FrameType::ALL {
        let heading = format!("### 0x{:02X} {}", *t as u8, t.name());
        assert!(
            spec.contains(&heading),
            "PROTOCOL.md lacks the section `{heading}`"
        );
    }
}

#[test]
fn every_error_code_is_in_the_table() {
    let spec = spec();
    for code in nexus_protocol::ErrorCode::ALL {
        let row = format!("| 0x{:04X} | `{}` |", code.0, code.name().unwrap());
        assert!(
            spec.contains(&row),
            "PROTOCOL.md lacks the error row `{row}`"
        );
    }
}

#[test]
fn the_preface_bytes_are_the_spec_bytes() {
    let hex: Vec<String> = nexus_protocol::frame::PREFACE
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    assert!(
        spec().contains(&hex.join(" ")),
        "PROTOCOL.md must list the preface bytes"
    );
}
