//! `weir new`: a ready-to-build handler project in Rust, Python or
//! JavaScript.
//!
//! A project is self-contained: it carries the WIT world and a copy of the
//! language's SDK, so it builds with nothing but the language's own
//! toolchain (crates.io, PyPI or npm), and `weir check` accepts its
//! component as made. The files come from `runtime/templates` and `sdk/`,
//! compiled into the binary, so the SDK a project gets always matches the
//! `weir` that made it.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Version of the SDKs (the runtime's version).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The contract a new project builds against: the newest one served.
const CONTRACT: &str = crate::host::WORLD_PACKAGE;
/// componentize-py release the Python projects are built with.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// componentize-js release the JavaScript projects are built with.
pub const COMPONENTIZE_JS: &str = "0.23.0";

const WIT: &str = include_str!("../../wit/handler.wit");
const MANIFEST: &str = include_str!("../templates/manifest.toml");
const README: &str = include_str!("../templates/README.md");

const RUST_CARGO: &str = include_str!("../templates/rust/Cargo.toml");
const RUST_LIB: &str = include_str!("../templates/rust/lib.rs");
const RUST_SDK_CARGO: &str = include_str!("../templates/rust/sdk-Cargo.toml");
const RUST_SDK: &[(&str, &str)] = &[
    ("lib.rs", include_str!("../../sdk/rust/src/lib.rs")),
    ("state.rs", include_str!("../../sdk/rust/src/state.rs")),
    ("emit.rs", include_str!("../../sdk/rust/src/emit.rs")),
    ("config.rs", include_str!("../../sdk/rust/src/config.rs")),
];

const PYTHON_APP: &str = include_str!("../templates/python/app.py");
const PYTHON_TEST: &str = include_str!("../templates/python/test_app.py");
const PYTHON_BUILD: &str = include_str!("../templates/python/build.sh");
const PYTHON_SDK: &[(&str, &str)] = &[
    (
        "__init__.py",
        include_str!("../../sdk/python/weir/__init__.py"),
    ),
    ("_host.py", include_str!("../../sdk/python/weir/_host.py")),
    ("config.py", include_str!("../../sdk/python/weir/config.py")),
    ("log.py", include_str!("../../sdk/python/weir/log.py")),
    ("state.py", include_str!("../../sdk/python/weir/state.py")),
    (
        "testing.py",
        include_str!("../../sdk/python/weir/testing.py"),
    ),
];

const JS_APP: &str = include_str!("../templates/js/app.js");
const JS_PACKAGE: &str = include_str!("../templates/js/package.json");
const JS_SDK: &str = include_str!("../../sdk/js/weir.js");

/// The languages `weir new` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    /// Rust, built for `wasm32-wasip2` with cargo.
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js.
    Js,
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rust => "rust",
            Self::Python => "python",
            Self::Js => "js",
        })
    }
}

/// What was made, for the caller to print.
#[derive(Debug)]
pub struct Project {
    /// The project directory.
    pub dir: PathBuf,
    /// Files written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// The command that builds the component `<name>.wasm`, run inside
    /// `dir`.
    pub build: String,
}

/// Checks that `name` can name a handler: its file stem becomes the
/// handler's name, consumer group and state namespace, and for Rust the
/// crate name.
///
/// # Errors
///
/// Says what is wrong with the name.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let first = name.chars().next();
    if !first.is_some_and(|c| c.is_ascii_lowercase()) {
        bail!("handler name {name:?} must start with a lowercase ASCII letter");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        bail!(
            "handler name {name:?} may hold only lowercase ASCII letters, digits, '-' and '_' (found {bad:?})"
        );
    }
    if name.len() > 64 {
        bail!("handler name {name:?} is longer than 64 characters");
    }
    Ok(())
}

/// Writes a new `language` project for handler `name` into `dir` (which
/// must not exist, or be empty).
///
/// # Errors
///
/// A bad name, a non-empty directory, or a file that cannot be written.
pub fn create(language: Language, name: &str, dir: &Path) -> anyhow::Result<Project> {
    validate_name(name)?;
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("{} exists and is not a readable directory", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} exists and is not empty; choose another name or --dir",
                dir.display()
            );
        }
    }
    let mut files: Vec<(PathBuf, String)> = vec![
        ("wit/handler.wit".into(), WIT.to_string()),
        (
            format!("{name}.toml").into(),
            fill(MANIFEST, name, language),
        ),
    ];
    let build = match language {
        Language::Rust => {
            files.push(("Cargo.toml".into(), fill(RUST_CARGO, name, language)));
            files.push(("src/lib.rs".into(), fill(RUST_LIB, name, language)));
            files.push((
                "sdk/weir-sdk/Cargo.toml".into(),
                fill(RUST_SDK_CARGO, name, language),
            ));
            for (file, text) in RUST_SDK {
                files.push((
                    format!("sdk/weir-sdk/src/{file}").into(),
                    (*text).to_string(),
                ));
            }
            files.push((".gitignore".into(), "/target\n*.wasm\n".into()));
            // cargo names the artifact after the crate, '-' turned into '_'.
            format!(
                "cargo build --release --target wasm32-wasip2 && cp target/wasm32-wasip2/release/{}.wasm {name}.wasm",
                name.replace('-', "_")
            )
        }
        Language::Python => {
            files.push(("app.py".into(), fill(PYTHON_APP, name, language)));
            files.push(("test_app.py".into(), fill(PYTHON_TEST, name, language)));
            files.push(("build.sh".into(), fill(PYTHON_BUILD, name, language)));
            for (file, text) in PYTHON_SDK {
                files.push((format!("weir/{file}").into(), (*text).to_string()));
            }
            files.push((".gitignore".into(), "/.venv\n__pycache__/\n*.wasm\n".into()));
            "bash build.sh".to_string()
        }
        Language::Js => {
            files.push(("app.js".into(), fill(JS_APP, name, language)));
            files.push(("weir.js".into(), JS_SDK.to_string()));
            files.push(("package.json".into(), fill(JS_PACKAGE, name, language)));
            files.push((".gitignore".into(), "/node_modules\n*.wasm\n".into()));
            "npm install && npm run build".to_string()
        }
    };
    let readme = fill(README, name, language)
        .replace("{{files}}", &file_table(language))
        .replace("{{build}}", &format!("{}{build}", setup_command(language)))
        .replace("{{test}}", test_command(language));
    files.push(("README.md".into(), readme));

    for (path, text) in &files {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&full, text).with_context(|| format!("cannot write {}", full.display()))?;
    }
    Ok(Project {
        dir: dir.to_path_buf(),
        files: files.into_iter().map(|(p, _)| p).collect(),
        build,
    })
}

fn fill(template: &str, name: &str, language: Language) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{type_name}}", &type_name(name))
        .replace("{{lang}}", &language.to_string())
        .replace(
            "{{language}}",
            match language {
                Language::Rust => "Rust",
                Language::Python => "Python",
                Language::Js => "JavaScript",
            },
        )
        .replace("{{version}}", VERSION)
        .replace("{{contract}}", CONTRACT)
        .replace("{{componentize_py}}", COMPONENTIZE_PY)
        .replace("{{componentize_js}}", COMPONENTIZE_JS)
}

/// `order-totals` -> `OrderTotals`.
fn type_name(name: &str) -> String {
    name.split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

fn file_table(language: Language) -> String {
    let rows: &[(&str, &str)] = match language {
        Language::Rust => &[
            ("src/lib.rs", "the handler"),
            ("Cargo.toml", "the crate (a `cdylib` for `wasm32-wasip2`)"),
            ("sdk/weir-sdk/", "the Weir SDK for Rust"),
        ],
        Language::Python => &[
            ("app.py", "the handler"),
            ("test_app.py", "unit tests, in plain Python"),
            ("build.sh", "builds the component with componentize-py"),
            ("weir/", "the Weir SDK for Python"),
        ],
        Language::Js => &[
            ("app.js", "the handler"),
            (
                "package.json",
                "`npm run build` builds the component with componentize-js",
            ),
            ("weir.js", "the Weir SDK for JavaScript"),
        ],
    };
    rows.iter()
        .map(|(file, what)| format!("| `{file}` | {what} |\n"))
        .collect()
}

fn setup_command(language: Language) -> &'static str {
    match language {
        Language::Rust => "rustup target add wasm32-wasip2   # once\n",
        Language::Python | Language::Js => "",
    }
}

fn test_command(language: Language) -> &'static str {
    match language {
        Language::Rust => "cargo test",
        Language::Python => "python3 -m unittest",
        Language::Js => {
            "# the handler runs only inside Weir: deploy it to a weir on the embedded broker\nweir run   # then produce to the topic (weir prints the broker's address)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLACEHOLDERS: &[&str] = &[
        "{{name}}",
        "{{type_name}}",
        "{{lang}}",
        "{{language}}",
        "{{version}}",
        "{{contract}}",
        "{{componentize_py}}",
        "{{componentize_js}}",
        "{{files}}",
        "{{build}}",
        "{{test}}",
    ];

    #[test]
    fn names_are_checked_with_a_reason() {
        assert!(validate_name("order-totals").is_ok());
        let err = validate_name("Orders").expect_err("uppercase").to_string();
        assert!(err.contains("lowercase"), "{err}");
        let err = validate_name("a b").expect_err("space").to_string();
        assert!(err.contains("' '"), "{err}");
        assert!(validate_name("").is_err());
    }

    #[test]
    fn every_language_gets_its_files_filled_in() {
        for language in [Language::Rust, Language::Python, Language::Js] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("order-totals");
            let project = create(language, "order-totals", &dir).expect("created");
            for file in &project.files {
                let text = std::fs::read_to_string(dir.join(file)).expect("readable");
                for placeholder in PLACEHOLDERS {
                    assert!(
                        !text.contains(placeholder),
                        "{language}: {} keeps {placeholder}",
                        file.display()
                    );
                }
            }
            crate::registry::Manifest::load(&dir.join("order-totals.toml"))
                .expect("the manifest is valid");
            let wit = std::fs::read_to_string(dir.join("wit/handler.wit")).expect("the WIT");
            assert!(wit.contains(&format!("package {CONTRACT};")), "{language}");
            assert!(dir.join("order-totals.toml").is_file());
            // A second run refuses to overwrite.
            let err = create(language, "order-totals", &dir).expect_err("not empty");
            assert!(err.to_string().contains("not empty"), "{err}");
        }
    }

    #[test]
    fn rust_types_are_camel_case() {
        assert_eq!(type_name("order-totals_v2"), "OrderTotalsV2");
    }
}
