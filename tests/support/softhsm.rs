//! SoftHSM2 tokens made at test time: a private configuration and token
//! directory per token, initialised with `softhsm2-util`, used through the
//! real PKCS#11 module.
//!
//! SoftHSM reads its configuration (`SOFTHSM2_CONF`) once per process, when the
//! module is initialised, so a token is used by child processes started with
//! [`SoftHsm::env`] (vault replicas, or this test binary re-run on one test with
//! [`run_child_test`]), never by the test process itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Where Debian (package `softhsm2`) and other distributions put the module.
const MODULES: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Set in a child test process that has a token (see [`run_child_test`]).
pub const CHILD_VAR: &str = "TV_TEST_SOFTHSM_CHILD";

/// The user PIN of every test token.
pub const PIN: &str = "87654321";

/// The PKCS#11 module, if SoftHSM2 is installed.
pub fn module() -> Option<PathBuf> {
    MODULES.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Whether a missing SoftHSM2 must fail the test instead of skipping it (CI).
fn required() -> bool {
    std::env::var("TV_REQUIRE_SOFTHSM").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One SoftHSM2 token in a private token directory.
pub struct SoftHsm {
    pub dir: TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
    pub label: String,
}

impl SoftHsm {
    /// Makes a token labelled `label`; `None` (after saying so on stderr) when
    /// SoftHSM2 is not installed and not required.
    pub fn new(label: &str) -> Option<Self> {
        let Some(module) = module() else {
            if required() {
                panic!("SoftHSM2 required (CI) but not installed: apt-get install softhsm2");
            }
            use std::io::Write as _;
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (softhsm): {test}: SoftHSM2 is not installed (apt-get install softhsm2)"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
                 slots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", PIN, "--so-pin", "12345678"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("run softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self {
            dir,
            conf,
            module,
            label: label.to_owned(),
        })
    }

    /// The environment a process needs to see this token, with the PIN.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SOFTHSM2_CONF", self.conf.display().to_string()),
            ("TOKENVAULT_KEYRING__PKCS11__PIN", PIN.to_owned()),
        ]
    }

    /// The `[keyring]` configuration of a vault using this token.
    pub fn keyring_toml(&self, extra_keyring: &str) -> String {
        format!(
            "[keyring]\nprovider = \"pkcs11\"\n{extra_keyring}\n[keyring.pkcs11]\nmodule = {:?}\n\
             token_label = {:?}\n",
            self.module.display().to_string(),
            self.label
        )
    }
}

/// Runs the test `name` (its full path, e.g. `key_custody::pkcs11_provider`)
/// alone in a child copy of this test binary that sees `hsm`'s token, and
/// fails if it fails. The child finds [`CHILD_VAR`] set.
pub fn run_child_test(name: &str, hsm: &SoftHsm) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env(CHILD_VAR, hsm.label.as_str())
        .env("TV_TEST_SOFTHSM_MODULE", &hsm.module)
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test {name} failed:\n{stdout}\n{stderr}"
    );
}

/// In a child started by [`run_child_test`]: the token's label and module.
pub fn child_token() -> Option<(String, PathBuf)> {
    let label = std::env::var(CHILD_VAR).ok()?;
    let module = std::env::var("TV_TEST_SOFTHSM_MODULE").ok()?;
    Some((label, Path::new(&module).to_owned()))
}
