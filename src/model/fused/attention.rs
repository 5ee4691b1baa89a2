//! Attention as one autodiff op on the CPU default (burn-flex, f32).
//!
//! burn's autodiff runs `attention` as its decomposition: matmul, scale, mask fills, max,
//! subtract, exp, sum, divide, matmul, each a pass over [batch, heads, seq, seq] with its
//! own buffer and backward step. Here the work is cut into blocks of 64 queries per head:
//! each block multiplies its queries by the keys up to the last one any of them may see
//! (so a causal mask skips the upper triangle), takes a vectorised masked softmax, and
//! multiplies by the values. The backward needs the probabilities P:
//!   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = dS·K,  dK = dSᵀ·Q.
//! It computes them again from Q and K, block by block as the forward did (the same values,
//! bit for bit), rather than keeping every layer's P from the forward to the backward: a
//! [b, heads, s, s] buffer per layer is most of a step's activations at 512 tokens and
//! more, and recomputing costs one Q·Kᵀ product per layer, as flash attention does.
//! dV and dK are summed per block of 64 keys, so every task writes its own rows and all of
//! them run in parallel. Grouped-query heads read their KV head directly (no repeated K/V).
//! Inputs are read through their strides, and the output is stored as [b, s, heads, d], the
//! layout the output projection reads, so no operand is copied into another layout.
//! Other backends and dtypes use burn's `attention`.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::dispatch::{AutodiffFlex, run_fused};
use crate::kernels::{self, Buffer, SharedOut, View, contiguous, gemm, strided};

/// Attention with another score scale than 1/√d and optionally soft-capped scores,
/// c·tanh(s/c) before the mask (gemma2's query_pre_attn_scalar and
/// attn_logit_softcapping). Without a cap the queries are pre-scaled and the fused op
/// runs; with one, the scores are computed with plain tensor ops.
pub fn scaled_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    masked: Option<Tensor<4, Bool>>,
    is_causal: bool,
    scale: f64,
    softcap: Option<f64>,
) -> Tensor<4> {
    let d = q.dims()[3] as f64;
    match softcap {
        None if scale == 1.0 / d.sqrt() => grouped_attention(q, k, v, masked, is_causal),
        None => grouped_attention(q.mul_scalar(scale * d.sqrt()), k, v, masked, is_causal),
        Some(cap) => attention_in_burn_ops(q, k, v, masked, is_causal, scale, Some(cap)),
    }
}

/// softmax(q·kᵀ/√d, masked)·v for q [b, heads, s, d] and k, v [b, kv_heads, s, d];
/// `masked` ([b or 1, 1, s, s], true = masked) and/or causal. Returns [b, heads, s, d].
pub fn grouped_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    masked: Option<Tensor<4, Bool>>,
    is_causal: bool,
) -> Tensor<4> {
    let f32s = [q.dtype(), k.dtype(), v.dtype()].iter().all(|d| *d == DType::F32);
    // Self-attention only: a decoding step (one query, cached keys) takes burn's path.
    if f32s && q.dims()[2] == k.dims()[2] && super::enabled() {
        let mask = match &masked {
            None => Some(None),
            Some(m) => flex_mask(m).map(Some),
        };
        if let Some(mask) = mask {
            assert_eq!(v.dims(), k.dims(), "attention: v and k differ in shape");
            let plan = Plan::new(&q, &k, mask, is_causal);
            let fused = run_fused([&q, &k, &v], AttentionBackward, |[q, k, v], keep_state| {
                let (q, k, v) = (Heads::new(q), Heads::new(k), Heads::new(v));
                let out = forward(&q, &k, &v, &plan);
                (out, keep_state.then_some((q, k, v, plan)))
            });
            if let Some(out) = fused {
                return out;
            }
        }
    }
    unfused(q, k, v, masked, is_causal)
}

/// A bool mask's burn-flex storage, on the autodiff device or the plain one.
fn flex_mask(m: &Tensor<4, Bool>) -> Option<FlexTensor> {
    m.clone().try_into_primitive::<AutodiffFlex>().or_else(|_| m.clone().try_into_primitive::<Flex>()).ok()
}

/// Whether `grouped_attention` takes the fused path for a query like `q` and this mask
/// (f32 on burn-flex, with or without autodiff).
pub fn fuses(q: &Tensor<4>, masked: Option<&Tensor<4, Bool>>) -> bool {
    super::enabled()
        && q.dtype() == DType::F32
        && (q.clone().try_into_primitive::<AutodiffFlex>().is_ok() || q.clone().try_into_primitive::<Flex>().is_ok())
        && masked.is_none_or(|m| flex_mask(m).is_some())
}

/// Attention in burn ops, after repeating each KV head for its query heads (see
/// `attention_in_burn_ops`). burn's `attention` outside autodiff would also be wrong with a
/// mask: burn-tch hands burn's bool mask (true = masked) to torch's
/// scaled_dot_product_attention unchanged, where true means "may attend".
fn unfused(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, masked: Option<Tensor<4, Bool>>, is_causal: bool) -> Tensor<4> {
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    attention_in_burn_ops(q, k, v, masked, is_causal, scale, None)
}

/// softmax(cap(scale·q·kᵀ), masked)·v in burn ops, the scores written out. burn's own
/// `attention` only serves a decoding step (no mask, not causal): under autodiff it is a
/// decomposition, outside it libtorch's and CUDA's fused kernels, whose f32 sums round
/// otherwise. A bf16 product after attention turns those last-bit differences into whole
/// bf16 steps, so a policy and its frozen reference would differ before any update
/// (2.5e-3 nats of a completion's log-prob on libtorch, AVX2 CPU); written out here, both
/// run the same ops and agree bit for bit, as in TRL, where both run the same kernel.
fn attention_in_burn_ops(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    masked: Option<Tensor<4, Bool>>,
    is_causal: bool,
    scale: f64,
    softcap: Option<f64>,
) -> Tensor<4> {
    let [b, heads, s, _] = q.dims();
    let repeat = |t: Tensor<4>| {
        let [b, kv, s, d] = t.dims();
        let groups = heads / kv;
        if groups == 1 {
            t
        } else {
            t.unsqueeze_dim::<5>(2).expand([b, kv, groups, s, d]).reshape([b, kv * groups, s, d])
        }
    };
    let (k, v) = (repeat(k), repeat(v));
    let sk = k.dims()[2];
    if masked.is_none() && softcap.is_none() && !is_causal {
        let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
        return attention(q, k, v, None, None, options);
    }
    let mut masked = masked.map(|m| m.expand([b, heads, s, sk]));
    if is_causal {
        // Query i sees keys up to i + (sk − s): the last s keys line up with the queries.
        let shift = sk - s;
        // Made on the device (true where key j > i + shift), not uploaded from the host.
        let causal = Tensor::<2, Bool>::tril_mask([s, sk], shift as i64, &q.device());
        let causal = causal.reshape([1, 1, s, sk]).expand([b, heads, s, sk]);
        masked = Some(match masked {
            Some(m) => m.bool_or(causal),
            None => causal,
        });
    }
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    if let Some(cap) = softcap {
        scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
    }
    // The lowest finite value rather than −inf: a row with every key masked stays finite.
    let scores = match masked {
        Some(m) => scores.mask_fill(m, f32::MIN),
        None => scores,
    };
    // Written out rather than burn's softmax, whose autodiff and plain versions round
    // differently: a policy and its frozen copy must agree bit for bit before any update.
    let exp = (scores.clone() - scores.max_dim(3)).exp();
    (exp.clone() / exp.sum_dim(3)).matmul(v)
}

/// Queries (and keys) per block: the unit of parallel work and of causal skipping.
const BLOCK: usize = 64;

/// Shapes, scale and mask of one call.
#[derive(Clone, Debug)]
struct Plan {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    scale: f32,
    causal: bool,
    /// [mask_batch, seq, seq] bytes, nonzero = masked; mask_batch is 1 or `batch`.
    mask: Option<(Vec<u8>, usize)>,
    /// Per mask row (one when there is no mask) and query block: one past the last key any
    /// query of the block may see. Keys from there on are skipped.
    limits: Vec<usize>,
}

impl Plan {
    fn new(q: &Tensor<4>, k: &Tensor<4>, mask: Option<FlexTensor>, causal: bool) -> Self {
        let [batch, heads, seq, head_dim] = q.dims();
        let kv_heads = k.dims()[1];
        // The kernels index k and v through raw pointers: shapes must agree.
        assert!(
            k.dims() == [batch, kv_heads, seq, head_dim] && kv_heads > 0 && heads % kv_heads == 0,
            "attention: q {:?} and k {:?} do not fit grouped heads",
            q.dims(),
            k.dims()
        );
        let mask = mask.map(|m| {
            let m = m.to_contiguous();
            let dims = m.layout().shape().clone();
            assert!(dims[1] == 1 && dims[2] == seq && dims[3] == seq, "attention mask must be [b or 1, 1, s, s]");
            (m.storage::<u8>().to_vec(), dims[0])
        });
        let blocks = seq.div_ceil(BLOCK);
        let visible_end = |i: usize| if causal { i + 1 } else { seq };
        let limits = match &mask {
            None => (0..blocks).map(|blk| visible_end((blk * BLOCK + BLOCK).min(seq) - 1)).collect(),
            Some((m, rows)) => (0..rows * blocks)
                .map(|task| {
                    let (r, blk) = (task / blocks, task % blocks);
                    let last_seen = |i: usize| {
                        m[(r * seq + i) * seq..][..visible_end(i)]
                            .iter()
                            .rposition(|masked| *masked == 0)
                            .map_or(0, |j| j + 1)
                    };
                    (blk * BLOCK..(blk * BLOCK + BLOCK).min(seq)).map(last_seen).max().unwrap_or(0)
                })
                .collect(),
        };
        Self { batch, heads, kv_heads, seq, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), causal, mask, limits }
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn blocks(&self) -> usize {
        self.seq.div_ceil(BLOCK)
    }

    /// First query (or key) and length of block `blk`.
    fn block(&self, blk: usize) -> (usize, usize) {
        (blk * BLOCK, BLOCK.min(self.seq - blk * BLOCK))
    }

    /// Keys `limit..` are masked from every query of block `blk` in batch row `b`.
    fn limit(&self, b: usize, blk: usize) -> usize {
        match &self.mask {
            Some((_, rows)) if *rows > 1 => self.limits[b * self.blocks() + blk],
            _ => self.limits[blk],
        }
    }

    /// Scores of query i (batch row b) over keys 0..row.len() -> softmax probabilities in
    /// place; masked keys get 0, and so does every key of a query that sees none.
    fn softmax_row(&self, b: usize, i: usize, row: &mut [f32]) {
        let visible = if self.causal { (i + 1).min(row.len()) } else { row.len() };
        let (live, dead) = row.split_at_mut(visible);
        match &self.mask {
            None => kernels::scale(live, self.scale),
            Some((m, rows)) => kernels::scale_unmasked(
                live,
                &m[((if *rows == 1 { 0 } else { b }) * self.seq + i) * self.seq..][..visible],
                self.scale,
            ),
        }
        let max = kernels::max(live);
        if max == f32::NEG_INFINITY {
            live.fill(0.0);
        } else {
            let sum = kernels::exp_shifted_sum(live, max);
            kernels::scale(live, 1.0 / sum);
        }
        dead.fill(0.0);
    }
}

/// A [b, heads, s, d] tensor read through its strides (the last one 1): head (b, h) is an
/// s × d matrix.
#[derive(Clone, Debug)]
struct Heads {
    tensor: FlexTensor,
    strides: [usize; 3],
}

impl Heads {
    fn new(t: FlexTensor) -> Self {
        let tensor = kernels::rows_readable(t);
        let st = tensor.layout().strides();
        let strides = [st[0] as usize, st[1] as usize, st[2] as usize];
        Self { tensor, strides }
    }

    fn view(&self, b: usize, h: usize) -> View {
        let base = self.tensor.storage::<f32>().as_ptr().wrapping_add(self.tensor.layout().start_offset());
        View::rows(base.wrapping_add(b * self.strides[0] + h * self.strides[1]), self.strides[2])
    }
}

/// The output ([b, heads, s, d], stored as [b, s, heads, d]).
fn forward(q: &Heads, k: &Heads, v: &Heads, plan: &Plan) -> FlexTensor {
    let (b, h, s, d, g) = (plan.batch, plan.heads, plan.seq, plan.head_dim, plan.groups());
    let mut out = Buffer::new(b * s * h * d);
    let o = out.out();
    (0..b * h * plan.blocks()).into_par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
        let (bh, blk) = (task / plan.blocks(), task % plan.blocks());
        let (bi, hi) = (bh / h, bh % h);
        let ((i0, rows), keys) = (plan.block(blk), plan.limit(bi, blk));
        scores.resize(rows * keys, 0.0);
        // SAFETY: `scores` is the task's own rows × keys scratch; the views read rows
        // i0..i0+rows of head (bi, hi)'s queries and keys 0..keys ≤ s of its KV head, inside
        // the live q, k, v; the output rows ((bi, i0 + r), head hi) of [b, s, heads, d] are
        // this task's alone.
        unsafe {
            plan.block_probabilities(q, k, bi, hi, blk, scores.as_mut_ptr(), keys);
            gemm(
                rows,
                d,
                keys,
                o.at(((bi * s + i0) * h + hi) * d),
                h * d,
                false,
                View::rows(scores.as_ptr(), keys),
                v.view(bi, hi / g),
            );
        }
    });
    // SAFETY: the tasks cover every (batch, head, query block), and each wrote its rows of
    // the output, d values per query.
    strided(unsafe { out.filled() }, plan.per_head(), vec![(s * h * d) as isize, d as isize, (h * d) as isize, 1])
}

/// The probabilities P ([b, heads, s, s], zero past each block's last visible key), for
/// the backward: each block computed as the forward computed it.
fn probabilities(q: &Heads, k: &Heads, plan: &Plan) -> Vec<f32> {
    let (b, h, s) = (plan.batch, plan.heads, plan.seq);
    let mut probs = Buffer::new(b * h * s * s);
    let p = probs.out();
    (0..b * h * plan.blocks()).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / plan.blocks(), task % plan.blocks());
        let (bi, hi) = (bh / h, bh % h);
        let ((i0, rows), keys) = (plan.block(blk), plan.limit(bi, blk));
        let rows_of_p = p.at((bh * s + i0) * s);
        // SAFETY: rows i0..i0+rows of head (bi, hi) of P (s values each, inside the buffer,
        // which outlives the loop) are this task's alone: it writes their first `keys`
        // values and zeroes the rest.
        unsafe {
            plan.block_probabilities(q, k, bi, hi, blk, rows_of_p, s);
            for r in 0..rows {
                kernels::to_write(rows_of_p.add(r * s + keys), s - keys).fill(MaybeUninit::new(0.0));
            }
        }
    });
    // SAFETY: the tasks cover every (batch, head, query block), and each wrote s values per query.
    unsafe { probs.filled() }
}

impl Plan {
    fn per_head(&self) -> Shape {
        Shape::new([self.batch, self.heads, self.seq, self.head_dim])
    }

    /// Softmax probabilities of query block `blk` of head (bi, hi) over keys
    /// 0..limit(bi, blk), written into `rows` × limit values of `dst`, rows `stride` apart.
    ///
    /// # Safety
    /// `dst` holds that many writable values, which no one else touches meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_probabilities(
        &self,
        q: &Heads,
        k: &Heads,
        bi: usize,
        hi: usize,
        blk: usize,
        dst: *mut f32,
        stride: usize,
    ) {
        let ((i0, rows), keys) = (self.block(blk), self.limit(bi, blk));
        // SAFETY: the views read rows i0..i0+rows of head (bi, hi)'s queries and keys
        // 0..keys ≤ s of its KV head, inside the live q and k; dst is the caller's.
        unsafe {
            gemm(
                rows,
                keys,
                self.head_dim,
                dst,
                stride,
                false,
                q.view(bi, hi).down(i0),
                k.view(bi, hi / self.groups()).t(),
            );
            for r in 0..rows {
                self.softmax_row(bi, i0 + r, std::slice::from_raw_parts_mut(dst.add(r * stride), keys));
            }
        }
    }

    /// Σ over the query heads and blocks that see keys j0..j0+cols of (b, kv head) of
    /// weightsᵀ·rows, where `weights` ([b, heads, s, s], rows s apart) are P or dS and `rows`
    /// are dO or Q: dV or dK for those keys, written into `dst` (rows `dst_stride` apart).
    ///
    /// # Safety
    /// `weights` points at [b, heads, s, s] live values, and `dst` at rows j0..j0+cols
    /// (`dst_stride` apart, d values each) that no one else touches meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn key_block_sum(
        &self,
        bi: usize,
        kv: usize,
        kb: usize,
        weights: *const f32,
        rows: &Heads,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        let (s, d, g) = (self.seq, self.head_dim, self.groups());
        let (j0, cols) = self.block(kb);
        for r in 0..cols {
            // SAFETY: row r of dst holds d writable values (the caller's contract).
            unsafe { std::ptr::write_bytes(dst.add(r * dst_stride), 0, d) };
        }
        for hi in kv * g..(kv + 1) * g {
            for qb in 0..self.blocks() {
                let keys = self.limit(bi, qb).min(j0 + cols);
                if keys <= j0 {
                    continue;
                }
                let (i0, n) = self.block(qb);
                let w = View {
                    ptr: weights.wrapping_add(((bi * self.heads + hi) * s + i0) * s + j0),
                    row_stride: 1,
                    col_stride: s as isize,
                };
                // SAFETY: w reads keys j0..keys (≤ s) of queries i0..i0+n of head (bi, hi)
                // inside `weights`, the rows view those queries of the live `rows`, and dst
                // rows j0..keys are the caller's.
                unsafe { gemm(keys - j0, d, n, dst, dst_stride, true, w, rows.view(bi, hi).down(i0)) };
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// q, k, v, plan.
    type State = (Heads, Heads, Heads, Plan);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let (q, k, v, plan) = ops.state;
        let mut probs = probabilities(&q, &k, &plan);
        let d_out = Heads::new(grads.consume::<Flex>(&ops.node));
        let (b, h, kvh, s, d, g) = (plan.batch, plan.heads, plan.kv_heads, plan.seq, plan.head_dim, plan.groups());
        let key_tasks = b * kvh * plan.blocks();
        if let Some(node) = node_v {
            // dV is stored as [b, s, kv, d], the layout of the value projection it flows back to.
            let mut dv = Buffer::new(b * s * kvh * d);
            let (dst, weights) = (dv.out(), SharedOut(probs.as_mut_ptr()));
            (0..key_tasks).into_par_iter().for_each(|task| {
                let (bkv, kb) = (task / plan.blocks(), task % plan.blocks());
                let (bi, kv) = (bkv / kvh, bkv % kvh);
                // SAFETY: `probs` is P, [b, heads, s, s], only read here; dst is key block kb
                // of (bi, kv) in dV's [b, s, kv, d] layout, written by this task alone.
                unsafe {
                    plan.key_block_sum(
                        bi,
                        kv,
                        kb,
                        weights.ptr(),
                        &d_out,
                        dst.at(((bi * s + kb * BLOCK) * kvh + kv) * d),
                        kvh * d,
                    )
                };
            });
            let strides = vec![(s * kvh * d) as isize, d as isize, (kvh * d) as isize, 1];
            // SAFETY: the tasks cover every (batch, KV head, key block), and each zeroed its rows before summing into them.
            grads.register::<Flex>(node.id, strided(unsafe { dv.filled() }, Shape::new([b, kvh, s, d]), strides));
        }
        if node_q.is_none() && node_k.is_none() {
            return;
        }
        // dS in place of P, and dQ, per block of queries.
        let mut dq = Buffer::new(b * h * s * d);
        let (dq_out, ds) = (dq.out(), SharedOut(probs.as_mut_ptr()));
        (0..b * h * plan.blocks()).into_par_iter().for_each_init(Vec::new, |dp: &mut Vec<f32>, task| {
            let (bh, blk) = (task / plan.blocks(), task % plan.blocks());
            let (bi, hi) = (bh / h, bh % h);
            let ((i0, rows), keys) = (plan.block(blk), plan.limit(bi, blk));
            dp.resize(rows * keys, 0.0);
            // SAFETY: this task alone reads and rewrites its block's rows of P (→ dS) and
            // writes its rows of dQ ([b, heads, s, d]); both buffers outlive the loop. The
            // views read rows of the live dO, V and K and the task's own dp (rows × keys).
            unsafe {
                gemm(rows, keys, d, dp.as_mut_ptr(), keys, false, d_out.view(bi, hi).down(i0), v.view(bi, hi / g).t());
                for r in 0..rows {
                    let pr = std::slice::from_raw_parts_mut(ds.at((bh * s + i0 + r) * s), keys);
                    let dpr = &dp[r * keys..][..keys];
                    kernels::softmax_grad(pr, dpr, kernels::dot(dpr, pr), plan.scale);
                }
                gemm(
                    rows,
                    d,
                    keys,
                    dq_out.at((bh * s + i0) * d),
                    d,
                    false,
                    View::rows(ds.at((bh * s + i0) * s), s),
                    k.view(bi, hi / g),
                );
            }
        });
        if let Some(node) = node_k {
            let mut dk = Buffer::new(b * kvh * s * d);
            let dst = dk.out();
            (0..key_tasks).into_par_iter().for_each(|task| {
                let (bkv, kb) = (task / plan.blocks(), task % plan.blocks());
                let (bi, kv) = (bkv / kvh, bkv % kvh);
                // SAFETY: dS (in P's buffer) is complete and only read here; dst is key block
                // kb of (bi, kv) in dK's [b, kv, s, d], written by this task alone.
                unsafe { plan.key_block_sum(bi, kv, kb, ds.ptr(), &q, dst.at((bkv * s + kb * BLOCK) * d), d) };
            });
            // SAFETY: the tasks cover every (batch, KV head, key block), and each zeroed its rows before summing into them.
            grads.register::<Flex>(node.id, contiguous(unsafe { dk.filled() }, Shape::new([b, kvh, s, d])));
        }
        if let Some(node) = node_q {
            // SAFETY: the dS tasks cover every (batch, head, query block), and each wrote its d values per query.
            grads.register::<Flex>(node.id, contiguous(unsafe { dq.filled() }, plan.per_head()));
        }
    }
}
