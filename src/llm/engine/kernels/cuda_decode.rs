//! A decode step on an NVIDIA GPU in about nine kernel launches per layer: matrix
//! products on 8-bit activations (candle's `mmvq` kernels, called through
//! `candle_kernels::ffi` on the model's stream, or with `StepKernels::Own` our own for Q4_K,
//! Q6_K and Q8_0, `cuda_matvec.cuh`) with preallocated buffers, and our own fused glue kernels
//! (residual add + RMSNorm + Q8_1 quantization, in one pass with `StepKernels::Own`,
//! `cuda_norm.cuh`; split-position attention in one kernel, from the q/k/v projections
//! (q/k norm, RoPE and the KV store in its first lines) to the output projection's
//! quantized input (the splits joined by whichever block ends last); SwiGLU +
//! quantization).
//!
//! Why: through candle's ops a decode step of the Qwen3-8B shape is about 1,200 small ops,
//! each a host-side allocation and launch of 5–10 µs, so the GPU idled most of the step
//! (10–15 % of its memory roofline on an H200). Here a step is about 310 launches with no
//! allocation, and they are captured once into a CUDA graph per (rows, splits) shape and
//! replayed: every kernel argument that changes from step to step (positions, lengths,
//! cache addresses) is read from device memory that the step writes first, so one graph
//! serves every step of that shape.
//!
//! With `StepKernels::Own`, our kernels are checked against the measured ones when a plan
//! is built: every matrix ours take against candle's `mmvq`, for 1 to `MAX_ROWS` rows of
//! random activations, and the one-pass RMSNorm against the two-pass one on random rows. A
//! disagreement puts the step back on the measured kernels and says so
//! (`DecodePlan::step_kernels`), so a kernel fault on a GPU the tests never ran on costs
//! speed, not answers. Our matrix kernels come in families that compute the same sums
//! (staged through registers, or copied by `cp.async` through 2 or 3 stages): each is
//! checked, a failing one other than the registers-staged one is only left out, and then
//! each group of same-shaped matrices is timed on every family and takes the fastest per
//! count of rows (`DecodePlan::tune`), since which one wins depends on the GPU.
//!
//! Owns: the kernels' PTX, the step's device buffers, and the checks that make each launch
//! sound (every pointer handed to a kernel comes from a tensor or buffer whose dtype,
//! device, layout and size were checked against what the kernel reads and writes). Knows a
//! transformer layer's order of operations but no files, tokens or scheduling: the caller
//! (`candle_model.rs`) hands it the weights once and each step's input rows and caches.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{
    self as profiler, CUdevice_attribute, CUevent_flags, CUgraphInstantiate_flags,
    CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::kernels::ffi;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, CudaDevice, DType, Device, Result, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cuda_decode.ptx"));

/// Sequences one step may carry (candle's `mmvq` kernels take 1 to 8 activation rows).
pub const MAX_ROWS: usize = 8;
/// Query heads per KV head the attention kernel holds in registers.
const MAX_GROUP: usize = 8;
/// Most position splits of the attention kernel (a power of two; its join takes a split
/// per lane of a warp).
const MAX_SPLIT: usize = 32;
/// Positions per split at least. A split's block is a chain of waits (its keys, their
/// scores, its values), so more blocks over more multiprocessors shorten the kernel: at
/// 128, the fifteenth session's bound (one position per thread of a 128-position chunk), a
/// 1,000-token context ran on 64 blocks of the Qwen3-8B shape, half an H200's
/// multiprocessors; at 32 it runs on 256. Contexts of 4,096 and more have 32 splits
/// either way.
const MIN_SPLIT_LEN: usize = 32;
/// The one-pass RMSNorm's threads per block and 8-value groups per thread (`RN_THREADS`
/// and `RN_GROUPS` in `cuda_norm.cuh`).
const NORM_1PASS_THREADS: usize = 512;
const NORM_1PASS_GROUPS: usize = 4;
/// Matrix rows per block of our matrix kernels (a warp each: `MV_WARPS` in the `.cu`).
const MV_ROWS_PER_BLOCK: usize = 4;
/// The largest difference from candle's `mmvq` that our matrix kernels may show at load,
/// relative to the product's largest output. Both sum the same integer dot products of
/// 32 values; only the order of the float sums differs, a few 1e-7 of the output's scale.
/// A misread block is off by the output's own scale.
const MAT_VEC_TOLERANCE: f32 = 1e-3;
/// Timed passes over a group of matrices per kernel family and row count when a plan is
/// built (`DecodePlan::tune`); their median decides.
const TUNE_PASSES: usize = 5;
/// How much faster than the registers-staged family (the one measured in full runs)
/// another must be, in the median, to take a matrix: timing noise alone must not move it.
const TUNE_MARGIN: f32 = 0.02;
/// candle's padding of a row of Q8_1 activations (`MATRIX_ROW_PADDING`).
const ROW_PADDING: usize = 512;
const Q8_1_BYTES: usize = 36;

/// `launch_mmvq_gguf_*_f32_plain`: weights, Q8_1 activations, f32 output, columns, rows,
/// activation row stride (in blocks), output row stride (in floats), rows of activations,
/// stream.
type Mmvq = unsafe extern "C" fn(
    *const std::ffi::c_void,
    *const std::ffi::c_void,
    *mut std::ffi::c_void,
    i32,
    i32,
    i32,
    i32,
    i32,
    *mut std::ffi::c_void,
);

fn mmvq_for(dtype: GgmlDType) -> Option<Mmvq> {
    Some(match dtype {
        GgmlDType::Q4_0 => ffi::launch_mmvq_gguf_q4_0_f32_plain,
        GgmlDType::Q4_1 => ffi::launch_mmvq_gguf_q4_1_f32_plain,
        GgmlDType::Q5_0 => ffi::launch_mmvq_gguf_q5_0_f32_plain,
        GgmlDType::Q5_1 => ffi::launch_mmvq_gguf_q5_1_f32_plain,
        GgmlDType::Q8_0 => ffi::launch_mmvq_gguf_q8_0_f32_plain,
        GgmlDType::Q2K => ffi::launch_mmvq_gguf_q2_k_f32_plain,
        GgmlDType::Q3K => ffi::launch_mmvq_gguf_q3_k_f32_plain,
        GgmlDType::Q4K => ffi::launch_mmvq_gguf_q4_k_f32_plain,
        GgmlDType::Q5K => ffi::launch_mmvq_gguf_q5_k_f32_plain,
        GgmlDType::Q6K => ffi::launch_mmvq_gguf_q6_k_f32_plain,
        _ => return None,
    })
}

/// Q8_1 blocks per activation row of width `n`, padded as candle pads them.
fn q8_stride(n: usize) -> usize {
    n.div_ceil(ROW_PADDING) * ROW_PADDING / 32
}

/// The sizes of the model a plan runs.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub eps: f32,
    /// Llama's `1/√d`, applied to queries after RoPE; 1 where the norm carries it (Qwen3).
    pub q_scale: f32,
    /// Rotation pairs `(i, i + d/2)` (Qwen3) rather than `(2i, 2i + 1)` (Llama).
    pub neox: bool,
}

/// One layer's weights, as the caller holds them.
pub struct LayerWeights<'a> {
    pub attn_norm: &'a Tensor,
    /// The q, k and v matrices, stacked where they share a format, in that order.
    pub qkv: Vec<Arc<QTensor>>,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    pub attn_output: Arc<QTensor>,
    pub ffn_norm: &'a Tensor,
    /// Gate then up, stacked where they share a format.
    pub gate_up: Vec<Arc<QTensor>>,
    pub ffn_down: Arc<QTensor>,
}

/// Which kernels a plan's step runs (`GPU_DECODE=fused-own` or `fused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKernels {
    /// Ours for Q4_K, Q6_K and Q8_0 matrices (candle's `mmvq` for the other formats) and the
    /// one-pass RMSNorm (`cuda_norm.cuh`): the default; on an H200, decode on the Qwen3-8B
    /// shape at 326 tok/s against 253 with `Candle` (same run).
    Own,
    /// `Own` with each of our matrix kernels launched as a programmatic dependent of the
    /// kernel before it (`pdl_wait` in `cuda_common.cuh`; compute capability 9.0 on, `Own`
    /// before): its blocks take the multiprocessors the small kernel before it leaves idle
    /// and load their first weights while it runs. Not yet measured on a GPU, so not the
    /// default (`GPU_DECODE=fused-own-pdl`).
    OwnPdl,
    /// candle's `mmvq` for every matrix and the two-pass RMSNorm: what `Own` falls back to.
    Candle,
}

/// A matrix product: the weights (kept alive here), its launchers and its size.
struct Product {
    _weights: Arc<QTensor>,
    ptr: u64,
    dtype: GgmlDType,
    launch: Mmvq,
    /// Our kernel for 1..=MAX_ROWS activation rows (index: rows - 1), where this matrix
    /// has one; it then runs instead of `launch`. Each comes from one of `families`.
    own: Option<Vec<MatVecKernel>>,
    /// Our kernel families that take this matrix, the registers-staged one first.
    families: Vec<Family>,
    rows: usize,
    cols: usize,
}

impl Product {
    /// Runs on the first of its families, the registers-staged one, where it has any.
    fn take_staged(&mut self) {
        self.own = self.families.first().map(|f| f.kernels.clone());
    }
}

/// A vector of f32 on the device (a norm's weights, a table), kept alive here.
struct Vector {
    _tensor: Tensor,
    ptr: u64,
}

struct Layer {
    attn_norm: Vector,
    qkv: Vec<Product>,
    q_norm: Option<Vector>,
    k_norm: Option<Vector>,
    attn_output: Product,
    ffn_norm: Vector,
    gate_up: Vec<Product>,
    ffn_down: Product,
}

struct Kernels {
    rms_norm_q8: CudaFunction,
    attn_partial: CudaFunction,
    silu_mul_q8: CudaFunction,
}

/// One of our matrix kernels and the most blocks of it that fit on the GPU at once: its
/// grid, so that each warp streams several rows (`mat_vec` in `cuda_matvec.cuh`).
#[derive(Clone)]
struct MatVecKernel {
    function: CudaFunction,
    max_blocks: u32,
}

/// What `DecodePlan::check_own_products` found: the worst difference from candle's `mmvq`
/// among the kernels that agreed, relative to each product's largest output, and each
/// family that disagreed, with the first disagreement.
struct Checked {
    worst: f32,
    failed: Vec<(String, String)>,
}

/// One family of our matrix kernels (`mv_q4k_v16`: staged through registers, `mat_vec` in
/// `cuda_matvec.cuh`; `mv_q4k_v16_a3`: copied by `cp.async` through 3 stages,
/// `mat_vec_async`), for 1..=MAX_ROWS activation rows (index: rows - 1). Every family of a
/// format computes the same sums; which is fastest depends on the GPU and the matrix, so
/// `DecodePlan::tune` measures them.
#[derive(Clone)]
struct Family {
    name: String,
    kernels: Vec<MatVecKernel>,
}

/// Our matrix kernel families, the registers-staged one first in each list.
struct OwnMatVec {
    q4k: Vec<Family>,
    /// Q8_0 in groups of 8 blocks (272 bytes per 256 values).
    q8_0: Vec<Family>,
    /// Q6_K by the bytes each load takes (16, 8, 4, 2): a row of 210-byte blocks starts
    /// aligned to what its block count allows.
    q6k: Vec<(usize, Vec<Family>)>,
}

impl OwnMatVec {
    /// Our kernel families for a matrix of `dtype` at device address `ptr` with `cols`
    /// columns (none when there is none): every row must start aligned to their loads.
    fn for_matrix(&self, dtype: GgmlDType, ptr: u64, cols: usize) -> Vec<Family> {
        let aligned = |bytes: usize| ptr.is_multiple_of(bytes as u64);
        match dtype {
            // 144-byte blocks: every row starts 16-byte aligned when the matrix does.
            GgmlDType::Q4K if aligned(16) => self.q4k.clone(),
            // Groups of 8 blocks, 272 bytes: rows of whole groups start 16-byte aligned.
            GgmlDType::Q8_0 if cols.is_multiple_of(256) && aligned(16) => self.q8_0.clone(),
            GgmlDType::Q6K => {
                let row_bytes = cols / 256 * 210;
                self.q6k
                    .iter()
                    .find(|(bytes, _)| row_bytes.is_multiple_of(*bytes) && aligned(*bytes))
                    .map(|(_, families)| families.clone())
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

/// Device buffers for up to `MAX_ROWS` rows, allocated once.
struct Buffers {
    /// The rows' embeddings, copied from candle's lookup (a fixed address for the graphs).
    emb: CudaSlice<f32>,
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    /// The products' 8-bit activations, in candle's Q8_1 blocks (for its `mmvq`)...
    q8: CudaSlice<u8>,
    /// ...and in our layout (`Q8Rows` in `cuda_common.cuh`, for our kernels): the quants
    /// contiguous, and per 16 values (d, d * their sum).
    x_qs: CudaSlice<u8>,
    x_ds: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    /// Per row and KV head: the attention's splits done so far (0 between launches).
    counts: CudaSlice<u32>,
    gu: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// Positions (`0..MAX_ROWS`), capacities (`MAX_ROWS..2 * MAX_ROWS`), then the
    /// attention's positions per split.
    rows: CudaSlice<i32>,
    /// Per layer and row: the keys' and the values' cache address.
    kv: CudaSlice<u64>,
}

/// Everything a decode step needs on one GPU, built once per loaded model.
pub struct DecodePlan {
    stream: Arc<CudaStream>,
    device: Device,
    dims: Dims,
    kernels: Kernels,
    layers: Vec<Layer>,
    output_norm: Vector,
    output: Product,
    cos: Vector,
    sin: Vector,
    /// Owns the step's device memory; `ptrs` holds its (fixed) addresses.
    buf: Buffers,
    ptrs: Pointers,
    /// Per (rows, splits): `None` once that shape has run without a graph (which loads
    /// every kernel lazily, before any capture), then its captured graph.
    graphs: HashMap<(usize, usize), Option<CudaGraph>>,
    /// Set when a capture failed: every step then launches its kernels one by one.
    graphs_off: bool,
    /// The one-pass RMSNorm: set exactly when the step runs `StepKernels::Own` (our matrix
    /// kernels then sit in the products).
    norm_1pass: Option<CudaFunction>,
    /// Whether our matrix kernels launch as programmatic dependents (`StepKernels::OwnPdl`).
    pdl: bool,
}

/// One row of a step: the sequence's position and its per-layer `(keys, values)` caches,
/// each `(n_kv, capacity, head_dim)` f16 with room at `position`.
pub struct Row<'a> {
    pub position: usize,
    pub caches: &'a [(Tensor, Tensor)],
}

impl DecodePlan {
    /// The plan for these weights, or why this model cannot use it (the caller then keeps
    /// candle's ops for decode too). With `StepKernels::Own`, our matrix kernels are
    /// checked against candle's `mmvq` here (see `check_own_products`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cuda: &CudaDevice,
        dims: Dims,
        layers: &[LayerWeights<'_>],
        output_norm: &Tensor,
        output: &Arc<QTensor>,
        cos: &Tensor,
        sin: &Tensor,
        step_kernels: StepKernels,
    ) -> Result<DecodePlan> {
        let d = dims.head_dim;
        if !matches!(d, 64 | 128 | 256) {
            bail!("head width {d} (the fused attention takes 64, 128 or 256)")
        }
        if dims.n_kv == 0 || !dims.n_head.is_multiple_of(dims.n_kv) {
            bail!("{} query heads over {} KV heads", dims.n_head, dims.n_kv)
        }
        if dims.n_head / dims.n_kv > MAX_GROUP {
            bail!("{} query heads per KV head (at most {MAX_GROUP})", dims.n_head / dims.n_kv)
        }
        let stream = cuda.cuda_stream();
        let device = Device::Cuda(cuda.clone());
        let module = stream
            .context()
            .load_module(Ptx::from_src(PTX))
            .map_err(|e| candle_core::Error::Msg(format!("loading the decode kernels: {e}")))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| candle_core::Error::Msg(format!("kernel {name}: {e}")))
        };
        let kernels = Kernels {
            rms_norm_q8: load("rms_norm_q8")?,
            attn_partial: load(&format!("attn_partial_d{d}"))?,
            silu_mul_q8: load("silu_mul_q8")?,
        };
        let sm_count = stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(msg)?;
        let family = |name: String| -> Result<Family> {
            let kernels = (1..=MAX_ROWS)
                .map(|n| {
                    let function = load(&format!("{name}_n{n}"))?;
                    let per_sm = function
                        .occupancy_max_active_blocks_per_multiprocessor(
                            MV_ROWS_PER_BLOCK as u32 * 32,
                            0,
                            None,
                        )
                        .map_err(msg)?;
                    let max_blocks = per_sm.max(1) * sm_count.max(1) as u32;
                    Ok(MatVecKernel { function, max_blocks })
                })
                .collect::<Result<_>>()?;
            Ok(Family { name, kernels })
        };
        // Registers-staged first, then `cp.async` with 2 and 3 stages where `cp.async` takes
        // the loads (not 2 bytes) and they fit a block's static shared memory (not Q8_0's 3).
        // Only the first is needed: another that does not load is left out, and said so.
        let families = |base: &str, stages: &[usize]| -> Result<Vec<Family>> {
            let mut families = vec![family(base.to_string())?];
            for s in stages {
                match family(format!("{base}_a{s}")) {
                    Ok(f) => families.push(f),
                    Err(e) => tracing::warn!("{e}: left out of our matrix kernel families"),
                }
            }
            Ok(families)
        };
        let mat_vec_kernels = match step_kernels {
            StepKernels::Own | StepKernels::OwnPdl => Some(OwnMatVec {
                q4k: families("mv_q4k_v16", &[2, 3])?,
                q8_0: families("mv_q8_0_v16", &[2])?,
                q6k: [16, 8, 4, 2]
                    .into_iter()
                    .map(|bytes| {
                        let stages: &[usize] = if bytes == 2 { &[] } else { &[2, 3] };
                        Ok((bytes, families(&format!("mv_q6k_v{bytes}"), stages)?))
                    })
                    .collect::<Result<_>>()?,
            }),
            StepKernels::Candle => None,
        };
        let (e, q_width, kv_width, n_ff) = (dims.n_embd, dims.n_head * d, dims.n_kv * d, dims.n_ff);
        let vector = |t: &Tensor, len: usize| -> Result<Vector> {
            Ok(Vector { _tensor: t.clone(), ptr: tensor_ptr(t, DType::F32, len, &device)? })
        };
        let mut plan_layers = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let ctx = |e: candle_core::Error| candle_core::Error::Msg(format!("layer {i}: {e}"));
            plan_layers.push(Layer {
                attn_norm: vector(layer.attn_norm, e).map_err(ctx)?,
                qkv: products_of(&layer.qkv, q_width + 2 * kv_width, e, &device).map_err(ctx)?,
                q_norm: layer.q_norm.map(|t| vector(t, d)).transpose().map_err(ctx)?,
                k_norm: layer.k_norm.map(|t| vector(t, d)).transpose().map_err(ctx)?,
                attn_output: product_of(&layer.attn_output, Some(e), q_width, &device)
                    .map_err(ctx)?,
                ffn_norm: vector(layer.ffn_norm, e).map_err(ctx)?,
                gate_up: products_of(&layer.gate_up, 2 * n_ff, e, &device).map_err(ctx)?,
                ffn_down: product_of(&layer.ffn_down, Some(e), n_ff, &device).map_err(ctx)?,
            });
            if layer.q_norm.is_some() != layer.k_norm.is_some() {
                bail!("layer {i} has a norm for queries or keys but not both")
            }
        }
        let half_table = dims.max_positions * d / 2;
        let rows = MAX_ROWS;
        let widest = e.max(q_width).max(n_ff);
        let alloc = |len: usize| cuda.alloc_zeros::<f32>(len);
        let buf = Buffers {
            emb: alloc(rows * e)?,
            x: alloc(rows * e)?,
            delta: alloc(rows * e)?,
            q8: cuda.alloc_zeros::<u8>(rows * q8_stride(widest) * Q8_1_BYTES)?,
            x_qs: cuda.alloc_zeros::<u8>(rows * q8_stride(widest) * 32)?,
            x_ds: alloc(rows * q8_stride(widest) * 2 * 2)?,
            qkv: alloc(rows * (q_width + 2 * kv_width))?,
            part_acc: alloc(rows * dims.n_head * MAX_SPLIT * d)?,
            part_ml: alloc(rows * dims.n_head * MAX_SPLIT * 2)?,
            counts: cuda.alloc_zeros::<u32>(rows * dims.n_kv)?,
            gu: alloc(rows * 2 * n_ff)?,
            logits: alloc(rows * dims.vocab)?,
            rows: cuda.alloc_zeros::<i32>(2 * MAX_ROWS + 1)?,
            kv: cuda.alloc_zeros::<u64>(layers.len() * MAX_ROWS * 2)?,
        };
        let mut plan = DecodePlan {
            output_norm: vector(output_norm, e)?,
            output: product_of(output, Some(dims.vocab), e, &device)?,
            cos: vector(cos, half_table)?,
            sin: vector(sin, half_table)?,
            layers: plan_layers,
            kernels,
            ptrs: Pointers::of(&buf, &stream),
            buf,
            graphs: HashMap::new(),
            graphs_off: false,
            norm_1pass: None,
            pdl: false,
            dims,
            device,
            stream,
        };
        if let Some(kernels) = mat_vec_kernels {
            let mut taken = 0;
            for product in plan.products_mut() {
                product.families = kernels.for_matrix(product.dtype, product.ptr, product.cols);
                product.take_staged();
                taken += usize::from(product.own.is_some());
            }
            let verdict = match plan.check_own_products()? {
                Ok(checked) => plan.drop_failed_families(checked),
                Err(why) => Err(why),
            };
            let verdict = match verdict {
                Ok(worst) => {
                    let norm = load("rms_norm_q8_1pass")?;
                    match plan.check_norm_1pass(&norm)? {
                        Ok(flips) => Ok((worst, flips, norm)),
                        Err(why) => Err(format!("the one-pass RMSNorm disagrees: {why}")),
                    }
                }
                Err(why) => Err(format!("our matrix kernels disagree: {why}")),
            };
            match verdict {
                Ok((worst, flips, norm)) => {
                    plan.norm_1pass = Some(norm);
                    plan.pdl = step_kernels == StepKernels::OwnPdl && takes_pdl(&plan.stream)?;
                    tracing::info!(
                        matrices = taken,
                        worst_difference = worst,
                        rms_norm_quants_one_step_off = flips,
                        "our matrix kernels and one-pass RMSNorm agree with the measured ones"
                    );
                    // A failed measurement costs speed only: each matrix keeps its
                    // registers-staged kernels, the ones measured in full runs.
                    if let Err(e) = plan.tune() {
                        tracing::warn!(
                            "timing our matrix kernel families failed ({e}); each matrix \
                             keeps its registers-staged kernels"
                        );
                        plan.products_mut().for_each(Product::take_staged);
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        "{why}; the decode step runs on the measured kernels (GPU_DECODE=fused)"
                    );
                    for product in plan.products_mut() {
                        product.own = None;
                        product.families.clear();
                    }
                }
            }
        }
        Ok(plan)
    }

    /// Drops each kernel family that disagreed with candle's `mmvq` from every matrix
    /// (the others take those matrices), unless it is a registers-staged one, a matrix's
    /// first: then the whole step goes back on the measured kernels, as before there were
    /// other families. The worst difference of those kept, or why the step cannot use
    /// ours.
    fn drop_failed_families(&mut self, checked: Checked) -> std::result::Result<f32, String> {
        let first_of_a_matrix = |name: &str| {
            self.all_products().any(|p| p.families.first().is_some_and(|f| f.name == name))
        };
        if let Some((_, why)) = checked.failed.iter().find(|(name, _)| first_of_a_matrix(name)) {
            return Err(format!("our matrix kernels disagree: {why}"));
        }
        for (name, why) in &checked.failed {
            tracing::warn!(
                "our {name} kernels disagree ({why}); the other families take their matrices"
            );
        }
        for product in self.products_mut() {
            product.families.retain(|f| !checked.failed.iter().any(|(name, _)| *name == f.name));
        }
        Ok(checked.worst)
    }

    /// Times every kernel family on each group of matrices of one format and shape (the
    /// same matrix of every layer) for each count of activation rows, a pass over the whole
    /// group at a time (so that, as in a step, the weights come from memory and not from
    /// L2), and gives the group the fastest family per row count: the registers-staged one
    /// unless another is `TUNE_MARGIN` faster in the median of `TUNE_PASSES` passes. Which
    /// is fastest depends on the GPU (its shared memory, registers and latencies) and the
    /// matrix's size, which is why it is measured here rather than fixed. Logs what it
    /// measured, a line per group.
    fn tune(&mut self) -> Result<()> {
        let stream = self.stream.clone();
        let products: Vec<&Product> = self.all_products().collect();
        type Key = (GgmlDType, usize, usize, Vec<String>);
        let mut groups: Vec<(Key, Vec<usize>)> = Vec::new();
        for (i, p) in products.iter().enumerate() {
            if p.families.len() < 2 {
                continue;
            }
            let key =
                (p.dtype, p.rows, p.cols, p.families.iter().map(|f| f.name.clone()).collect());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let Some(widest) = groups.iter().map(|((_, rows, _, _), _)| *rows).max() else {
            return Ok(());
        };
        let out = stream.alloc_zeros::<f32>(MAX_ROWS * widest).map_err(msg)?;
        let out_ptr = out.device_ptr(&stream).0;
        let event = || stream.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let (start, end) = (event().map_err(msg)?, event().map_err(msg)?);
        let mut chosen: Vec<(usize, Vec<MatVecKernel>)> = Vec::new();
        for ((dtype, rows, cols, names), members) in &groups {
            let families = &products[members[0]].families;
            let pass = |family: &Family, n: usize| -> Result<()> {
                for &m in members {
                    let p = products[m];
                    // Launched plainly: the families are compared as launched alone.
                    self.product_on(
                        p,
                        Some((family.kernels.as_slice(), false)),
                        q8_stride(p.cols),
                        out_ptr,
                        p.rows,
                        n,
                        0,
                    )?;
                }
                Ok(())
            };
            let mut kernels = Vec::with_capacity(MAX_ROWS);
            let (mut table, mut picks) = (Vec::new(), Vec::new());
            for n in 1..=MAX_ROWS {
                let mut micros = Vec::with_capacity(families.len());
                for family in families {
                    pass(family, n)?; // untimed: a function's first launch loads it
                    let mut samples = Vec::with_capacity(TUNE_PASSES);
                    for _ in 0..TUNE_PASSES {
                        start.record(&stream).map_err(msg)?;
                        pass(family, n)?;
                        end.record(&stream).map_err(msg)?;
                        samples.push(start.elapsed_ms(&end).map_err(msg)?);
                    }
                    samples.sort_by(f32::total_cmp);
                    micros.push(samples[TUNE_PASSES / 2] * 1000.0 / members.len() as f32);
                }
                let best = (1..families.len())
                    .filter(|&i| micros[i] < micros[0] * (1.0 - TUNE_MARGIN))
                    .min_by(|&a, &b| micros[a].total_cmp(&micros[b]))
                    .unwrap_or(0);
                kernels.push(families[best].kernels[n - 1].clone());
                let cells: Vec<String> = micros.iter().map(|t| format!("{t:.1}")).collect();
                table.push(format!("{n}: {}", cells.join("/")));
                picks.push(families[best].name.as_str());
            }
            tracing::info!(
                matrices = %format!("{dtype:?} {rows}x{cols} x{}", members.len()),
                families = %names.join(" / "),
                micros_per_matrix_by_rows = %table.join(", "),
                chosen_by_rows = %picks.join(" "),
                "our matrix kernel families timed"
            );
            chosen.extend(members.iter().map(|&m| (m, kernels.clone())));
        }
        drop(products);
        chosen.sort_by_key(|(m, _)| *m);
        let mut chosen = chosen.into_iter().peekable();
        for (i, product) in self.products_mut().enumerate() {
            if let Some((_, kernels)) = chosen.next_if(|(m, _)| *m == i) {
                product.own = Some(kernels);
            }
        }
        Ok(())
    }

    /// The kernels the step runs: `Own` only when they were asked for and our matrix
    /// kernels agreed with candle's at load (a disagreement puts the whole step back on
    /// the measured kernels).
    pub fn step_kernels(&self) -> StepKernels {
        match self.norm_1pass {
            Some(_) if self.pdl => StepKernels::OwnPdl,
            Some(_) => StepKernels::Own,
            None => StepKernels::Candle,
        }
    }

    fn products_mut(&mut self) -> impl Iterator<Item = &mut Product> {
        let layers = self.layers.iter_mut().flat_map(|l| {
            l.qkv
                .iter_mut()
                .chain(l.gate_up.iter_mut())
                .chain([&mut l.attn_output, &mut l.ffn_down])
        });
        layers.chain(std::iter::once(&mut self.output))
    }

    /// Every product that runs on our kernels, against candle's `mmvq` on the same random
    /// activations (`MAX_ROWS` rows): each of our kernel families that take it, for each
    /// count of rows from 1 to `MAX_ROWS`, into an output first filled with NaN (so a value
    /// it never wrote fails too). The worst difference relative to each product's largest
    /// output and the families that disagreed, or why nothing could be checked.
    fn check_own_products(&mut self) -> Result<std::result::Result<Checked, String>> {
        let stream = self.stream.clone();
        let blocks = self.buf.q8.len() / Q8_1_BYTES;
        let (q8, x_qs, x_ds) = random_q8_1(blocks);
        stream.memcpy_htod(&q8, &mut self.buf.q8).map_err(msg)?;
        stream.memcpy_htod(&x_qs, &mut self.buf.x_qs).map_err(msg)?;
        stream.memcpy_htod(&x_ds, &mut self.buf.x_ds).map_err(msg)?;
        let checked: Vec<&Product> =
            self.all_products().filter(|p| !p.families.is_empty()).collect();
        let mut result = Checked { worst: 0.0, failed: Vec::new() };
        let Some(widest) = checked.iter().map(|p| p.rows).max() else {
            return Ok(Ok(result));
        };
        let mut out = stream.alloc_zeros::<f32>(MAX_ROWS * widest).map_err(msg)?;
        let out_ptr = out.device_ptr(&stream).0;
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        for (i, p) in checked.iter().enumerate() {
            let len = MAX_ROWS * p.rows;
            let stride = q8_stride(p.cols);
            self.product_on(p, None, stride, out_ptr, p.rows, MAX_ROWS, 0)?;
            theirs.resize(len, 0.0);
            stream.memcpy_dtoh(&out.slice(..len), theirs.as_mut_slice()).map_err(msg)?;
            stream.synchronize().map_err(msg)?;
            let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if !scale.is_finite() {
                return Ok(Err(format!("candle's mmvq gave {scale} on matrix {i}")));
            }
            let runs = p.families.iter().flat_map(|f| (1..=MAX_ROWS).map(move |n| (f, n)));
            for (family, n) in runs {
                if result.failed.iter().any(|(name, _)| *name == family.name) {
                    continue; // failed on another matrix or at fewer rows
                }
                ours.clear();
                ours.resize(len, f32::NAN);
                stream.memcpy_htod(ours.as_slice(), &mut out.slice_mut(..len)).map_err(msg)?;
                let own = Some((family.kernels.as_slice(), false));
                self.product_on(p, own, stride, out_ptr, p.rows, n, 0)?;
                stream.memcpy_dtoh(&out.slice(..len), ours.as_mut_slice()).map_err(msg)?;
                stream.synchronize().map_err(msg)?;
                let used = n * p.rows;
                let diff = ours[..used].iter().zip(&theirs[..used]).fold(0.0f32, |m, (a, b)| {
                    if a.is_nan() {
                        f32::INFINITY
                    } else {
                        m.max((a - b).abs())
                    }
                });
                let relative = diff / scale.max(f32::MIN_POSITIVE);
                if relative.is_nan() || relative > MAT_VEC_TOLERANCE {
                    let why = format!(
                        "{} on {:?} matrix {i} of {}x{}, {n} rows: off by {diff} where its \
                         largest output is {scale}",
                        family.name, p.dtype, p.rows, p.cols
                    );
                    result.failed.push((family.name.clone(), why));
                    continue;
                }
                result.worst = result.worst.max(relative);
            }
        }
        Ok(Ok(result))
    }

    /// The one-pass RMSNorm `norm` against the measured kernel on the same random rows
    /// (`MAX_ROWS` of the model's width, with a residual): `x_out` must be the same floats,
    /// and candle's blocks the same scales within one half step and the same quants within
    /// one step, in at most 1 % of values (the two sum the squares in different orders).
    /// The quants one step off, or what disagreed.
    fn check_norm_1pass(
        &mut self,
        norm: &CudaFunction,
    ) -> Result<std::result::Result<usize, String>> {
        let e = self.dims.n_embd;
        if !norm_1pass_takes(e) {
            return Ok(Ok(0)); // never used for this width
        }
        let stream = self.stream.clone();
        let len = MAX_ROWS * e;
        let (x, delta) = random_rows(len);
        stream.memcpy_htod(&x, &mut self.buf.emb.slice_mut(..len)).map_err(msg)?;
        stream.memcpy_htod(&delta, &mut self.buf.delta.slice_mut(..len)).map_err(msg)?;
        let (p, weights) = (self.ptrs, self.output_norm.ptr);
        let blocks = MAX_ROWS * q8_stride(e);
        let run = |one_pass: Option<&CudaFunction>| -> Result<(Vec<f32>, Vec<u8>)> {
            self.rms_norm_q8(one_pass, p.emb, p.delta, p.x, weights, MAX_ROWS, e)?;
            let mut x = vec![0f32; len];
            let mut q8 = vec![0u8; blocks * Q8_1_BYTES];
            stream.memcpy_dtoh(&self.buf.x.slice(..len), x.as_mut_slice()).map_err(msg)?;
            let q8_view = self.buf.q8.slice(..blocks * Q8_1_BYTES);
            stream.memcpy_dtoh(&q8_view, q8.as_mut_slice()).map_err(msg)?;
            stream.synchronize().map_err(msg)?;
            Ok((x, q8))
        };
        let (x_measured, q8_measured) = run(None)?;
        let (x_one_pass, q8_one_pass) = run(Some(norm))?;
        if x_measured != x_one_pass {
            return Ok(Err("the residual sums differ".to_string()));
        }
        let mut flips = 0;
        for (b, (m, o)) in q8_measured
            .chunks_exact(Q8_1_BYTES)
            .zip(q8_one_pass.chunks_exact(Q8_1_BYTES))
            .enumerate()
        {
            let (dm, d1) = (u16::from_le_bytes([m[0], m[1]]), u16::from_le_bytes([o[0], o[1]]));
            if dm.abs_diff(d1) > 1 {
                return Ok(Err(format!("block {b}: scale {dm:#06x} against {d1:#06x}")));
            }
            for (l, (&qm, &q1)) in m[4..].iter().zip(&o[4..]).enumerate() {
                let (qm, q1) = (qm as i8, q1 as i8);
                if qm.abs_diff(q1) > 1 {
                    return Ok(Err(format!("block {b} value {l}: {qm} against {q1}")));
                }
                flips += usize::from(qm != q1);
            }
        }
        if flips * 100 > blocks * 32 {
            return Ok(Err(format!("{flips} of {} quants one step off", blocks * 32)));
        }
        Ok(Ok(flips))
    }

    fn all_products(&self) -> impl Iterator<Item = &Product> {
        let layers = self.layers.iter().flat_map(|l| {
            l.qkv.iter().chain(l.gate_up.iter()).chain([&l.attn_output, &l.ffn_down])
        });
        layers.chain(std::iter::once(&self.output))
    }

    /// Device memory of the step's buffers (logged at load; `GPU_MEMORY_MARGIN` covers it).
    pub fn buffer_bytes(&self) -> u64 {
        let b = &self.buf;
        let floats = b.emb.len()
            + b.x.len()
            + b.delta.len()
            + b.qkv.len()
            + b.part_acc.len()
            + b.part_ml.len()
            + b.gu.len()
            + b.x_ds.len()
            + b.logits.len();
        let words = b.rows.len() + b.counts.len();
        (floats * 4 + b.q8.len() + b.x_qs.len() + words * 4 + b.kv.len() * 8) as u64
    }

    /// Run one token for each row: `x` holds the rows' embeddings `(rows, n_embd)` f32;
    /// each row's keys and values go into its caches at its position. `logits` gets every
    /// row's logits, row after row.
    pub fn step(&mut self, x: &Tensor, rows: &[Row<'_>], logits: &mut Vec<f32>) -> Result<()> {
        let n = rows.len();
        let dims = self.dims;
        let (e, d, n_kv) = (dims.n_embd, dims.head_dim, dims.n_kv);
        if n == 0 || n > MAX_ROWS {
            bail!("a fused decode step takes 1 to {MAX_ROWS} rows, not {n}")
        }
        // Per-row facts for the kernels, each cache checked against what they touch.
        let n_layer = self.layers.len();
        let mut facts = vec![0i32; 2 * MAX_ROWS + 1];
        let mut kv = vec![0u64; n_layer * MAX_ROWS * 2];
        let mut max_len = 0;
        for (r, row) in rows.iter().enumerate() {
            if row.caches.len() != n_layer {
                bail!("row {r} has {} cache layers, the model {n_layer}", row.caches.len())
            }
            let mut capacity = None;
            for (l, (keys, values)) in row.caches.iter().enumerate() {
                let cap = match keys.dims() {
                    &[h, cap, w] if h == n_kv && w == d => cap,
                    dims => bail!("row {r} layer {l}: a key cache of shape {dims:?}"),
                };
                if values.dims() != keys.dims() || capacity.is_some_and(|c| c != cap) {
                    bail!("row {r} layer {l}: caches of different shapes")
                }
                capacity = Some(cap);
                let len = n_kv * cap * d;
                kv[(l * MAX_ROWS + r) * 2] = tensor_ptr(keys, DType::F16, len, &self.device)?;
                kv[(l * MAX_ROWS + r) * 2 + 1] = tensor_ptr(values, DType::F16, len, &self.device)?;
            }
            let cap = capacity.unwrap_or(0);
            if row.position >= cap || row.position >= dims.max_positions {
                bail!("row {r}: position {} is past its cache ({cap})", row.position)
            }
            facts[r] = row.position as i32;
            facts[MAX_ROWS + r] = cap as i32;
            max_len = max_len.max(row.position + 1);
        }
        // Splits in powers of two, so that few graph shapes serve every length.
        let n_split = max_len.div_ceil(MIN_SPLIT_LEN).clamp(1, MAX_SPLIT).next_power_of_two();
        facts[2 * MAX_ROWS] = max_len.div_ceil(n_split) as i32;
        self.stream.memcpy_htod(&facts, &mut self.buf.rows).map_err(msg)?;
        self.stream.memcpy_htod(&kv, &mut self.buf.kv).map_err(msg)?;
        {
            tensor_ptr(x, DType::F32, n * e, &self.device)?;
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else { bail!("embeddings not on the GPU") };
            let at = layout.start_offset();
            let src = cuda.as_cuda_slice::<f32>()?.slice(at..at + n * e);
            let mut dst = self.buf.emb.slice_mut(..n * e);
            self.stream.memcpy_dtod(&src, &mut dst).map_err(msg)?;
        }

        let key = (n, n_split);
        match self.graphs.get(&key) {
            Some(Some(graph)) => graph.launch().map_err(msg)?,
            Some(None) if !self.graphs_off => match self.capture(n, n_split) {
                Ok(graph) => {
                    graph.launch().map_err(msg)?;
                    self.graphs.insert(key, Some(graph));
                }
                Err(e) => {
                    tracing::warn!(
                        "capturing a decode step as a CUDA graph failed ({e}); steps launch \
                         their kernels one by one from now on"
                    );
                    self.graphs_off = true;
                    self.launch_all(n, n_split)?;
                }
            },
            _ => {
                // A profiler started with collection off (`ncu --profile-from-start off`,
                // `gpu-check.sh profile`) sees the plan's first step, kernel by kernel, and
                // not the thousands of launches of the load's check and timing. Without one,
                // these calls do nothing; what they return is of no consequence.
                let first = self.graphs.is_empty();
                if first {
                    // SAFETY: no arguments; the model's context is current (the launches
                    // before bound it).
                    let _ = unsafe { profiler::cuProfilerStart() };
                }
                let launched = self.launch_all(n, n_split);
                if first {
                    self.stream.synchronize().map_err(msg)?;
                    // SAFETY: as above.
                    let _ = unsafe { profiler::cuProfilerStop() };
                }
                launched?;
                self.graphs.insert(key, None);
            }
        }
        logits.clear();
        logits.resize(n * dims.vocab, 0.0);
        self.stream
            .memcpy_dtoh(&self.buf.logits.slice(..n * dims.vocab), logits.as_mut_slice())
            .map_err(msg)?;
        self.stream.synchronize().map_err(msg)?;
        Ok(())
    }

    /// Record the step's launches for `n` rows and `n_split` splits as a graph. Nothing
    /// runs while capturing.
    fn capture(&self, n: usize, n_split: usize) -> Result<CudaGraph> {
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream.begin_capture(mode).map_err(msg)?;
        let launched = self.launch_all(n, n_split);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0)).map_err(msg);
        launched?;
        graph?.ok_or_else(|| msg("the capture recorded nothing"))
    }

    /// Every launch of a step, in order, for `n` rows whose facts and embeddings are in
    /// place.
    fn launch_all(&self, n: usize, n_split: usize) -> Result<()> {
        let dims = self.dims;
        let (e, d, n_head, n_kv) = (dims.n_embd, dims.head_dim, dims.n_head, dims.n_kv);
        let (q_width, kv_width) = (n_head * d, n_kv * d);
        let qkv_width = q_width + 2 * kv_width;
        let p = self.ptrs;
        let q8_e = q8_stride(e);
        let norm = self.norm_1pass.as_ref();
        // The first norm starts from the embeddings; every later one adds the product
        // before it to the residual stream `x`.
        let (mut src, mut delta) = (p.emb, 0);
        for (l, layer) in self.layers.iter().enumerate() {
            self.rms_norm_q8(norm, src, delta, p.x, layer.attn_norm.ptr, n, e)?;
            (src, delta) = (p.x, p.delta);
            self.products(&layer.qkv, q8_e, p.qkv, qkv_width, n)?;
            self.attention(layer, l, n, n_split)?;
            self.product(&layer.attn_output, q8_stride(q_width), p.delta, e, n, 0)?;
            self.rms_norm_q8(norm, p.x, p.delta, p.x, layer.ffn_norm.ptr, n, e)?;
            self.products(&layer.gate_up, q8_e, p.gu, 2 * dims.n_ff, n)?;
            self.silu_mul_q8(n)?;
            self.product(&layer.ffn_down, q8_stride(dims.n_ff), p.delta, e, n, 0)?;
        }
        self.rms_norm_q8(norm, src, delta, 0, self.output_norm.ptr, n, e)?;
        self.product(&self.output, q8_e, p.logits, dims.vocab, n, 0)
    }

    /// `x_out = src (+ delta)` (when `x_out` is not 0) and the Q8_1 blocks of its RMSNorm
    /// into `q8`, for `n` rows of width `width`: on the one-pass kernel `one_pass` where
    /// given and the width suits it, else on the two-pass one.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_q8(
        &self,
        one_pass: Option<&CudaFunction>,
        src: u64,
        delta: u64,
        x_out: u64,
        weights: u64,
        n: usize,
        width: usize,
    ) -> Result<()> {
        let p = self.ptrs;
        let (width_i, stride, eps) = (width as i32, q8_stride(width) as i32, self.dims.eps);
        let one_pass = one_pass.filter(|_| norm_1pass_takes(width));
        let mut launch = self.stream.launch_builder(one_pass.unwrap_or(&self.kernels.rms_norm_q8));
        launch.arg(&src).arg(&delta).arg(&x_out).arg(&weights);
        launch.arg(&p.q8).arg(&p.x_qs).arg(&p.x_ds);
        launch.arg(&width_i).arg(&stride).arg(&eps);
        let threads = if one_pass.is_some() { NORM_1PASS_THREADS } else { 512 };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `src`, `delta` and `x_out` are 0 or `n` rows of `width` floats (`emb`,
        // `x` and `delta` hold MAX_ROWS rows of n_embd, the only width used); `weights`
        // holds `width` floats (checked in `new`); `q8`, `x_qs` and `x_ds` hold MAX_ROWS
        // rows of q8_stride(widest) blocks in their layouts. The kernel touches no more (the
        // one-pass kernel: rows of a multiple of 8 floats, read and written 16 bytes at a
        // time from 16-byte aligned buffers, and no more than its registers hold).
        launched(unsafe { launch.launch(cfg) })
    }

    /// `out[:, offset..] = W · q8` for each part, parts side by side in rows of `out_stride`.
    fn products(
        &self,
        parts: &[Product],
        q8_stride: usize,
        out: u64,
        out_stride: usize,
        n: usize,
    ) -> Result<()> {
        let mut offset = 0;
        for part in parts {
            self.product(part, q8_stride, out, out_stride, n, offset)?;
            offset += part.rows;
        }
        Ok(())
    }

    fn product(
        &self,
        w: &Product,
        q8_stride: usize,
        out: u64,
        out_stride: usize,
        n: usize,
        offset: usize,
    ) -> Result<()> {
        let own = w.own.as_deref().map(|kernels| (kernels, self.pdl));
        self.product_on(w, own, q8_stride, out, out_stride, n, offset)
    }

    /// `product` on our kernels `own` when given (as programmatic dependents of the kernel
    /// before when its flag is set), on candle's `mmvq` otherwise.
    #[allow(clippy::too_many_arguments)]
    fn product_on(
        &self,
        w: &Product,
        own: Option<(&[MatVecKernel], bool)>,
        q8_stride: usize,
        out: u64,
        out_stride: usize,
        n: usize,
        offset: usize,
    ) -> Result<()> {
        if offset + w.rows > out_stride || q8_stride * 32 < w.cols {
            bail!("a product of {}x{} does not fit its buffers", w.rows, w.cols)
        }
        let p = self.ptrs;
        let dst = out + (offset * 4) as u64;
        if let Some((own, dependent)) = own {
            let (mut cols, mut rows) = (w.cols as i32, w.rows as i32);
            let (mut q8_stride, mut out_stride) = (q8_stride as i32, out_stride as i32);
            let kernel = &own[n - 1];
            let blocks = (w.rows.div_ceil(MV_ROWS_PER_BLOCK) as u32).min(kernel.max_blocks);
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (MV_ROWS_PER_BLOCK as u32 * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY (both launches): as for `mmvq` below, with the activations in our layout
            // (`x_qs` and `x_ds` hold as many rows and blocks as `q8`, written by the same
            // kernels); the kernel's weight loads are as wide as the rows' alignment allows
            // (`OwnMatVec::for_matrix`), its warps take rows below `rows` only (any grid of
            // at least one block covers them all), and `own` holds MAX_ROWS kernels with
            // 1 <= n <= MAX_ROWS (checked in `step`). The arguments are the kernel's
            // parameters in order (`MV_ENTRY` in `cuda_matvec.cuh`): three device addresses
            // and the output's, then four `int`s.
            if dependent {
                let (mut weights, mut x_qs, mut x_ds, mut dst) = (w.ptr, p.x_qs, p.x_ds, dst);
                let mut args: [*mut std::ffi::c_void; 8] = [
                    (&raw mut weights).cast(),
                    (&raw mut x_qs).cast(),
                    (&raw mut x_ds).cast(),
                    (&raw mut dst).cast(),
                    (&raw mut cols).cast(),
                    (&raw mut rows).cast(),
                    (&raw mut q8_stride).cast(),
                    (&raw mut out_stride).cast(),
                ];
                // ...and our matrix kernels call `pdl_wait` before they read the activations
                // or write anything.
                return unsafe { launch_dependent(&self.stream, &kernel.function, cfg, &mut args) };
            }
            let mut launch = self.stream.launch_builder(&kernel.function);
            launch.arg(&w.ptr).arg(&p.x_qs).arg(&p.x_ds).arg(&dst).arg(&cols).arg(&rows);
            launch.arg(&q8_stride).arg(&out_stride);
            return launched(unsafe { launch.launch(cfg) });
        }
        // SAFETY: the weights hold `rows x cols` in their format (checked in `new`); `q8`
        // holds `n` rows of `q8_stride >= cols / 32` blocks written by the previous kernel;
        // `out` holds `n` rows of `out_stride` floats (MAX_ROWS rows of each buffer), of
        // which this writes columns `offset..offset + rows`. Same stream as every other
        // launch of the step.
        unsafe {
            (w.launch)(
                w.ptr as *const _,
                p.q8 as *const _,
                dst as *mut _,
                w.cols as i32,
                w.rows as i32,
                q8_stride as i32,
                out_stride as i32,
                n as i32,
                self.stream.cu_stream() as *mut _,
            )
        };
        Ok(())
    }

    /// Attention of layer `l` for `n` rows, from the q/k/v projections in `qkv`: the
    /// kernel norms and rotates the queries and keys and stores the keys and values at each
    /// row's position before it reads the caches.
    fn attention(&self, layer: &Layer, l: usize, n: usize, n_split: usize) -> Result<()> {
        let p = self.ptrs;
        let dims = self.dims;
        let (l_i, n_head, n_kv, n_split_i) =
            (l as i32, dims.n_head as i32, dims.n_kv as i32, n_split as i32);
        let qkv_stride = ((dims.n_head + 2 * dims.n_kv) * dims.head_dim) as i32;
        let q_norm = layer.q_norm.as_ref().map_or(0, |v| v.ptr);
        let k_norm = layer.k_norm.as_ref().map_or(0, |v| v.ptr);
        let (eps, q_scale, neox) = (dims.eps, dims.q_scale, dims.neox as i32);
        let (cos, sin) = (self.cos.ptr, self.sin.ptr);
        let stride = q8_stride(dims.n_head * dims.head_dim) as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.attn_partial);
        launch.arg(&p.qkv).arg(&qkv_stride).arg(&q_norm).arg(&k_norm).arg(&cos).arg(&sin);
        launch.arg(&eps).arg(&q_scale).arg(&neox);
        launch.arg(&p.rows).arg(&p.kv).arg(&l_i).arg(&n_head).arg(&n_kv);
        launch.arg(&n_split_i).arg(&p.part_acc).arg(&p.part_ml).arg(&p.counts);
        launch.arg(&p.q8).arg(&p.x_qs).arg(&p.x_ds).arg(&stride);
        let cfg = LaunchConfig {
            grid_dim: (dims.n_kv as u32, n_split as u32, n as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `qkv` holds `n` rows of all heads; each row's position is below its
        // caches' capacity and below the rotation tables' positions (checked in `step`),
        // and its cache addresses point at `(n_kv, cap, d)` f16 tensors of this device that
        // the caller keeps alive for the step (the kernel writes the row's position of each
        // KV head and reads the positions up to it); the norms hold `d` floats; `part_*`
        // hold MAX_ROWS x n_head x MAX_SPLIT slots and n_split <= MAX_SPLIT; `counts`
        // MAX_ROWS x n_kv words, 0 between launches (each launch's joining blocks set theirs
        // back); the positions per split times n_split cover the longest row (written in
        // `step`); it writes `n` rows of the query width's Q8_1 blocks, within `q8`, `x_qs`
        // and `x_ds`.
        launched(unsafe { launch.launch(cfg) })
    }

    fn silu_mul_q8(&self, n: usize) -> Result<()> {
        let p = self.ptrs;
        let n_ff = self.dims.n_ff;
        let stride = q8_stride(n_ff);
        let (gu_stride, n_ff_i, stride_i) = ((2 * n_ff) as i32, n_ff as i32, stride as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.silu_mul_q8);
        launch.arg(&p.gu).arg(&gu_stride).arg(&n_ff_i);
        launch.arg(&p.q8).arg(&p.x_qs).arg(&p.x_ds).arg(&stride_i);
        let cfg = LaunchConfig {
            grid_dim: (stride.div_ceil(8) as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `gu` holds MAX_ROWS rows of 2 x n_ff floats; `q8`, `x_qs` and `x_ds`
        // MAX_ROWS rows of at least q8_stride(n_ff) blocks; warps past the row's blocks
        // return.
        launched(unsafe { launch.launch(cfg) })
    }
}

/// Launches `function` on `stream` as a programmatic dependent of the kernel before it there
/// (`pdl_wait` in `cuda_common.cuh`), with `args` pointing at its arguments: cudarc's
/// launch builder sets no launch attributes, so this is the driver's `cuLaunchKernelEx`.
/// Captured into a graph, it becomes a programmatic edge (CUDA 12.3 on).
///
/// # Safety
/// As for any launch: `args` point at values of the kernel's parameter types, in order,
/// alive for the call, and the grid touches only memory it may; and the kernel calls
/// `pdl_wait` before it reads what earlier kernels write or writes anything itself.
unsafe fn launch_dependent(
    stream: &CudaStream,
    function: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut [*mut std::ffi::c_void],
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: a plain C struct and union of integers, for which zero is a valid value.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    stream.context().bind_to_thread().map_err(msg)?;
    // SAFETY: the caller's; `config` and `attribute` live through the call.
    let result = unsafe {
        sys::cuLaunchKernelEx(
            &config,
            function.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    launched(result.result())
}

/// Whether the GPU takes programmatic dependent launches (compute capability 9.0 on); says
/// so when not.
fn takes_pdl(stream: &CudaStream) -> Result<bool> {
    let major = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(msg)?;
    if major < 9 {
        tracing::warn!(
            "programmatic dependent launch needs compute capability 9.0 (this GPU: {major}.x): \
             our matrix kernels launch as with GPU_DECODE=fused-own"
        );
    }
    Ok(major >= 9)
}

/// A launch's result as the step's. (candle's `mmvq` launchers return nothing: a fault of
/// theirs surfaces at the step's closing copy, or ends a capture with an error.)
fn launched<T>(result: std::result::Result<T, impl std::fmt::Display>) -> Result<()> {
    result.map(|_| ()).map_err(|e| msg(format!("a decode kernel failed to launch: {e}")))
}

/// The device addresses of `Buffers`, which never move: kernel arguments, and what the
/// captured graphs hold.
#[derive(Clone, Copy)]
struct Pointers {
    emb: u64,
    x: u64,
    delta: u64,
    q8: u64,
    x_qs: u64,
    x_ds: u64,
    qkv: u64,
    part_acc: u64,
    part_ml: u64,
    counts: u64,
    gu: u64,
    logits: u64,
    rows: u64,
    kv: u64,
}

impl Pointers {
    fn of(b: &Buffers, s: &CudaStream) -> Pointers {
        Pointers {
            emb: b.emb.device_ptr(s).0,
            x: b.x.device_ptr(s).0,
            delta: b.delta.device_ptr(s).0,
            q8: b.q8.device_ptr(s).0,
            x_qs: b.x_qs.device_ptr(s).0,
            x_ds: b.x_ds.device_ptr(s).0,
            qkv: b.qkv.device_ptr(s).0,
            part_acc: b.part_acc.device_ptr(s).0,
            part_ml: b.part_ml.device_ptr(s).0,
            counts: b.counts.device_ptr(s).0,
            gu: b.gu.device_ptr(s).0,
            logits: b.logits.device_ptr(s).0,
            rows: b.rows.device_ptr(s).0,
            kv: b.kv.device_ptr(s).0,
        }
    }
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused decode step: {e}"))
}

/// Several matrices applied to the same input, `total` output rows together.
fn products_of(
    parts: &[Arc<QTensor>],
    total: usize,
    cols: usize,
    device: &Device,
) -> Result<Vec<Product>> {
    let parts =
        parts.iter().map(|w| product_of(w, None, cols, device)).collect::<Result<Vec<_>>>()?;
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    if rows != total {
        bail!("stacked products of {rows} rows, expected {total}")
    }
    Ok(parts)
}

/// The product by `w`, checked to be `rows x cols` (any rows when `None`) on `device`.
fn product_of(
    w: &Arc<QTensor>,
    rows: Option<usize>,
    cols: usize,
    device: &Device,
) -> Result<Product> {
    let Some(launch) = mmvq_for(w.dtype()) else {
        bail!(
            "a matrix in {:?} (the GPU's fused decode takes Q4_0..Q8_0 and the K-quants)",
            w.dtype()
        )
    };
    let (r, c) = w.shape().dims2()?;
    if c != cols || rows.is_some_and(|rows| rows != r) {
        bail!("a matrix of {r}x{c}, expected {}x{cols}", rows.unwrap_or(r))
    }
    if !w.device().same_device(device) {
        bail!("a matrix on another device")
    }
    if w.storage_size_in_bytes() < r * c / w.dtype().block_size() * w.dtype().type_size() {
        bail!("a matrix holds fewer bytes than its shape needs")
    }
    Ok(Product {
        ptr: w.device_ptr()? as u64,
        _weights: w.clone(),
        dtype: w.dtype(),
        launch,
        own: None,
        families: Vec::new(),
        rows: r,
        cols: c,
    })
}

/// The device address of a contiguous tensor of `len` values of `dtype` on `device`.
fn tensor_ptr(t: &Tensor, dtype: DType, len: usize, device: &Device) -> Result<u64> {
    if t.dtype() != dtype || t.elem_count() != len || !t.is_contiguous() {
        bail!("a tensor of {:?} {:?}, expected {len} contiguous {dtype:?}", t.dtype(), t.dims())
    }
    if !t.device().same_device(device) {
        bail!("a tensor on another device")
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else { bail!("a tensor not on the GPU") };
    let stream = match device {
        Device::Cuda(dev) => dev.cuda_stream(),
        _ => bail!("not a GPU"),
    };
    let base = match dtype {
        DType::F32 => cuda.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::F16 => cuda.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        other => bail!("{other:?} tensors are not used here"),
    };
    Ok(base + (layout.start_offset() * dtype.size_in_bytes()) as u64)
}

/// Whether the one-pass RMSNorm takes rows of `width` values: a multiple of 8, and no more
/// than its threads' registers hold.
fn norm_1pass_takes(width: usize) -> bool {
    width.is_multiple_of(8) && q8_stride(width) * 4 <= NORM_1PASS_THREADS * NORM_1PASS_GROUPS
}

/// `len` random floats twice (a fixed seed): activations with a few large values, as real
/// ones have, and a smaller residual.
fn random_rows(len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut unit = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    let x = (0..len).map(|i| unit() * if i % 97 == 0 { 40.0 } else { 2.0 }).collect();
    let delta = (0..len).map(|_| unit() * 0.5).collect();
    (x, delta)
}

/// `blocks` Q8_1 blocks of random activations (a fixed seed: scales 1e-3 to 1e-2, quants
/// over the whole int8 range but -128) in both layouts, as `quantize_warp` writes them:
/// candle's blocks (with a sum of the values), and our quants and `(d, d * sum)` per 16.
fn random_q8_1(blocks: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut bytes = vec![0u8; blocks * Q8_1_BYTES];
    let mut qs = vec![0u8; blocks * 32];
    let mut ds = vec![0f32; blocks * 4];
    for ((block, quants), scales) in
        bytes.chunks_exact_mut(Q8_1_BYTES).zip(qs.chunks_exact_mut(32)).zip(ds.chunks_exact_mut(4))
    {
        let d = half::f16::from_f32(1e-3 + (next() % 1000) as f32 * 9e-6);
        let mut sums = [0i32; 2];
        for (i, (q, x)) in block[4..].iter_mut().zip(quants.iter_mut()).enumerate() {
            let v = (next() % 255) as i32 - 127;
            sums[i / 16] += v;
            (*q, *x) = (v as i8 as u8, v as i8 as u8);
        }
        let d32 = d.to_f32();
        block[..2].copy_from_slice(&d.to_le_bytes());
        let sum = d32 * (sums[0] + sums[1]) as f32;
        block[2..4].copy_from_slice(&half::f16::from_f32(sum).to_le_bytes());
        scales.copy_from_slice(&[d32, d32 * sums[0] as f32, d32, d32 * sums[1] as f32]);
    }
    (bytes, qs, ds)
}
