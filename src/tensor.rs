//! The tensor layer every other one builds on: burn's `Tensor` (the backend chosen at
//! build time) and reading its values back on the host.

/// A tensor's values as f32, whatever its element type.
pub fn values<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("tensor converted to f32")
}
