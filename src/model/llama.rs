//! The decoder-only language model: embeddings, decoder layers, final norm, LM head.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Embedding, Linear};
use burn::tensor::{Bool, DType, Device, Distribution, FloatDType, Int, Tensor};

use super::attention::{Attention, KvCache};
use super::block::DecoderLayer;
use super::checkpoint::recomputed_layer;
use super::config::{Family, LlamaConfig};
use super::fused::DeferredWeightGrad;
use super::lora::{Projection, peft_key};
use super::mlp::{Activation, Mlp};
use super::norm::RmsNorm;
use super::precision::MixedPrecision;
use super::rope::{Rope, RotaryTables};

#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// None when the checkpoint ties the output projection to the embeddings.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub rope: Rope,
    /// How weight products run; the projections carry the same setting (`with_precision`).
    #[module(skip)]
    pub precision: MixedPrecision,
    /// Gemma2: embeddings are multiplied by √hidden_size.
    #[module(skip)]
    pub embed_scale: Option<f64>,
    /// Gemma2: logits become c·tanh(logits / c).
    #[module(skip)]
    pub final_softcap: Option<f64>,
    /// Under autodiff, recompute each decoder layer in the backward pass instead of
    /// keeping its intermediates (`gradient_checkpointing`).
    #[module(skip)]
    pub recompute_layers: bool,
}

/// Supplies each parameter by its Hugging Face name, in HF layout ([out, in] for linear
/// weights). Loading and random initialisation share the model-building code this way.
pub trait WeightSource {
    fn tensor(&mut self, name: &str, hf_shape: &[usize], device: &Device) -> anyhow::Result<Tensor<2>>;
    fn vector(&mut self, name: &str, len: usize, device: &Device) -> anyhow::Result<Tensor<1>>;
    /// A norm's weight as stored, where the applied gain is weight + `offset` (gemma2 stores
    /// w for a gain of 1 + w, the others the gain itself).
    fn norm_weight(&mut self, name: &str, len: usize, _offset: f64, device: &Device) -> anyhow::Result<Tensor<1>> {
        self.vector(name, len, device)
    }
}

/// HF's default initialisation (normal, std = initializer_range), norms at one, biases at zero.
pub struct RandomInit {
    pub std: f64,
}

impl WeightSource for RandomInit {
    fn tensor(&mut self, _: &str, shape: &[usize], device: &Device) -> anyhow::Result<Tensor<2>> {
        Ok(random_from_cpu([shape[0], shape[1]], Distribution::Normal(0.0, self.std), device))
    }
    fn vector(&mut self, name: &str, len: usize, device: &Device) -> anyhow::Result<Tensor<1>> {
        Ok(if name.ends_with(".bias") { Tensor::zeros([len], device) } else { Tensor::ones([len], device) })
    }
    /// A gain of one in every family (gemma2 initialises its stored w at zero).
    fn norm_weight(&mut self, _: &str, len: usize, offset: f64, device: &Device) -> anyhow::Result<Tensor<1>> {
        Ok(Tensor::ones([len], device).sub_scalar(offset))
    }
}

/// Seeds the random draws of model building: burn-flex's RNG, which `random_from_cpu` draws
/// from, and `device`'s own (LoRA dropout masks).
pub fn seed_model_draws(device: &Device, seed: u64) {
    Device::flex().seed(seed);
    device.seed(seed);
}

/// A random tensor drawn by burn-flex's seeded RNG on the CPU and moved to `device`: each
/// backend's own RNG draws other values for the same seed, so a random init or fresh LoRA
/// adapters drawn on the device would make runs on different backends start apart.
pub(crate) fn random_from_cpu<const D: usize>(
    shape: [usize; D],
    distribution: Distribution,
    device: &Device,
) -> Tensor<D> {
    let drawn = Tensor::<D>::random(shape, distribution, &Device::flex());
    Tensor::from_data(drawn.into_data(), device)
}

/// A trainable parameter whose id is derived from its HF name (FNV-1a), so the same
/// model built twice (e.g. from a checkpoint) has the same ids and optimizer state saved
/// for one applies to the other.
pub(crate) fn named_param<const D: usize>(name: &str, value: Tensor<D>) -> Param<Tensor<D>> {
    let mut param = Param::from_tensor(value);
    param.id = param_id(name);
    param
}

/// The id of the parameter with this HF (or PEFT) name.
pub fn param_id(name: &str) -> ParamId {
    ParamId::from(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)))
}

fn projection(
    src: &mut dyn WeightSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> anyhow::Result<Projection> {
    linear(src, name, d_in, d_out, bias, device).map(Projection::new)
}

fn linear(
    src: &mut dyn WeightSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> anyhow::Result<Linear> {
    // HF stores [out, in]; burn's Linear computes x·W with W as [in, out].
    let key = format!("{name}.weight");
    let weight = src.tensor(&key, &[d_out, d_in], device)?.transpose();
    let bias = if bias {
        let key = format!("{name}.bias");
        Some(named_param(&key, src.vector(&key, d_out, device)?))
    } else {
        None
    };
    Ok(Linear { weight: named_param(&key, weight), bias })
}

fn rms_norm(
    src: &mut dyn WeightSource,
    name: &str,
    size: usize,
    config: &LlamaConfig,
    device: &Device,
) -> anyhow::Result<RmsNorm> {
    let key = format!("{name}.weight");
    // Gemma2's norms apply 1 + w to the w they store.
    let offset = if config.family() == Family::Gemma2 { 1.0 } else { 0.0 };
    let weight = src.norm_weight(&key, size, offset, device)?;
    Ok(RmsNorm { weight: named_param(&key, weight), epsilon: config.rms_norm_eps, offset })
}

impl Llama {
    pub fn build(config: &LlamaConfig, src: &mut dyn WeightSource, device: &Device) -> anyhow::Result<Self> {
        let (d, heads, kv, hd) = (config.hidden_size, config.num_attention_heads, config.kv_heads(), config.head_dim());
        let family = config.family();
        let gemma = family == Family::Gemma2;
        let embed = src.tensor("model.embed_tokens.weight", &[config.vocab_size, d], device)?;
        let qkv_bias = config.qkv_bias();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let head_norm = |src: &mut dyn WeightSource, which: &str| -> anyhow::Result<Option<RmsNorm>> {
                (family == Family::Qwen3)
                    .then(|| rms_norm(src, &format!("{p}.self_attn.{which}"), hd, config, device))
                    .transpose()
            };
            let gemma_norm = |src: &mut dyn WeightSource, which: &str| -> anyhow::Result<Option<RmsNorm>> {
                gemma.then(|| rms_norm(src, &format!("{p}.{which}"), d, config, device)).transpose()
            };
            layers.push(DecoderLayer {
                input_layernorm: rms_norm(src, &format!("{p}.input_layernorm"), d, config, device)?,
                self_attn: Attention {
                    q_proj: projection(src, &format!("{p}.self_attn.q_proj"), d, heads * hd, qkv_bias, device)?,
                    k_proj: projection(src, &format!("{p}.self_attn.k_proj"), d, kv * hd, qkv_bias, device)?,
                    v_proj: projection(src, &format!("{p}.self_attn.v_proj"), d, kv * hd, qkv_bias, device)?,
                    o_proj: projection(src, &format!("{p}.self_attn.o_proj"), heads * hd, d, config.o_bias(), device)?,
                    num_heads: heads,
                    num_kv_heads: kv,
                    head_dim: hd,
                    window: config.attention_window(i).unwrap_or(0),
                    q_norm: head_norm(src, "q_norm")?,
                    k_norm: head_norm(src, "k_norm")?,
                    scale: 1.0 / config.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt(),
                    softcap: config.attn_logit_softcapping,
                },
                post_attention_layernorm: rms_norm(src, &format!("{p}.post_attention_layernorm"), d, config, device)?,
                pre_feedforward_layernorm: gemma_norm(src, "pre_feedforward_layernorm")?,
                post_feedforward_layernorm: gemma_norm(src, "post_feedforward_layernorm")?,
                mlp: Mlp {
                    gate_proj: projection(
                        src,
                        &format!("{p}.mlp.gate_proj"),
                        d,
                        config.intermediate_size,
                        config.mlp_bias,
                        device,
                    )?,
                    up_proj: projection(
                        src,
                        &format!("{p}.mlp.up_proj"),
                        d,
                        config.intermediate_size,
                        config.mlp_bias,
                        device,
                    )?,
                    down_proj: projection(
                        src,
                        &format!("{p}.mlp.down_proj"),
                        config.intermediate_size,
                        d,
                        config.mlp_bias,
                        device,
                    )?,
                    activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
                },
            });
        }
        let norm = rms_norm(src, "model.norm", d, config, device)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(linear(src, "lm_head", d, config.vocab_size, false, device)?)
        };
        Ok(Self {
            embed_tokens: Embedding { weight: named_param("model.embed_tokens.weight", embed) },
            layers,
            norm,
            lm_head,
            rope: Rope::new(hd, config.max_positions(), config.rope_theta, &config.rope_scaling()?),
            precision: MixedPrecision::No,
            embed_scale: gemma.then(|| (d as f64).sqrt()),
            final_softcap: config.final_logit_softcapping,
            recompute_layers: false,
        })
    }

    /// Every parameter's name as a checkpoint spells it: HF names, and PEFT's for adapters
    /// (`base_model.model.<module>.lora_A.weight`).
    pub fn parameter_names(&self) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        for (i, layer) in self.layers.iter().enumerate() {
            names.extend(layer.norm_names().into_iter().map(|(norm, _)| format!("model.layers.{i}.{norm}.weight")));
        }
        for (path, _, projection) in self.projections() {
            names.push(format!("{path}.weight"));
            if projection.base.bias.is_some() {
                names.push(format!("{path}.bias"));
            }
            if projection.lora.is_some() {
                names.extend(["A", "B"].map(|factor| peft_key(&path, factor)));
            }
        }
        names.push("model.norm.weight".to_string());
        if self.lm_head.is_some() {
            names.push("lm_head.weight".to_string());
        }
        names
    }

    /// tokens: [batch, seq] -> logits [batch, seq, vocab]
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.head(self.hidden_states(tokens, 0))
    }

    /// The final hidden states (after the last norm) of columns `from..`,
    /// [batch, seq − from, hidden]: what the vocabulary projection reads. Every column
    /// runs through every layer but the last, whose output is formed only for the kept
    /// ones (a training step reads log-probs from the first completion column on).
    pub fn hidden_states(&self, tokens: Tensor<2, Int>, from: usize) -> Tensor<3> {
        let [_, seq] = tokens.dims();
        let positions: Vec<usize> = (0..seq).collect();
        let device = tokens.device();
        self.layers_forward(tokens, &self.rope.tables(&positions, 1, seq, &device), &positions, 1, None, true, from)
    }

    /// Packed rows: tokens [batch, seq] at their own `positions` ([batch * seq]),
    /// attending where `masked` ([batch, 1, seq, seq], true = masked) is false.
    pub fn forward_packed(&self, tokens: Tensor<2, Int>, positions: &[usize], masked: Tensor<4, Bool>) -> Tensor<3> {
        self.head(self.hidden_states_packed(tokens, positions, masked, 0))
    }

    /// `hidden_states` for packed rows, as `forward_packed` takes them.
    pub fn hidden_states_packed(
        &self,
        tokens: Tensor<2, Int>,
        positions: &[usize],
        masked: Tensor<4, Bool>,
        from: usize,
    ) -> Tensor<3> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        self.layers_forward(
            tokens,
            &self.rope.tables(positions, batch, seq, &device),
            positions,
            batch,
            Some(masked),
            false,
            from,
        )
    }

    /// Embedding, every layer (RoPE tables and each window's mask built once for all),
    /// final norm, the last layer's output from column `from` on. A layer with a sliding
    /// window attends where neither `masked` nor its window masks a key.
    #[allow(clippy::too_many_arguments)] // the inputs of a layer, and which columns to keep
    fn layers_forward(
        &self,
        tokens: Tensor<2, Int>,
        rotary: &RotaryTables,
        positions: &[usize],
        batch: usize,
        masked: Option<Tensor<4, Bool>>,
        is_causal: bool,
        from: usize,
    ) -> Tensor<3> {
        let mut x = self.embed(tokens);
        let mut masks: Vec<(usize, Option<Tensor<4, Bool>>)> = Vec::new();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let window = layer.self_attn.window;
            if !masks.iter().any(|(w, _)| *w == window) {
                let mask = match (layer.self_attn.window_mask(positions, positions, batch, &x.device()), masked.clone())
                {
                    (Some(w), Some(m)) => Some(m.bool_or(w)),
                    (w, m) => w.or(m),
                };
                masks.push((window, mask));
            }
            let mask = masks.iter().find(|(w, _)| *w == window).and_then(|(_, m)| m.clone());
            let keep_from = if i == last { from } else { 0 };
            x = match self.recompute_layers {
                true => recomputed_layer(layer, x, rotary, mask, is_causal, keep_from),
                false => layer.forward(x, rotary, mask, is_causal, keep_from),
            };
        }
        if self.layers.is_empty() {
            x = crate::tensor::from_column(x, from);
        }
        self.norm.forward(x)
    }

    /// Token embeddings (scaled by √hidden in gemma2).
    fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embed_tokens.forward(tokens);
        // Frozen embeddings may be kept in the checkpoint's bf16/f16; the rows picked are
        // widened, exactly, and everything after them is f32.
        let x = if x.dtype() == DType::F32 { x } else { x.cast(FloatDType::F32) };
        match self.embed_scale {
            Some(scale) => x.mul_scalar(scale),
            None => x,
        }
    }

    /// The vocabulary projection's parameter as stored: lm_head's [hidden, vocab] weight, or
    /// the tied embeddings [vocab, hidden] (then true: the projection reads it transposed).
    fn head_param(&self) -> (&Param<Tensor<2>>, bool) {
        match &self.lm_head {
            Some(head) => (&head.weight, false),
            None => (&self.embed_tokens.weight, true),
        }
    }

    /// The vocabulary projection as one [hidden, vocab] matrix (lm_head's weight, or the
    /// tied embeddings transposed), so logits = hidden · W.
    pub fn head_weight(&self) -> Tensor<2> {
        let (param, transposed) = self.head_param();
        if transposed { param.val().transpose() } else { param.val() }
    }

    /// Whether the vocabulary projection takes gradients: its parameter's flag (a
    /// transposed view of the tied embeddings is not a leaf, so it would not say).
    pub fn head_trains(&self) -> bool {
        self.head_param().0.val().is_require_grad()
    }

    /// The id of the vocabulary projection's parameter: lm_head's, or the embeddings' when tied.
    pub fn head_param_id(&self) -> ParamId {
        self.head_param().0.id
    }

    /// `head` for a training step on the CPU default: the same logits, with the projection
    /// weight's gradient left to `DeferredWeightGrad::add_to` after the backward pass
    /// (see `fused::matmul_deferring_weight_grad`). None where `head` must run instead:
    /// mixed precision, a final soft cap, or inputs the fused kernels do not take.
    pub fn head_deferring_weight_grad(&self, x: Tensor<3>) -> Option<(Tensor<3>, DeferredWeightGrad)> {
        if self.precision != MixedPrecision::No || self.final_softcap.is_some() {
            return None;
        }
        let [b, s, d] = x.dims();
        let (param, transposed) = self.head_param();
        let (logits, grad) =
            super::fused::matmul_deferring_weight_grad(&x.reshape([b * s, d]), &param.val(), transposed)?;
        let vocab = logits.dims()[1];
        Some((logits.reshape([b, s, vocab]), grad))
    }

    /// Decoding step: tokens [batch, seq] continue the cached ones; returns the logits of
    /// the last position only, [batch, vocab] (all greedy decoding needs).
    pub fn forward_last(&self, tokens: Tensor<2, Int>, cache: &mut [KvCache]) -> Tensor<2> {
        assert_eq!(cache.len(), self.layers.len(), "one KV cache per layer");
        let mut x = self.embed(tokens);
        for (layer, layer_cache) in self.layers.iter().zip(cache.iter_mut()) {
            x = layer.forward_cached(x, &self.rope, layer_cache);
        }
        let [b, s, _] = x.dims();
        let last = self.norm.forward(x.narrow(1, s - 1, 1));
        self.head(last).reshape([b, self.vocab_size()])
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.val().dims()[0]
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Final projection to the vocabulary: lm_head, or the tied embeddings; hidden states
    /// [batch, seq, hidden] (after the last norm) -> logits [batch, seq, vocab].
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        // lm_head has no bias (built with bias false), so it is the plain product, which
        // takes the fused path on the CPU default.
        let logits = self.precision.matmul3(x, self.head_weight());
        match self.final_softcap {
            Some(cap) => softcap(logits, cap),
            None => logits,
        }
    }
}

/// c·tanh(x / c): gemma2's soft cap of logits.
pub fn softcap<const D: usize>(x: Tensor<D>, cap: f64) -> Tensor<D> {
    x.div_scalar(cap).tanh().mul_scalar(cap)
}
