//! A compiled experiment script: its AST, the config it passed to `train`, the files it
//! was built from, and calls into its functions by name.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rhai::{AST, Dynamic, EvalAltResult, Map, Module, Scope};

use super::engine::{ScriptEngine, describe_error};

/// One loaded version of an experiment script (a reload makes a new one).
pub struct ScriptVersion {
    pub path: PathBuf,
    /// Static-module namespace under which this version's functions are registered.
    namespace: String,
    pub config: Option<Map>,
    /// The script and every plugin it imported, with their sources at load time.
    pub sources: Vec<(PathBuf, String)>,
    functions: Vec<(String, usize)>,
}

impl ScriptVersion {
    pub fn has_fn(&self, name: &str, arity: usize) -> bool {
        self.functions.iter().any(|(n, a)| n == name && *a == arity)
    }

    pub fn fn_names(&self) -> impl Iterator<Item = &str> {
        self.functions.iter().map(|(n, _)| n.as_str())
    }

    pub fn display_path(&self) -> String {
        self.path.display().to_string()
    }

    /// `file:line: in name()` for the script's definition of `name`, for errors found in
    /// what a function returned (the value has no position of its own).
    pub fn fn_location(&self, name: &str) -> String {
        let source = self.sources.first().map(|(_, text)| text.as_str()).unwrap_or_default();
        let line = function_line(source, name).map(|l| format!(":{l}")).unwrap_or_default();
        format!("{}{line}: in {name}()", self.display_path())
    }
}

/// Error from a script: already formatted as `file:line:col: message`.
#[derive(Debug)]
pub struct ScriptError(pub String);

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

pub struct ScriptHost {
    pub scripts: ScriptEngine,
    versions_loaded: usize,
    callers: RefCell<HashMap<String, AST>>,
}

impl ScriptHost {
    pub fn new(scripts: ScriptEngine) -> Self {
        Self { scripts, versions_loaded: 0, callers: RefCell::new(HashMap::new()) }
    }

    /// Compiles `path` with every plugin it imports, evaluates its top level (which
    /// calls `train(config)`), and registers its functions. Nothing is swapped here:
    /// the caller decides whether the new version replaces the running one.
    pub fn load(&mut self, path: &Path) -> Result<ScriptVersion, ScriptError> {
        let shown = path.display().to_string();
        let source =
            std::fs::read_to_string(path).map_err(|e| ScriptError(format!("{shown}: cannot read script: {e}")))?;
        self.scripts.imported.borrow_mut().clear();
        self.scripts.captured.borrow_mut().train_config = None;

        let engine = &self.scripts.engine;
        let mut ast = engine
            .compile_into_self_contained(&Scope::new(), &source)
            .map_err(|e| ScriptError(describe_error(&e, &shown, &self.scripts.plugins_dir)))?;
        ast.set_source(shown.clone());
        let functions = ast.iter_functions().map(|f| (f.name.to_string(), f.params.len())).collect();
        // Evaluating into a module keeps the script's imports visible to its functions
        // when the host later calls them one by one.
        let module = Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map_err(|e| ScriptError(describe_error(&e, &shown, &self.scripts.plugins_dir)))?;

        self.versions_loaded += 1;
        let namespace = format!("experiment_v{}", self.versions_loaded);
        self.scripts.engine.register_static_module(namespace.as_str(), module.into());

        let mut sources = vec![(path.to_path_buf(), source)];
        for file in self.scripts.imported.borrow().iter() {
            if sources.iter().all(|(p, _)| p != file) {
                let text = std::fs::read_to_string(file).unwrap_or_default();
                sources.push((file.clone(), text));
            }
        }
        let config = self.scripts.captured.borrow_mut().train_config.take();
        Ok(ScriptVersion { path: path.to_path_buf(), namespace, config, sources, functions })
    }

    /// Calls `name(args...)` as defined by `version`.
    pub fn call(&self, version: &ScriptVersion, name: &str, args: Vec<Dynamic>) -> Result<Dynamic, ScriptError> {
        if !version.has_fn(name, args.len()) {
            return Err(ScriptError(format!(
                "{}: no function {name}() taking {} argument(s)",
                version.display_path(),
                args.len()
            )));
        }
        let key = format!("{}::{name}/{}", version.namespace, args.len());
        let mut callers = self.callers.borrow_mut();
        if !callers.contains_key(&key) {
            let params: Vec<String> = (0..args.len()).map(|i| format!("arg{i}")).collect();
            let code = format!("{}::{name}({})", version.namespace, params.join(", "));
            let ast = self.scripts.engine.compile(&code).map_err(|e| ScriptError(e.to_string()))?;
            callers.insert(key.clone(), ast);
        }
        let caller = &callers[&key];
        let mut scope = Scope::new();
        for (i, arg) in args.into_iter().enumerate() {
            scope.push_dynamic(format!("arg{i}"), arg);
        }
        self.scripts.engine.eval_ast_with_scope::<Dynamic>(&mut scope, caller).map_err(|e| {
            match *e {
                EvalAltResult::ErrorInFunctionCall(..) | EvalAltResult::ErrorInModule(..) => {
                    ScriptError(describe_error(&e, &version.display_path(), &self.scripts.plugins_dir))
                }
                // Limit errors are not wrapped in the call chain, so their position is in
                // the generated caller; name the function's definition instead.
                ref other => ScriptError(format!("{}: {}", version.fn_location(name), limit_message(other))),
            }
        })
    }
}

/// Finds the plugins folder for a script: `--plugins`, else the nearest `plugins` folder
/// in the script's ancestors (not the script's own folder, so tests/plugins/*.rhai finds
/// the project's plugins), else `./plugins`.
pub fn find_plugins_dir(script: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        if !dir.is_dir() {
            bail!("--plugins {}: not a folder", dir.display());
        }
        return Ok(dir.to_path_buf());
    }
    let script = script.canonicalize().with_context(|| format!("{}: cannot read script", script.display()))?;
    let own_dir = script.parent().map(Path::to_path_buf).unwrap_or_default();
    let nearest = own_dir
        .ancestors()
        .map(|dir| dir.join("plugins"))
        .find(|candidate| candidate.is_dir() && *candidate != own_dir);
    let cwd = PathBuf::from("plugins");
    nearest
        .or_else(|| cwd.is_dir().then_some(cwd))
        .ok_or_else(|| anyhow!("no plugins folder found above {} or in the working directory", script.display()))
        .context("give one with --plugins DIR")
}

/// The line where `fn name(` is defined in `source`, if it is.
fn function_line(source: &str, name: &str) -> Option<usize> {
    let signature = format!("fn {name}(");
    source.lines().position(|line| line.trim_start().starts_with(&signature)).map(|i| i + 1)
}

fn limit_message(err: &EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorTooManyOperations(_) => {
            "too many operations: stopped as an endless loop (raise --max-operations if the work is real)".into()
        }
        EvalAltResult::ErrorStackOverflow(_) => "stack overflow: calls nested too deep (endless recursion?)".into(),
        other => {
            let text = other.to_string();
            text.rfind(" (line ").map_or(text.clone(), |i| text[..i].to_string())
        }
    }
}
