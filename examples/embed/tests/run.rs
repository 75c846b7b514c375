//! The embedding example runs as a test: a guest of its own, migrated over
//! TCP, byte for byte.

#[test]
fn the_example_migrates_its_own_guest_byte_exact() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embed"))
        .output()
        .expect("the example runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("verified: true, pages that differ: 0"),
        "{text}"
    );
}
