//! Runs the `tokenvault` binary the way a user's shell would, for the tests
//! that walk through the CLI (the five-minute tour, the Python worker).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

/// Runs `tokenvault <args>` in `cwd` with exactly the given client
/// variables: every `TOKENVAULT_CLI_*` variable of the test's own
/// environment is removed, and no `admin.toml` of the machine is read.
pub fn tokenvault(cwd: &Path, args: &[&str], env: &BTreeMap<String, String>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOKENVAULT_CLI_") {
            cmd.env_remove(name);
        }
    }
    // No ~/.config/tokenvault/admin.toml of the machine running the tests.
    cmd.env("XDG_CONFIG_HOME", cwd.join("no-config"));
    cmd.envs(env);
    cmd.output().expect("run tokenvault")
}

/// Stdout of a step that must succeed.
pub fn ok(step: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{step}: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The value of a `name  value` line.
pub fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}
