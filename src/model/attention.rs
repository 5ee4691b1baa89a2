//! Causal self-attention with grouped-query heads (GQA).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::rope::Rope;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// x: [batch, seq, hidden] -> [batch, seq, hidden]
    pub fn forward(&self, x: Tensor<3>, rope: &Rope) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);
        let q = rope.apply(heads(self.q_proj.forward(x.clone()), self.num_heads));
        let k = rope.apply(heads(self.k_proj.forward(x.clone()), self.num_kv_heads));
        let v = heads(self.v_proj.forward(x), self.num_kv_heads);
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));

        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let out = attention(q, k, v, None, None, options);
        let out = out.swap_dims(1, 2).reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }

    /// [b, kv_heads, s, d] -> [b, heads, s, d]: each KV head serves `heads / kv_heads` queries.
    fn repeat_kv(&self, t: Tensor<4>) -> Tensor<4> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return t;
        }
        let [b, kv, s, d] = t.dims();
        t.unsqueeze_dim::<5>(2).expand([b, kv, groups, s, d]).reshape([b, kv * groups, s, d])
    }
}
