//! `ember bench gemm`: the cuBLASLt GEMM (`EMBER_GEMM=cublaslt`) beside Burn's matmul, on
//! the three products of each of a model's linear layers (forward `x·wᵀ`, `dx = dy·w`,
//! `dw = dyᵀ·x`): the largest difference between them and each one's TFLOP/s. Then a small
//! autodiff check that the op's own backward gives Burn's gradients. `--check` turns a
//! difference past the dtype's tolerance into a non-zero exit.

use anyhow::{bail, Result};

use crate::models::RunFlags;

#[derive(clap::Args)]
pub struct Args {
    /// GEMM shapes `m,n,k` (`[m,k]·[k,n]`), separated by `;`. The default is Qwen3-0.6B's
    /// projections at 4 × 2048 tokens and one 8192³ product.
    #[arg(
        long,
        default_value = "8192,2048,1024;8192,1024,1024;8192,1024,2048;8192,3072,1024;8192,1024,3072;8192,8192,8192"
    )]
    shapes: String,
    /// Timed repetitions of each product (after one untimed).
    #[arg(long, default_value_t = 10)]
    repeat: usize,
    /// Exit non-zero when a difference passes the tolerance.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(a: Args) -> Result<()> {
    let shapes = parse_shapes(&a.shapes)?;
    #[cfg(not(feature = "cuda"))]
    bail!(
        "ember bench gemm compares cuBLASLt with Burn's matmul ({} shapes given): it needs a build \
         with --features cuda",
        shapes.len()
    );
    #[cfg(feature = "cuda")]
    cuda::compare(a, shapes)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use anyhow::{bail, Result};
    use burn::tensor::{DType, Distribution, Tensor};
    use ember_models::layers::gemm::product_on_burn;
    use ember_train::trainer::scalar;

    use super::Args;

    /// `op(a)·op(b)` without autodiff, `op` transposing when its flag is set.
    type Gemm = fn(Tensor<2>, Tensor<2>, bool, bool) -> Tensor<2>;

    pub fn compare(a: Args, shapes: Vec<(usize, usize, usize)>) -> Result<()> {
        let lt: Gemm = ember_models::layers::cublaslt::gemm;
        let device = a.run.device()?;
        let dtype = a.run.dtype(&device)?;
        // bf16 and f16 round the output to 8 and 11 bits; the two sides also add in different
        // orders.
        let tol = match dtype {
            DType::F32 => 1e-4,
            DType::F16 => 4e-3,
            _ => 2e-2,
        };
        let normal = Distribution::Normal(0.0, 1.0);
        let mut worst = 0f64;
        println!(
            "| m | n | k | product | max diff / max | Burn TFLOP/s | cuBLASLt TFLOP/s | ratio |"
        );
        println!("|---:|---:|---:|---|---:|---:|---:|---:|");
        for (m, n, k) in shapes {
            let x = Tensor::<2>::random([m, k], normal, &device).cast(dtype);
            let w = Tensor::<2>::random([n, k], normal, &device).cast(dtype);
            let dy = Tensor::<2>::random([m, n], normal, &device).cast(dtype);
            let products: [(&str, &Tensor<2>, &Tensor<2>, bool, bool); 3] = [
                ("x·wᵀ", &x, &w, false, true),
                ("dy·w", &dy, &w, false, false),
                ("dyᵀ·x", &dy, &x, true, false),
            ];
            for (name, p, q, tp, tq) in products {
                let reference = product_on_burn(p.clone(), q.clone(), tp, tq);
                let ours = lt(p.clone(), q.clone(), tp, tq);
                let diff = rel_diff(ours, reference)?;
                worst = nan_max(worst, diff);
                let flops = 2.0 * (m * n * k) as f64;
                let t_burn = time(a.repeat, || product_on_burn(p.clone(), q.clone(), tp, tq))?;
                let t_lt = time(a.repeat, || lt(p.clone(), q.clone(), tp, tq))?;
                println!(
                    "| {m} | {n} | {k} | {name} | {diff:.2e} | {:.1} | {:.1} | {:.2}× |",
                    flops / t_burn / 1e12,
                    flops / t_lt / 1e12,
                    t_burn / t_lt
                );
            }
        }
        let chain = chain_diff(&device, dtype)?;
        println!(
            "a chain of 16 dependent GEMMs and element-wise kernels, no host read between them: \
             max diff / max {chain:.2e} against Burn's"
        );
        // A GEMM that read its input before cubecl wrote it, or a kernel that read the output
        // before cuBLASLt wrote it, is off by O(1), not by rounding.
        if a.check && (chain.is_nan() || chain > tol) {
            bail!("the GEMM chain differs from Burn's by {chain:.2e}: cuBLASLt is not ordered against cubecl's stream");
        }
        let grads = grad_diff(&device, dtype)?;
        println!(
            "autodiff through the cuBLASLt op vs Burn's: dx and dw max diff / max {grads:.2e}"
        );
        worst = nan_max(worst, grads);
        println!("largest difference {worst:.2e} (tolerance {tol:.0e})");
        if a.check && (worst.is_nan() || worst > tol) {
            bail!("cuBLASLt GEMM differs from Burn's matmul by {worst:.2e} (tolerance {tol:.0e})");
        }
        Ok(())
    }

    /// The larger of two differences, NaN if either is (`f64::max` would drop it).
    fn nan_max(a: f64, b: f64) -> f64 {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            a.max(b)
        }
    }

    /// `max |a − b| / max |b|`, in f32.
    fn rel_diff(a: Tensor<2>, b: Tensor<2>) -> Result<f64> {
        let (a, b) = (a.cast(DType::F32), b.cast(DType::F32));
        let diff = scalar((a - b.clone()).abs().max())?;
        let scale = scalar(b.abs().max())?;
        Ok(diff as f64 / (scale as f64).max(f64::MIN_POSITIVE))
    }

    /// Seconds per call, over `repeat` calls after one untimed; reading one value of the last
    /// output waits for all of them.
    fn time(repeat: usize, mut f: impl FnMut() -> Tensor<2>) -> Result<f64> {
        scalar(f().slice([0..1, 0..1]).sum().cast(DType::F32))?;
        let t = Instant::now();
        let mut last = None;
        for _ in 0..repeat.max(1) {
            last = Some(f());
        }
        if let Some(y) = last {
            scalar(y.slice([0..1, 0..1]).sum().cast(DType::F32))?;
        }
        Ok(t.elapsed().as_secs_f64() / repeat.max(1) as f64)
    }

    /// `y ← tanh(y·wᵀ / √k) + y` sixteen times, each product consuming what a cubecl kernel
    /// wrote just before and feeding the next kernel, through cuBLASLt and through Burn: the
    /// ordering between the two streams (`EMBER_GEMM_ORDER`) decides whether they agree.
    fn chain_diff(device: &burn::tensor::Device, dtype: DType) -> Result<f64> {
        let (m, k) = (1024, 1024);
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<2>::random([m, k], normal, device).cast(dtype);
        let w = Tensor::<2>::random([k, k], normal, device).cast(dtype);
        let run = |gemm: Gemm| {
            let mut y = x.clone();
            for _ in 0..16 {
                y = (gemm(y.clone(), w.clone(), false, true) / (k as f64).sqrt()).tanh() + y;
            }
            y
        };
        let ours = run(ember_models::layers::cublaslt::gemm);
        rel_diff(ours, run(product_on_burn))
    }

    /// The gradients of `sum(r ∘ x·wᵀ)` through the cuBLASLt op against Burn's autodiff.
    fn grad_diff(device: &burn::tensor::Device, dtype: DType) -> Result<f64> {
        let ad = device.clone().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        let (m, n, k) = (96, 80, 64);
        let x0 = Tensor::<2>::random([m, k], normal, &ad);
        let w0 = Tensor::<2>::random([n, k], normal, &ad);
        let r = Tensor::<2>::random([m, n], normal, &ad);
        let grads = |lt: bool| -> Result<(Tensor<2>, Tensor<2>)> {
            let (x, w) = (x0.clone().require_grad(), w0.clone().require_grad());
            let (xc, wc) = (x.clone().cast(dtype), w.clone().cast(dtype));
            let y = if lt {
                ember_models::layers::gemm::matmul_nt_lt(xc, wc)
            } else {
                xc.matmul(wc.transpose())
            };
            let g = (y.cast(DType::F32) * r.clone()).sum().backward();
            match (x.grad(&g), w.grad(&g)) {
                (Some(dx), Some(dw)) => Ok((dx, dw)),
                _ => bail!("no gradient reached x or w"),
            }
        };
        let (dx_lt, dw_lt) = grads(true)?;
        let (dx, dw) = grads(false)?;
        Ok(nan_max(rel_diff(dx_lt, dx)?, rel_diff(dw_lt, dw)?))
    }
}

fn parse_shapes(s: &str) -> Result<Vec<(usize, usize, usize)>> {
    s.split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let v: Vec<usize> = p
                .split(',')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--shapes: `{p}` is not m,n,k"))?;
            match v[..] {
                [m, n, k] if m > 0 && n > 0 && k > 0 => Ok((m, n, k)),
                _ => bail!("--shapes: `{p}` is not three positive sizes m,n,k"),
            }
        })
        .collect()
}
