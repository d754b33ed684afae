//! Property tests for what stands between a hostile name or a planted file
//! and the host's filesystem: `valid_name`, the paths derived from a name,
//! and the definition store's refusal to follow symlinks. Pure or tempdir
//! only: no agent, no QEMU. Fuzz targets for the parsers are in fuzz/
//! (docs/fuzzing.md).

use proptest::prelude::*;
use qlive::domain::definition::{valid_name, Definition};
use qlive::domain::store::{Store, StoreError};
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Strings a name check must survive: anything at all, and short strings
/// over the alphabet that matters (dots, slashes, NUL, the allowed set).
fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a./\\x00_-]{0,6}",
        "[A-Za-z0-9_./-]{0,70}",
        "\\.{1,3}(/[a.]{0,3})?",
    ]
}

/// Names `valid_name` should accept: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
fn good_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
}

/// `s` is exactly one normal path component.
fn single_normal_component(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!(c.next(), Some(Component::Normal(n)) if n == s) && c.next().is_none()
}

fn def(name: &str) -> Definition {
    Definition::from_value(&serde_json::json!({
        "name": name, "emulator": "/usr/bin/qemu-system-x86_64", "memory_mib": 64,
        "uuid": "d89d3627-2b0c-4fd8-b2c9-5c27d86e14ca",
    }))
    .unwrap()
}

proptest! {
    #[test]
    fn accepted_name_is_one_safe_path_component(name in any_name()) {
        if valid_name(&name) {
            prop_assert!(!name.is_empty() && name.len() <= 64, "{name:?}");
            prop_assert!(!name.contains('/') && !name.contains('\0'), "{name:?}");
            prop_assert!(name != "." && name != "..", "{name:?}");
            prop_assert!(!name.starts_with('.') && !name.starts_with('-'), "{name:?}");
            // as used: <dir>/<name>, <name>.json, <name>.log
            for comp in [name.clone(), format!("{name}.json"), format!("{name}.log")] {
                prop_assert!(single_normal_component(&comp), "{comp:?}");
                let dir = Path::new("/var/lib/qlive/domains");
                let joined = dir.join(&comp);
                prop_assert_eq!(joined.parent(), Some(dir));
                prop_assert!(joined.starts_with(dir));
            }
        }
    }

    #[test]
    fn names_with_slash_or_leading_dot_are_rejected(
        a in any_name(),
        b in any_name(),
    ) {
        let with_slash = format!("{a}/{b}");
        prop_assert!(!valid_name(&with_slash), "{with_slash:?}");
        let dotted = format!(".{a}");
        prop_assert!(!valid_name(&dotted), "{dotted:?}");
        let with_nul = format!("{a}\0{b}");
        prop_assert!(!valid_name(&with_nul), "{with_nul:?}");
    }

    #[test]
    fn well_formed_names_are_accepted(name in good_name()) {
        prop_assert!(valid_name(&name), "{name:?}");
        let too_long = format!("{name}{}", "x".repeat(65 - name.len()));
        prop_assert!(!valid_name(&too_long), "{too_long:?}");
    }

    /// Every path derived from an accepted name stays directly under its
    /// directory: the stored definition, the console log, the run dir.
    #[test]
    fn derived_paths_stay_in_their_directory(name in good_name()) {
        let state = Path::new("/var/lib/qlive");
        let log = qlive::console::log_path(state, &name);
        let console = state.join("console");
        prop_assert_eq!(log.parent(), Some(console.as_path()));
        let run = Path::new("/run/qlive");
        let rd = qlive::instance::paths::domain_run_dir(run, &name);
        let run_domains = run.join("domains");
        prop_assert_eq!(rd.parent(), Some(run_domains.as_path()));
        let p = qlive::instance::paths::InstancePaths::new(run, &name, 7);
        for f in [&p.qmp, &p.migrate, &p.pid, &p.log] {
            prop_assert_eq!(f.parent(), Some(p.dir.as_path()));
            prop_assert!(f.starts_with(&rd));
        }
    }
}

proptest! {
    /// `path_of` is an error or `<state>/domains/<name>.json`, nothing else.
    #[test]
    fn store_path_of_stays_in_the_domains_dir(name in any_name()) {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let domains = state.path().join("domains");
        match store.path_of(&name) {
            Err(StoreError::BadName(n)) => {
                prop_assert_eq!(&n, &name);
                prop_assert!(!valid_name(&name));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
            Ok(p) => {
                prop_assert!(valid_name(&name));
                prop_assert_eq!(p.parent(), Some(domains.as_path()));
                prop_assert_eq!(p, domains.join(format!("{name}.json")));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `<state>/domains/<name>.json` planted as a symlink to a valid stored
    /// domain outside the state dir: `load` refuses it, naming the path and
    /// the problem; `save` and `remove` act on the link, never the target.
    #[test]
    fn store_never_follows_a_symlinked_domain_file(name in good_name()) {
        let state = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        // a well-formed stored domain of that name, outside the state dir
        let elsewhere = Store::open(outside.path()).unwrap();
        elsewhere.save(&def(&name)).unwrap();
        let target = elsewhere.path_of(&name).unwrap();
        let original = fs::read(&target).unwrap();
        let link = store.path_of(&name).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let e = store.load(&name).unwrap_err();
        let is_symlink = matches!(
            e,
            StoreError::NotRegularFile { kind: "a symbolic link", .. }
        );
        prop_assert!(is_symlink, "{e}");
        let msg = e.to_string();
        prop_assert!(msg.contains(&format!("{name}.json")), "{msg}");
        prop_assert!(msg.contains("symbolic link"), "{msg}");
        let all = store.load_all().unwrap();
        prop_assert!(all.iter().all(|r| r.is_err()), "a symlink was loaded");

        // save over it: the link is replaced, the target keeps its bytes
        let mut changed = def(&name);
        changed.memory_mib = 128;
        store.save(&changed).unwrap();
        prop_assert_eq!(fs::read(&target).unwrap(), original.clone());
        prop_assert!(fs::symlink_metadata(&link).unwrap().is_file());
        prop_assert_eq!(store.load(&name).unwrap(), changed);

        // remove a re-planted link: the link goes, the target stays
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        store.remove(&name).unwrap();
        prop_assert!(fs::symlink_metadata(&link).is_err());
        prop_assert_eq!(fs::read(&target).unwrap(), original);
    }

    /// A symlink at the console log path is refused before anything (QEMU's
    /// `append=on` chardev, the agent's follower) would write through it.
    #[test]
    fn console_log_symlink_is_detected(name in good_name()) {
        let state = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let log = qlive::console::log_path(state.path(), &name);
        fs::create_dir_all(log.parent().unwrap()).unwrap();
        prop_assert!(qlive::fsutil::ensure_regular_or_absent(&log).is_ok());
        let target: PathBuf = outside.path().join("victim");
        fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, &log).unwrap();
        let e = qlive::fsutil::ensure_regular_or_absent(&log).unwrap_err();
        let msg = e.to_string();
        prop_assert!(msg.contains("symbolic link") && msg.contains(&format!("{name}.log")), "{msg}");
        fs::remove_file(&log).unwrap();
        fs::write(&log, b"").unwrap();
        prop_assert!(qlive::fsutil::ensure_regular_or_absent(&log).is_ok());
        prop_assert_eq!(fs::read(&target).unwrap(), b"keep".to_vec());
    }
}
