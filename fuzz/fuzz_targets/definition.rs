//! The definition validator (`Definition::parse`) on arbitrary bytes.
//!
//! Properties checked for every accepted definition, beyond "does not panic":
//! - its name passes `valid_name` (safe as one path component);
//! - serialize -> parse gives an equal definition, and serializing that gives
//!   the same bytes (what the store writes is what it reads back);
//! - completed as `define` completes it before storing it (a UUID, the NICs'
//!   generated MACs and tap names), it still passes `validate` and still
//!   round-trips: otherwise the agent could not load its own file again;
//! - the QEMU command line of the completed definition builds without
//!   panicking, in both start modes,
//!   with no NUL in any argument (it could not be exec'd), `extra_args` last,
//!   verbatim and free of the options qlive controls, and `-incoming defer`
//!   present exactly for an incoming instance.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlive::domain::definition::{valid_name, Definition, RESERVED_QEMU_OPTIONS};
use qlive::instance::cmdline::{build, EffectiveAccel, StartMode, RAM_ID};
use qlive::instance::paths::InstancePaths;
use std::cell::Cell;
use std::path::Path;

/// The option name of an argument as QEMU reads it (`--x=y` is `-x`).
fn option_name(arg: &str) -> Option<String> {
    let rest = arg.strip_prefix('-')?.trim_start_matches('-');
    Some(format!("-{}", rest.split('=').next().unwrap_or(rest)))
}

/// serialize -> parse gives the same definition and the same bytes again.
fn round_trip(def: &Definition) {
    let bytes = serde_json::to_vec(def).expect("a definition serializes");
    let again = Definition::parse(&bytes).unwrap_or_else(|e| {
        panic!(
            "serialized definition refused: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&again, def, "round trip changed the definition");
    assert_eq!(serde_json::to_vec(&again).unwrap(), bytes, "not canonical");
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut def) = Definition::parse(data) else {
        return;
    };
    assert!(
        valid_name(&def.name),
        "accepted invalid name {:?}",
        def.name
    );
    round_trip(&def);

    // What `define` stores (src/agent/ops.rs): a UUID (a fixed one here,
    // when the input has none) and the NIC defaults, from a deterministic
    // "random" source.
    def.uuid.get_or_insert(uuid::Uuid::from_u128(
        0xd89d3627_2b0c_4fd8_b2c9_5c27d86e14ca,
    ));
    let n = Cell::new(0u32);
    def.assign_nic_defaults(|| {
        let [_, a, b, c] = n.get().to_be_bytes();
        n.set(n.get() + 1);
        [a, b, c]
    });
    if let Err(e) = def.validate() {
        panic!("define would store a definition it cannot load again: {e}\n{def:?}");
    }
    round_trip(&def);

    let paths = InstancePaths::new(Path::new("/run/qlive"), &def.name, 1);
    for mode in [StartMode::Boot, StartMode::Incoming] {
        let argv = build(&def, "pc-q35-7.2", EffectiveAccel::Tcg, &paths, mode, RAM_ID);
        let args: Vec<&str> = argv
            .iter()
            .map(|a| a.to_str().expect("argv is UTF-8"))
            .collect();
        assert!(args.iter().all(|a| !a.contains('\0')), "NUL in {args:?}");
        // extra_args come last, verbatim, and none of them is an option
        // qlive controls (QEMU reads `--x=y` as `-x y`)
        let (ours, extra) = args.split_at(args.len() - def.extra_args.len());
        assert_eq!(extra, def.extra_args.as_slice(), "extra_args not last");
        for a in extra {
            if let Some(o) = option_name(a) {
                assert!(!RESERVED_QEMU_OPTIONS.contains(&o.as_str()), "{a:?} passed");
            }
        }
        // -incoming exactly where qlive puts it
        let incoming = ours
            .windows(2)
            .filter(|w| w == &["-incoming", "defer"])
            .count();
        let want = usize::from(mode == StartMode::Incoming);
        assert_eq!(incoming, want, "-incoming in {mode:?}: {args:?}");
    }
});
