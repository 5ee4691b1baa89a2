//! The tensor layer every other one builds on: burn's `Tensor` (the backend chosen at
//! build time) and reading its values back on the host.

/// A tensor's values as f32, whatever its element type.
pub fn values<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("tensor converted to f32")
}

/// Columns `first..` of a [N, W, ...] tensor (the tensor itself when `first` is 0).
pub fn from_column<const D: usize, K: burn::tensor::kind::Basic>(
    t: burn::tensor::Tensor<D, K>,
    first: usize,
) -> burn::tensor::Tensor<D, K> {
    let width = t.dims()[1];
    if first == 0 { t } else { t.narrow(1, first, width - first) }
}
