//! `gen-assets OUTDIR`: the man pages and shell completions of `qlive`,
//! generated from its command line (`qlive::cli::Cli`), for the packages:
//!
//! - `OUTDIR/man/man1/qlive.1.gz`, and `qlive-SUB.1.gz` for every subcommand
//!   the CLI has when this runs (hidden ones and `help` skipped), each with a
//!   SEE ALSO back to qlive(1);
//! - `OUTDIR/completions/qlive.bash`, `_qlive` (zsh), `qlive.fish`.
//!
//! An example, not a subcommand of the binary: clap_mangen and clap_complete
//! are dev-dependencies, so the shipped `qlive` does not link them. `make deb`
//! runs it before `cargo deb` (`cargo run --release --example gen-assets --
//! target/assets`), the RPM spec in `%build`. Pages are compressed with
//! `gzip -9n` (no name, no timestamp), as Debian policy asks.

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{roman, Roff};
use clap_mangen::Man;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 || args[1].starts_with('-') {
        eprintln!("usage: gen-assets OUTDIR");
        return ExitCode::from(2);
    }
    match generate(Path::new(&args[1])) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-assets: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = man_pages(&out.join("man/man1"))?;
    written.extend(completions(&out.join("completions"))?);
    Ok(written)
}

/// qlive(1) and one page per visible subcommand.
fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // No `help` subcommand here: it would get a qlive-help(1) entry in
    // qlive(1) with no page behind it. `build` names the subcommands
    // `qlive-SUB` (their pages' titles) and gives them the global options.
    let mut cmd = qlive::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .cloned()
        .collect();
    anyhow::ensure!(!subs.is_empty(), "the CLI has no subcommands");

    let mut written = Vec::new();
    let mut see_also = Roff::default();
    see_also.control("SH", ["SEE ALSO"]);
    for (i, sub) in subs.iter().enumerate() {
        let sep = if i + 1 < subs.len() { "(1)," } else { "(1)" };
        see_also.control("BR", [&page_name(sub), sep]);
    }
    see_also.control("PP", []);
    see_also.text([roman(
        "The documentation in /usr/share/doc/qlive/, operations.md above all.",
    )]);
    written.push(write_page(dir, Man::new(cmd.clone()), see_also)?);

    // A subcommand has no version of its own: name the package's in the
    // page footer, as qlive(1) does.
    let source = format!("qlive {}", cmd.get_version().unwrap_or_default());
    for sub in subs {
        let mut back = Roff::default();
        back.control("SH", ["SEE ALSO"]);
        back.control("BR", ["qlive", "(1)"]);
        written.push(write_page(dir, Man::new(sub).source(&source), back)?);
    }
    Ok(written)
}

/// `qlive-SUB`, as clap_mangen names the page (and its title).
fn page_name(sub: &clap::Command) -> String {
    sub.get_display_name()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("qlive-{}", sub.get_name()))
}

/// Render `man` followed by `extra`, write NAME.1 and gzip it to NAME.1.gz.
fn write_page(dir: &Path, man: Man, extra: Roff) -> anyhow::Result<PathBuf> {
    let mut page = Vec::new();
    man.render(&mut page)?;
    // `to_roff`, not `to_writer`: the page already has the apostrophe
    // preamble `to_writer` would repeat (the extra text has no apostrophes).
    page.extend_from_slice(extra.to_roff().as_bytes());
    let path = dir.join(man.get_filename());
    std::fs::write(&path, &page)?;
    let status = std::process::Command::new("gzip")
        .args(["-9nf", "--"])
        .arg(&path)
        .status()
        .map_err(|e| anyhow::anyhow!("running gzip: {e}"))?;
    anyhow::ensure!(status.success(), "gzip {}: {status}", path.display());
    let mut gz = path.into_os_string();
    gz.push(".gz");
    Ok(gz.into())
}

/// bash, zsh and fish completions, with `help` (`qlive help SUB`) included.
fn completions(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "qlive.bash"),
        (Shell::Zsh, "_qlive"),
        (Shell::Fish, "qlive.fish"),
    ] {
        let mut cmd = qlive::cli::Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "qlive", &mut script);
        let path = dir.join(file);
        std::fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}
