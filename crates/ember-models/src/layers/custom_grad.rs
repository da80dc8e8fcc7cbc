//! Differentiable ops whose forward and backward are ordinary tensor code, for when Burn's
//! autodiff would keep too much for the backward pass (attention's score matrices, the LM
//! head's logits). The forward runs on the inner backend, with no graph, and becomes one node
//! whose backward is the op's own.
//!
//! Burn 0.22 chooses the backend at run time, while an autodiff node is typed by its backend
//! and checkpointing strategy, so [`apply`] tries each pair this build has.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::Tensor;

/// The backward half of an op of `N` inputs of rank `DI` and one output of rank `DO`.
pub trait TensorBackward<const N: usize, const DI: usize, const DO: usize>:
    std::fmt::Debug + Send + 'static
{
    /// What the forward pass keeps for the backward one (tensors without autodiff).
    type State: Clone + Send + std::fmt::Debug + 'static;

    /// The gradients of the inputs, given the output's.
    fn backward(&self, state: Self::State, grad: Tensor<DO>) -> [Tensor<DI>; N];
}

/// The ranks ride along so that the impl below can name them.
#[derive(Debug)]
struct Node<Op, const DI: usize, const DO: usize>(Op);

impl<B, Op, const N: usize, const DI: usize, const DO: usize> Backward<B, N> for Node<Op, DI, DO>
where
    B: Backend,
    Op: TensorBackward<N, DI, DO>,
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = Op::State;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = Tensor::<DO>::from_primitive::<B>(grads.consume::<B>(&ops.node));
        let input_grads = self.0.backward(ops.state, grad);
        for (parent, g) in ops.parents.into_iter().zip(input_grads) {
            if let Some(node) = parent {
                let g = g
                    .try_into_primitive::<B>()
                    .expect("gradient on the inner backend");
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// Runs `forward` on `inputs` and, when any of them is tracked, records one graph node whose
/// backward is `op`'s, with the state `forward` returned. All inputs must share one device.
pub fn apply<Op, F, const N: usize, const DI: usize, const DO: usize>(
    op: Op,
    inputs: [Tensor<DI>; N],
    forward: F,
) -> Tensor<DO>
where
    Op: TensorBackward<N, DI, DO>,
    F: FnOnce([Tensor<DI>; N]) -> (Tensor<DO>, Op::State),
{
    if !inputs.iter().any(Tensor::is_tracked) {
        return forward(inputs.map(Tensor::inner)).0;
    }
    macro_rules! attempt {
        ($b:ty, $c:ty) => {
            if inputs
                .iter()
                .all(|t| t.clone().try_into_primitive::<Autodiff<$b, $c>>().is_ok())
            {
                return on_backend::<$b, $c, Op, F, N, DI, DO>(op, inputs, forward);
            }
        };
    }
    attempt!(burn::backend::Flex, NoCheckpointing);
    attempt!(burn::backend::Flex, BalancedCheckpointing);
    #[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
    {
        attempt!(burn::backend::Cube, NoCheckpointing);
        attempt!(burn::backend::Cube, BalancedCheckpointing);
    }
    panic!("custom op: inputs on different devices, or on an autodiff backend this build lacks")
}

fn on_backend<B, C, Op, F, const N: usize, const DI: usize, const DO: usize>(
    op: Op,
    inputs: [Tensor<DI>; N],
    forward: F,
) -> Tensor<DO>
where
    B: Backend,
    C: CheckpointStrategy,
    Op: TensorBackward<N, DI, DO>,
    F: FnOnce([Tensor<DI>; N]) -> (Tensor<DO>, Op::State),
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
{
    let prims = inputs.map(|t| {
        t.try_into_primitive::<Autodiff<B, C>>()
            .expect("checked by the caller")
    });
    let guards = prims.each_ref().map(|p| p.node());
    let inner = prims.map(|p| Tensor::<DI>::from_primitive::<B>(p.into_primitive()));
    let (out, state) = forward(inner);
    let out = out
        .try_into_primitive::<B>()
        .expect("forward output on the inner backend");
    let node = match Node::<Op, DI, DO>(op)
        .prepare::<C>(guards)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::<DO>::from_primitive::<Autodiff<B, C>>(node)
}
