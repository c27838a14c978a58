//! The shape of `src/`, kept by tests: no import cycles between modules, no file too long
//! to read before its tests.
//!
//! A module is a top-level file or directory under `src/` (`src/scaleout/link.rs` belongs to
//! `scaleout`). An edge `a → b` is any `crate::b…` path in `a`'s code outside its
//! `#[cfg(test)]` part, grouped imports (`use crate::{b, c::D}`) included; doc comments,
//! comments, `$crate` and names re-exported at the crate root are not edges. `lib.rs` (the
//! crate face that declares every module) and the binary (`main.rs`, `bin/`) are not nodes.
//! Needs no tool beyond `cargo test`: the source is read as text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The longest a file may be, in lines of code (not blank, not only a comment) before its
/// first `#[cfg(test)]`.
const MAX_CODE_LINES: usize = 800;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library file under `src/` with the module it belongs to.
fn library_files() -> Vec<(String, PathBuf)> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&root).unwrap().to_path_buf();
            let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
            let module = first.trim_end_matches(".rs").to_owned();
            (!matches!(module.as_str(), "lib" | "main" | "bin")).then_some((module, path))
        })
        .collect()
}

/// The file's lines before its first top-level `#[cfg(test)]`, comments removed (line
/// comments and doc comments; block comments are not used in this crate).
fn code_before_tests(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let code = strip_line_comment(line);
        if !code.trim().is_empty() {
            lines.push((i + 1, code.to_owned()));
        }
    }
    lines
}

/// `line` up to a `//` that is not inside a string literal.
fn strip_line_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut in_str = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The first path segment of every item in a `{…}` group starting at `rest` (just after
/// the `{`), recursing into nothing: `{a::{b, c}, d}` gives `a` and `d`.
fn group_heads(rest: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut at_item_start = true;
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'{' => depth += 1,
            b'}' if depth == 0 => break,
            b'}' => depth -= 1,
            b',' if depth == 0 => at_item_start = true,
            _ if at_item_start && depth == 0 && is_ident(b) => {
                let start = i;
                while i < bytes.len() && is_ident(bytes[i]) {
                    i += 1;
                }
                heads.push(rest[start..i].to_owned());
                at_item_start = false;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    heads
}

/// Edges out of one file: (target module, line number).
fn edges_of(text: &str, modules: &BTreeSet<String>) -> Vec<(String, usize)> {
    let lines = code_before_tests(text);
    // Joined so that a grouped import spanning lines reads as one.
    let mut joined = String::new();
    let mut line_at = Vec::new();
    for (n, code) in &lines {
        joined.push_str(code);
        joined.push('\n');
        line_at.resize(joined.len(), *n);
    }
    let bytes = joined.as_bytes();
    let mut edges = Vec::new();
    let mut from = 0;
    while let Some(pos) = joined[from..].find("crate::") {
        let at = from + pos;
        from = at + "crate::".len();
        let preceded = at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b'$');
        if preceded {
            continue;
        }
        let rest = &joined[from..];
        let heads = if let Some(group) = rest.strip_prefix('{') {
            group_heads(group)
        } else {
            let end = rest
                .bytes()
                .position(|b| !is_ident(b))
                .unwrap_or(rest.len());
            vec![rest[..end].to_owned()]
        };
        for head in heads {
            if modules.contains(&head) {
                edges.push((head, line_at[at]));
            }
        }
    }
    edges
}

/// module → (module it imports → first place it does, as "file:line").
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn module_graph() -> Graph {
    let files = library_files();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = Graph::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let rel = path.strip_prefix(src()).unwrap().display().to_string();
        let out = graph.entry(module.clone()).or_default();
        for (target, line) in edges_of(&text, &modules) {
            if &target != module {
                out.entry(target)
                    .or_insert_with(|| format!("src/{rel}:{line}"));
            }
        }
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flat_map(|m| m.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found.sort();
    t.found
}

/// One concrete cycle inside `component`, starting at its first module: a → b → … → a.
fn one_cycle(graph: &Graph, component: &[String]) -> Vec<String> {
    let inside: BTreeSet<&str> = component.iter().map(String::as_str).collect();
    let start = component[0].as_str();
    // Breadth-first from start's successors back to start: the shortest cycle through it.
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph[v].keys().map(String::as_str) {
            if !inside.contains(w) || parent.contains_key(w) {
                continue;
            }
            parent.insert(w, v);
            if w == start {
                let mut path = vec![start.to_owned()];
                let mut at = v;
                while at != start {
                    path.push(at.to_owned());
                    at = parent[at];
                }
                path.push(start.to_owned());
                path.reverse();
                return path;
            }
            queue.push_back(w);
        }
    }
    unreachable!("a strongly connected component has a cycle through each member")
}

#[test]
fn no_import_cycles_between_modules() {
    let graph = module_graph();
    let found = cycles(&graph);
    let mut report = String::new();
    for component in &found {
        let path = one_cycle(&graph, component);
        writeln!(report, "cycle among {{{}}}:", component.join(", ")).unwrap();
        for pair in path.windows(2) {
            let at = &graph[&pair[0]][&pair[1]];
            writeln!(report, "  {} → {}   ({at})", pair[0], pair[1]).unwrap();
        }
    }
    assert!(
        found.is_empty(),
        "modules import each other in circles:\n{report}"
    );
}

#[test]
fn no_file_is_too_long_before_its_tests() {
    let mut too_long = String::new();
    for (_, path) in library_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let n = code_before_tests(&text).len();
        if n > MAX_CODE_LINES {
            let rel = path.strip_prefix(src()).unwrap().display().to_string();
            writeln!(too_long, "  src/{rel}: {n} lines of code").unwrap();
        }
    }
    assert!(
        too_long.is_empty(),
        "files over {MAX_CODE_LINES} lines of code before their #[cfg(test)]:\n{too_long}"
    );
}

/// The checker itself: a planted cycle through a grouped import is found and named.
#[test]
fn the_checker_finds_a_planted_cycle() {
    let modules: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let a = "//! see crate::c\nuse crate::{\n    b::{X, Y},\n    Root,\n};\n";
    let b = "fn f() { crate::c::g(); }\n";
    let c = "use crate::a;\n#[cfg(test)]\nmod tests { use crate::b; }\n";
    let mut graph = Graph::new();
    for (name, text) in [("a", a), ("b", b), ("c", c)] {
        let out = graph.entry(name.to_owned()).or_default();
        for (target, line) in edges_of(text, &modules) {
            out.entry(target)
                .or_insert_with(|| format!("{name}:{line}"));
        }
    }
    assert_eq!(graph["a"].keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(graph["a"]["b"], "a:2");
    assert_eq!(graph["c"].keys().collect::<Vec<_>>(), ["a"]);
    let found = cycles(&graph);
    assert_eq!(found, [vec!["a", "b", "c"]]);
    assert_eq!(one_cycle(&graph, &found[0]), ["a", "b", "c", "a"]);
}
