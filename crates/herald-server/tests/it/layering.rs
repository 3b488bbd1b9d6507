//! The layering rules of ARCHITECTURE.md, checked on the source itself so
//! that they stay true: no import cycle among the modules of any crate of
//! the workspace, and no source file over 600 lines before its tests.
//!
//! A module's imports are every path it names: its `use` trees and the
//! paths written in its code (`crate::metrics::…`, `super::…`, a child
//! module, or a module brought in by `use`). A path counts as an import of
//! the longest module it starts with. Tests (`#[cfg(test)] mod …`, at the
//! end of a file by convention) are left out: they may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

#[test]
fn no_module_imports_a_module_that_imports_it() {
    let mut failures = Vec::new();
    for krate in crates() {
        let modules = modules(&krate.join("src"));
        assert!(modules.len() > 3, "found no modules under {}", krate.display());
        let graph = imports(&modules);
        for cycle in cycles(&graph) {
            let name = krate.file_name().unwrap_or_default().to_string_lossy();
            failures.push(format!("{name}: {}", describe(&cycle, &graph)));
        }
    }
    assert!(failures.is_empty(), "import cycles:\n{}", failures.join("\n"));
}

#[test]
fn no_source_file_is_over_600_lines_before_its_tests() {
    let mut long = Vec::new();
    for krate in crates() {
        for file in rust_files(&krate.join("src")) {
            let text = std::fs::read_to_string(&file).expect("read source");
            let lines = without_tests(&text).lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

/// The checker itself: a cycle through a parent and its child is found,
/// and so is one written as an inline path; a one-way chain is not.
#[test]
fn the_cycle_check_sees_the_cycles_it_should() {
    let modules: BTreeMap<String, Module> = [
        ("a", "use crate::b::Thing;\n", vec![]),
        ("b", "pub struct Thing; fn f() { crate::c::g() }\n", vec![]),
        ("c", "pub fn g() { super::a::h() }\n", vec![]),
        ("p", "pub use child::X; pub struct Y;\n", vec!["child"]),
        ("p::child", "use super::Y; pub struct X;\n", vec![]),
        ("q", "use crate::b::{Thing, self};\n", vec![]),
    ]
    .into_iter()
    .map(|(name, code, children)| {
        let children = children.into_iter().map(String::from).collect();
        (
            name.to_owned(),
            Module {
                code: code.to_owned(),
                children,
            },
        )
    })
    .collect();
    let graph = imports(&modules);
    let found: Vec<BTreeSet<String>> = cycles(&graph).into_iter().map(|c| c.into_iter().collect()).collect();
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert!(found.contains(&set(&["a", "b", "c"])), "{found:?}");
    assert!(found.contains(&set(&["p", "p::child"])), "{found:?}");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(graph["q"].contains_key("b"), "{:?}", graph["q"]);
}

fn crates() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("read crates/")
        .map(|entry| entry.expect("crates/ entry").path())
        .filter(|path| path.join("src").is_dir())
        .collect();
    found.sort();
    assert!(found.len() >= 3, "expected the workspace's crates, found {found:?}");
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

struct Module {
    code: String,
    /// The names of the modules declared inside this one.
    children: Vec<String>,
}

/// Every module of a library crate, by path (`broker::redis`), with its
/// code (comments and tests removed). The binary's `main.rs` is a crate of
/// its own and is left out.
fn modules(src: &Path) -> BTreeMap<String, Module> {
    let mut modules = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        let last = parts.pop().expect("a file name");
        match last.as_str() {
            "main.rs" if parts.is_empty() => continue,
            "lib.rs" if parts.is_empty() => {}
            "mod.rs" => {}
            other => parts.push(other.trim_end_matches(".rs").to_owned()),
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = without_comments(without_tests(&text));
        let children = declared_modules(&code);
        modules.insert(parts.join("::"), Module { code, children });
    }
    modules
}

/// The text before the file's test module.
fn without_tests(text: &str) -> &str {
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]") {
        let at = from + at;
        let rest = text[at + "#[cfg(test)]".len()..].trim_start();
        let rest = match rest.strip_prefix("pub") {
            Some(public) => public.trim_start_matches(|c| c != ' ' && c != '\n'),
            None => rest,
        };
        if rest.trim_start().starts_with("mod ") {
            return &text[..at];
        }
        from = at + 1;
    }
    text
}

fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        match (line, block) {
            (Some(l), b) if b.is_none_or(|b| l < b) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |end| &rest[l + end..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                rest = rest[b..].find("*/").map_or("", |end| &rest[b + end + 2..]);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

fn declared_modules(code: &str) -> Vec<String> {
    let words: Vec<&str> = code.split_whitespace().collect();
    words
        .windows(2)
        .filter(|pair| pair[0] == "mod" && pair[1].ends_with(';'))
        .map(|pair| pair[1].trim_end_matches(';').to_owned())
        .collect()
}

/// module -> (imported module -> one path that shows it).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn imports(modules: &BTreeMap<String, Module>) -> Graph {
    let mut graph = Graph::new();
    for (name, module) in modules {
        let (use_paths, code) = use_trees(&module.code);
        let mut aliases: BTreeMap<String, String> = BTreeMap::new();
        let mut edges = BTreeMap::new();
        let mut record = |path: &[String], aliases: &BTreeMap<String, String>| {
            if let Some((target, whole)) = resolve(name, module, path, modules, aliases)
                && target != *name
            {
                edges.entry(target).or_insert(whole);
            }
        };
        for path in &use_paths {
            if let Some((target, _)) = resolve(name, module, path, modules, &aliases) {
                let imported = if path.last().is_some_and(|s| s == "self") {
                    &path[path.len() - 2]
                } else {
                    path.last().expect("non-empty")
                };
                if modules.get(&target).is_some() && target.ends_with(imported.as_str()) {
                    aliases.insert(imported.clone(), target);
                }
            }
        }
        for path in &use_paths {
            record(path, &aliases);
        }
        for path in inline_paths(&code) {
            record(&path, &aliases);
        }
        graph.insert(name.clone(), edges);
    }
    graph
}

/// The longest module a path starts with, seen from module `from`.
fn resolve(
    from: &str,
    module: &Module,
    path: &[String],
    modules: &BTreeMap<String, Module>,
    aliases: &BTreeMap<String, String>,
) -> Option<(String, String)> {
    let mut base: Vec<String> = if from.is_empty() {
        vec![]
    } else {
        from.split("::").map(String::from).collect()
    };
    let mut rest = path;
    match path.first()?.as_str() {
        "crate" => {
            base.clear();
            rest = &path[1..];
        }
        "self" => rest = &path[1..],
        "super" => {
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        first if module.children.iter().any(|c| c == first) => {}
        first => {
            let target = aliases.get(first)?;
            base = target.split("::").map(String::from).collect();
            rest = &path[1..];
        }
    }
    let mut best = base.join("::");
    for segment in rest {
        base.push(segment.clone());
        let candidate = base.join("::");
        if modules.contains_key(&candidate) {
            best = candidate;
        } else {
            break;
        }
    }
    Some((best, path.join("::")))
}

/// The flattened paths of every `use` tree, and the code without them.
fn use_trees(code: &str) -> (Vec<Vec<String>>, String) {
    let mut paths = Vec::new();
    let mut rest_of_code = String::new();
    let mut rest = code;
    while let Some(at) = find_word(rest, "use") {
        rest_of_code.push_str(&rest[..at]);
        let end = rest[at..].find(';').map_or(rest.len(), |e| at + e);
        expand(&rest[at + 3..end], &mut Vec::new(), &mut paths);
        rest = &rest[(end + 1).min(rest.len())..];
    }
    rest_of_code.push_str(rest);
    (paths, rest_of_code)
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = text[from..].find(word) {
        let at = from + at;
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if boundary(before) && after.is_some_and(char::is_whitespace) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// Expands a use tree (`a::{b, c::{d, e as f}}`) into its paths.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim().trim_start_matches("::");
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = segments(&tree[..open]);
        let close = tree.rfind('}').unwrap_or(tree.len());
        let depth = prefix.len();
        prefix.extend(head);
        for item in split_top_level(&tree[open + 1..close]) {
            expand(item, prefix, out);
        }
        prefix.truncate(depth);
    } else {
        let item = tree.split(" as ").next().unwrap_or("").trim();
        if item.is_empty() || item == "*" {
            if !prefix.is_empty() {
                out.push(prefix.clone());
            }
            return;
        }
        let mut path = prefix.clone();
        path.extend(segments(item).into_iter().filter(|s| s != "*"));
        out.push(path);
    }
}

fn segments(text: &str) -> Vec<String> {
    text.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn split_top_level(list: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&list[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(&list[start..]);
    items
}

/// Paths written in code: `a::b::c` sequences of identifiers.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut paths = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if !ident(bytes[at]) || (at > 0 && (ident(bytes[at - 1]) || bytes[at - 1] == b':')) {
            at += 1;
            continue;
        }
        let mut path = Vec::new();
        let mut end = at;
        loop {
            let start = end;
            while end < bytes.len() && ident(bytes[end]) {
                end += 1;
            }
            path.push(code[start..end].to_owned());
            if code[end..].starts_with("::") && bytes.get(end + 2).is_some_and(|&b| ident(b)) {
                end += 2;
            } else {
                break;
            }
        }
        if path.len() > 1 {
            paths.push(path);
        }
        at = end.max(at + 1);
    }
    paths
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, node: &'g str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flat_map(|e| e.keys()) {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top.to_owned());
                    if top == node {
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
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found
}

/// A cycle's modules and the imports that join them.
fn describe(cycle: &[String], graph: &Graph) -> String {
    let members: BTreeSet<&String> = cycle.iter().collect();
    let mut edges = Vec::new();
    for from in cycle {
        for (to, path) in &graph[from] {
            if members.contains(to) {
                edges.push(format!("  {from} -> {to} ({path})"));
            }
        }
    }
    format!("[{}]\n{}", cycle.join(", "), edges.join("\n"))
}
