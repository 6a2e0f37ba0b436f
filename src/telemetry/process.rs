//! The process's own metrics, in the names and meanings of the Prometheus
//! client libraries (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, …), read from `/proc` at scrape time and
//! appended to the recorder's text: no timer, no state.
//!
//! Invariants:
//! - Each family is written whole (`# HELP`, `# TYPE`, one sample) or not at
//!   all: a figure `/proc` does not give (another OS, a file that does not
//!   parse, an unlimited descriptor limit) is left out silently.
//! - Times from `/proc/self/stat` are in clock ticks of 1/100 s (`USER_HZ`,
//!   100 on every Linux platform the vault runs on).
//! - `/proc/self/stat` is split at the last `)`: the command name before it
//!   may itself hold spaces and parentheses.

use std::fmt::{Display, Write as _};

/// Clock ticks per second of the times in `/proc/self/stat`.
const TICKS_PER_SECOND: f64 = 100.0;

/// Appends the process families to `out` (Prometheus text format).
pub fn render(out: &mut String) {
    let Some(stat) = read("/proc/self/stat").and_then(|s| Stat::parse(&s)) else {
        return;
    };
    family(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        stat.cpu_seconds(),
    );
    if let Some(bytes) = read("/proc/self/status").and_then(|s| resident_bytes(&s)) {
        family(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            bytes,
        );
    }
    family(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        stat.virtual_bytes,
    );
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count(),
        );
    }
    if let Some(max) = read("/proc/self/limits").and_then(|s| max_open_files(&s)) {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
    if let Some(boot) = read("/proc/stat").and_then(|s| boot_time(&s)) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot as f64 + stat.start_ticks as f64 / TICKS_PER_SECOND,
        );
    }
    family(
        out,
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        stat.threads,
    );
}

/// One family with its single sample.
fn family(out: &mut String, name: &str, kind: &str, help: &str, value: impl Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// What the vault reads of `/proc/self/stat` (proc(5)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    /// Field 14, user time (ticks).
    utime: u64,
    /// Field 15, system time (ticks).
    stime: u64,
    /// Field 20.
    threads: u64,
    /// Field 22, start time after boot (ticks).
    start_ticks: u64,
    /// Field 23, virtual memory size (bytes).
    virtual_bytes: u64,
}

impl Stat {
    /// Parses the one line of `/proc/self/stat`; `None` if it does not have
    /// the fields.
    fn parse(line: &str) -> Option<Self> {
        // Field 2, the command name in parentheses, may hold anything but
        // ends at the last `)`; field 3 is the first after it.
        let (_, rest) = line.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
        Some(Self {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            virtual_bytes: field(23)?,
        })
    }

    fn cpu_seconds(&self) -> f64 {
        (self.utime + self.stime) as f64 / TICKS_PER_SECOND
    }
}

/// `VmRSS` of `/proc/self/status` (in kB there), in bytes.
fn resident_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The soft limit of `Max open files` in `/proc/self/limits`; `None` when
/// unlimited.
fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_split_at_the_last_parenthesis() {
        let line = "4242 (tokio (rt) x) y) S 1 4242 4242 0 -1 4194560 2500 0 3 0 \
                    150 75 0 0 20 0 12 0 98765 1234567890 5000 18446744073709551615 \
                    4194304 4198400 140736 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = Stat::parse(line).expect("a stat line");
        assert_eq!(
            stat,
            Stat {
                utime: 150,
                stime: 75,
                threads: 12,
                start_ticks: 98765,
                virtual_bytes: 1_234_567_890,
            }
        );
        assert!((stat.cpu_seconds() - 2.25).abs() < 1e-9);
    }

    #[test]
    fn a_stat_line_without_its_fields_is_refused() {
        assert_eq!(Stat::parse("4242 (tokenvault) S 1 2 3"), None);
        assert_eq!(Stat::parse("no parenthesis at all"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_read() {
        let status = "Name:\ttokenvault\nVmSize:\t  123456 kB\nVmRSS:\t   20480 kB\nThreads:\t12\n";
        assert_eq!(resident_bytes(status), Some(20480 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), None);
        assert_eq!(
            boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn each_family_has_help_type_and_a_sample() {
        let mut out = String::new();
        render(&mut out);
        if !std::path::Path::new("/proc/self/stat").exists() {
            assert!(out.is_empty());
            return;
        }
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("# HELP {name} ")), "{out}");
            assert!(out.contains(&format!("# TYPE {name} ")), "{out}");
            let value = out
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse::<f64>().ok());
            // A test process may not have used a whole tick of CPU yet.
            let least = if name == "process_cpu_seconds_total" {
                0.0
            } else {
                1.0
            };
            assert!(value.is_some_and(|v| v >= least), "{name} in {out}");
        }
    }
}
