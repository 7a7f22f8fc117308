//! Imports between the crate's top-level modules point one way: no module
//! reaches, directly or through others, back to itself.
//!
//! The test reads every source file under `src/` and takes each
//! `crate::<module>` path outside comments (in `use` lines and inline, test
//! code included) as an edge from the file's top-level module to
//! `<module>`. `lib.rs`, and `main.rs` with its `cli.rs`, sit above everything and are
//! left out.
//! A cycle fails the test, naming each step and the lines that make it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges between top-level modules, each with the `file:line`s behind it.
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The identifier an item of a `use` group starts with, if any.
fn push_name(found: &mut Vec<String>, item: &str) {
    let name: String = item
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() {
        found.push(name);
    }
}

/// The identifiers right after `crate::` on `line`, `crate::{a, b::c}`
/// giving `a` and `b`.
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        // `$crate::` in a macro is the same crate; `weir_crate::` is not.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The names at the top level of the group, up to its own `}`.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_name(&mut found, &item);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            push_name(&mut found, &item);
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap_or(&file);
        let Some(top) = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
        else {
            continue;
        };
        let top = top.trim_end_matches(".rs").to_string();
        if matches!(top.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (number, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for module in crate_paths(code) {
                if module != top {
                    graph
                        .entry(top.clone())
                        .or_default()
                        .entry(module)
                        .or_default()
                        .push(format!("{}:{}", relative.display(), number + 1));
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one: the modules in order.
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    // Depth-first, remembering the path that reached each module.
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flat_map(|e| e.keys()) {
            if next == start {
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn top_level_modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(
        graph.len() > 5,
        "read too few modules under {}",
        src.display()
    );
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            let mut report = String::new();
            for (i, from) in cycle.iter().enumerate() {
                let to = &cycle[(i + 1) % cycle.len()];
                let lines = &graph[from][to];
                report.push_str(&format!(
                    "\n  {from} -> {to}: {}",
                    lines.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            panic!("import cycle between top-level modules:{report}");
        }
    }
}

#[test]
fn paths_after_crate_are_read_as_modules() {
    assert_eq!(crate_paths("use crate::store::Store;"), ["store"]);
    assert_eq!(
        crate_paths("use crate::{config::Config, host::{Host, Event}, parse};"),
        ["config", "host", "parse"]
    );
    assert_eq!(
        crate_paths("let x = crate::metrics::Metrics::new(); $crate::host::x"),
        ["metrics", "host"]
    );
    assert!(crate_paths("use weir_crate::x;").is_empty());
    assert_eq!(
        crate_paths("use crate::{a::{b::{C, D}, E}, f, g::H};"),
        ["a", "f", "g"]
    );
}

#[test]
fn a_cycle_is_found() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), vec![]);
    }
    assert_eq!(cycle_from(&graph, "a").map(|c| c.len()), Some(3));
    assert_eq!(cycle_from(&graph, "d"), None);
    graph.entry("c".into()).or_default().remove("a");
    assert_eq!(cycle_from(&graph, "a"), None);
}
