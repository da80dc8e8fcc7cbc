//! A hybrid's training forward over packed rows: every document of a row is read as if it
//! were alone. Attention keeps to the document, positions restart with it, and the recurrent
//! layers' states and convolutions do not cross into it ([`super::documents`]).
//!
//! A model with meta tokens opens every sequence with them, so here each document gets its
//! own copy: the row is laid out again as [meta | document 0 | meta | document 1 | …], which
//! takes one read of the document ids to the host, and the outputs are gathered back to the
//! tokens' own places. Rows whose documents are many get longer; the others are padded to
//! the longest with a document of their own that nothing reads.

use burn::tensor::{Int, Tensor, TensorData};

use super::stack::{index3, HybridLM, Pass};

impl HybridLM {
    /// The final norm's output `[batch, seq, hidden]` of packed rows: tokens at `positions`
    /// (counted within their document), in the documents `segments` gives (`[batch, seq]`
    /// ids, non-decreasing along a row). Without segments a row is one sequence from 0.
    pub fn packed_hidden(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let Some(segments) = segments else {
            return self.final_hidden(ids, None);
        };
        let x = self.embed(ids);
        let (x, positions, segments, back) = if self.memory.is_some() {
            self.meta_per_document(x, positions, segments)
        } else {
            (x, positions, segments, None)
        };
        let rope = self
            .config
            .rope_theta
            .map(|theta| self.rope_at(theta, positions));
        let pass = Pass {
            rope: rope.as_ref(),
            start: 0,
            keep: None,
            pad: None,
            segments: Some(segments),
        };
        let last = self.blocks(x, &pass, None).pop().expect("the embeddings");
        let y = self.norm_f.forward(last);
        match back {
            Some(idx) => y.gather(1, idx),
            None => y,
        }
    }

    /// The rows laid out with the meta tokens before every document: their inputs,
    /// positions and document ids, and where each token went (`[batch, seq, hidden]`
    /// indices for a gather back).
    #[allow(clippy::type_complexity)]
    fn meta_per_document(
        &self,
        x: Tensor<3>,
        positions: Tensor<2, Int>,
        segments: Tensor<2, Int>,
    ) -> (
        Tensor<3>,
        Tensor<2, Int>,
        Tensor<2, Int>,
        Option<Tensor<3, Int>>,
    ) {
        let [b, s, h] = x.dims();
        let n = self.config.memory_tokens;
        let device = x.device();
        let docs: Vec<i64> = segments.to_data().convert::<i64>().iter::<i64>().collect();
        // Per row: the source of every laid-out position (meta token j is j, token t is
        // n + t), its document, and each token's new place.
        let mut rows = Vec::with_capacity(b);
        for row in docs.chunks(s) {
            let (mut src, mut doc, mut at) = (Vec::new(), Vec::new(), Vec::with_capacity(s));
            for (t, &d) in row.iter().enumerate() {
                if t == 0 || d != row[t - 1] {
                    src.extend(0..n as i64);
                    doc.extend(std::iter::repeat_n(d, n));
                }
                at.push(src.len() as i64);
                src.push((n + t) as i64);
                doc.push(d);
            }
            rows.push((src, doc, at));
        }
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let (mut src, mut doc, mut at) = (vec![], vec![], vec![]);
        for (mut s_r, mut d_r, a_r) in rows {
            let filler = d_r.iter().max().map_or(0, |&m| m + 1);
            s_r.resize(width, 0);
            d_r.resize(width, filler);
            src.extend(s_r);
            doc.extend(d_r);
            at.extend(a_r);
        }
        let meta = crate::layers::to_dtype(
            self.memory.as_ref().expect("meta tokens").val(),
            self.compute_dtype,
        );
        let all = Tensor::cat(vec![meta.reshape([1, n, h]).expand([b, n, h]), x], 1);
        let src = Tensor::<2, Int>::from_data(TensorData::new(src, [b, width]), &device);
        let meta_pos = Tensor::<1, Int>::arange(0..n as i64, &device)
            .reshape([1, n])
            .expand([b, n]);
        let positions = Tensor::cat(vec![meta_pos, positions.add_scalar(n as i64)], 1);
        (
            all.gather(1, src.clone().reshape([b, width, 1]).expand([b, width, h])),
            positions.gather(1, src),
            Tensor::from_data(TensorData::new(doc, [b, width]), &device),
            Some(index3(at, b, s, h, &device)),
        )
    }
}
