//! Console output that does not tear the progress bar.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

pub fn line(text: &str) {
    match BAR.lock().ok().and_then(|b| b.clone()) {
        Some(bar) => bar.println(text),
        None => println!("{text}"),
    }
}

pub fn start_bar(total: u64, enabled: bool) {
    if !enabled || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {elapsed_precise} < {eta_precise}  {msg}")
            .expect("static template"),
    );
    *BAR.lock().expect("bar lock") = Some(bar);
}

pub fn advance(message: String) {
    if let Some(bar) = BAR.lock().ok().and_then(|b| b.clone()) {
        bar.set_message(message);
        bar.inc(1);
    }
}

pub fn finish_bar() {
    if let Some(bar) = BAR.lock().ok().and_then(|mut b| b.take()) {
        bar.finish_and_clear();
    }
}
