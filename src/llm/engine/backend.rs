//! Which forward pass a loaded model runs: our own CPU kernels (`model.rs`, the CPU default)
//! or candle on a device (`candle_model.rs`, for CUDA). The worker holds a `Backend` and its
//! sequences' `Cache`s and never looks inside either, so KV reuse, batching, cancellation
//! and the bounded context work the same on every device.

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;

use crate::llm::engine::candle_model::{CandleModel, DeviceCache};
use crate::llm::engine::device::ComputeDevice;
use crate::llm::engine::model::{KernelCache, KvCache, Model, ModelConfig, SeqBatch};

/// A loaded model. One per engine thread, made once and never moved in a hot path, so the
/// size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Kernels(Model),
    Candle(CandleModel),
}

/// One sequence's keys and values, where its model keeps them.
#[derive(Debug)]
pub enum Cache {
    Kernels(KvCache),
    Candle(DeviceCache),
}

impl Backend {
    /// Load the weights of an opened GGUF for `device`.
    pub fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        config: ModelConfig,
        device: &ComputeDevice,
    ) -> candle_core::Result<Backend> {
        Ok(match device {
            ComputeDevice::Kernels => Backend::Kernels(Model::load(content, reader, config)?),
            ComputeDevice::Candle(device) => {
                Backend::Candle(CandleModel::load(content, reader, config, device)?)
            }
        })
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Backend::Kernels(model) => model.config(),
            Backend::Candle(model) => model.config(),
        }
    }

    /// Memory the weights hold where they run: on the device for candle; `None` for our
    /// kernels, whose weights are the file's blocks as read (its size).
    pub fn weight_bytes(&self) -> Option<u64> {
        match self {
            Backend::Kernels(_) => None,
            Backend::Candle(model) => Some(model.weight_bytes()),
        }
    }

    /// How decode steps run (`ModelInfo::decode_path`).
    pub fn decode_path(&self) -> &'static str {
        match self {
            Backend::Kernels(_) => "kernels",
            Backend::Candle(model) => model.decode_path(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Backend::Kernels(model) => model.vocab_size(),
            Backend::Candle(model) => model.vocab_size(),
        }
    }

    /// An empty cache for one sequence of at most `max_tokens` positions.
    pub fn new_cache(&self, max_tokens: usize) -> Cache {
        match self {
            Backend::Kernels(model) => Cache::Kernels(model.new_cache(max_tokens)),
            Backend::Candle(model) => Cache::Candle(model.new_cache(max_tokens)),
        }
    }

    /// `Model::forward_batch` on whichever forward pass this is. Each cache must be one
    /// this backend made.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqBatch<'_, Cache>],
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match self {
            Backend::Kernels(model) => {
                if seqs.iter().any(|seq| !matches!(seq.cache, Cache::Kernels(_))) {
                    candle_core::bail!("a device cache was given to the CPU model")
                }
                // Handed over as it is: a decode step allocates nothing here.
                model.forward_batch(seqs, out)
            }
            Backend::Candle(model) => {
                let mut batch = Vec::with_capacity(seqs.len());
                for seq in seqs.iter_mut() {
                    let Cache::Candle(cache) = &mut *seq.cache else {
                        candle_core::bail!("a CPU cache was given to the device model")
                    };
                    batch.push(SeqBatch { tokens: seq.tokens, cache, logits: seq.logits });
                }
                model.forward_batch(&mut batch, out)
            }
        }
    }
}

impl Cache {
    /// Positions stored.
    pub fn len(&self) -> usize {
        match self {
            Cache::Kernels(cache) => cache.len(),
            Cache::Candle(cache) => cache.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget every position from `n_tokens` on.
    pub fn truncate(&mut self, n_tokens: usize) {
        match self {
            Cache::Kernels(cache) => cache.truncate(n_tokens),
            Cache::Candle(cache) => cache.truncate(n_tokens),
        }
    }

    /// Memory held, on the CPU or the device.
    pub fn bytes(&self) -> u64 {
        match self {
            Cache::Kernels(cache) => cache.bytes(),
            Cache::Candle(cache) => cache.bytes(),
        }
    }

    /// Release memory past the stored positions, for a cache that is parked. A device that
    /// cannot reallocate keeps the cache as it was.
    pub fn shrink_to_fit(&mut self) {
        match self {
            Cache::Kernels(cache) => cache.shrink_to_fit(),
            Cache::Candle(cache) => {
                if let Err(err) = cache.shrink_to_fit() {
                    tracing::warn!(%err, "could not shrink a parked KV cache on the device");
                }
            }
        }
    }

    /// A new cache holding a copy of the first `n_tokens` positions; `None` when the device
    /// has no memory for it (the caller then starts from an empty cache).
    pub fn clone_prefix(&self, n_tokens: usize) -> Option<Cache> {
        match self {
            Cache::Kernels(cache) => Some(Cache::Kernels(cache.clone_prefix(n_tokens))),
            Cache::Candle(cache) => match cache.clone_prefix(n_tokens) {
                Ok(copy) => Some(Cache::Candle(copy)),
                Err(err) => {
                    tracing::warn!(%err, "could not copy a KV prefix on the device");
                    None
                }
            },
        }
    }
}

/// The kernels read a `Cache` through this; `Backend::forward_batch` has checked that every
/// cache of the batch is a kernels cache before the pass starts.
impl KernelCache for Cache {
    fn kv(&self) -> &KvCache {
        match self {
            Cache::Kernels(cache) => cache,
            Cache::Candle(_) => unreachable!("checked by Backend::forward_batch"),
        }
    }
    fn kv_mut(&mut self) -> &mut KvCache {
        match self {
            Cache::Kernels(cache) => cache,
            Cache::Candle(_) => unreachable!("checked by Backend::forward_batch"),
        }
    }
}
