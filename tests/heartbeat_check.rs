//! The heartbeat checker every VM test relies on must catch what it claims
//! to: a lost, doubled or torn line, a second sequence, CORRUPT.

mod common;

use common::Heartbeat;

#[test]
fn intact_stream_passes() {
    let hb = Heartbeat::parse(
        b"junk\x1b[0m\nQLIVE-GUEST READY\nHB 1\nHB 2\nPATTERN READY mib=32\nHB 3\nHB 4",
    );
    hb.assert_intact("ok");
    assert_eq!(
        (hb.first, hb.last, hb.count),
        (1, 3, 3),
        "the unfinished last line is not counted"
    );
}

#[test]
fn breaks_are_caught() {
    for (what, text) in [
        ("lost line", &b"HB 1\nHB 2\nHB 4\n"[..]),
        ("duplicate line", b"HB 1\nHB 2\nHB 2\nHB 3\n"),
        ("lost newline", b"HB 1\nHB 2HB 3\nHB 4\n"),
        ("lost byte", b"HB 1\nHB 2\nHB 3\nH 4\nHB 5\n"),
        ("second instance", b"HB 10\nHB 11\nHB 12\nHB 11\nHB 13\n"),
    ] {
        let hb = Heartbeat::parse(text);
        assert!(!hb.breaks.is_empty(), "{what} not caught: {hb:?}");
        let r = std::panic::catch_unwind(|| hb.assert_intact(what));
        assert!(r.is_err(), "{what}: assert_intact passed");
    }
    let hb = Heartbeat::parse(b"HB 1\nCORRUPT off=1018 want=1 got=2\nHB 2\n");
    assert!(std::panic::catch_unwind(|| hb.assert_intact("corrupt")).is_err());
}
