//! The sandboxed Rhai engine: tensor ops, plugin imports, limits, and error reports
//! that name file:line:col.

use std::cell::RefCell;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Dynamic, Engine, EvalAltResult, FLOAT, Map, ModuleResolver, Position, Shared};

use super::tensor::{self, ScriptTensor};

/// Limits that stop a runaway script instead of hanging or crashing the trainer.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_operations: u64,
    pub max_call_levels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_operations: 20_000_000, max_call_levels: 48 }
    }
}

/// Resolves `import "losses/dpo"` to `<plugins>/losses/dpo.rhai`, never outside `<plugins>`,
/// and records every file it read so the host can watch and report them.
struct PluginResolver {
    root: PathBuf,
    files: Rc<RefCell<Vec<PathBuf>>>,
}

impl ModuleResolver for PluginResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<rhai::Module>, Box<EvalAltResult>> {
        let relative = Path::new(path);
        let escapes = relative.components().any(|c| !matches!(c, Component::Normal(_)));
        if escapes || path.is_empty() {
            return Err(EvalAltResult::ErrorModuleNotFound(
                format!("{path} (imports are paths inside the plugins folder, like \"losses/dpo\")"),
                pos,
            )
            .into());
        }
        let file = self.root.join(format!("{path}.rhai"));
        if !file.is_file() {
            return Err(EvalAltResult::ErrorModuleNotFound(format!("{path} (no file {})", file.display()), pos).into());
        }
        self.files.borrow_mut().push(file.clone());
        // A fresh resolver each time: no cache, so an edited plugin is re-read on reload.
        let mut inner = FileModuleResolver::new_with_path(&self.root);
        inner.enable_cache(false);
        inner.resolve(engine, source, path, pos)
    }
}

/// What a script hands to the host while it is evaluated.
#[derive(Default)]
pub struct Captured {
    pub train_config: Option<Map>,
}

pub struct ScriptEngine {
    pub engine: Engine,
    pub plugins_dir: PathBuf,
    pub imported: Rc<RefCell<Vec<PathBuf>>>,
    pub captured: Rc<RefCell<Captured>>,
}

impl ScriptEngine {
    pub fn new(plugins_dir: &Path, limits: &Limits) -> Self {
        let mut engine = Engine::new();
        engine.set_max_operations(limits.max_operations);
        engine.set_max_call_levels(limits.max_call_levels);
        engine.set_max_expr_depths(128, 64);
        engine.set_max_string_size(1 << 20);
        engine.set_max_array_size(1 << 20);
        engine.set_max_map_size(1 << 16);
        engine.set_max_modules(256);
        // `eval` would compile code the host never checked.
        engine.disable_symbol("eval");

        let imported = Rc::new(RefCell::new(Vec::new()));
        engine.set_module_resolver(PluginResolver { root: plugins_dir.to_path_buf(), files: imported.clone() });

        tensor::register(&mut engine);
        super::random::register(&mut engine);

        let captured = Rc::new(RefCell::new(Captured::default()));
        let slot = captured.clone();
        engine.register_fn("train", move |config: Map| {
            slot.borrow_mut().train_config = Some(config);
        });
        engine.register_fn("assert_close", assert_close);
        engine.register_fn("assert_close", |a: ScriptTensor, e: FLOAT, tol: FLOAT| assert_close(a.scalar()?, e, tol));
        engine.register_fn("assert_close", |a: rhai::INT, e: FLOAT, tol: FLOAT| assert_close(a as FLOAT, e, tol));
        engine.register_fn("assert_true", |cond: bool, msg: &str| -> Result<(), Box<EvalAltResult>> {
            if cond { Ok(()) } else { Err(runtime_error(format!("assertion failed: {msg}"))) }
        });
        engine.on_print(crate::console::line);
        engine.on_debug(|text, source, pos| {
            crate::console::line(&format!("[debug {}:{}] {text}", source.unwrap_or("script"), pos))
        });

        Self { engine, plugins_dir: plugins_dir.to_path_buf(), imported, captured }
    }
}

fn assert_close(actual: FLOAT, expected: FLOAT, tol: FLOAT) -> Result<(), Box<EvalAltResult>> {
    if (actual - expected).abs() <= tol && actual.is_finite() {
        Ok(())
    } else {
        Err(runtime_error(format!("expected {expected} ± {tol}, got {actual}")))
    }
}

pub fn runtime_error(msg: String) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(Dynamic::from(msg), Position::NONE).into()
}

/// Renders a Rhai error as `file:line:col: message`, following imported modules and
/// function calls down to the place that failed, then listing the call chain.
pub fn describe_error(err: &EvalAltResult, file: &str, plugins_dir: &Path) -> String {
    let mut chain = Vec::new();
    let mut out = innermost(err, file.to_string(), plugins_dir, &mut chain);
    for frame in chain.iter().rev() {
        out.push_str(&format!("\n    {frame}"));
    }
    out
}

fn innermost(err: &EvalAltResult, file: String, plugins_dir: &Path, chain: &mut Vec<String>) -> String {
    match err {
        EvalAltResult::ErrorInModule(module, inner, pos) => {
            // Rhai gives no position for the import itself; find the statement in the file.
            let pos = if pos.is_none() { import_position(&file, module) } else { *pos };
            chain.push(format!("imported as \"{module}\" at {}", at(&file, pos)));
            let module_file = if Path::new(module).is_absolute() {
                module.to_string()
            } else {
                plugins_dir.join(module).display().to_string()
            };
            innermost(inner, display_path(&module_file), plugins_dir, chain)
        }
        EvalAltResult::ErrorInFunctionCall(name, source, inner, pos) => {
            chain.push(format!("in call to {name}() at {}", at(&file, *pos)));
            let inner_file = if source.is_empty() { file } else { display_path(source) };
            innermost(inner, inner_file, plugins_dir, chain)
        }
        other => {
            // Display appends " (line L, position C)"; the location goes in front instead.
            let text = other.to_string();
            let message = match text.rfind(" (line ") {
                Some(i) if !other.position().is_none() => &text[..i],
                _ => text.as_str(),
            };
            format!("{}: {message}", at(&file, other.position()))
        }
    }
}

fn import_position(file: &str, module: &str) -> Position {
    let quoted = format!("\"{module}\"");
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().enumerate().find_map(|(i, line)| {
                let col = line.find(&quoted)?;
                line.contains("import").then(|| Position::new(i as u16 + 1, col as u16 + 1))
            })
        })
        .unwrap_or(Position::NONE)
}

fn at(file: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(line), Some(col)) => format!("{file}:{line}:{col}"),
        (Some(line), None) => format!("{file}:{line}"),
        _ => file.to_string(),
    }
}

/// Module ids are absolute paths; show them relative to the working directory.
fn display_path(path: &str) -> String {
    let p = Path::new(path);
    let with_ext = if p.extension().is_none() { p.with_extension("rhai") } else { p.to_path_buf() };
    std::env::current_dir()
        .ok()
        .and_then(|cwd| with_ext.strip_prefix(&cwd).ok().map(Path::to_path_buf))
        .unwrap_or(with_ext)
        .display()
        .to_string()
}
