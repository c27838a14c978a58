//! The documentation stays true to the tree: every relative link in the README, `docs/`,
//! the simulator's README and the changelog resolves to a file (and a `#anchor` to a
//! heading of it); every config key the docs name in backticks exists in the reference
//! config; and the hot/cold lists of `docs/configuration.md` match `cold_settings!`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use diia_gateway::settings::Cold;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The markdown files under the rule: README, changelog, simulator README, `docs/*.md`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![
        root().join("README.md"),
        root().join("CHANGELOG.md"),
        root().join("sim/README.md"),
    ];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of a markdown text outside fenced code blocks, with their line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            lines.push((number + 1, line));
        }
    }
    lines
}

/// The inline code spans of one line (single backticks; what the docs use).
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// A line with its code spans blanked out, so a `](x)` inside backticks is no link.
fn without_code(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a markdown file offers (duplicate headings get `-1`, `-2`, … as on GitHub).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let count = seen.entry(base.clone()).or_insert(0);
        let anchor = if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

/// The targets of the inline links `[text](target)` of a markdown text, with line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    for (number, line) in prose_lines(text) {
        let line = without_code(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            links.push((number, rest[..end].trim().to_owned()));
            rest = &rest[end..];
        }
    }
    links
}

/// What is wrong with one link target seen from `file` (`None`: it resolves).
fn broken(file: &Path, target: &str) -> Option<String> {
    if target.starts_with("http://") || target.starts_with("https://") {
        return None;
    }
    if target.is_empty() || target.starts_with("mailto:") {
        return Some("is empty or not a relative link".to_owned());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let resolved = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().unwrap().join(path)
    };
    if !resolved.exists() {
        return Some(format!("{} does not exist", resolved.display()));
    }
    let anchor = anchor?;
    if resolved.extension().is_none_or(|ext| ext != "md") {
        return Some("an anchor into a file that is not markdown".to_owned());
    }
    if anchors(&read(&resolved)).contains(anchor) {
        None
    } else {
        Some(format!(
            "no heading in {} has the anchor #{anchor}",
            resolved.display()
        ))
    }
}

#[test]
fn every_relative_link_resolves_to_a_file_and_heading() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        for (line, target) in links(&read(&file)) {
            checked += 1;
            if let Some(problem) = broken(&file, &target) {
                problems.push(format!(
                    "{}:{line}: ({target}) {problem}",
                    file.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser blind?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_alert_runbook_url_names_a_runbook_heading() {
    let rules = read(&root().join("deploy/prometheus/diia-gateway.rules.yml"));
    let runbook = anchors(&read(&root().join("docs/runbook.md")));
    let urls: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("runbook_url: docs/runbook.md#"))
        .collect();
    assert!(urls.len() >= 10, "runbook_url lines not found");
    let missing: Vec<&&str> = urls.iter().filter(|a| !runbook.contains(**a)).collect();
    assert!(missing.is_empty(), "runbook anchors missing: {missing:?}");
}

/// Dotted keys and tables the reference config defines, commented-out examples included
/// (`# [server.tls]`, `# cert = "…"`: optional keys without a default are shown that way).
fn reference_keys() -> BTreeSet<String> {
    let text = read(&root().join("config/gateway.toml"));
    let table: toml::Table = text.parse().expect("config/gateway.toml parses");
    let mut keys = BTreeSet::new();
    fn walk(prefix: &str, table: &toml::Table, keys: &mut BTreeSet<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, keys),
                toml::Value::Array(items) => {
                    for item in items {
                        if let toml::Value::Table(inner) = item {
                            walk(&key, inner, keys);
                        }
                    }
                }
                _ => {}
            }
            keys.insert(key);
        }
    }
    walk("", &table, &mut keys);
    let mut section = String::new();
    for line in text.lines() {
        let commented = line.strip_prefix('#').map(str::trim);
        let content = commented.unwrap_or(line).trim();
        let content = match content.split_once(" #") {
            Some((before, _)) => before.trim_end(),
            None => content,
        };
        if let Some(header) = content.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let header = header.trim_start_matches('[').trim_end_matches(']');
            if is_key_path(header) {
                section = header.to_owned();
                keys.insert(section.clone());
            }
            continue;
        }
        if commented.is_none() {
            continue;
        }
        if let Some((name, value)) = content.split_once('=') {
            let name = name.trim();
            // A commented assignment, not prose with an `=` in it: the value parses as TOML.
            let value_parses = format!("x = {}", value.trim())
                .parse::<toml::Table>()
                .is_ok();
            if value_parses
                && !name.is_empty()
                && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                keys.insert(if section.is_empty() {
                    name.to_owned()
                } else {
                    format!("{section}.{name}")
                });
            }
        }
    }
    keys
}

fn is_key_path(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

/// The config key a code span names, if it names one: `section.key` (`section.table.key`,
/// `section.list[].key`, `section.table.*`, a `[table]` header, or `key = value`) whose
/// first segment is a top-level section of the reference config. File names
/// (`scaleout.toml`, `cache.rs`) and anything else are not keys.
fn named_key(span: &str, sections: &BTreeSet<String>) -> Option<String> {
    let span = span.trim();
    let span = match span.split_once(" = ") {
        Some((key, _)) => key.trim(),
        None => span,
    };
    let (span, bracketed) = match span.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some(inner) => (inner.trim_start_matches('[').trim_end_matches(']'), true),
        None => (span, false),
    };
    let (span, wildcard) = match span.strip_suffix(".*") {
        Some(table) => (table, true),
        None => (span, false),
    };
    let key = span.replace("[]", "");
    if !is_key_path(&key) {
        return None;
    }
    let mut segments = key.split('.');
    let first = segments.next()?;
    if !sections.contains(first) {
        return None;
    }
    let last = key.rsplit('.').next()?;
    let file_extension = [
        "rs", "toml", "md", "json", "yml", "yaml", "svg", "sh", "pem",
    ];
    if !bracketed && !wildcard && (!key.contains('.') || file_extension.contains(&last)) {
        return None;
    }
    Some(key)
}

fn top_level_sections() -> BTreeSet<String> {
    let mut sections: BTreeSet<String> = reference_keys()
        .iter()
        .map(|key| key.split('.').next().unwrap().to_owned())
        .collect();
    // Optional tables without a default, so not in the reference config as keys.
    sections.insert("simulator".to_owned());
    sections
}

#[test]
fn every_config_key_the_docs_name_exists_in_the_reference_config() {
    let keys = reference_keys();
    let sections = top_level_sections();
    for section in ["server", "upstream", "cache", "limits", "auth", "scaleout"] {
        assert!(
            sections.contains(section),
            "{section} not found in the reference config"
        );
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        for (line, text) in prose_lines(&read(&file)) {
            for span in code_spans(text) {
                let Some(key) = named_key(span, &sections) else {
                    continue;
                };
                checked += 1;
                if key != "simulator" && !keys.contains(&key) {
                    problems.push(format!(
                        "{}:{line}: `{span}` is not in config/gateway.toml",
                        file.strip_prefix(root()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} keys found: is the parser blind?"
    );
    assert!(
        problems.is_empty(),
        "unknown keys:\n{}",
        problems.join("\n")
    );
}

/// The keys named in the bullet list of one `### ` section of `docs/configuration.md`.
fn listed_keys(heading: &str) -> BTreeSet<String> {
    let text = read(&root().join("docs/configuration.md"));
    let sections = top_level_sections();
    let mut inside = false;
    let mut in_item = false;
    let mut keys = BTreeSet::new();
    for (_, line) in prose_lines(&text) {
        if line.starts_with('#') {
            inside = line.trim() == heading;
            in_item = false;
            continue;
        }
        if !inside {
            continue;
        }
        in_item = line.starts_with("- ") || (in_item && line.starts_with("  "));
        if in_item {
            keys.extend(
                code_spans(line)
                    .into_iter()
                    .filter_map(|span| named_key(span, &sections)),
            );
        }
    }
    assert!(!keys.is_empty(), "no keys listed under {heading}");
    keys
}

/// `cold_settings!`'s keys, one per key: `"upstream.base_url / [simulator]"` is two.
fn cold_keys() -> BTreeSet<String> {
    Cold::cold_keys()
        .iter()
        .flat_map(|group| group.split(" / "))
        .map(|key| {
            key.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        })
        .collect()
}

#[test]
fn the_documented_cold_keys_are_those_of_cold_settings() {
    let documented = listed_keys("### Cold keys");
    let declared = cold_keys();
    let undocumented: Vec<_> = declared.difference(&documented).collect();
    let not_cold: Vec<_> = documented.difference(&declared).collect();
    assert!(
        undocumented.is_empty() && not_cold.is_empty(),
        "docs/configuration.md \"Cold keys\" drifted from cold_settings!: \
         cold but not listed {undocumented:?}; listed but not cold {not_cold:?}"
    );
}

#[test]
fn the_documented_hot_keys_are_not_cold_and_every_key_is_one_or_the_other() {
    let hot = listed_keys("### Hot keys");
    let cold = cold_keys();
    let both: Vec<_> = hot.intersection(&cold).collect();
    assert!(both.is_empty(), "listed as hot but cold: {both:?}");
    // Where a secret is read from counts as the secret (a reload compares the values read).
    let resolved_into = [
        ("auth.acquirer_token_env", "auth.acquirer_token"),
        ("auth.auth_token_env", "auth.auth_token"),
    ];
    let reference = reference_keys();
    let mut unlisted = Vec::new();
    for key in &reference {
        let key = resolved_into
            .iter()
            .find(|(from, _)| *from == key)
            .map_or(key.clone(), |(_, into)| (*into).to_owned());
        let is_table = reference
            .iter()
            .any(|other| other.starts_with(&format!("{key}.")));
        // The longest listed key that is this key or a table above it decides.
        let mut candidate = key.as_str();
        let covered = loop {
            if hot.contains(candidate) || cold.contains(candidate) {
                break true;
            }
            match candidate.rsplit_once('.') {
                Some((parent, _)) => candidate = parent,
                None => break false,
            }
        };
        if !covered && !is_table {
            unlisted.push(key);
        }
    }
    assert!(
        unlisted.is_empty(),
        "keys of config/gateway.toml neither hot nor cold in docs/configuration.md: {unlisted:?}"
    );
}
