//! Helpers shared by every module's error enum.

/// One line for an error and its causes: "outer: cause: root cause",
/// skipping a cause whose text the line already holds. Used where an error
/// becomes text: log messages (journald shows fields only with `-o
/// verbose`), API error messages, the CLI's last line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
