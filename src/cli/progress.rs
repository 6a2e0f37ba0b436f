//! Progress of a long operation on stderr (`tokenvault admin keys rotate
//! --wait`). On a terminal it is a progress bar (indicatif) with the count,
//! the percentage and an estimate of the time left, redrawn in place. Anywhere
//! else (a log file, CI, a pipe) it is plain lines without control codes: one
//! when the wait starts, one every [`LINE_EVERY`] while it runs, and one when
//! it ends, e.g.
//!
//! ```text
//! rotating to v2: 0/450 wrapped keys (0%)
//! rotating to v2: 120/450 wrapped keys (26%), ETA 14s
//! rotation to v2 completed: 450/450 wrapped keys (100%) in 19s
//! ```
//!
//! Progress is best effort: a failure to write it is ignored. Results still
//! go to stdout and errors to stderr, as for every command.

use std::io::{self, IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is written while the operation runs.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress towards a number of units of work, shown on stderr. Dropped
/// before [`Progress::finish`] (the operation failed), it clears its bar and
/// says nothing more: the error is printed as usual.
pub struct Progress {
    /// What is being done, e.g. `rotating to v2`.
    doing: String,
    /// The units counted, plural (`wrapped keys`).
    units: &'static str,
    /// When the wait started.
    started: Instant,
    /// Where progress goes.
    sink: Sink,
}

/// How progress is shown.
enum Sink {
    /// A terminal: a bar redrawn in place.
    Bar(ProgressBar),
    /// Anything else: lines. `last` is when the last one was written,
    /// `first_done` the count when the wait started (for the estimate).
    Lines { last: Instant, first_done: u64 },
}

impl Progress {
    /// Starts showing `done` of `total` `units` for `doing`: a bar when
    /// stderr is a terminal, else a first line.
    pub fn start(doing: String, units: &'static str, done: u64, total: u64) -> Self {
        let started = Instant::now();
        let sink = if io::stderr().is_terminal() {
            let template =
                format!("{{msg}} [{{bar:40}}] {{pos}}/{{len}} {units} ({{percent}}%), ETA {{eta}}");
            // The template is fixed text with keys indicatif knows; the default
            // bar stands in should a future indicatif refuse it.
            let style = ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(style);
            bar.set_message(doing.clone());
            bar.set_position(done);
            Sink::Bar(bar)
        } else {
            say(&running_line(&doing, done, total, units, None));
            Sink::Lines {
                last: started,
                first_done: done,
            }
        };
        Self {
            doing,
            units,
            started,
            sink,
        }
    }

    /// Shows that `done` of `total` units are done.
    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.sink {
            Sink::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Sink::Lines { last, first_done } => {
                if last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    let left = eta(*first_done, done, total, self.started.elapsed());
                    say(&running_line(&self.doing, done, total, self.units, left));
                }
            }
        }
    }

    /// Ends the display with one line, `ending` (e.g. `rotation to v2
    /// completed`), the final count and the time it took.
    pub fn finish(self, ending: &str, done: u64, total: u64) {
        if let Sink::Bar(bar) = &self.sink {
            bar.finish_and_clear();
        }
        let took = Duration::from_secs(self.started.elapsed().as_secs());
        say(&format!(
            "{ending}: {} in {}",
            count_text(done, total, self.units),
            humantime::format_duration(took)
        ));
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Sink::Bar(bar) = &self.sink
            && !bar.is_finished()
        {
            bar.finish_and_clear();
        }
    }
}

/// Writes one line on stderr, ignoring failures (progress is best effort).
fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// The percentage done, 0 to 100 (100 when there is nothing to do).
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 100;
    }
    let percent = (u128::from(done) * 100 / u128::from(total)).min(100);
    // At most 100, so it fits.
    u64::try_from(percent).unwrap_or(100)
}

/// `120/450 wrapped keys (26%)`.
pub fn count_text(done: u64, total: u64, units: &str) -> String {
    format!("{done}/{total} {units} ({}%)", percent(done, total))
}

/// `rotating to v2: 120/450 wrapped keys (26%), ETA 14s`; without an
/// estimate, no ETA.
pub fn running_line(
    doing: &str,
    done: u64,
    total: u64,
    units: &str,
    left: Option<Duration>,
) -> String {
    let mut line = format!("{doing}: {}", count_text(done, total, units));
    if let Some(left) = left {
        line.push_str(&format!(", ETA {}", humantime::format_duration(left)));
    }
    line
}

/// The time left, to the second (rounded up), at the rate since the wait
/// started with `first_done` done `elapsed` ago; `None` until some progress
/// was seen.
pub fn eta(first_done: u64, done: u64, total: u64, elapsed: Duration) -> Option<Duration> {
    let progressed = done.checked_sub(first_done).filter(|d| *d > 0)?;
    let left = total.saturating_sub(done);
    let elapsed_ms = u64::try_from(elapsed.as_millis()).ok()?;
    let left_ms = elapsed_ms.checked_mul(left)? / progressed;
    Some(Duration::from_secs(left_ms.div_ceil(1000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentages() {
        assert_eq!(
            count_text(120, 450, "wrapped keys"),
            "120/450 wrapped keys (26%)"
        );
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(5, 4), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(percent(1, 3), 33);
    }

    #[test]
    fn the_estimate_follows_the_rate_seen_since_the_start() {
        // 100 keys in 10 s since the start, 300 left: 30 s.
        assert_eq!(
            eta(50, 150, 450, Duration::from_secs(10)),
            Some(Duration::from_secs(30))
        );
        // Nothing done yet: no estimate rather than a wrong one.
        assert_eq!(eta(50, 50, 450, Duration::from_secs(10)), None);
        // Rounded up to the second.
        assert_eq!(
            eta(0, 3, 4, Duration::from_millis(1000)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn plain_lines_hold_no_control_codes() {
        let lines = [
            running_line("rotating to v2", 0, 450, "wrapped keys", None),
            running_line(
                "rotating to v2",
                120,
                450,
                "wrapped keys",
                Some(Duration::from_secs(74)),
            ),
        ];
        assert_eq!(lines[0], "rotating to v2: 0/450 wrapped keys (0%)");
        assert_eq!(
            lines[1],
            "rotating to v2: 120/450 wrapped keys (26%), ETA 1m 14s"
        );
        for line in lines {
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
    }
}
