//! Packed rows for the recurrent layers: several documents share a row but not a state.
//!
//! A document boundary is a step whose decay is zero: the state a layer carries into a
//! document's first token is forgotten before that token writes. The chunked scans compute
//! every decay as a product of per-step decays between two positions (an exp of a difference
//! of cumulative sums); with boundaries, such a product is zero exactly when the two positions
//! lie in different documents. Since each document is contiguous (ids never decrease along a
//! row), "a boundary lies between i and j" is "doc(i) ≠ doc(j)", so the scans multiply their
//! decays by equality masks of document ids and need nothing else. The short causal conv
//! likewise drops the taps that reach back into an earlier document. This is what
//! mamba_ssm's `seq_idx` and FLA's `cu_seqlens` compute.

use std::cell::RefCell;

use burn::tensor::{Int, Tensor};

/// Document ids `[batch, seq]` of packed rows, non-decreasing along each row, as f32 (exact
/// for any realistic count). One value serves every layer of a forward pass, so each mask
/// is made once and handed out again to the layers that ask for it after the first.
#[derive(Debug)]
pub struct Documents {
    ids: Tensor<2>,
    taps: RefCell<Vec<(usize, Tensor<3>)>>,
    chunks: RefCell<Vec<(usize, ChunkMasks)>>,
}

/// [`Documents`] laid out in chunks of `t` for a chunked scan, as 1/0 masks.
#[derive(Clone, Debug)]
pub struct ChunkMasks {
    /// `[b, c, t, t]`: positions i and j are in the same document.
    pub within: Tensor<4>,
    /// `[b, c, t]`: the state entering the chunk still reaches position i.
    pub from_start: Tensor<3>,
    /// `[b, c, t]`: position j still reaches the chunk's last position.
    pub to_end: Tensor<3>,
    /// `[b, c]`: the state entering the chunk still reaches its last position.
    pub through: Tensor<2>,
    /// `[b, c + 1, c + 1]`: the state after chunk boundary j (0: the initial state, k: the
    /// end of chunk k − 1) still reaches boundary i.
    pub across: Tensor<3>,
}

impl Documents {
    pub fn new(segments: Tensor<2, Int>) -> Self {
        Self {
            ids: segments.float(),
            taps: RefCell::default(),
            chunks: RefCell::default(),
        }
    }

    /// 1 where the input `back` steps before each position is in the same document,
    /// `[b, l, 1]`. Inputs before the row (a continued state's history) count as the first
    /// document's.
    pub fn reaches_back(&self, back: usize) -> Tensor<3> {
        remembered(&self.taps, back, || {
            let ids = &self.ids;
            let [b, l] = ids.dims();
            let first = ids.clone().narrow(1, 0, 1);
            let earlier = if back >= l {
                first.expand([b, l])
            } else {
                let head = first.expand([b, back]);
                Tensor::cat(vec![head, ids.clone().narrow(1, 0, l - back)], 1)
            };
            earlier.equal(ids.clone()).float().reshape([b, l, 1])
        })
    }

    /// The masks of chunks of `t` positions; the row is padded to whole chunks by repeating
    /// its last id (padding continues the last document).
    pub fn chunks(&self, t: usize) -> ChunkMasks {
        remembered(&self.chunks, t, || self.make_chunks(t))
    }

    fn make_chunks(&self, t: usize) -> ChunkMasks {
        let [b, l] = self.ids.dims();
        let c = l.div_ceil(t);
        let ids = if c * t > l {
            let last = self.ids.clone().narrow(1, l - 1, 1).expand([b, c * t - l]);
            Tensor::cat(vec![self.ids.clone(), last], 1)
        } else {
            self.ids.clone()
        }
        .reshape([b, c, t]);
        let same = |x: Tensor<3>, y: Tensor<3>| x.equal(y).float();
        // [b, c, 1] and [b, 1, 1]
        let last = ids.clone().narrow(2, t - 1, 1);
        let first = ids.clone().narrow(1, 0, 1).narrow(2, 0, 1);
        // The document of the state entering each chunk: the previous chunk's last position's
        // (the first position's for the first chunk, so that an initial state continues it).
        let entering = if c > 1 {
            Tensor::cat(vec![first.clone(), last.clone().narrow(1, 0, c - 1)], 1)
        } else {
            first.clone()
        };
        let ends = Tensor::cat(vec![first, last.clone()], 1).reshape([b, c + 1]);
        ChunkMasks {
            within: same(
                ids.clone()
                    .reshape([b, c, t, 1])
                    .expand([b, c, t, t])
                    .reshape([b, c * t, t]),
                ids.clone()
                    .reshape([b, c, 1, t])
                    .expand([b, c, t, t])
                    .reshape([b, c * t, t]),
            )
            .reshape([b, c, t, t]),
            from_start: same(ids.clone(), entering.clone().expand([b, c, t])),
            to_end: same(ids, last.clone().expand([b, c, t])),
            through: same(last, entering).reshape([b, c]),
            across: same(
                ends.clone()
                    .reshape([b, c + 1, 1])
                    .expand([b, c + 1, c + 1]),
                ends.reshape([b, 1, c + 1]).expand([b, c + 1, c + 1]),
            ),
        }
    }
}

/// The value `make` gives for `key`, made on the first call and cloned after it.
fn remembered<T: Clone>(
    memo: &RefCell<Vec<(usize, T)>>,
    key: usize,
    make: impl FnOnce() -> T,
) -> T {
    if let Some((_, v)) = memo.borrow().iter().find(|(k, _)| *k == key) {
        return v.clone();
    }
    let v = make();
    memo.borrow_mut().push((key, v.clone()));
    v
}
