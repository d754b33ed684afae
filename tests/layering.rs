//! The module layering of docs/architecture.md ("Layering"), enforced.
//!
//! The table is read from the document itself, so the rule and its check
//! cannot drift apart. Every `src/**/*.rs` file is mapped to its module
//! (`src/instance/files.rs` is `instance::files`, a `mod.rs` is its
//! directory's module, `lib.rs` and `main.rs` are the top) and every
//! `crate::` path in it, in `use` items (groups expanded) and inline in
//! code, outside comments and literals, is resolved to the longest prefix
//! the table has. `super::` and `self::` paths stay inside a module and are
//! not followed.
//!
//! Fails, naming file, line and import, when a file imports from a higher
//! layer, names a module the table does not have, or is in no layer; also
//! when a table entry matches no file. No VM is started.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Layer of a table entry; `lib.rs` and `main.rs` are above all.
type Layer = u32;
const TOP: Layer = u32::MAX;

/// The layering: module path (`upgrade::stale`) to layer.
#[derive(Debug, Default)]
struct Table {
    modules: BTreeMap<String, Layer>,
    /// Files at the top (`lib.rs`, `main.rs`), by path under `src/`.
    top_files: Vec<String>,
}

impl Table {
    /// Parse the table under `## Layering` in `doc`: rows `| N | `a`, `b` | ... |`
    /// and `| top | `lib.rs`, `main.rs` | ... |`.
    fn parse(doc: &str) -> Result<Table, String> {
        let section = doc
            .split("\n## Layering\n")
            .nth(1)
            .ok_or("docs/architecture.md has no `## Layering` section")?;
        let section = section.split("\n## ").next().unwrap_or(section);
        let mut t = Table::default();
        for row in section.lines().filter(|l| l.starts_with('|')) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (Some(layer), Some(names)) = (cells.get(1), cells.get(2)) else {
                continue;
            };
            let names: Vec<String> = names
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            if *layer == "top" {
                t.top_files.extend(names);
            } else if let Ok(n) = layer.parse::<Layer>() {
                for m in names {
                    if t.modules.insert(m.clone(), n).is_some() {
                        return Err(format!("{m} is in the layering table twice"));
                    }
                }
            }
        }
        if t.modules.is_empty() || t.top_files.is_empty() {
            return Err(format!(
                "no layering table found under `## Layering`: {t:?}"
            ));
        }
        Ok(t)
    }

    /// The entry a module path falls under: its longest prefix in the table.
    fn resolve(&self, path: &[&str]) -> Option<(&str, Layer)> {
        (1..=path.len()).rev().find_map(|n| {
            let p = path[..n].join("::");
            self.modules
                .get_key_value(&p)
                .map(|(k, l)| (k.as_str(), *l))
        })
    }
}

/// The module a file under `src/` is (`None` for the crate roots).
fn module_of(rel: &str) -> Option<Vec<String>> {
    let rel = rel.strip_suffix(".rs")?;
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if parts == ["lib"] || parts == ["main"] {
        return None;
    }
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    Some(parts)
}

#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "src/{}:{}: {}", self.file, self.line, self.what)
    }
}

/// `src` with comments and the contents of string and char literals
/// replaced by spaces; newlines are kept, so line numbers stay right.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
        if at(0) == '/' && at(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if at(0) == '/' && at(1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if !(i > 0 && is_ident(c[i - 1]))
            && ((at(0) == 'r' && (at(1) == '"' || (at(1) == '#' && matches!(at(2), '"' | '#'))))
                || (at(0) == 'b' && at(1) == 'r' && matches!(at(2), '"' | '#')))
        {
            // Raw string: r"..", r#".."#, br#".."#.
            let start = if at(0) == 'b' { i + 2 } else { i + 1 };
            let hashes = c[start..].iter().take_while(|&&h| h == '#').count();
            let body = start + hashes + 1;
            for _ in i..body {
                out.push(' ');
            }
            i = body;
            while i < c.len() {
                if c[i] == '"'
                    && c[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes
                {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if at(0) == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if at(0) == '\'' && (at(1) == '\\' || (at(1) != '\'' && at(2) == '\'')) {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime.
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(at(0));
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The paths of a `use` tree (`crate::api::{self, client::Client}` gives
/// `crate::api` and `crate::api::client::Client`), renames dropped.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    let mut tokens = Vec::new();
    let mut chars = tree.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '{' | '}' | ',' | '*' => tokens.push(ch.to_string()),
            ':' if chars.peek() == Some(&':') => {
                chars.next();
                tokens.push("::".into());
            }
            c if is_ident(c) => {
                let mut id = c.to_string();
                while let Some(&n) = chars.peek().filter(|&&n| is_ident(n)) {
                    id.push(n);
                    chars.next();
                }
                tokens.push(id);
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut pos = 0;
    parse_tree(&tokens, &mut pos, Vec::new(), &mut out);
    out
}

fn parse_tree(t: &[String], pos: &mut usize, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        match t.get(*pos).map(String::as_str) {
            Some("{") => {
                *pos += 1;
                loop {
                    match t.get(*pos).map(String::as_str) {
                        Some("}") | None => {
                            *pos += 1;
                            return;
                        }
                        Some(",") => *pos += 1,
                        _ => parse_tree(t, pos, prefix.clone(), out),
                    }
                }
            }
            Some("*") => {
                *pos += 1;
                out.push(prefix);
                return;
            }
            Some("::") => *pos += 1,
            Some("self") if !prefix.is_empty() => {
                *pos += 1;
            }
            Some("as") => {
                *pos += 2; // the rename
                out.push(prefix);
                return;
            }
            Some(",") | Some("}") | None => {
                out.push(prefix);
                return;
            }
            Some(id) => {
                prefix.push(id.to_string());
                *pos += 1;
            }
        }
    }
}

/// Every `crate::` path in `code` (already stripped), with its line: from
/// `use` items, then inline ones.
fn crate_paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let line_of = |text: &str, byte: usize| text[..byte].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut rest = code.to_string();
    // `use` items: take them out of the text, so their groups are not read
    // again as inline paths.
    let mut search = 0;
    while let Some(off) = rest[search..].find("use ") {
        let at = search + off;
        let before = rest[..at].chars().next_back();
        if before.is_some_and(is_ident) {
            search = at + 4;
            continue;
        }
        let Some(end) = rest[at..].find(';').map(|e| at + e) else {
            break;
        };
        let line = line_of(&rest, at);
        for p in expand_use(&rest[at + 4..end]) {
            if p.first().map(String::as_str) == Some("crate") {
                found.push((line, p));
            }
        }
        let blanked: String = rest[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        rest.replace_range(at..end, &blanked);
        search = end;
    }
    // Inline paths: crate::a::b::c.
    let mut search = 0;
    while let Some(off) = rest[search..].find("crate::") {
        let at = search + off;
        search = at + 7;
        if rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == '$')
        {
            continue;
        }
        let mut path = vec!["crate".to_string()];
        let tail = &rest[at + 7..];
        let mut cur = tail;
        loop {
            let id: String = cur.chars().take_while(|&c| is_ident(c)).collect();
            if id.is_empty() {
                break;
            }
            cur = &cur[id.len()..];
            path.push(id);
            match cur.strip_prefix("::") {
                Some(next) if next.starts_with(|c: char| is_ident(c)) => cur = next,
                _ => break,
            }
        }
        found.push((line_of(&rest, at), path));
    }
    found.sort();
    found
}

/// Check one file (`rel`, its path under `src/`) against the table.
fn check_file(table: &Table, rel: &str, src: &str) -> Vec<Violation> {
    let v = |line: usize, what: String| Violation {
        file: rel.to_string(),
        line,
        what,
    };
    let (me, my_layer) = match module_of(rel) {
        None if table.top_files.iter().any(|f| f == rel) => ("(crate root)".to_string(), TOP),
        None => return vec![v(1, format!("{rel} is not in the layering table"))],
        Some(m) => {
            let segs: Vec<&str> = m.iter().map(String::as_str).collect();
            match table.resolve(&segs) {
                Some((entry, layer)) => (entry.to_string(), layer),
                None => {
                    return vec![v(
                        1,
                        format!(
                            "module {} is in no layer of the layering table",
                            m.join("::")
                        ),
                    )]
                }
            }
        }
    };
    let mut out = Vec::new();
    for (line, path) in crate_paths(&strip(src)) {
        let shown = path.join("::");
        let segs: Vec<&str> = path[1..].iter().map(String::as_str).collect();
        let Some((entry, layer)) = table.resolve(&segs) else {
            out.push(v(
                line,
                format!("`{shown}`: no such module in the layering table"),
            ));
            continue;
        };
        if layer > my_layer {
            out.push(v(
                line,
                format!("`{shown}`: {me} (layer {my_layer}) imports {entry} (layer {layer})"),
            ));
        } else if entry == "agent"
            && (me == "cli" || me == "upgrade::run")
            && shown != "crate::agent::run"
        {
            out.push(v(
                line,
                format!("`{shown}`: {me} may use only `crate::agent::run` of the agent"),
            ));
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn table() -> Table {
    let doc = include_str!("../docs/architecture.md");
    Table::parse(doc).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn src_follows_the_layering() {
    let table = table();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 40, "found only {files:?}");
    let mut violations = Vec::new();
    let mut imports = 0;
    let mut used_entries = std::collections::BTreeSet::new();
    for f in &files {
        let rel = f
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        imports += crate_paths(&strip(&text)).len();
        if let Some(m) = module_of(&rel) {
            let segs: Vec<&str> = m.iter().map(String::as_str).collect();
            if let Some((entry, _)) = table.resolve(&segs) {
                used_entries.insert(entry.to_string());
            }
        } else {
            used_entries.insert(rel.clone());
        }
        violations.extend(check_file(&table, &rel, &text));
    }
    for entry in table.modules.keys().chain(&table.top_files) {
        if !used_entries.contains(entry) {
            violations.push(Violation {
                file: "../docs/architecture.md".into(),
                line: 0,
                what: format!("layering table entry `{entry}` matches no file under src/"),
            });
        }
    }
    assert!(
        imports > 100,
        "only {imports} crate:: paths found: the scan is broken"
    );
    assert!(
        violations.is_empty(),
        "{} layering violation(s) (see docs/architecture.md#layering):\n{}",
        violations.len(),
        violations
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The checker on synthetic files: it must flag what is wrong and only that.
#[test]
fn checker_flags_wrong_way_imports() {
    let t = table();
    let flagged = |rel: &str, src: &str| -> Vec<(usize, String)> {
        check_file(&t, rel, src)
            .into_iter()
            .map(|v| (v.line, v.what))
            .collect()
    };
    // A wrong-way `use`, named with its line and the layers.
    let v = flagged("instance/mod.rs", "//! doc\n\nuse crate::agent::Agent;\n");
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, 3);
    assert!(v[0].1.contains("crate::agent::Agent"), "{v:?}");
    assert!(
        v[0].1
            .contains("instance (layer 2) imports agent (layer 5)"),
        "{v:?}"
    );
    // Inline paths, groups and multi-line uses.
    let v = flagged(
        "domain/store.rs",
        "use crate::{\n    fsutil,\n    api::Request,\n};\nfn f() { crate::migration::job::Job::x(); }\n",
    );
    let lines: Vec<usize> = v.iter().map(|x| x.0).collect();
    assert_eq!(lines, vec![1, 5], "{v:?}");
    // Longest prefix: upgrade::stale is low, upgrade::run is high.
    assert!(flagged("instance/mod.rs", "use crate::upgrade::stale::check;\n").is_empty());
    assert!(flagged("instance/mod.rs", "use crate::upgrade::{self, stale};\n").len() == 1);
    assert_eq!(
        flagged(
            "instance/probe.rs",
            "fn f() { crate::upgrade::run::run(); }\n"
        )
        .len(),
        1
    );
    assert!(flagged("instance/mod.rs", "use crate::instance::files::FileId;\n").is_empty());
    assert_eq!(
        flagged("instance/files.rs", "use crate::instance::paths;\n").len(),
        1
    );
    // Same layer and lower layers are fine; so are super:: paths.
    assert!(flagged(
        "migration/job.rs",
        "use crate::qmp::Qmp;\nuse super::phase;\nuse crate::migration::phase::PhaseName;\n"
    )
    .is_empty());
    // Comments and literals are not imports.
    assert!(flagged(
        "fsutil.rs",
        "// use crate::agent;\n/* crate::cli::x /* nested */ crate::api */\nconst S: &str = \"crate::agent::run\";\nconst R: &str = r#\"use crate::cli;\"#;\nfn f<'a>(x: &'a str) -> char { '\"' }\n"
    )
    .is_empty());
    // Clients use the agent only to run it.
    assert!(flagged("cli/mod.rs", "fn f() { crate::agent::run(cfg); }\n").is_empty());
    assert_eq!(flagged("cli/mod.rs", "use crate::agent::Agent;\n").len(), 1);
    assert_eq!(flagged("cli/mod.rs", "use crate::agent;\n").len(), 1);
    assert_eq!(
        flagged("upgrade/run.rs", "fn f() { crate::agent::run(c); }\n").len(),
        0
    );
    assert_eq!(
        flagged("upgrade/run.rs", "use crate::agent::ops;\n").len(),
        1
    );
    // The roots may import anything.
    assert!(flagged("main.rs", "use crate::cli;\n").is_empty());
    // A module the table lacks, and a file in no layer.
    let v = flagged("qmp/mod.rs", "use crate::nosuch::Thing;\n");
    assert!(v[0].1.contains("no such module"), "{v:?}");
    let v = flagged("newmod/mod.rs", "");
    assert!(v[0].1.contains("newmod is in no layer"), "{v:?}");
    let v = flagged("build.rs", "");
    assert!(v[0].1.contains("module build is in no layer"), "{v:?}");
}

#[test]
fn use_trees_expand() {
    let paths = |s: &str| -> Vec<String> { expand_use(s).iter().map(|p| p.join("::")).collect() };
    assert_eq!(
        paths("crate::api::{self, client::{Client, ClientError}, Request as R}"),
        vec![
            "crate::api",
            "crate::api::client::Client",
            "crate::api::client::ClientError",
            "crate::api::Request"
        ]
    );
    assert_eq!(paths("crate::instance::*"), vec!["crate::instance"]);
    assert_eq!(paths("std::io"), vec!["std::io"]);
}

#[test]
fn the_table_has_every_layer() {
    let t = table();
    let layers: std::collections::BTreeSet<Layer> = t.modules.values().copied().collect();
    assert_eq!(layers, (0..=6).collect(), "{t:?}");
    assert_eq!(t.modules.get("upgrade::stale"), Some(&1));
    assert_eq!(t.modules.get("upgrade::run"), Some(&6));
    assert_eq!(t.top_files, vec!["lib.rs", "main.rs"]);
}
