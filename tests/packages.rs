//! The RPM that `make rpm` built (packaging/rpm/build.sh, into target/rpm/),
//! checked with rpm's own queries, as `deb_contents` in tests/systemd_e2e.rs
//! checks the .deb: its files and their modes, its scriptlets (the systemd
//! and sysusers macros expanded, each valid `sh`), the QEMU file trigger and
//! its requirements. Nothing is installed: Debian is no RPM system.
//!
//! Needs `make rpm` (target/rpm/qlive-*.rpm); `make test` builds it first.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The package `make rpm` built.
fn qlive_rpm() -> PathBuf {
    std::fs::read_dir(repo_root().join("target/rpm"))
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "rpm"))
        .expect("qlive .rpm missing in target/rpm: run `make rpm`")
}

/// `rpm -qp ARGS... RPM`, its stdout.
fn rpm_query(rpm: &Path, args: &[&str]) -> String {
    let out = Command::new("rpm")
        .arg("-qp")
        .args(args)
        .arg(rpm)
        .output()
        .expect("running rpm (scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "rpm -qp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -n` on a script: it parses.
fn assert_parses(what: &str, script: &str) {
    let mut sh = Command::new("sh")
        .arg("-n")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running sh");
    {
        use std::io::Write;
        let mut stdin = sh.stdin.take().expect("sh's stdin");
        stdin
            .write_all(script.as_bytes())
            .expect("writing the script to sh");
    }
    let out = sh.wait_with_output().expect("waiting for sh");
    assert!(
        out.status.success(),
        "{what} does not parse: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scriptlet must have no macro left unexpanded: rpm leaves an undefined
/// `%name` in the script as it is, and sh then runs it as a command.
fn assert_expanded(what: &str, script: &str) {
    for m in ["%{", "%systemd", "%sysusers", "%tmpfiles", "%_"] {
        assert!(
            !script.contains(m),
            "{what} has an unexpanded macro ({m}):\n{script}"
        );
    }
}

#[test]
fn rpm_contents() {
    let rpm = qlive_rpm();

    // Files, with their modes: `-rwxr-xr-x /usr/bin/qlive`.
    let listing = rpm_query(&rpm, &["--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]"]);
    let has = |mode: &str, path: &str| listing.lines().any(|l| l == format!("{mode} {path}"));
    let units = repo_units();
    assert!(units.len() >= 5, "units in systemd/: {units:?}");
    for u in &units {
        let f = format!("/usr/lib/systemd/system/{u}");
        assert!(has("-rw-r--r--", &f), "{f} missing:\n{listing}");
    }
    let pages = man_pages();
    assert!(pages.len() > 10, "subcommands found: {pages:?}");
    assert!(pages.iter().any(|p| p == "qlive-upgrade.1.gz"), "{pages:?}");
    for p in &pages {
        let f = format!("/usr/share/man/man1/{p}");
        assert!(has("-rw-r--r--", &f), "{f} missing:\n{listing}");
    }
    for (mode, f) in [
        ("-rwxr-xr-x", "/usr/bin/qlive"),
        ("-rw-r--r--", "/usr/lib/tmpfiles.d/qlive.conf"),
        ("-rw-r--r--", "/usr/lib/sysusers.d/qlive.conf"),
        ("-rw-r--r--", "/usr/share/bash-completion/completions/qlive"),
        ("-rw-r--r--", "/usr/share/zsh/site-functions/_qlive"),
        (
            "-rw-r--r--",
            "/usr/share/fish/vendor_completions.d/qlive.fish",
        ),
        ("-rw-r--r--", "/usr/share/doc/qlive/README.md"),
        ("-rw-r--r--", "/usr/share/doc/qlive/docs/operations.md"),
        ("-rw-r--r--", "/usr/share/licenses/qlive/LICENSE"),
        ("drwxr-xr-x", "/etc/qlive/hooks.d"),
        ("drwx------", "/var/lib/qlive"),
    ] {
        assert!(has(mode, f), "{mode} {f} missing:\n{listing}");
    }

    // Scriptlets, each as rpm stores it.
    let script = |tag: &str| rpm_query(&rpm, &["--qf", &format!("%{{{tag}}}")]);
    let pre = script("PREIN");
    let post = script("POSTIN");
    let preun = script("PREUN");
    let postun = script("POSTUN");
    for (what, s) in [
        ("%pre", &pre),
        ("%post", &post),
        ("%preun", &preun),
        ("%postun", &postun),
    ] {
        assert!(s.trim() != "(none)" && !s.trim().is_empty(), "no {what}");
        assert_expanded(what, s);
        assert_parses(what, s);
    }
    // %pre: %sysusers_create_compat of qlive.sysusers
    for s in [
        "getent group 'qlive' >/dev/null || groupadd -r 'qlive'",
        "useradd -r -g 'qlive-qemu' -d '/' -s '/usr/sbin/nologin' -c 'qlive QEMU instances' 'qlive-qemu'",
        "usermod -a -G 'kvm' 'qlive-qemu'",
    ] {
        assert!(pre.contains(s), "%pre lacks {s:?}:\n{pre}");
    }
    // %post: %systemd_post (enable by preset, on first install only) and
    // %tmpfiles_create
    for s in [
        "if [ $1 -eq 1 ] && [ -x \"/usr/lib/systemd/systemd-update-helper\" ]; then",
        "/usr/lib/systemd/systemd-update-helper install-system-units qlive.socket qlive.service qlive-metrics.timer || :",
        "systemd-tmpfiles --create qlive.conf",
    ] {
        assert!(post.contains(s), "%post lacks {s:?}:\n{post}");
    }
    // %preun: %systemd_preun (stop and disable, on removal only)
    for s in [
        "if [ $1 -eq 0 ] && [ -x \"/usr/lib/systemd/systemd-update-helper\" ]; then",
        "/usr/lib/systemd/systemd-update-helper remove-system-units qlive.socket qlive.service \
         qlive-upgrade.service qlive-metrics.timer qlive-metrics.service || :",
    ] {
        assert!(preun.contains(s), "%preun lacks {s:?}:\n{preun}");
    }
    // %postun: %systemd_postun_with_restart (on upgrade only: qlive.service
    // marked, try-restarted by systemd's file trigger after the transaction)
    for s in [
        "if [ $1 -ge 1 ] && [ -x \"/usr/lib/systemd/systemd-update-helper\" ]; then",
        "/usr/lib/systemd/systemd-update-helper mark-restart-system-units qlive.service || :",
    ] {
        assert!(postun.contains(s), "%postun lacks {s:?}:\n{postun}");
    }

    // The file trigger on QEMU's files.
    let trig = rpm_query(&rpm, &["--filetriggers"]);
    let (head, body) = trig
        .split_once('\n')
        .unwrap_or_else(|| panic!("no file trigger:\n{trig}"));
    assert!(
        head.starts_with("filetriggerin scriptlet (using /bin/sh) -- "),
        "{head}"
    );
    for p in [
        "/usr/bin/qemu-system",
        "/usr/libexec/qemu-kvm",
        "/usr/lib64/qemu",
        "/usr/share/qemu",
        "/usr/share/seabios",
    ] {
        assert!(head.contains(p), "trigger on {p} missing: {head}");
    }
    assert!(
        body.contains("systemctl start --no-block qlive-upgrade.service"),
        "{body}"
    );
    assert_expanded("%filetriggerin", body);
    assert_parses("%filetriggerin", body);

    // Requirements, with their kind: `manual qemu-kvm-core`, `pre shadow-utils`.
    let reqs = rpm_query(
        &rpm,
        &["--qf", "[%{REQUIREFLAGS:deptype} %{REQUIRENAME}\n]"],
    );
    for r in [
        "manual qemu-kvm-core",
        "pre shadow-utils",
        "post systemd",
        "preun systemd",
        "postun systemd",
        "auto libsystemd.so.0()(64bit)",
    ] {
        assert!(reqs.lines().any(|l| l == r), "{r} missing:\n{reqs}");
    }
    assert!(
        rpm_query(&rpm, &["--requires"]).contains("qemu-kvm-core"),
        "rpm --requires"
    );
}
