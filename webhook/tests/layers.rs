//! The webhook's flow is serve -> review -> quota <- cluster, over policy: a module may use
//! only the modules below it (docs/architecture.md, "Stages"). This reads every source file
//! of the library and fails on an import that points up the flow, so the layout stays what
//! `ls webhook/src` shows. Unit tests (`tests.rs` and `*_tests.rs` files, `#[cfg(test)]`
//! blocks), test fixtures and the test-only `testing` module are left out: tests may wire any
//! parts together.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Each top-level module and the modules it may use. Leaves (`value`, `backoff`, `metrics`)
/// use nothing of bulwark's.
const ALLOWED: [(&str, &[&str]); 13] = [
    ("value", &[]),
    ("backoff", &[]),
    ("metrics", &[]),
    ("policy", &["value"]),
    ("quota", &["policy", "value"]),
    (
        "cluster",
        &["quota", "policy", "metrics", "backoff", "value"],
    ),
    ("review", &["quota", "policy", "metrics", "value"]),
    ("serve", &["review", "metrics", "backoff", "value"]),
    ("nodes", &["policy", "metrics", "backoff", "value"]),
    (
        "release",
        &[
            "cluster", "quota", "policy", "nodes", "metrics", "backoff", "value",
        ],
    ),
    ("config", &["review", "quota", "policy", "nodes", "value"]),
    (
        "webhook",
        &[
            "serve", "review", "quota", "cluster", "policy", "metrics", "backoff", "value",
            "config", "release",
        ],
    ),
    // `bulwark status`, beside the flow: it counts pods as the webhook's cache does and parses
    // the config as the webhook does; nothing uses it.
    ("status", &["cluster", "config", "policy"]),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file before its unit tests, without comments.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or_default();
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named after `crate::` in `code`, including each item of a
/// `use crate::{a, b::c, ...}` group.
fn used(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item_start) = (1, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        out.insert(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

#[test]
fn imports_only_point_down_the_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.into_iter().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        // The binary (main, cli, commands) sits above the library; tests (`tests.rs`, `api_tests.rs`),
        // fixtures and the test-only `testing` module (`testing.rs` or `testing/`) are left out.
        let test_only = name.ends_with("tests.rs")
            || name == "fixtures.rs"
            || rel.starts_with("testing")
            || rel == Path::new("testing.rs");
        if test_only
            || matches!(
                rel.to_str(),
                Some("lib.rs" | "main.rs" | "cli.rs" | "commands.rs")
            )
        {
            continue;
        }
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_owned())
            .unwrap_or_default();
        let Some(may) = allowed.get(top.as_str()) else {
            wrong.push(format!(
                "{}: module {top} is not in the layer table",
                rel.display()
            ));
            continue;
        };
        let text = fs::read_to_string(&file).expect("readable source");
        for module in used(&code(&text)) {
            if module != top && !may.contains(&module.as_str()) {
                wrong.push(format!("{}: {top} uses crate::{module}", rel.display()));
            }
        }
        checked += 1;
    }
    assert!(checked > 30, "only {checked} files read");
    assert!(
        wrong.is_empty(),
        "imports against the flow:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_finds_grouped_and_plain_imports() {
    let code = "use crate::{\n    quota::{decide::Ask, view::ClusterView},\n    policy::Mode,\n};\nlet x = crate::value::seconds;";
    let found: Vec<String> = used(code).into_iter().collect();
    assert_eq!(found, ["policy", "quota", "value"]);
}
