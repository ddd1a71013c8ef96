//! Engine integration tests: real SmolLM2 file, real Qwen3 vocabulary, tiny Qwen3 GGUF.
