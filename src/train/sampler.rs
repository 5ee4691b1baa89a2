//! Which rows each micro-batch trains on: a shuffled order (SplitMix64 from the seed),
//! reshuffled at each epoch, and with `replay` k the same rows again for k steps.

use std::path::Path;

use anyhow::{Result, bail};

use super::checkpoint::TrainerState;
use crate::rng::SplitMix64;

/// The data position of a run: saved in every checkpoint, so a resumed run draws the rows
/// the uninterrupted one would have.
pub struct Sampler {
    /// Row indices in the order this epoch trains them.
    pub order: Vec<usize>,
    /// Position in `order` of the next row.
    pub cursor: usize,
    /// Epochs completed.
    pub epoch: usize,
    /// Draws each epoch's shuffle.
    pub rng: SplitMix64,
    /// Row indices of each micro-batch of the current batch (what `replay` trains again).
    pub replayed: Vec<Vec<usize>>,
    batch_size: usize,
    replay: usize,
}

impl Sampler {
    /// The first epoch's order over `rows` rows, shuffled by `seed`.
    pub fn new(rows: usize, seed: u64, batch_size: usize, replay: usize) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut order: Vec<usize> = (0..rows).collect();
        rng.shuffle(&mut order);
        Self { order, cursor: 0, epoch: 0, rng, replayed: Vec::new(), batch_size, replay }
    }

    /// Row indices of micro-batch `micro` of `step`: the next batch_size rows in shuffled
    /// order, or with `replay` k the rows this micro-batch had at the first step of its
    /// group of k.
    pub fn rows_for(&mut self, step: usize, micro: usize) -> &[usize] {
        let fresh = step.is_multiple_of(self.replay) || self.replayed.len() <= micro;
        if fresh {
            let rows = self.next_rows();
            self.replayed.truncate(micro);
            self.replayed.push(rows);
        }
        &self.replayed[micro]
    }

    /// Indices of the next batch_size rows in shuffled order, reshuffling at each epoch.
    fn next_rows(&mut self) -> Vec<usize> {
        let mut rows = Vec::with_capacity(self.batch_size);
        while rows.len() < self.batch_size {
            if self.cursor == self.order.len() {
                self.cursor = 0;
                self.epoch += 1;
                self.rng.shuffle(&mut self.order);
            }
            rows.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        rows
    }

    /// Epochs as a fraction (metrics' `epoch`).
    pub fn epoch_progress(&self) -> f64 {
        self.epoch as f64 + self.cursor as f64 / self.order.len() as f64
    }

    /// Takes the position `state` of checkpoint `ckpt` saved, made over the same rows.
    pub fn restore(&mut self, ckpt: &Path, state: &TrainerState) -> Result<()> {
        let rows = self.order.len();
        if state.order.len() != rows || state.order.iter().any(|&i| i >= rows) {
            bail!(
                "{}: the data has {rows} rows, the checkpoint was made with {}; resume needs the same data",
                ckpt.display(),
                state.order.len()
            );
        }
        if state.replayed.iter().flatten().any(|&i| i >= rows) {
            bail!(
                "{}: the replayed batch names rows the data does not have; resume needs the same data",
                ckpt.display()
            );
        }
        self.order = state.order.clone();
        self.cursor = state.cursor;
        self.epoch = state.epoch;
        self.rng = state.rng.clone();
        self.replayed = state.replayed.clone();
        Ok(())
    }
}
