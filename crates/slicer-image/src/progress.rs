//! Step reporting: a spinner with elapsed time on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Step {
    bar: Option<ProgressBar>,
    name: String,
    started: Instant,
}

impl Step {
    pub fn start(name: &str) -> Step {
        let bar = if std::io::stderr().is_terminal() {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(name.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            Some(b)
        } else {
            eprintln!("==> {name}");
            None
        };
        Step {
            bar,
            name: name.to_string(),
            started: Instant::now(),
        }
    }

    pub fn done(self) {
        let msg = format!("{} ({:.1} s)", self.name, self.started.elapsed().as_secs_f64());
        match &self.bar {
            Some(b) => b.finish_with_message(format!("done: {msg}")),
            None => eprintln!("    done: {msg}"),
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon_with_message(format!("failed: {}", self.name));
            }
        }
    }
}
