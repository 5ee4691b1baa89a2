//! A request to stop a run: the loop saves a checkpoint and returns at the next step
//! boundary. The loop reads the handle it is given (as burn-train's Learner takes an
//! interrupter); Ctrl-C is one source of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Once};

/// A shared stop flag; clones set and read the same one.
#[derive(Clone, Default)]
pub struct Interrupt {
    requested: Arc<AtomicBool>,
    /// Set by the process's Ctrl-C handler, which `listen` installs.
    from_ctrl_c: bool,
}

impl Interrupt {
    /// A handle only `request` sets.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's Ctrl-C as a handle. The handler is installed by `listen`, when a run
    /// reaches its steps, so a Ctrl-C during set-up still ends the process at once.
    pub fn ctrl_c() -> Self {
        static CTRL_C: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);
        Self { requested: CTRL_C.clone(), from_ctrl_c: true }
    }

    /// From now on the handle's source can set it (installs the Ctrl-C handler once).
    pub fn listen(&self) {
        static INSTALLED: Once = Once::new();
        if self.from_ctrl_c {
            let requested = self.requested.clone();
            INSTALLED.call_once(|| {
                let _ = ctrlc::set_handler(move || requested.store(true, Ordering::SeqCst));
            });
        }
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}
