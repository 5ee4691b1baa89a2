//! Hugging Face safetensors checkpoints: load (single file or sharded with an index),
//! f32/f16/bf16, and save in the same layout, with clear errors on missing or
//! mis-shaped tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::config::LlamaConfig;
use super::llama::{Llama, WeightSource};
use super::lora::LoraConfig;
use crate::failpoint;

/// Where one tensor of a checkpoint lies: its file, dtype, shape and byte range.
struct Stored {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte offsets in the file.
    start: u64,
    end: u64,
}

/// The tensors of a checkpoint, read from their files one at a time as the model takes
/// them. Only the headers are read up front; each tensor's bytes are read once, by
/// position, straight into its own buffer, so a checkpoint is never held whole in memory.
///
/// Positional reads rather than a memory map: burn's tensors own their storage, so a map
/// would only be another way to read the bytes, and one that a file truncated or rewritten
/// while mapped turns into SIGBUS or changed weights. Each file's size and modification
/// time are checked when it is opened and again after the model is built; a change in
/// between is an error.
pub struct SafetensorsWeights {
    tensors: HashMap<String, Stored>,
    /// (file, size, modified) when the header was read.
    files: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    /// Matrices (embeddings, projections, lm_head) keep the file's dtype (bf16, f16 or f32)
    /// instead of becoming f32: for weights that never train (a LoRA base, a reference).
    keep_stored_dtype: bool,
}

/// The dtypes prefhost reads.
fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// A file's size and modification time, to tell whether it changed while being read.
fn file_stamp(file: &Path) -> Result<(u64, Option<std::time::SystemTime>)> {
    let meta = std::fs::metadata(file).with_context(|| format!("{}: cannot read weights", file.display()))?;
    Ok((meta.len(), meta.modified().ok()))
}

/// Reads a safetensors header and checks every tensor's entry against the file: a dtype
/// prefhost reads, a byte range that fits its shape, and data that the file really holds.
fn read_header(file: &Path) -> Result<Vec<(String, Stored)>> {
    use std::os::unix::fs::FileExt;
    let at = file.display();
    let handle = std::fs::File::open(file).with_context(|| format!("{at}: cannot read weights"))?;
    let file_len = handle.metadata().with_context(|| format!("{at}: cannot read weights"))?.len();
    let mut len_bytes = [0u8; 8];
    handle
        .read_exact_at(&mut len_bytes, 0)
        .map_err(|e| anyhow::anyhow!("{at}: not a valid safetensors file: cannot read its header length ({e})"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    // safetensors' own limit (100 MB): a larger value is a corrupt file, not a header to allocate.
    if header_len > 100_000_000 || 8 + header_len > file_len {
        bail!(
            "{at}: not a valid safetensors file: header length {header_len} with a file of {file_len} bytes (truncated?)"
        );
    }
    let mut header = vec![0u8; header_len as usize];
    handle.read_exact_at(&mut header, 8).map_err(|e| anyhow::anyhow!("{at}: not a valid safetensors file: {e}"))?;
    // Entry by entry rather than through safetensors' Metadata, whose errors do not name the tensor.
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("{at}: not a valid safetensors file: header: {e}"))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut infos = Vec::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(entry)
            .map_err(|e| anyhow::anyhow!("{at}: tensor \"{name}\": not a valid safetensors header entry: {e}"))?;
        infos.push((name, info));
    }
    // In file order, so a truncated file names the first tensor it cuts.
    infos.sort_by_key(|(_, info)| info.data_offsets);
    let mut out = Vec::new();
    for (name, info) in infos {
        let Some(size) = element_size(info.dtype) else {
            bail!(
                "{at}: tensor \"{name}\" has dtype {:?}, which prefhost does not read (supported: F32, F16, BF16)",
                info.dtype
            );
        };
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let needs = info.shape.iter().try_fold(size as u64, |n, &d| n.checked_mul(d as u64));
        if end < start || needs != Some(end - start) {
            let needs = needs.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
            bail!(
                "{at}: not a valid safetensors file: tensor \"{name}\": shape {:?} in {:?} needs {needs} bytes, its data offsets [{start}, {end}) hold {}",
                info.shape,
                info.dtype,
                end.saturating_sub(start)
            );
        }
        if end > data_len {
            bail!(
                "{at}: not a valid safetensors file: tensor \"{name}\" ends at byte {} of a {file_len}-byte file (truncated?)",
                data_start + end
            );
        }
        out.push((
            name,
            Stored {
                file: file.to_path_buf(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + start,
                end: data_start + end,
            },
        ));
    }
    Ok(out)
}

impl SafetensorsWeights {
    /// Every matrix as f32: what a model that trains them starts from.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    /// `keep_stored_dtype`: matrices stay in the file's dtype (see the field).
    pub fn open_with(dir: &Path, keep_stored_dtype: bool) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", index.display(), e.line(), e.column()))?;
            let map = parsed["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
            let mut shards: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors: HashMap<String, Stored> = HashMap::new();
        let mut stamps = Vec::new();
        for file in files {
            let (len, modified) = file_stamp(&file)?;
            stamps.push((file.clone(), len, modified));
            for (name, stored) in read_header(&file)? {
                // Which copy applies would be a guess (the later shard silently won before).
                if let Some(first) = tensors.get(&name) {
                    bail!("tensor \"{name}\" is in both {} and {}", first.file.display(), file.display());
                }
                tensors.insert(name, stored);
            }
        }
        Ok(Self { tensors, files: stamps, keep_stored_dtype })
    }

    /// The tensor's bytes as stored (little-endian), checked against the expected shape.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<u8>, PathBuf)> {
        use std::os::unix::fs::FileExt;
        let Some(stored) = self.tensors.get(name) else {
            bail!("checkpoint has no tensor \"{name}\" (expected shape {shape:?})");
        };
        let at = stored.file.display();
        if stored.shape != shape {
            bail!("{at}: tensor \"{name}\" has shape {:?}, the config expects {shape:?}", stored.shape);
        }
        let mut bytes = vec![0u8; (stored.end - stored.start) as usize];
        std::fs::File::open(&stored.file).and_then(|f| f.read_exact_at(&mut bytes, stored.start)).map_err(|e| {
            anyhow::anyhow!("{at}: tensor \"{name}\": cannot read its data ({e}); was the file truncated?")
        })?;
        let stored = self.tensors.remove(name).expect("looked up above");
        Ok((stored.dtype, bytes, stored.file))
    }

    /// Errors if a file changed since its header was read: the tensors read from it may
    /// mix two versions.
    pub fn check_unchanged(&self) -> Result<()> {
        for (file, len, modified) in &self.files {
            if file_stamp(file)? != (*len, *modified) {
                bail!("{}: the file changed while the model was being loaded; load it again", file.display());
            }
        }
        Ok(())
    }

    /// Bytes per element of the checkpoint's tensors as stored (4 for f32, 2 for bf16/f16):
    /// what a frozen copy kept in the stored dtype costs per parameter.
    pub fn stored_bytes_per_element(&self) -> f64 {
        let (bytes, elements) = self
            .tensors
            .values()
            .fold((0u64, 0u64), |(b, n), t| (b + t.end - t.start, n + t.shape.iter().product::<usize>() as u64));
        if elements == 0 { 4.0 } else { bytes as f64 / elements as f64 }
    }

    /// Names the checkpoint had that the model did not use, each with its file.
    pub fn unused(&self) -> Vec<String> {
        let file_name =
            |f: &PathBuf| f.file_name().map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut names: Vec<String> =
            self.tensors.iter().map(|(name, stored)| format!("{name} (in {})", file_name(&stored.file))).collect();
        names.sort();
        names
    }
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    let halves = |conv: fn(u16) -> f32| data.chunks_exact(2).map(|b| conv(u16::from_le_bytes([b[0], b[1]]))).collect();
    Ok(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => halves(|h| half::f16::from_bits(h).to_f32()),
        Dtype::BF16 => halves(|h| half::bf16::from_bits(h).to_f32()),
        other => bail!("unsupported dtype {other:?} (supported: F32, F16, BF16)"),
    })
}

/// A tensor in the file's own dtype: bf16 and f16 keep their bits, f32 is read as f32.
fn stored_data(dtype: Dtype, bytes: &[u8], shape: Vec<usize>) -> Result<(TensorData, DType)> {
    let bits = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    Ok(match dtype {
        Dtype::BF16 => (
            TensorData::new(bytes.chunks_exact(2).map(|b| half::bf16::from_bits(bits(b))).collect::<Vec<_>>(), shape),
            DType::BF16,
        ),
        Dtype::F16 => (
            TensorData::new(bytes.chunks_exact(2).map(|b| half::f16::from_bits(bits(b))).collect::<Vec<_>>(), shape),
            DType::F16,
        ),
        _ => (TensorData::new(to_f32(dtype, bytes)?, shape), DType::F32),
    })
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor<2>> {
        let (dtype, bytes, file) = self.take(name, shape)?;
        let in_file = || format!("{}: tensor {name}", file.display());
        if self.keep_stored_dtype {
            let (data, dtype) = stored_data(dtype, &bytes, shape.to_vec()).with_context(in_file)?;
            return Ok(Tensor::from_data(data, (device, dtype)));
        }
        let values = to_f32(dtype, &bytes).with_context(in_file)?;
        Ok(Tensor::from_data(TensorData::new(values, [shape[0], shape[1]]), device))
    }
    /// Norm weights and biases stay f32 (a few thousand values per layer).
    fn vector(&mut self, name: &str, len: usize, device: &Device) -> Result<Tensor<1>> {
        let (dtype, bytes, file) = self.take(name, &[len])?;
        let values = to_f32(dtype, &bytes).with_context(|| format!("{}: tensor {name}", file.display()))?;
        Ok(Tensor::from_data(TensorData::new(values, [len]), device))
    }
}

/// Loads `dir/config.json` + safetensors into a model on `device`, every weight f32 (a
/// model that trains them).
pub fn load_model(dir: &Path, device: &Device) -> Result<(LlamaConfig, Llama)> {
    load_model_with(dir, device, false)
}

/// Loads a model whose weights will not train (a LoRA base, a reference): its matrices
/// keep the checkpoint's dtype (bf16/f16 take half of f32's memory) and are widened to f32
/// only for each product that reads them. Norms and biases are f32. Gives the same
/// log-probs as `load_model`: bf16 and f16 convert to f32 exactly.
pub fn load_frozen_model(dir: &Path, device: &Device) -> Result<(LlamaConfig, Llama)> {
    load_model_with(dir, device, true)
}

fn load_model_with(dir: &Path, device: &Device, keep_stored_dtype: bool) -> Result<(LlamaConfig, Llama)> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let mut weights = SafetensorsWeights::open_with(dir, keep_stored_dtype)?;
    let model = Llama::build(&config, &mut weights, device).with_context(|| format!("loading {}", dir.display()))?;
    let unused = weights.unused();
    if !unused.is_empty() {
        bail!("{}: checkpoint tensors not used by a {} model: {}", dir.display(), config.model_type, unused.join(", "));
    }
    weights.check_unchanged()?;
    Ok((config, model))
}

/// Tensors by HF name: shape and f32 values.
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A tensor on its way into a safetensors file: its shape, and its values as a
/// [rows, columns] tensor made only when the writer reaches it, then copied out a block
/// of rows at a time. A save so holds a few MB of copies at once, not the whole model's
/// (538 MB at 135M parameters, on top of the training run's peak).
pub struct PendingTensor<'a> {
    pub shape: Vec<usize>,
    make: Box<dyn Fn() -> Tensor<2> + 'a>,
}

impl<'a> PendingTensor<'a> {
    pub(crate) fn matrix(shape: [usize; 2], make: impl Fn() -> Tensor<2> + 'a) -> Self {
        Self { shape: shape.to_vec(), make: Box::new(make) }
    }

    fn vector(t: Tensor<1>) -> Self {
        Self { shape: t.dims().to_vec(), make: Box::new(move || t.clone().unsqueeze::<2>()) }
    }

    /// All values (f32, row-major).
    pub fn values(&self) -> Vec<f32> {
        crate::tensor::values((self.make)())
    }
}

/// The model's parameters under their HF names and layout, each made when asked for.
/// Adapters are folded into their projection's weight: saving a LoRA model merges it.
pub fn hf_tensor_list(model: &Llama) -> Vec<(String, PendingTensor<'_>)> {
    let mut out = Vec::new();
    // burn's Linear holds [in, out]; HF's files hold [out, in].
    let linear_t = |weight: Tensor<2>| {
        let [input, output] = weight.dims();
        PendingTensor::matrix([output, input], move || weight.clone().transpose())
    };
    let embed = model.embed_tokens.weight.val();
    out.push(("model.embed_tokens.weight".to_string(), PendingTensor::matrix(embed.dims(), move || embed.clone())));
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, norm) in layer.norm_names() {
            out.push((format!("model.layers.{i}.{name}.weight"), PendingTensor::vector(norm.weight.val())));
        }
    }
    for (path, _, projection) in model.projections() {
        let [input, output] = projection.base.weight.dims();
        let merged = PendingTensor::matrix([output, input], move || projection.merged_weight().transpose());
        out.push((format!("{path}.weight"), merged));
        if let Some(bias) = &projection.base.bias {
            out.push((format!("{path}.bias"), PendingTensor::vector(bias.val())));
        }
    }
    out.push(("model.norm.weight".to_string(), PendingTensor::vector(model.norm.weight.val())));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), linear_t(head.weight.val())));
        if let Some(bias) = &head.bias {
            out.push(("lm_head.bias".to_string(), PendingTensor::vector(bias.val())));
        }
    }
    out
}

/// The model's parameters under their HF names and layout, with their values.
pub fn hf_tensors(model: &Llama) -> NamedTensors {
    with_values(hf_tensor_list(model))
}

/// Each tensor of `list` with its values.
pub(crate) fn with_values(list: Vec<(String, PendingTensor)>) -> NamedTensors {
    list.into_iter().map(|(name, t)| (name, (t.shape.clone(), t.values()))).collect()
}

/// Writes an HF model folder (config.json, model.safetensors, tokenizer.json). Files are
/// written to a temporary folder first and renamed into place, so a crash leaves either
/// the old folder or the new one, never a half-written one.
pub fn save_model(model: &Llama, config: &LlamaConfig, tokenizer_json: &Path, dir: &Path) -> Result<()> {
    save_model_with(model, config, tokenizer_json, dir, &[])
}

/// `save_model` plus extra files (trainer state, optimizer state) in the same atomic step.
pub fn save_model_with(
    model: &Llama,
    config: &LlamaConfig,
    tokenizer_json: &Path,
    dir: &Path,
    extra: &[ExtraFile],
) -> Result<()> {
    write_folder(dir, !extra.is_empty(), |staging| {
        staging.safetensors("model.safetensors", hf_tensor_list(model))?;
        let mut json = serde_json::to_value(config)?;
        json["architectures"] = serde_json::json!([config.family().architecture()]);
        json["torch_dtype"] = serde_json::json!("float32");
        staging.write("config.json", (serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
        copy_tokenizer_files(tokenizer_json, staging)?;
        write_extra(staging, extra)
    })
}

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Writes a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, the
/// tokenizer files) plus `extra`, atomically like `save_model_with`. `base_model` is the
/// model folder the adapters were trained on.
pub fn save_adapter(
    model: &Llama,
    lora: &LoraConfig,
    base_model: &str,
    tokenizer_json: &Path,
    dir: &Path,
    extra: &[ExtraFile],
) -> Result<()> {
    write_folder(dir, !extra.is_empty(), |staging| {
        staging.safetensors(ADAPTER_WEIGHTS, model.adapter_tensor_list())?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "target_modules": lora.modules()?,
            "use_rslora": lora.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        staging.write(ADAPTER_CONFIG, (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
        copy_tokenizer_files(tokenizer_json, staging)?;
        write_extra(staging, extra)
    })
}

/// A PEFT adapter folder read back: its LoRA settings, base model, and tensors (PEFT
/// names and layout, f32).
pub struct AdapterFiles {
    pub lora: LoraConfig,
    pub base_model: Option<String>,
    pub tensors: NamedTensors,
}

pub fn read_adapter(dir: &Path) -> Result<AdapterFiles> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
    let at = path.display();
    if json["peft_type"].as_str() != Some("LORA") {
        bail!("{at}: peft_type is {}, only \"LORA\" adapters are supported", json["peft_type"]);
    }
    // Variants this trainer does not implement: refuse rather than load them wrongly. Every
    // field but those read below and PEFT's bookkeeping must be off, so variants newer PEFT
    // versions add (aLoRA's alora_invocation_tokens, use_bdlora, arrow_config, ...) are
    // refused too instead of loading as plain LoRA.
    let off = |key: &str, v: &serde_json::Value| match key {
        "bias" => v.is_null() || v == "none",
        // Only how PEFT initialised the adapters, which are stored trained; other values
        // (pissa, olora, loftq, ...) also change the base weights.
        "init_lora_weights" => v.is_null() || v.is_boolean(),
        _ => {
            v.is_null()
                || v == &serde_json::json!(false)
                || v.as_object().is_some_and(|m| m.is_empty())
                || v.as_array().is_some_and(|a| a.is_empty())
        }
    };
    const READ_OR_BOOKKEEPING: [&str; 15] = [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        // Read by PEFT only with use_qalora / layers_to_transform / megatron_config, which must be off.
        "qalora_group_size",
        "layers_pattern",
        "megatron_core",
    ];
    let object = json.as_object().with_context(|| format!("{at}: expected a JSON object"))?;
    for (key, value) in object {
        if !READ_OR_BOOKKEEPING.contains(&key.as_str()) && !off(key, value) {
            bail!("{at}: field \"{key}\" is {value}, which prefhost does not support");
        }
    }
    let mut fields = serde_json::Map::new();
    for key in ["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"] {
        if let Some(v) = json.get(key).filter(|v| !v.is_null()) {
            fields.insert(key.to_string(), v.clone());
        }
    }
    let lora: LoraConfig =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
    lora.validate(&at.to_string())?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights).with_context(|| format!("{}: cannot read", weights.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", weights.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let values =
            to_f32(view.dtype(), view.data()).with_context(|| format!("{}: tensor {name}", weights.display()))?;
        tensors.insert(name.to_string(), (view.shape().to_vec(), values));
    }
    Ok(AdapterFiles { lora, base_model: json["base_model_name_or_path"].as_str().map(str::to_string), tensors })
}

/// A base model with the adapters of a PEFT folder on it (`base`: the model folder, by
/// default the adapter's base_model_name_or_path). Returns the base folder too.
pub fn load_adapter_model(
    adapter_dir: &Path,
    base: Option<&Path>,
    device: &Device,
) -> Result<(LlamaConfig, Llama, PathBuf)> {
    let mut files = read_adapter(adapter_dir)?;
    let base = match (base, &files.base_model) {
        (Some(base), _) => base.to_path_buf(),
        (None, Some(named)) => PathBuf::from(named),
        (None, None) => bail!(
            "{}: no base_model_name_or_path; give the base model folder",
            adapter_dir.join(ADAPTER_CONFIG).display()
        ),
    };
    if !base.join("config.json").is_file() {
        bail!(
            "{}: the adapter's base model {} is not a model folder here; give the base model folder",
            adapter_dir.join(ADAPTER_CONFIG).display(),
            base.display()
        );
    }
    let (config, model) = load_model(&base, device)?;
    let model = model
        .with_lora(&files.lora, device)?
        .set_adapters(&mut files.tensors, device)
        .with_context(|| adapter_dir.join(ADAPTER_WEIGHTS).display().to_string())?;
    Ok((config, model, base))
}

/// Where `write_folder(dir, ..)` builds the new folder and moves a replaced one aside:
/// hidden siblings (leading dot), which are never taken for checkpoints.
fn side_folders(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    (parent.join(format!(".{name}.tmp")), parent.join(format!(".{name}.old")), parent)
}

/// The staging folder of a save in progress. Every file goes through it, so the
/// `file:NAME` failpoint can stop the save after any one of them.
struct Staging<'a> {
    path: PathBuf,
    target: &'a Path,
}

impl Staging<'_> {
    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        std::fs::write(self.path.join(name), bytes).with_context(|| format!("writing {name}"))?;
        failpoint::file_written(self.target, name)
    }

    fn copy(&self, source: &Path, name: &str) -> Result<()> {
        std::fs::copy(source, self.path.join(name)).with_context(|| format!("copying {}", source.display()))?;
        failpoint::file_written(self.target, name)
    }

    fn safetensors(&self, name: &str, tensors: Vec<(String, PendingTensor)>) -> Result<()> {
        write_safetensors(tensors, &self.path.join(name))?;
        failpoint::file_written(self.target, name)
    }
}

/// Builds `dir` in a staging folder and renames it into place, so a crash leaves either
/// the old folder or the new one, never a half-written one. A crash while replacing an
/// existing `dir` can leave it moved aside; `recover_folder` puts it back.
/// With `manifest` (checkpoints: folders with extra files), `MANIFEST_FILE` is written
/// last inside the staging folder, so it is in place exactly when the files it lists are.
fn write_folder(dir: &Path, manifest: bool, fill: impl FnOnce(&Staging) -> Result<()>) -> Result<()> {
    let (staging, old, parent) = side_folders(dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    fill(&Staging { path: staging.clone(), target: dir })?;
    if manifest {
        write_manifest(&staging)?;
    }

    // On disk before the rename makes them visible: a power loss never leaves a
    // checkpoint folder with missing or empty files.
    sync_dir_and_files(&staging)?;
    failpoint::hit(dir, "staged")?;
    // An existing folder is moved aside first and removed only once the new one is in place.
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old).with_context(|| format!("replacing {}", dir.display()))?;
        failpoint::hit(dir, "moved-aside")?;
    }
    std::fs::rename(&staging, dir).with_context(|| format!("moving the checkpoint to {}", dir.display()))?;
    failpoint::hit(dir, "renamed")?;
    sync_path(&parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// A checkpoint's list of its files with the size and SHA-256 of each, so that damage
/// after the save (a truncated or bit-flipped file) is found before a resume loads it.
/// Every byte is hashed: a sample would miss a flipped bit (a few seconds per GB saved).
pub const MANIFEST_FILE: &str = "manifest.json";

fn write_manifest(staging: &Path) -> Result<()> {
    let mut files = serde_json::Map::new();
    for name in folder_files(staging)? {
        let (size, sha256) = crate::files::sha256_file(&staging.join(&name))?;
        files.insert(name, serde_json::json!({"size": size, "sha256": sha256}));
    }
    let text = serde_json::to_string_pretty(&serde_json::json!({ "files": files }))? + "\n";
    std::fs::write(staging.join(MANIFEST_FILE), text).with_context(|| format!("writing {MANIFEST_FILE}"))
}

/// Every file under `dir` but the manifest, as paths relative to it ("a/b.jinja"), sorted.
fn folder_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if entry.file_type()?.is_dir() {
            names.extend(folder_files(&entry.path())?.into_iter().map(|inner| format!("{name}/{inner}")));
        } else if entry.file_type()?.is_file() && name != MANIFEST_FILE {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Checks `dir` against its manifest: Err naming the first file that is missing or whose
/// size or checksum differs (or a manifest that does not parse); Ok(false) for a folder
/// without one (a checkpoint written before manifests existed), Ok(true) when all match.
pub fn verify_manifest(dir: &Path) -> Result<bool> {
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
    let files = parsed["files"].as_object().with_context(|| format!("{}: no \"files\" object", path.display()))?;
    for (name, want) in files {
        let (Some(size), Some(sha)) = (want["size"].as_u64(), want["sha256"].as_str()) else {
            bail!("{}: files.{name}: needs \"size\" (a number) and \"sha256\" (a string)", path.display());
        };
        // A name from a damaged manifest must not lead outside the checkpoint.
        let inside = Path::new(name).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if name.is_empty() || !inside {
            bail!("{}: files.{name:?}: not the name of a file in the checkpoint", path.display());
        }
        let file = dir.join(name);
        if !file.is_file() {
            bail!("{}: missing (the manifest lists it)", file.display());
        }
        let (now_size, now_sha) = crate::files::sha256_file(&file)?;
        if now_size != size {
            bail!("{}: {now_size} bytes, the manifest says {size} (truncated?)", file.display());
        }
        if now_sha != sha {
            bail!("{}: sha256 {now_sha}, the manifest says {sha} (damaged)", file.display());
        }
    }
    Ok(true)
}

/// The folder whose save left `name` (a staging or moved-aside folder of `side_folders`).
pub fn interrupted_save_of(name: &str) -> Option<&str> {
    name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp").or_else(|| n.strip_suffix(".old")))
}

/// Tidies what a crash inside `write_folder(dir, ..)` left. A folder moved aside with
/// nothing renamed in its place is put back (it was complete: only a folder in place is
/// ever moved aside); one superseded by a new `dir`, and any staging folder, are removed.
pub fn recover_folder(dir: &Path) -> Result<()> {
    let (staging, old, parent) = side_folders(dir);
    if old.exists() {
        if dir.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        } else {
            std::fs::rename(&old, dir)
                .with_context(|| format!("putting {} back as {}", old.display(), dir.display()))?;
            sync_path(&parent)?;
        }
    }
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    Ok(())
}

/// Writes `tensors` as an f32 safetensors file, streaming: the header first (what
/// safetensors' own writer makes: tensors in name order, the header padded with spaces to a
/// multiple of 8 bytes), then each tensor a block of rows at a time.
fn write_safetensors(mut tensors: Vec<(String, PendingTensor)>, path: &Path) -> Result<()> {
    use std::io::Write;
    const BLOCK_BYTES: usize = 8 << 20;
    tensors.sort_by(|(a, _), (b, _)| a.cmp(b));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let bytes = tensor.shape.iter().product::<usize>() * 4;
        let info =
            TensorInfo { dtype: Dtype::F32, shape: tensor.shape.clone(), data_offsets: (offset, offset + bytes) };
        infos.push((name.clone(), info));
        offset += bytes;
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header = Metadata::new(Some(metadata), infos).map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let write = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        let mut bytes = Vec::new();
        for (_, tensor) in &tensors {
            let matrix = (tensor.make)();
            let [rows, columns] = matrix.dims();
            let block = (BLOCK_BYTES / (4 * columns.max(1))).max(1);
            for start in (0..rows).step_by(block) {
                let values = crate::tensor::values(matrix.clone().narrow(0, start, block.min(rows - start)));
                bytes.clear();
                bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
                file.write_all(&bytes)?;
            }
        }
        file.flush()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// tokenizer.json and the rest of the tokenizer (chat template, special tokens), which
/// travel with the model.
fn copy_tokenizer_files(tokenizer_json: &Path, staging: &Staging) -> Result<()> {
    let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
    staging.copy(tokenizer_json, "tokenizer.json")?;
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        staging.copy(&generation, "generation_config.json")?;
    }
    for name in crate::data::tokenizer::side_files(dir)? {
        if let Some(sub) = Path::new(&name).parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(staging.path.join(sub)).with_context(|| format!("creating {}", sub.display()))?;
        }
        staging.copy(&dir.join(&name), &name)?;
    }
    Ok(())
}

/// A file saved beside the weights in the same atomic step: its name, and what writes it
/// to the path it is given (so a large state can stream to disk instead of into a buffer).
pub struct ExtraFile<'a> {
    pub name: &'a str,
    pub write: &'a dyn Fn(&Path) -> Result<()>,
}

fn write_extra(staging: &Staging, extra: &[ExtraFile]) -> Result<()> {
    for file in extra {
        (file.write)(&staging.path.join(file.name)).with_context(|| format!("writing {}", file.name))?;
        failpoint::file_written(staging.target, file.name)?;
    }
    Ok(())
}

fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", path.display()))
}

fn sync_dir_and_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_dir_and_files(&entry.path())?;
        } else {
            sync_path(&entry.path())?;
        }
    }
    sync_path(dir)
}
