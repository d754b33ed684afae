//! qlive under real systemd, installed from its Debian package, upgrading a
//! guest when QEMU itself is upgraded with dpkg. The scenario is
//! tests/systemd/e2e.sh (systemd booted as PID 1 in namespaces over
//! overlays, so the host is untouched); this test runs it and checks the
//! guest's console across the agent restart, the upgrade of qlive itself
//! and the QEMU upgrade.
//!
//! Needs `make deb` (target/debian/qlive_*.deb and the higher-versioned
//! target/debian-next/qlive_*.deb) and `make qemu-new` (target/qemu-new/debs):
//! `make test` builds both first.

mod common;

use common::*;

/// The .deb in `target/DIR`, which `make deb` fills.
fn deb_in(dir: &str) -> std::path::PathBuf {
    std::fs::read_dir(repo_root().join("target").join(dir))
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| panic!("qlive .deb missing in target/{dir}: run `make deb`"))
}

/// The package `make deb` built.
fn qlive_deb() -> std::path::PathBuf {
    deb_in("debian")
}

/// The same package with a higher version (`make deb`, target/debian-next),
/// installed over the first for the self-upgrade.
fn qlive_next_deb() -> std::path::PathBuf {
    deb_in("debian-next")
}

#[test]
fn dpkg_upgrade_of_qemu_moves_the_guest_under_systemd() {
    let root = repo_root();
    let deb = qlive_deb();
    let next_deb = qlive_next_deb();
    let debs = root.join("target/qemu-new/debs");
    assert!(
        debs.is_dir(),
        "QEMU 10 packages missing: run `make qemu-new`"
    );
    let g = guest_image();
    let scratch = tempfile::Builder::new()
        .prefix("ns-e2e")
        .tempdir_in(root.join("target"))
        .unwrap();
    let out = std::process::Command::new(root.join("tests/systemd/e2e.sh"))
        .arg(&deb)
        .arg(&next_deb)
        .arg(&debs)
        .arg(g.kernel.parent().unwrap())
        .arg(scratch.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("e2e:")).collect();
    println!("{}", steps.join("\n"));
    assert!(
        out.status.success(),
        "e2e.sh failed:\n{}\n{stderr}",
        steps.join("\n")
    );
    assert!(stdout.contains("e2e: PASS"));
    let log = stdout
        .split("CONSOLE_LOG_BEGIN\n")
        .nth(1)
        .and_then(|s| s.split("CONSOLE_LOG_END").next())
        .expect("console log in e2e output");
    let hb = Heartbeat::parse(log.as_bytes());
    assert!(hb.count > 1000, "heartbeats seen: {}", hb.count);
    hb.assert_intact("guest console across agent restart, qlive and QEMU package upgrades");
}

/// The package carries the binary, the units, tmpfiles/sysusers snippets,
/// the docs, a man page per subcommand, the shell completions, its
/// maintainer scripts and the QEMU trigger.
#[test]
fn deb_contents() {
    let deb = qlive_deb();
    let out = std::process::Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    for f in [
        "./usr/bin/qlive",
        "./lib/systemd/system/qlive.service",
        "./lib/systemd/system/qlive.socket",
        "./lib/systemd/system/qlive-upgrade.service",
        "./lib/systemd/system/qlive-metrics.service",
        "./lib/systemd/system/qlive-metrics.timer",
        "./usr/lib/tmpfiles.d/qlive.conf",
        "./usr/lib/sysusers.d/qlive.conf",
        "./usr/share/doc/qlive/docs/operations.md",
        "./usr/share/selinux/packages/qlive/qlive.pp",
        "./usr/share/selinux/devel/include/contrib/qlive.if",
        "./usr/share/man/man1/qlive-upgrade.1.gz",
        "./usr/share/bash-completion/completions/qlive",
        "./usr/share/zsh/vendor-completions/_qlive",
        "./usr/share/fish/vendor_completions.d/qlive.fish",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(f)),
            "{f} missing from the .deb:\n{listing}"
        );
    }
    let units = repo_units();
    assert!(units.len() >= 5, "units in systemd/: {units:?}");
    let pages = man_pages();
    assert!(pages.len() > 10, "subcommands found: {pages:?}");
    for f in units
        .iter()
        .map(|u| format!("./lib/systemd/system/{u}"))
        .chain(pages.iter().map(|p| format!("./usr/share/man/man1/{p}")))
    {
        assert!(
            listing.lines().any(|l| l.ends_with(&f)),
            "{f} missing from the .deb:\n{listing}"
        );
    }
    let ctrl = std::process::Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&ctrl.stdout);
    for s in [
        "postinst",
        "prerm",
        "postrm",
        "triggers",
        "Depends:",
        "qemu-system-x86",
        "libsystemd0",
    ] {
        assert!(
            info.contains(s),
            "{s} missing from the control data:\n{info}"
        );
    }
    let trig = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --ctrl-tarfile '{}' | tar -xO ./triggers",
            deb.display()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&trig.stdout)
            .contains("interest-noawait /usr/bin/qemu-system-x86_64"),
        "trigger on the QEMU binary"
    );
}
