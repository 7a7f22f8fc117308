//! `weir new` makes projects that build with their language's own
//! toolchain and pass `weir check` as made: Rust with cargo for
//! wasm32-wasip2, Python with componentize-py, JavaScript with
//! componentize-js (the toolchains `.ci/install-handler-tools` installs).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use weir_tests::{broker_test, require, weir_binary, workspace};

/// Runs `command` (a build of a whole handler project among them, so the
/// bound is generous) and returns its stdout.
fn run(what: &str, command: &mut Command) -> Result<String> {
    let output = weir_tests::output_within(command, weir_tests::PROGRESS_CEILING)
        .with_context(|| format!("running {what}"))?;
    ensure!(
        output.status.success(),
        "{what} exited with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn tools() -> Result<PathBuf> {
    require(
        workspace().join("target/handler-tools"),
        "the handler toolchains",
        "install them with `bash .ci/install-handler-tools` (or set WEIR_SKIP_BROKER_TESTS=1)",
    )
}

/// Scaffolds `language` project `name` in `parent`; returns its directory.
fn scaffold(parent: &Path, language: &str, name: &str) -> Result<PathBuf> {
    let dir = parent.join(name);
    let said = run(
        "weir new",
        Command::new(weir_binary()?)
            .args(["new", language, name, "--dir"])
            .arg(&dir),
    )?;
    ensure!(
        said.contains("created") && said.contains("weir check"),
        "weir new said: {said}"
    );
    Ok(dir)
}

/// `weir check` accepts the component and names the world's export.
fn check(component: &Path) -> Result<()> {
    let said = run(
        "weir check",
        Command::new(weir_binary()?).arg("check").arg(component),
    )?;
    ensure!(
        said.contains(": ok") && said.contains("handle"),
        "weir check said: {said}"
    );
    Ok(())
}

#[test]
fn scaffolded_projects_build_and_pass_check() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let tools = tools()?;
    let tmp = tempfile::tempdir()?;

    // Python: the project's own build script, the pinned componentize-py,
    // and its unit tests in plain Python (the SDK's in-memory doubles).
    let python = scaffold(tmp.path(), "python", "hello-py")?;
    run(
        "python unit tests",
        Command::new("python3")
            .args(["-m", "unittest", "-q"])
            .current_dir(&python),
    )?;
    run(
        "build.sh",
        Command::new("bash")
            .arg("build.sh")
            .env("COMPONENTIZE_PY", tools.join("py/bin/componentize-py"))
            .current_dir(&python),
    )?;
    check(&python.join("hello-py.wasm"))?;

    // JavaScript: `npm run build`, with componentize-js on the PATH.
    let js = scaffold(tmp.path(), "js", "hello-js")?;
    let path = std::env::join_paths(std::iter::once(tools.join("js/node_modules/.bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    run(
        "npm run build",
        Command::new("npm")
            .args(["run", "--silent", "build"])
            .env("PATH", path)
            .current_dir(&js),
    )?;
    check(&js.join("hello-js.wasm"))?;

    // Rust: cargo for wasm32-wasip2 (a shared target directory keeps
    // repeated runs fast).
    let rust = scaffold(tmp.path(), "rust", "hello-rs")?;
    run(
        "cargo build",
        Command::new("cargo")
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .env("CARGO_TARGET_DIR", workspace().join("target/scaffold"))
            .current_dir(&rust),
    )?;
    check(&workspace().join("target/scaffold/wasm32-wasip2/release/hello_rs.wasm"))?;

    // A second `weir new` into the same place refuses, and a bad name is
    // explained.
    let again = Command::new(weir_binary()?)
        .args(["new", "rust", "hello-rs", "--dir"])
        .arg(&rust)
        .output()?;
    ensure!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "a second weir new: {again:?}"
    );
    let bad = Command::new(weir_binary()?)
        .args(["new", "python", "Hello World"])
        .current_dir(tmp.path())
        .output()?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("lowercase"),
        "weir new with a bad name: {bad:?}"
    );
    Ok(())
}
