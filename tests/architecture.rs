//! The README's architecture invariants, checked by reading `src/`: where SQL, axum,
//! `unsafe` and `Serialize` may appear, what `llm/` and `assistant.rs` may import, and the
//! `//!` header every file starts with. These tests read source text only; they build and
//! run nothing of the product.

use std::path::{Path, PathBuf};

use crate::util::repo_path;

/// One source file: its path relative to `src/` (with `/`) and its lines of code, that is
/// without comment lines, so that prose about axum or SQL does not count.
struct Source {
    rel: String,
    text: String,
}

impl Source {
    fn code_lines(&self) -> impl Iterator<Item = (usize, &str)> {
        self.text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line))
            .filter(|(_, line)| !line.trim_start().starts_with("//"))
    }

    fn under(&self, prefix: &str) -> bool {
        self.rel.starts_with(prefix)
    }
}

fn sources() -> Vec<Source> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = repo_path("src");
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    assert!(paths.len() > 20, "found only {} source files under {}", paths.len(), root.display());
    paths
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
            let text = std::fs::read_to_string(&path).expect("read source");
            Source { rel, text }
        })
        .collect()
}

/// Every code line, outside the files that `allowed` accepts, that `matches` flags; the
/// assertion lists them all as `file:line: text`.
fn check(what: &str, allowed: impl Fn(&Source) -> bool, matches: impl Fn(&str) -> bool) {
    let mut offenders = Vec::new();
    for source in sources().iter().filter(|s| !allowed(s)) {
        for (number, line) in source.code_lines() {
            if matches(line) {
                offenders.push(format!("src/{}:{number}: {}", source.rel, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "{what}:\n{}", offenders.join("\n"));
}

/// Whether `line` uses the crate or module `name` as a path (`name::`, `use name`).
fn uses_path(line: &str, name: &str) -> bool {
    line.match_indices(name).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = &line[at + name.len()..];
        let starts_word = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        starts_word
            && (after.starts_with("::") || after.starts_with(';') || after.starts_with(" as"))
    })
}

#[test]
fn every_source_file_starts_with_a_module_header() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|s| !s.text.starts_with("//!"))
        .map(|s| format!("src/{}", s.rel))
        .collect();
    assert!(missing.is_empty(), "files without a `//!` header saying what they own:\n{missing:?}");
}

#[test]
fn sql_lives_only_in_db() {
    const SQL_STARTS: &[&str] =
        &["SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE ", "ALTER ", "DROP ", "PRAGMA "];
    check(
        "SQL outside src/db/",
        |s| s.under("db/"),
        |line| {
            line.contains("sqlx::query")
                || line.contains("query_as(")
                || line.contains("query_scalar(")
                || SQL_STARTS.iter().any(|kw| {
                    line.contains(&format!("\"{kw}")) || line.contains(&format!("r#\"{kw}"))
                })
        },
    );
}

#[test]
fn only_the_gateway_knows_axum_and_hyper() {
    check(
        "axum, hyper or tower-http outside src/gateway/",
        |s| s.under("gateway/"),
        |line| {
            ["axum", "hyper", "hyper_util", "tower_http"].iter().any(|name| uses_path(line, name))
        },
    );
}

#[test]
fn unsafe_lives_only_in_the_kernels() {
    check(
        "`unsafe` outside src/llm/engine/kernels/ (and device.rs's one call, checked below)",
        |s| s.under("llm/engine/kernels/") || s.rel == "llm/engine/device.rs",
        |line| {
            line.contains("unsafe {")
                || line.contains("unsafe fn")
                || line.contains("unsafe impl")
                || line.contains("allow(unsafe_code)")
        },
    );
}

/// The one `unsafe` outside the kernels: turning off cudarc's cross-stream event tracking
/// when the GPU is opened (the safety argument is at the call).
#[test]
fn device_rs_has_only_the_event_tracking_call_unsafe() {
    let text = std::fs::read_to_string("src/llm/engine/device.rs").unwrap();
    let unsafe_lines: Vec<&str> = text
        .lines()
        .filter(|line| {
            !line.trim_start().starts_with("//")
                && (line.contains("unsafe") && !line.contains("unsafe_code"))
        })
        .collect();
    assert_eq!(unsafe_lines.len(), 1, "{unsafe_lines:?}");
    assert!(
        unsafe_lines[0].contains("unsafe { cuda.disable_event_tracking() }"),
        "{unsafe_lines:?}"
    );
}

/// GPU-only code (`cfg(feature = "cuda")`) stays where the README's code map says: opening
/// the device, the fused decode step's hook in the candle forward pass, and the kernels.
#[test]
fn cuda_only_code_lives_in_the_engine_device_files() {
    check(
        "`feature = \"cuda\"` outside device.rs, candle_model.rs and kernels/mod.rs",
        |s| {
            ["llm/engine/device.rs", "llm/engine/candle_model.rs", "llm/engine/kernels/mod.rs"]
                .contains(&s.rel.as_str())
        },
        |line| line.contains("feature = \"cuda\""),
    );
}

#[test]
fn only_channels_and_gateway_define_serialize_types() {
    check(
        "`Serialize` outside src/channels/ and src/gateway/ (domain types are not wire types)",
        |s| s.under("channels/") || s.under("gateway/"),
        // `Deserialize` alone is fine: parsing settings or files needs no wire type.
        |line| line.replace("Deserialize", "").contains("Serialize"),
    );
}

#[test]
fn llm_never_imports_axum_sqlx_channels_or_gateway() {
    check(
        "src/llm/ importing axum, sqlx, channels, gateway, db or the assistant",
        |s| !s.under("llm/"),
        |line| {
            ["axum", "sqlx", "hyper"].iter().any(|name| uses_path(line, name))
                || ["crate::channels", "crate::gateway", "crate::db", "crate::assistant"]
                    .iter()
                    .any(|path| line.contains(path))
        },
    );
}

#[test]
fn the_assistant_knows_no_http() {
    check(
        "src/assistant.rs using HTTP or a concrete channel",
        |s| s.rel != "assistant.rs",
        |line| {
            ["axum", "hyper", "reqwest"].iter().any(|name| uses_path(line, name))
                || line.contains("crate::gateway")
                || line.contains("channels::whatsapp")
                || line.contains("channels::nextcloud")
        },
    );
}

#[test]
fn only_app_and_the_command_entry_points_build_engines_and_providers() {
    // The router and the pool get their concrete parts from `app.rs`. `chat.rs`, `bench.rs`
    // and `bench_conversation.rs` are entry points of their own commands and start an engine
    // directly; `llm/engine/mod.rs` defines `EngineHandle::spawn` in terms of its variant.
    check(
        "concrete providers or the engine loader built outside app.rs and the command modules",
        |s| {
            // Z.ai is a configuration of the OpenAI-compatible client: `zai.rs` builds one
            // inside `ZaiProvider::new`, and the client's own unit tests build it.
            [
                "app.rs",
                "chat.rs",
                "bench.rs",
                "bench_conversation.rs",
                "llm/engine/mod.rs",
                "llm/providers/zai.rs",
                "llm/providers/openai_compat.rs",
            ]
            .contains(&s.rel.as_str())
        },
        |line| {
            [
                "ZaiProvider::new",
                "OpenAiCompatProvider::new",
                "LocalProvider::new",
                "EngineHandle::spawn",
                "EngineLoader",
            ]
            .iter()
            .any(|name| line.contains(name))
        },
    );
}
