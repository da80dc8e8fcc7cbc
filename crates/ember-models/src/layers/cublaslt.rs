//! cuBLASLt GEMMs on Burn's CUDA tensors, as a backend extension (`LtOps`).
//!
//! Why: on an H100, cubecl's own bf16 matmul reaches about 181 TFLOP/s on 8192³ where
//! cuBLAS reaches about 790, and the projections are most of a step's FLOPs.
//!
//! How it runs alongside cubecl: cubecl launches on streams it keeps private, so a GEMM
//! here runs on a stream of its own in the same (primary) context, ordered against cubecl's
//! in one of two ways (`EMBER_GEMM_ORDER`):
//! - `host` (the default, the one measured on an H100): wait for the device (`client.sync`)
//!   before the GEMM and for cuBLASLt's stream after it. Two host syncs per GEMM, which
//!   drain the GPU's queue each time, some 1,400 of them in a 0.6B training step at 4 × 2048.
//! - `device`: no host sync. A one-thread cubecl kernel stores a counter into a flag once
//!   everything before it on cubecl's stream is done; cuBLASLt's stream waits for that value
//!   (`cuStreamWaitValue32`), runs the GEMM and writes the counter into a second flag
//!   (`cuStreamWriteValue32`, which fences the GEMM's writes first); a second one-thread
//!   cubecl kernel spins until it reads it, so nothing later on cubecl's stream starts
//!   before the GEMM is done (nor reuses its buffers). On an H100 (2026-11-27) it did not
//!   work: `ember bench gemm` printed no row in 60 s, then in 130 s, where the host order
//!   runs the same bench in seconds, and a training step did not finish in 150 s. The
//!   likely cause, found by reading cubecl since: cubecl runs its calls on a thread of its
//!   own, so the flag store could reach the GPU after cuBLASLt's wait, a wait the driver
//!   cannot see. The store is now launched first; that is untested on a GPU, so it warns
//!   when chosen.
//!
//! Under fusion the op is lazy and opaque: fusion flushes what came before and runs it in
//! order. While cubecl records a graph (`decode_graph`) the op runs Burn's matmul: cuBLASLt's
//! stream would not be in the recording.
//!
//! Opt-in with `EMBER_GEMM=cublaslt` until measured on a GPU; libcublasLt is loaded at the
//! first call, from `LD_LIBRARY_PATH` (the `nvidia-cublas` wheel's `lib/` has it).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, TensorMetadata};
use burn::tensor::{DType, Device, Shape, Tensor};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::future::block_on;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};
use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl_runtime::runtime::Runtime;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaStream};

/// Whether the projections' GEMMs on `device` go to cuBLASLt (`EMBER_GEMM=cublaslt`).
pub fn enabled_on(device: &Device) -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    let wanted = *WANTED.get_or_init(|| match std::env::var("EMBER_GEMM").as_deref() {
        Ok("cublaslt") => true,
        Ok("burn") | Err(_) => false,
        Ok(other) => {
            eprintln!("warning: EMBER_GEMM={other} is not `cublaslt` or `burn`; using burn");
            false
        }
    });
    wanted && crate::device::is_cuda(device)
}

/// `op(a) · op(b)` for 2-D `a`, `b`, off the graph, `op` transposing when its flag is set.
/// Untracked tensors of an autodiff device are taken off it first: the extension has no
/// autodiff route, and the callers (custom backwards) hold no graph anyway.
pub fn gemm(a: Tensor<2>, b: Tensor<2>, ta: bool, tb: bool) -> Tensor<2> {
    assert!(
        !a.is_tracked() && !b.is_tracked(),
        "cublaslt::gemm is off the graph: use gemm::matmul_nt for tracked inputs"
    );
    Tensor::from_dispatch(<burn::backend::Dispatch as LtOps>::lt_gemm(
        a.inner().into_dispatch(),
        b.inner().into_dispatch(),
        ta,
        tb,
    ))
}

#[backend_extension(Cube, Fusion)]
pub trait LtOps: Backend {
    #[fusion(dtype = a, shape = gemm_shape(a, b, ta, tb))]
    fn lt_gemm(a: FloatTensor<Self>, b: FloatTensor<Self>, ta: bool, tb: bool)
        -> FloatTensor<Self>;
}

/// `[m, n]` of `op(a) · op(b)`.
fn gemm_shape(a: &Shape, b: &Shape, ta: &bool, tb: &bool) -> Shape {
    let m = if *ta { a[1] } else { a[0] };
    let n = if *tb { b[0] } else { b[1] };
    Shape::new([m, n])
}

impl LtOps for CubeBackend {
    fn lt_gemm(a: CubeTensor, b: CubeTensor, ta: bool, tb: bool) -> CubeTensor {
        let typed = matches!(a.dtype, DType::BF16 | DType::F16 | DType::F32) && a.dtype == b.dtype;
        // cuBLASLt rejects empty products; Burn's matmul gives their zeros.
        let empty = a.shape().num_elements() == 0 || b.shape().num_elements() == 0;
        let capturing = a.client.is_capturing();
        if let (CubeDevice::Cuda(d), true, false, false) = (&a.device, typed, empty, capturing) {
            let index = d.index;
            return run(index, a, b, ta, tb)
                .unwrap_or_else(|e| panic!("cuBLASLt GEMM on cuda:{index}: {e:#}"));
        }
        let a = if ta { Self::float_transpose(a) } else { a };
        let b = if tb { Self::float_transpose(b) } else { b };
        Self::float_matmul(a, b)
    }
}

fn run(index: usize, a: CubeTensor, b: CubeTensor, ta: bool, tb: bool) -> Result<CubeTensor> {
    let (a, b) = (into_contiguous(a), into_contiguous(b));
    let out_shape = gemm_shape(&a.shape(), &b.shape(), &ta, &tb);
    let k = if ta { a.shape()[0] } else { a.shape()[1] };
    let (m, n) = (out_shape[0], out_shape[1]);
    let out = empty_device_contiguous_dtype(a.client.clone(), a.device.clone(), out_shape, a.dtype);
    type Server = <CudaRuntime as Runtime>::Server;
    let resource = |t: &CubeTensor| {
        t.client
            .get_resource::<Server>(t.handle.clone())
            .map_err(|e| anyhow::anyhow!("device pointer: {e:?}"))
    };
    let mut devices = DEVICES.get_or_init(Default::default).lock().unwrap();
    let lt = match devices.entry(index) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(Lt::new(index)?),
    };
    // With device ordering, cubecl's flag store is launched before the guards are taken:
    // cubecl runs its calls in order on a thread of its own, and taking a guard waits for that
    // thread, so the store is on the GPU's queue before cuBLASLt's stream is told to wait for
    // it. Otherwise the wait could reach the GPU first, and the CUDA documentation warns that
    // waits the driver cannot see may deadlock when streams share a hardware queue.
    let signalled = match order() {
        Order::Host => None,
        Order::Device => {
            let flags = match &mut lt.flags {
                Some(f) => f,
                none => none.insert(Flags::new(&a.client)?),
            };
            let count = flags.next();
            flags.buf.signal(&a.client, count);
            Some((flags.buf.clone(), count))
        }
    };
    // The guards keep the buffers in place (not freed, reused or moved) until the GEMM is
    // enqueued; with device ordering cubecl's stream then waits for it before anything else.
    let (ga, gb, gd) = (resource(&a)?, resource(&b)?, resource(&out)?);
    let (pa, pb, pd) = (ga.resource().ptr, gb.resource().ptr, gd.resource().ptr);
    let key = Key {
        m,
        n,
        k,
        ta,
        tb,
        dtype: a.dtype,
        align: [pa, pb, pd].map(alignment),
    };
    let Some((flags, count)) = signalled else {
        block_on(a.client.sync()).map_err(|e| anyhow::anyhow!("waiting for cubecl: {e:?}"))?;
        lt.matmul(key, pa, pb, pd)?;
        lt.stream.synchronize().context("cuBLASLt stream")?;
        return Ok(out);
    };
    let stream = lt.stream.cu_stream();
    // Safety: the flags' buffer is pinned for the process (`Flags::_pinned`).
    unsafe { flags.wait_on(stream, count) }?;
    lt.matmul(key, pa, pb, pd)?;
    unsafe { flags.write_on(stream, count) }?;
    flags.await_on_cubecl(&a.client, count);
    Ok(out)
}

/// How cuBLASLt's stream is ordered against cubecl's (`EMBER_GEMM_ORDER`; module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Order {
    Host,
    Device,
}

fn order() -> Order {
    static ORDER: OnceLock<Order> = OnceLock::new();
    *ORDER.get_or_init(|| match std::env::var("EMBER_GEMM_ORDER").as_deref() {
        Ok("device") => Order::Device,
        Ok("host") | Err(_) => Order::Host,
        Ok(other) => {
            eprintln!("warning: EMBER_GEMM_ORDER={other} is not `host` or `device`; using host");
            Order::Host
        }
    })
}

/// Two `u32` flags in a cubecl buffer that both streams see: `[0]` says "cubecl's stream
/// reached the GEMM", `[1]` says "the GEMM is done". Each GEMM uses the next counter value,
/// so the flags never need resetting.
struct Flags {
    buf: FlagBuf,
    /// Pins the buffer for the process, so its address stays valid on cuBLASLt's stream.
    _pinned: Box<dyn Send>,
    count: u32,
}

/// The flags' buffer as both sides name it: cubecl's handle and its device address.
#[derive(Clone)]
struct FlagBuf {
    handle: Handle,
    ptr: u64,
}

impl Flags {
    fn new(client: &Client) -> Result<Self> {
        type Server = <CudaRuntime as Runtime>::Server;
        let handle = client.create_from_slice(&[0u8; 8]);
        let guard = client
            .get_resource::<Server>(handle.clone())
            .map_err(|e| anyhow::anyhow!("flags' device pointer: {e:?}"))?;
        let ptr = guard.resource().ptr;
        eprintln!(
            "cuBLASLt: ordered against cubecl's stream on the device (EMBER_GEMM_ORDER=device); \
             warning: on an H100 this order never finished a GEMM (2026-11-27); the flag store now \
             reaches the GPU before the wait, which is untested there (benches/README.md)"
        );
        Ok(Self {
            buf: FlagBuf { handle, ptr },
            _pinned: Box::new(guard),
            count: 0,
        })
    }

    fn next(&mut self) -> u32 {
        // Wraps after 2³² GEMMs (millions of steps), where the waits would stop ordering.
        self.count = self.count.wrapping_add(1).max(1);
        self.count
    }
}

impl FlagBuf {
    /// On cubecl's stream: flag 0 = `n` once what came before is done.
    fn signal(&self, client: &Client, n: u32) {
        let (count, dim, flags) = self.one_thread();
        flag_store::launch(client, count, dim, flags, 0, n);
    }

    /// On cubecl's stream: nothing after this starts before flag 1 reads `n`.
    fn await_on_cubecl(&self, client: &Client, n: u32) {
        let (count, dim, flags) = self.one_thread();
        flag_await::launch(client, count, dim, flags, 1, n);
    }

    /// One cube of one unit, over both flags.
    fn one_thread(&self) -> (CubeCount, CubeDim, BufferArg) {
        // Safety: the buffer holds the two u32s.
        let flags = unsafe { BufferArg::from_raw_parts(self.handle.clone(), 2) };
        (CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), flags)
    }

    /// On cuBLASLt's stream: wait until flag 0 reads at least `n`.
    unsafe fn wait_on(&self, stream: cudarc::driver::sys::CUstream, n: u32) -> Result<()> {
        use cudarc::driver::sys;
        sys::cuStreamWaitValue32_v2(
            stream,
            self.ptr,
            n,
            sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
        )
        .result()
        .context("cuStreamWaitValue32")
    }

    /// On cuBLASLt's stream: flag 1 = `n`, after the writes before it (the default flags
    /// fence them).
    unsafe fn write_on(&self, stream: cudarc::driver::sys::CUstream, n: u32) -> Result<()> {
        use cudarc::driver::sys;
        sys::cuStreamWriteValue32_v2(
            stream,
            self.ptr + 4,
            n,
            sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
        )
        .result()
        .context("cuStreamWriteValue32")
    }
}

#[cube(launch)]
fn flag_store(flags: &mut [Atomic<u32>], slot: u32, value: u32) {
    flags[slot as usize].store(value);
}

/// Spins on one thread: the other stream's GEMM has the rest of the GPU meanwhile. The read
/// is an atomic add of 0 rather than a load, so that no optimiser can take it for a value
/// that does not change inside the loop.
#[cube(launch)]
fn flag_await(flags: &mut [Atomic<u32>], slot: u32, value: u32) {
    while flags[slot as usize].fetch_add(0u32) < value {}
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Lt>>> = OnceLock::new();

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    dtype: DType,
    /// Of `a`, `b` and `d`'s addresses: algorithms are chosen for it.
    align: [u32; 3],
}

/// The power of two an address is aligned to, up to the 256 bytes cuBLASLt's heuristic
/// otherwise assumes (a row slice of a tensor can start anywhere).
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// One device's cuBLASLt handle, stream, workspace and chosen algorithm per shape.
struct Lt {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    algos: HashMap<Key, sys::cublasLtMatmulAlgo_t>,
    /// Made at the first GEMM ordered on the device.
    flags: Option<Flags>,
}

// The raw handle and algorithms are plain data owned by this struct, used under the mutex.
unsafe impl Send for Lt {}

/// cuBLAS recommends 32 MiB of workspace on Hopper.
const WORKSPACE: usize = 32 << 20;

impl Lt {
    fn new(index: usize) -> Result<Self> {
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "EMBER_GEMM=cublaslt: libcublasLt was not found; add its directory (for example \
                 the nvidia-cublas wheel's lib/) to LD_LIBRARY_PATH"
            );
        }
        let ctx = CudaContext::new(index).context("CUDA context")?;
        let stream = ctx.new_stream().context("CUDA stream")?;
        let handle = lt::create_handle().context("cublasLtCreate")?;
        let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE) }
            .context("cuBLASLt workspace")?;
        // So that a log shows the switch took effect.
        eprintln!("cuBLASLt: the projections' GEMMs on cuda:{index} run on cuBLASLt");
        Ok(Self {
            ctx,
            stream,
            handle,
            workspace,
            algos: HashMap::new(),
            flags: None,
        })
    }

    /// Row-major `d = op(a) · op(b)` as cuBLASLt's column-major `dᵀ = op(b)ᵀ · op(a)ᵀ`: a
    /// row-major matrix is its transpose in column-major, so `b` goes first and no copy is
    /// made.
    fn matmul(&mut self, key: Key, a: u64, b: u64, d: u64) -> Result<()> {
        self.ctx.bind_to_thread().context("CUDA context")?;
        let Key {
            m, n, k, ta, tb, ..
        } = key;
        let ty = match key.dtype {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType::CUDA_R_16F,
            _ => sys::cudaDataType::CUDA_R_32F,
        };
        let (m, n, k) = (m as u64, n as u64, k as u64);
        let desc = Descriptors::new(
            ty,
            // Stored shapes, column-major: `b` is `[n, k]` (or `[k, n]` when transposed) ...
            if tb { (k, n) } else { (n, k) },
            // ... `a` is `[k, m]` (or `[m, k]`), and `d` is `[n, m]`.
            if ta { (m, k) } else { (k, m) },
            (n, m),
            tb,
            ta,
        )?;
        let algo = match self.algos.get(&key) {
            Some(algo) => *algo,
            None => {
                let [aa, ab, ad] = key.align;
                // cuBLASLt's `a` is our `b`, as above.
                let algo = desc.heuristic(self.handle, [ab, aa, ad, ad])?;
                self.algos.insert(key, algo);
                algo
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        unsafe {
            lt::matmul(
                self.handle,
                desc.matmul,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                b as *const _,
                desc.a,
                a as *const _,
                desc.b,
                d as *const _,
                desc.d,
                d as *mut _,
                desc.d,
                &algo,
                self.workspace as *mut _,
                WORKSPACE,
                self.stream.cu_stream() as _,
            )
        }
        .context("cublasLtMatmul")
    }
}

/// A matmul descriptor and the three layouts of one call, destroyed together.
struct Descriptors {
    matmul: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
}

impl Descriptors {
    /// Layouts given as stored `(rows, cols)`, column-major and packed.
    fn new(
        ty: sys::cudaDataType,
        a: (u64, u64),
        b: (u64, u64),
        d: (u64, u64),
        trans_a: bool,
        trans_b: bool,
    ) -> Result<Self> {
        let layout = |(rows, cols): (u64, u64)| {
            lt::create_matrix_layout(ty, rows, cols, rows as i64).context("matrix layout")
        };
        let matmul = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .context("matmul descriptor")?;
        let out = Self {
            matmul,
            a: layout(a)?,
            b: layout(b)?,
            d: layout(d)?,
        };
        for (attr, t) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                trans_a,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                trans_b,
            ),
        ] {
            // cublasOperation_t: 0 is N, 1 is T.
            let op = t as i32;
            unsafe {
                lt::set_matmul_desc_attribute(
                    matmul,
                    attr,
                    &op as *const _ as *const _,
                    std::mem::size_of_val(&op),
                )
            }
            .context("transpose attribute")?;
        }
        Ok(out)
    }

    /// The first algorithm cuBLASLt suggests for the workspace and the operands' alignments
    /// (of its `a`, `b`, `c` and `d`).
    fn heuristic(
        &self,
        handle: sys::cublasLtHandle_t,
        align: [u32; 4],
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let pref = lt::create_matmul_pref().context("matmul preference")?;
        let set = |attr, value: *const std::ffi::c_void, len| unsafe {
            lt::set_matmul_pref_attribute(pref, attr, value, len)
        };
        let size = WORKSPACE;
        let found = set(
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &size as *const usize as *const _,
            std::mem::size_of::<usize>(),
        )
        .and_then(|_| {
            [
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ]
            .into_iter()
            .zip(align.iter())
            .try_for_each(|(attr, a)| set(attr, a as *const u32 as *const _, 4))
        })
        .and_then(|_| unsafe {
            lt::get_matmul_algo_heuristic(handle, self.matmul, self.a, self.b, self.d, self.d, pref)
        });
        unsafe { lt::destroy_matmul_pref(pref) }.ok();
        Ok(found.context("no cuBLASLt algorithm for this GEMM")?.algo)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        unsafe {
            lt::destroy_matrix_layout(self.a).ok();
            lt::destroy_matrix_layout(self.b).ok();
            lt::destroy_matrix_layout(self.d).ok();
            lt::destroy_matmul_desc(self.matmul).ok();
        }
    }
}

/// On a cube device that is not CUDA the op runs Burn's matmul, so a wgpu build checks the
/// extension's plumbing (dispatch, the lazy fusion op, the transposes and the autodiff
/// wrapper's backward) without a GPU. cuBLASLt itself is checked by `ember bench gemm`.
#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Distribution, Tensor};

    use super::gemm;
    use crate::layers::gemm::matmul_nt_lt;

    fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
        (a.cast(DType::F32) - b.cast(DType::F32))
            .abs()
            .max()
            .into_scalar()
    }

    #[test]
    fn extension_routes_all_three_products_and_their_gradients() {
        let device = crate::device::select("wgpu").expect("a wgpu device (lavapipe)");
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<2>::random([7, 5], normal, &device);
        let w = Tensor::<2>::random([3, 5], normal, &device);
        let dy = Tensor::<2>::random([7, 3], normal, &device);
        let nt = gemm(x.clone(), w.clone(), false, true);
        assert!(max_diff(nt, x.clone().matmul(w.clone().transpose())) < 1e-5);
        let nn = gemm(dy.clone(), w.clone(), false, false);
        assert!(max_diff(nn, dy.clone().matmul(w.clone())) < 1e-5);
        let tn = gemm(dy.clone(), x.clone(), true, false);
        assert_eq!(tn.dims(), [3, 5]);
        assert!(max_diff(tn, dy.clone().transpose().matmul(x.clone())) < 1e-5);

        let ad = device.autodiff();
        let grads = |custom: bool| {
            let x = Tensor::<2>::from_data(x.to_data(), &ad).require_grad();
            let w = Tensor::<2>::from_data(w.to_data(), &ad).require_grad();
            let r = Tensor::<2>::from_data(dy.to_data(), &ad);
            let y = if custom {
                matmul_nt_lt(x.clone(), w.clone())
            } else {
                x.clone().matmul(w.clone().transpose())
            };
            let g = (y * r).sum().backward();
            (x.grad(&g).unwrap(), w.grad(&g).unwrap())
        };
        let ((dx, dw), (dx_ref, dw_ref)) = (grads(true), grads(false));
        assert!(max_diff(dx, dx_ref) < 1e-5);
        assert!(max_diff(dw, dw_ref) < 1e-5);
    }
}
