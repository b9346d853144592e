//! The results as a Markdown section, and its place in `docs/reliability.md`:
//! between `<!-- chaos:short -->` / `<!-- chaos:long -->` (a run of selected
//! scenarios only: `chaos:short-selected` / `chaos:long-selected`) and the
//! matching `<!-- /chaos:... -->` marker. A file without the markers gets the section
//! appended; a missing file is created with the section alone.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::scenario::{Form, Outcome};

/// The Markdown section for one run.
#[must_use]
pub fn render(form: &Form, outcomes: &[Outcome], command: &str, total: Duration) -> String {
    let mut s = String::new();
    let passed = outcomes.iter().filter(|o| o.pass()).count();
    let title = if form.long { "Long form" } else { "Short form" };
    let _ = writeln!(s, "### {title}: {passed} of {} scenarios pass\n", outcomes.len());
    let _ = writeln!(s, "- command: `{command}`");
    let _ = writeln!(s, "- date: {}", date());
    let _ = writeln!(s, "- machine: {}", machine());
    let _ = writeln!(
        s,
        "- load: 2 emulators x {} readings/s (4 + 3 sensors, 50 readings per frame, `--reliable`), fault after {} s; \
         whole run {:.0} s\n",
        form.rate,
        form.fault_at.as_secs(),
        total.as_secs_f64()
    );
    s.push_str(
        "| scenario | fault injected | obligations | lost | duplicated | unexpected | corrupted | fault duration | \
         last ack | recovery | result |\n",
    );
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for o in outcomes {
        let v = o.verdict.unwrap_or_default();
        let num = |n: u64| if o.verdict.is_some() { n.to_string() } else { "-".into() };
        let recovery = o.recovery.map_or_else(|| "not recovered".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        let last_ack = o.load_done.map_or_else(|| "-".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        let result = if o.pass() { "PASS" } else { "**FAIL**" };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} s | {} | {} | {} |",
            o.fault.name(),
            o.fault.how(form),
            num(v.obligations),
            num(v.lost),
            num(v.duplicated),
            num(v.unexpected),
            num(v.corrupted),
            o.fault_duration.as_secs_f64(),
            last_ack,
            recovery,
            result
        );
    }
    s.push_str("\nCounters per scenario (from the daemons' `/metrics` and the emulators' summaries):\n\n");
    for o in outcomes {
        let _ = write!(s, "- `{}` ({:.0} s): {}", o.fault.name(), o.wall.as_secs_f64(), o.notes);
        if let Some(e) = &o.error {
            let _ = write!(s, "; **error: {e}**");
        }
        if let Some(v) = o.verdict {
            if v.rollup_short + v.rollup_excess > 0 {
                let _ = write!(s, "; rollup short {} / excess {}", v.rollup_short, v.rollup_excess);
            }
        }
        s.push('\n');
        for e in &o.examples {
            let _ = writeln!(s, "  - {e}");
        }
    }
    s
}

/// Puts `section` into `path` between the markers of `form`.
///
/// # Errors
/// The file cannot be read or written.
pub fn write(path: &Path, form: &Form, whole_suite: bool, section: &str) -> Result<()> {
    let tag = match (form.long, whole_suite) {
        (true, true) => "long",
        (false, true) => "short",
        (true, false) => "long-selected",
        (false, false) => "short-selected",
    };
    let (open, close) = (format!("<!-- chaos:{tag} -->"), format!("<!-- /chaos:{tag} -->"));
    let block = format!("{open}\n{section}{close}\n");
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            let end = b + close.len();
            let end = if old[end..].starts_with('\n') { end + 1 } else { end };
            format!("{}{block}{}", &old[..a], &old[end..])
        }
        _ if old.is_empty() => block,
        _ => format!("{}\n\n{block}", old.trim_end_matches('\n')),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or_else(String::new, |kb| format!(", {:.0} GiB RAM", kb / 1024.0 / 1024.0));
    format!("{model}, {cores} cores{mem_gib}, {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_replaces_its_predecessor_and_leaves_the_rest_alone() {
        let dir = std::env::temp_dir().join(test_support::unique_name("chaos_report"));
        let path = dir.join("r.md");
        let form = Form::short();
        write(&path, &form, true, "one\n").expect("create");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "<!-- chaos:short -->\none\n<!-- /chaos:short -->\n");
        std::fs::write(&path, "# Title\n\n<!-- chaos:short -->\nold\n<!-- /chaos:short -->\n\nafter\n").unwrap();
        write(&path, &form, true, "new\n").expect("replace");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# Title\n\n<!-- chaos:short -->\nnew\n<!-- /chaos:short -->\n\nafter\n"
        );
        write(&path, &Form::long(), true, "long\n").expect("append");
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("after\n\n<!-- chaos:long -->\nlong\n<!-- /chaos:long -->\n"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
