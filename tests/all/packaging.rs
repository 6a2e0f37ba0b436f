//! What operators install: the systemd unit under `deploy/` is one that
//! systemd accepts without a warning.

use std::path::Path;
use std::process::Command;

use crate::serve_cli::BIN;

/// `systemd-analyze verify` on `unit` (a copy of the shipped unit whose
/// `ExecStart` names the binary just built, which systemd checks exists):
/// its exit status and everything it printed.
fn verify(dir: &Path, unit: &str) -> (bool, String) {
    let path = dir.join("tokenvault.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn the_systemd_unit_verifies_without_warnings() {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze required (CI) but not installed: apt-get install systemd"
        );
        println!("SKIPPED (systemd-analyze)");
        return;
    }
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tokenvault.service"),
    )
    .unwrap();
    assert!(
        shipped.contains("ExecStart=/usr/local/bin/tokenvault serve"),
        "the unit runs the installed binary"
    );
    let unit = shipped.replace("/usr/local/bin/tokenvault", BIN);
    let dir = tempfile::tempdir().unwrap();
    let (ok, printed) = verify(dir.path(), &unit);
    assert!(
        ok && printed.trim().is_empty(),
        "systemd-analyze verify: {printed}"
    );

    // The check can fail: a misspelt directive is reported.
    let misspelt = unit.replace("ProtectSystem=", "ProtectSytem=");
    assert_ne!(misspelt, unit, "the unit sets ProtectSystem");
    let (_, printed) = verify(dir.path(), &misspelt);
    assert!(printed.contains("ProtectSytem"), "{printed}");
}
