//! Model names and model files: parses tier values (`qwen3:8b-q8_0`, a `.gguf` path,
//! `zai:<model>`, `openai:<base URL>#<model>`), maps Qwen3 names to the official `Qwen/Qwen3-*-GGUF` files, downloads them
//! into `MODELS_DIR` with `hf-hub` (verified, resumable, never a half file under the final
//! name) and reads GGUF headers for listings. It loads no model and knows no tier policy.
//!
//! What hf-hub 0.4.3 (tokio API) does, read from its source, and what this module adds:
//! - it calls `GET {endpoint}/{repo}/resolve/{rev}/{file}` with `Range: bytes=0-0` for the
//!   metadata (headers `X-Repo-Commit`, `X-Linked-Etag` or `ETag`, `Content-Range`), then
//!   ranged GETs of 10 MB chunks; `{endpoint}/api/models/{repo}/revision/{rev}` only for
//!   `info()` (used here to list the files of a repository after a 404);
//! - it downloads into `{cache}/models--{org}--{name}/blobs/{etag}.sync.part`, a file of the
//!   final length plus an 8-byte trailer recording how many bytes are committed, renames it
//!   to `blobs/{etag}` when complete and links `snapshots/{commit}/{file}` to it. A later call
//!   resumes from the committed offset; within one call it does not retry a failed chunk, so
//!   `pull_file` retries the call a bounded number of times (each retry resumes);
//! - it never checks the content against the etag: this module hashes the blob and compares
//!   it with the etag, which for LFS files is the SHA-256, then renames the verified blob to
//!   `MODELS_DIR/{file}` (same file system: atomic) and removes the cache folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiError, Progress};
use hf_hub::{Cache, Repo};
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// What a tier value (`MODEL_FAST=…`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// An official Qwen3 GGUF, e.g. `qwen3:8b` or `qwen3:14b-q8_0`.
    Qwen3(Qwen3Model),
    /// A GGUF file given by path.
    File(PathBuf),
    /// A Z.ai cloud model, e.g. `zai:glm-4.7`.
    Zai(String),
    /// A model on an OpenAI-compatible server, e.g.
    /// `openai:http://gpu-box:8000/v1#Qwen/Qwen3-32B`.
    Remote(RemoteModel),
}

/// A model served by an OpenAI-compatible server (vLLM, llama-server, Ollama, SGLang).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteModel {
    /// The API base as the server documents it (usually ending in `/v1`), without a
    /// trailing slash.
    pub base_url: String,
    /// The name the server knows the model by (`--served-model-name` for vLLM).
    pub model: String,
}

impl RemoteModel {
    /// Parses what follows `openai:`: `<base URL>#<model>`. The model comes after `#`, which
    /// never reaches the server as part of a URL, so a model name may hold `/`, `:` or `@`.
    fn parse(rest: &str) -> Result<RemoteModel, String> {
        const EXAMPLE: &str = "e.g. openai:http://gpu-box:8000/v1#Qwen/Qwen3-32B";
        let Some((base, model)) = rest.split_once('#') else {
            return Err(format!("expected openai:<base URL>#<model>, {EXAMPLE}"));
        };
        let (base, model) = (base.trim().trim_end_matches('/'), model.trim());
        if model.is_empty() || model.contains(char::is_whitespace) {
            return Err(format!("missing model name after `#`, {EXAMPLE}"));
        }
        let url = reqwest::Url::parse(base)
            .map_err(|e| format!("`{base}` is not a URL ({e}), {EXAMPLE}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("`{base}` must be an http:// or https:// URL with a host"));
        }
        // The value is shown in /api/models and in logs: a password in it would leak. The
        // key has its own variable.
        if !url.username().is_empty() || url.password().is_some() {
            return Err("the URL must not hold a user name or password: set the tier's API key \
                 variable (e.g. MODEL_SMART_API_KEY) instead"
                .to_string());
        }
        Ok(RemoteModel { base_url: base.to_string(), model: model.to_string() })
    }
}

/// One file of the official `Qwen/Qwen3-{4B,8B,14B}-GGUF` repositories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qwen3Model {
    /// `4B`, `8B` or `14B`.
    pub size: String,
    /// Quantization as spelled in the file name, e.g. `Q4_K_M`.
    pub quant: String,
}

/// Quantizations llama.cpp names; whether the official repository has a given one is only
/// known when pulling (a 404 then lists the files it does have).
pub const KNOWN_QUANTS: &[&str] = &[
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16",
];

/// The quantization used when a name gives none (PROTOCOLS.md §4.4).
pub const DEFAULT_QUANT: &str = "Q4_K_M";

const QWEN3_SIZES: &[&str] = &["4B", "8B", "14B"];

impl ModelSpec {
    /// Parses a tier value. The error says what is accepted; the caller adds the variable.
    pub fn parse(value: &str) -> Result<ModelSpec, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("empty value: use qwen3:4b|8b|14b[-quant], a .gguf path, zai:<model> or \
                 openai:<base URL>#<model>"
                .to_string());
        }
        if let Some(model) = value.strip_prefix("zai:") {
            let model = model.trim();
            if model.is_empty() || model.contains(char::is_whitespace) {
                return Err(format!("`{value}`: expected zai:<model>, e.g. zai:glm-4.7"));
            }
            return Ok(ModelSpec::Zai(model.to_string()));
        }
        if let Some(rest) = value.strip_prefix("openai:") {
            return RemoteModel::parse(rest)
                .map(ModelSpec::Remote)
                .map_err(|e| format!("`{value}`: {e}"));
        }
        let lower = value.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("qwen3:") {
            return Qwen3Model::parse(rest)
                .map(ModelSpec::Qwen3)
                .map_err(|e| format!("`{value}`: {e}"));
        }
        if lower.ends_with(".gguf") {
            return Ok(ModelSpec::File(PathBuf::from(value)));
        }
        Err(format!(
            "`{value}`: unknown model; use qwen3:4b, qwen3:8b or qwen3:14b (optionally with a \
             quantization such as qwen3:8b-q8_0), a path to a .gguf file, zai:<model>, or \
             openai:<base URL>#<model> for an OpenAI-compatible server"
        ))
    }

    /// The value written back the way a user would type it.
    pub fn display_name(&self) -> String {
        match self {
            ModelSpec::Qwen3(model) => model.name(),
            ModelSpec::File(path) => path.display().to_string(),
            ModelSpec::Zai(model) => format!("zai:{model}"),
            ModelSpec::Remote(remote) => format!("openai:{}#{}", remote.base_url, remote.model),
        }
    }
}

impl Qwen3Model {
    /// Parses what follows `qwen3:`, e.g. `8b` or `14b-q8_0`.
    fn parse(rest: &str) -> Result<Qwen3Model, String> {
        let (size, quant) = match rest.split_once('-') {
            Some((size, quant)) => (size, Some(quant)),
            None => (rest, None),
        };
        let size = size.to_ascii_uppercase();
        if !QWEN3_SIZES.contains(&size.as_str()) {
            return Err(format!("unknown Qwen3 size `{size}` (use 4b, 8b or 14b)"));
        }
        let quant = match quant {
            None => DEFAULT_QUANT.to_string(),
            Some(q) => {
                let q = q.to_ascii_uppercase();
                if !KNOWN_QUANTS.contains(&q.as_str()) {
                    return Err(format!(
                        "unknown quantization `{q}` (known: {})",
                        KNOWN_QUANTS.join(", ").to_ascii_lowercase()
                    ));
                }
                q
            }
        };
        Ok(Qwen3Model { size, quant })
    }

    /// `qwen3:8b-q4_k_m`.
    pub fn name(&self) -> String {
        format!("qwen3:{}-{}", self.size.to_ascii_lowercase(), self.quant.to_ascii_lowercase())
    }

    /// `Qwen/Qwen3-8B-GGUF`.
    pub fn repo(&self) -> String {
        format!("Qwen/Qwen3-{}-GGUF", self.size)
    }

    /// `Qwen3-8B-Q4_K_M.gguf`.
    pub fn file_name(&self) -> String {
        format!("Qwen3-{}-{}.gguf", self.size, self.quant)
    }

    /// The command that downloads this model.
    pub fn pull_command(&self) -> String {
        format!("my-claw models pull {}", self.name())
    }
}

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_TOKEN`.
    pub token: Option<Secret>,
    /// `MODELS_DIR`: final files go here, hf-hub's cache goes in `.hf-cache` inside it (same
    /// file system, so the final rename is atomic).
    pub models_dir: PathBuf,
    /// Bytes per ranged request; `None` keeps hf-hub's default (10 MB).
    pub chunk_size: Option<usize>,
    /// How many times one pull tries (each try resumes where the last one stopped).
    pub max_attempts: u32,
    /// Pause before the second try; doubled for each further one.
    pub retry_backoff: Duration,
}

impl HubConfig {
    pub fn new(endpoint: &str, token: Option<Secret>, models_dir: &Path) -> HubConfig {
        HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            models_dir: models_dir.to_path_buf(),
            chunk_size: None,
            max_attempts: 4,
            retry_backoff: Duration::from_secs(1),
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.models_dir.join(".hf-cache")
    }
}

/// Progress of one download, reported as bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadProgress {
    /// Bytes present, including those kept from an interrupted earlier try.
    pub downloaded: u64,
    pub total: u64,
    /// Which try this is (1-based).
    pub attempt: u32,
}

/// A progress callback; called often, keep it cheap.
pub type ProgressFn = Arc<dyn Fn(DownloadProgress) + Send + Sync>;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{file} is not in {repo} ({endpoint}){}", available_list(.available))]
    NotFound { endpoint: String, repo: String, file: String, available: Vec<String> },
    #[error("access to {repo} was refused (HTTP {status}); check HF_TOKEN")]
    Unauthorized { repo: String, status: u16 },
    #[error("checksum mismatch for {file}: expected sha256 {expected}, got {actual}; the file was deleted")]
    Checksum { file: String, expected: String, actual: String },
    #[error("download of {file} failed after {attempts} tries: {reason}; run the same command again to resume")]
    Failed { file: String, attempts: u32, reason: String },
    #[error("{0}")]
    Io(String),
}

fn available_list(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!("; GGUF files there: {}", available.join(", "))
    }
}

/// Downloads an official Qwen3 file into `MODELS_DIR` and returns its final path. A file
/// already there is kept as it is (delete it to download again).
pub async fn pull(
    config: &HubConfig,
    model: &Qwen3Model,
    progress: ProgressFn,
) -> Result<PathBuf, HubError> {
    pull_file(config, &model.repo(), &model.file_name(), progress).await
}

/// Downloads `file` of model repository `repo` (revision `main`) into `MODELS_DIR/file`.
///
/// The final name only ever holds a verified file: hf-hub writes a `.sync.part` file in the
/// cache, the finished blob is hashed and compared with its etag, and only then renamed.
pub async fn pull_file(
    config: &HubConfig,
    repo: &str,
    file: &str,
    progress: ProgressFn,
) -> Result<PathBuf, HubError> {
    if file.contains('/') || file.contains('\\') || file.starts_with('.') {
        return Err(HubError::Io(format!("refusing to write file name `{file}`")));
    }
    let final_path = config.models_dir.join(file);
    if final_path.is_file() {
        return Ok(final_path);
    }
    let cache_dir = config.cache_dir();
    tokio::fs::create_dir_all(&cache_dir)
        .await
        .map_err(|e| HubError::Io(format!("cannot create {}: {e}", cache_dir.display())))?;

    // Build from an explicit cache: `ApiBuilder::new()` would look for a home directory and
    // a token file there; here HF_TOKEN (or nothing) is the only credential used.
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.as_ref().map(|t| t.expose().to_string()))
        .with_progress(false)
        .with_user_agent("my-claw", env!("CARGO_PKG_VERSION"));
    if config.chunk_size.is_some() {
        builder = builder.with_chunk_size(config.chunk_size);
    }
    let api = builder.build().map_err(|e| HubError::Io(format!("hf-hub client: {e}")))?;
    let api_repo = api.repo(Repo::model(repo.to_string()));

    // Each try gets a new generation number; chunk tasks of a failed try that hf-hub leaves
    // running in the background then cannot report stale numbers.
    let generation = Arc::new(AtomicU64::new(0));
    let max_attempts = config.max_attempts.max(1);
    let mut attempt = 0;
    let pointer = loop {
        attempt += 1;
        generation.store(u64::from(attempt), Ordering::SeqCst);
        let reporter = Reporter {
            state: Arc::new(ReporterState {
                generation: u64::from(attempt),
                current: generation.clone(),
                downloaded: AtomicU64::new(0),
                total: AtomicU64::new(0),
                attempt,
                callback: progress.clone(),
            }),
        };
        match api_repo.download_with_progress(file, reporter).await {
            Ok(pointer) => break pointer,
            Err(err) => {
                if let Some(status) = http_status(&err) {
                    if status == 404 {
                        let available = list_gguf_files(&api_repo).await;
                        return Err(HubError::NotFound {
                            endpoint: config.endpoint.clone(),
                            repo: repo.to_string(),
                            file: file.to_string(),
                            available,
                        });
                    }
                    if status == 401 || status == 403 {
                        return Err(HubError::Unauthorized { repo: repo.to_string(), status });
                    }
                }
                if attempt >= max_attempts {
                    return Err(HubError::Failed {
                        file: file.to_string(),
                        attempts: attempt,
                        reason: err.to_string(),
                    });
                }
                // hf-hub stops at the first failed chunk but leaves the other chunk tasks
                // of that try running; they write the same bytes at the same offsets, so the
                // next try (which resumes from the committed offset) is unaffected.
                let pause = config.retry_backoff * 2u32.saturating_pow(attempt - 1);
                tracing::warn!(file, attempt, error = %err, "download interrupted, resuming in {pause:?}");
                tokio::time::sleep(pause).await;
            }
        }
    };

    let blob = tokio::fs::canonicalize(&pointer)
        .await
        .map_err(|e| HubError::Io(format!("downloaded file {}: {e}", pointer.display())))?;
    let etag = blob.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let repo_cache_dir = cache_dir.join(Repo::model(repo.to_string()).folder_name());
    if let Err(err) = verify_blob(&blob, &etag, file).await {
        let _ = tokio::fs::remove_file(&blob).await;
        let _ = tokio::fs::remove_dir_all(&repo_cache_dir).await;
        return Err(err);
    }
    tokio::fs::rename(&blob, &final_path).await.map_err(|e| {
        HubError::Io(format!("cannot move {} to {}: {e}", blob.display(), final_path.display()))
    })?;
    // The cache now holds only a dangling link and a ref; a partial download of another
    // file of the same repository would also be dropped, which is acceptable for a cache
    // whose only purpose is resuming.
    let _ = tokio::fs::remove_dir_all(&repo_cache_dir).await;
    Ok(final_path)
}

/// Hashes the blob and compares with a SHA-256 etag. A 40-character etag is a git blob id
/// (non-LFS files, never GGUF weights): then only the GGUF magic is checked.
async fn verify_blob(blob: &Path, etag: &str, file: &str) -> Result<(), HubError> {
    let is_sha256 = etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit());
    let path = blob.to_path_buf();
    let actual = match tokio::task::spawn_blocking(move || sha256_file(&path)).await {
        Ok(Ok(actual)) => actual,
        Ok(Err(e)) => return Err(HubError::Io(format!("cannot read {}: {e}", blob.display()))),
        Err(e) => return Err(HubError::Io(format!("hashing task failed: {e}"))),
    };
    if is_sha256 {
        if !actual.eq_ignore_ascii_case(etag) {
            return Err(HubError::Checksum {
                file: file.to_string(),
                expected: etag.to_ascii_lowercase(),
                actual,
            });
        }
        return Ok(());
    }
    tracing::warn!(etag, "the hub gave no sha256 for this file; checking the GGUF magic only");
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(blob).and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut magic)
    });
    if read.is_err() || &magic != b"GGUF" {
        return Err(HubError::Io(format!(
            "{file}: downloaded content is not a GGUF file; deleted"
        )));
    }
    Ok(())
}

/// Lowercase hex SHA-256 of a file, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn http_status(err: &ApiError) -> Option<u16> {
    match err {
        ApiError::RequestError(e) => e.status().map(|s| s.as_u16()),
        ApiError::TooManyRetries(inner) => http_status(inner),
        _ => None,
    }
}

/// The `.gguf` files of a repository, best effort (an empty list when the listing fails).
async fn list_gguf_files(api_repo: &hf_hub::api::tokio::ApiRepo) -> Vec<String> {
    match api_repo.info().await {
        Ok(info) => info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|name| name.ends_with(".gguf"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[derive(Clone)]
struct Reporter {
    state: Arc<ReporterState>,
}

struct ReporterState {
    generation: u64,
    current: Arc<AtomicU64>,
    downloaded: AtomicU64,
    total: AtomicU64,
    attempt: u32,
    callback: ProgressFn,
}

impl ReporterState {
    fn report(&self) {
        if self.current.load(Ordering::SeqCst) != self.generation {
            return;
        }
        (self.callback)(DownloadProgress {
            downloaded: self.downloaded.load(Ordering::SeqCst),
            total: self.total.load(Ordering::SeqCst),
            attempt: self.attempt,
        });
    }
}

impl Progress for Reporter {
    async fn init(&mut self, size: usize, _filename: &str) {
        self.state.total.store(size as u64, Ordering::SeqCst);
        self.state.downloaded.store(0, Ordering::SeqCst);
        self.state.report();
    }

    async fn update(&mut self, size: usize) {
        // hf-hub first reports the bytes kept from an earlier try, then each piece received.
        self.state.downloaded.fetch_add(size as u64, Ordering::SeqCst);
        self.state.report();
    }

    async fn finish(&mut self) {
        let total = self.state.total.load(Ordering::SeqCst);
        self.state.downloaded.store(total, Ordering::SeqCst);
        self.state.report();
    }
}

/// What `models list` and the status show about a GGUF file, read from its header only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub architecture: Option<String>,
    pub name: Option<String>,
    /// From `general.file_type`, else the most common weight type.
    pub quantization: String,
    pub n_tensors: usize,
}

/// Reads the header of a GGUF file (metadata and tensor table, no weights).
pub fn read_gguf_summary(path: &Path) -> Result<GgufSummary, String> {
    use candle_core::quantized::gguf_file::Content;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| format!("not a readable GGUF: {e}"))?;
    let text = |key: &str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
    // One labelling rule for the whole program: the engine's.
    let quantization = crate::llm::engine::gguf::quantization_label(&content);
    Ok(GgufSummary {
        architecture: text("general.architecture"),
        name: text("general.name"),
        quantization,
        n_tensors: content.tensor_infos.len(),
    })
}

/// The GGUF files directly inside `MODELS_DIR` (hidden files and the download cache are
/// skipped), sorted by name. A missing directory is an empty list.
pub fn find_gguf_files(models_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(models_dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            !name.starts_with('.') && name.to_ascii_lowercase().ends_with(".gguf") && p.is_file()
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<ModelSpec, &str>) {
        let got = ModelSpec::parse(input);
        match (got, expected) {
            (Ok(got), Ok(expected)) => assert_eq!(got, expected, "input {input}"),
            (Err(got), Err(fragment)) => assert!(got.contains(fragment), "{input}: {got}"),
            (got, expected) => panic!("{input}: got {got:?}, expected {expected:?}"),
        }
    }

    fn qwen(size: &str, quant: &str) -> ModelSpec {
        ModelSpec::Qwen3(Qwen3Model { size: size.into(), quant: quant.into() })
    }

    #[test]
    fn tier_values_parse() {
        check("qwen3:4b", Ok(qwen("4B", "Q4_K_M")));
        check("qwen3:8b-q8_0", Ok(qwen("8B", "Q8_0")));
        check("Qwen3:14B-Q5_K_M", Ok(qwen("14B", "Q5_K_M")));
        check("zai:glm-4.7", Ok(ModelSpec::Zai("glm-4.7".into())));
        check("models/x.gguf", Ok(ModelSpec::File("models/x.gguf".into())));
        check("qwen3:7b", Err("unknown Qwen3 size `7B`"));
        check("qwen3:8b-q9", Err("unknown quantization `Q9`"));
        check("llama3", Err("unknown model"));
        check("zai:", Err("expected zai:<model>"));
        check("", Err("empty value"));
    }

    #[test]
    fn remote_values_parse() {
        let remote = |base: &str, model: &str| {
            ModelSpec::Remote(RemoteModel { base_url: base.into(), model: model.into() })
        };
        check(
            "openai:http://gpu-box:8000/v1#Qwen/Qwen3-32B",
            Ok(remote("http://gpu-box:8000/v1", "Qwen/Qwen3-32B")),
        );
        check(
            " openai:https://10.0.0.7/v1/#qwen3:32b ",
            Ok(remote("https://10.0.0.7/v1", "qwen3:32b")),
        );
        check("openai:http://[::1]:8080/v1#m", Ok(remote("http://[::1]:8080/v1", "m")));
        check("openai:http://gpu-box:8000/v1", Err("expected openai:<base URL>#<model>"));
        check("openai:http://gpu-box:8000/v1#", Err("missing model name"));
        check("openai:gpu-box:8000#m", Err("must be an http:// or https:// URL"));
        check("openai:http://user:pw@gpu-box/v1#m", Err("must not hold a user name"));
        let spec = ModelSpec::parse("openai:http://gpu-box:8000/v1/#Qwen/Qwen3-32B").unwrap();
        assert_eq!(spec.display_name(), "openai:http://gpu-box:8000/v1#Qwen/Qwen3-32B");
    }

    #[test]
    fn qwen3_names_map_to_official_files() {
        let ModelSpec::Qwen3(model) = ModelSpec::parse("qwen3:8b").unwrap() else {
            panic!("not qwen3")
        };
        assert_eq!(model.repo(), "Qwen/Qwen3-8B-GGUF");
        assert_eq!(model.file_name(), "Qwen3-8B-Q4_K_M.gguf");
        assert_eq!(model.name(), "qwen3:8b-q4_k_m");
        assert_eq!(model.pull_command(), "my-claw models pull qwen3:8b-q4_k_m");
    }
}
