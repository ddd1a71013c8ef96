//! `Provider` over the local engine: a thin adapter from the trait to `EngineHandle`.
//! It adds no policy (routing and fallback live in `llm::router`).

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::llm::engine::EngineHandle;
use crate::llm::{
    forward_chunks, ChunkStream, DeviceUse, LlmError, LlmRequest, Provider, ProviderInfo,
};

const FORWARD_BUFFER: usize = 64;

/// The in-process model as a `Provider`. Cloning the handle is cheap; the model is shared.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    handle: EngineHandle,
}

impl LocalProvider {
    pub fn new(handle: EngineHandle) -> LocalProvider {
        LocalProvider { handle }
    }

    pub fn handle(&self) -> &EngineHandle {
        &self.handle
    }
}

impl Provider for LocalProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".to_string(),
            model: self.handle.info().name.clone(),
            leaves_machine: false,
            host: None,
        }
    }

    fn device(&self) -> Option<DeviceUse> {
        let info = self.handle.info();
        let now = self.handle.device_now();
        Some(DeviceUse {
            device: info.device.id.clone(),
            device_name: info.device.name.clone(),
            weights_bytes: info.weight_bytes,
            kv_kept_bytes: self.handle.stats().cached_bytes,
            device_memory_used_bytes: now.memory_used_bytes(),
            device_memory_total_bytes: now.memory_total_bytes,
        })
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        // Submitting never blocks: a full queue is an immediate `QueueFull`.
        let submitted = self.handle.submit(request);
        Box::pin(async move {
            let mut upstream = submitted?;
            // Resolve once the engine took the request (`Chunk::Accepted`, before the prompt
            // is read), so that what it refuses at once (a context overflow) reaches the
            // caller as `Err`, and a long prefill already counts as the answer running.
            let first = match upstream.recv().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(err)) => return Err(err),
                None => return Err(LlmError::EngineStopped),
            };
            let (tx, rx) = mpsc::channel(FORWARD_BUFFER);
            let _ = tx.try_send(Ok(first));
            // Forward the rest; when the caller drops its receiver, the upstream receiver is
            // dropped and the worker stops at its next step (prefill included).
            tokio::spawn(forward_chunks(upstream, tx));
            Ok(rx)
        })
    }

    fn warm(&self, request: LlmRequest) -> BoxFuture<'_, Result<(), LlmError>> {
        // The engine runs it only while no request is running or waiting.
        Box::pin(self.handle.warm(request))
    }
}
