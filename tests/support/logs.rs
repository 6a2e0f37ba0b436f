//! Captures everything the vault logs (at trace level) during the test run,
//! so tests can prove that no secret ever reaches a log line.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once per test binary).
pub fn capture() {
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buffer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace,h2=info,hyper=info,tower=info")
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .try_init();
        buffer
    });
}

/// Everything logged so far by every test in this binary.
pub fn captured() -> Vec<u8> {
    BUFFER
        .get()
        .map(|b| b.lock().unwrap().clone())
        .unwrap_or_default()
}
