//! Rhai side: the sandboxed engine, the Tensor type, seeded random draws, rewards, compiled script versions, file
//! watching for hot reload, and the pure-Rhai test runner.

pub mod engine;
pub mod program;
pub mod random;
pub mod reward;
pub mod tensor;
pub mod testing;
pub mod watch;

pub use engine::{Limits, ScriptEngine, describe_error};
pub use program::{ScriptError, ScriptHost, ScriptVersion, find_plugins_dir};
pub use tensor::{ScriptTensor, set_script_device};
pub use watch::ScriptWatcher;
