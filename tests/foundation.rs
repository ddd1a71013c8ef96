//! Foundation tests: configuration errors, database durability across restarts and
//! `kill -9`, and the server skeleton (health, token, graceful shutdown).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use my_claw::db::{self, memory};
use my_claw::domain::{ChannelKind, Role};

use crate::util::{self, run_binary, Server, ServerOptions};

fn check_config_error(args: &[&str], envs: &[(&str, &str)], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let mut all_envs = vec![("DATA_DIR", data_dir)];
    all_envs.extend_from_slice(envs);
    let out = run_binary(args, &all_envs, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?} envs {envs:?}: stderr {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line expected, got:\n{stderr}");
    assert!(lines[0].contains(expected), "expected `{expected}` in `{}`", lines[0]);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_configuration_exits_with_one_clear_line() {
    check_config_error(
        &["serve"],
        &[("BIND", "localhost:99999")],
        "BIND=localhost:99999: invalid port",
    );
    check_config_error(&["--bind", "nonsense"], &[], "BIND=nonsense: expected host:port");
    check_config_error(
        &["serve"],
        &[("DATABASE_URL", "postgres://localhost/db")],
        "DATABASE_URL=postgres://localhost/db: must start with sqlite://",
    );
    check_config_error(&["serve"], &[("HISTORY_MESSAGES", "0")], "HISTORY_MESSAGES=0");
    // Values that do not even parse are said the same way, naming the variable.
    check_config_error(&["serve"], &[("CONTEXT_SIZE", "abc")], "CONTEXT_SIZE=abc (--context-size)");
    check_config_error(&["serve"], &[("PRELOAD", "maybe")], "expected one of true, false");
    check_config_error(&["serve"], &[("MODEL_KEEP_ALIVE", "soon")], "MODEL_KEEP_ALIVE=soon");
    check_config_error(
        &["serve"],
        &[("NEXTCLOUD_URL", "https://cloud.example.org")],
        "also set NEXTCLOUD_BOT_SECRET",
    );

    check_config_error(
        &["serve"],
        &[("LOG", "info,my_claw=loud")],
        "LOG=info,my_claw=loud: invalid filter",
    );
    check_config_error(&["serve"], &[("REQUEST_HEADER_TIMEOUT", "0")], "REQUEST_HEADER_TIMEOUT=0");
    check_config_error(&["serve"], &[("REQUEST_BODY_TIMEOUT", "2d")], "must be at most 1h");
    check_config_error(&["serve"], &[("ZAI_TIMEOUT_SECS", "0")], "ZAI_TIMEOUT_SECS=0");
    // Secrets of public endpoints: one floor for both, counted after trimming.
    check_config_error(&["serve"], &[("CRON_SECRET", "a")], "CRON_SECRET: must be at least 16");
    let spaces = " ".repeat(20);
    check_config_error(
        &["serve"],
        &[("WEBCHAT_TOKEN", &spaces)],
        "WEBCHAT_TOKEN: must be at least 16 characters",
    );
    check_config_error(
        &["serve"],
        &[("WEBCHAT_TOKEN", "0123456789abcdef\u{1b}[2J")],
        "WEBCHAT_TOKEN: contains a control or non-ASCII character",
    );

    // Kernel instruction sets: a name that is none (the line says what this CPU has).
    check_config_error(
        &["serve"],
        &[("ENGINE_ISA", "avx9000")],
        "ENGINE_ISA=avx9000: must be auto or one this CPU has (portable",
    );

    // Devices: an unknown one, a bad budget, and CUDA from a binary built without it.
    check_config_error(&["serve"], &[("DEVICE", "tpu")], "DEVICE=tpu: unknown device");
    check_config_error(&["serve"], &[("GPU_MEMORY_BUDGET", "lots")], "GPU_MEMORY_BUDGET=lots");
    if !cfg!(feature = "cuda") {
        check_config_error(
            &["--device", "cuda", "serve"],
            &[],
            "DEVICE=cuda:0: this binary was built without CUDA",
        );
    }

    // Tier settings are settings like the others: one line, exit 2.
    check_config_error(&["serve"], &[("DEFAULT_TIER", "x")], "DEFAULT_TIER=x: unknown tier");
    check_config_error(
        &["serve"],
        &[("MODEL_MAIN", "zai:glm-4.7")],
        "MODEL_MAIN=zai:glm-4.7: main must be a local model",
    );
    check_config_error(&["serve"], &[("MODEL_FAST", "qwen3:3b")], "MODEL_FAST=qwen3:3b");
    check_config_error(
        &["serve"],
        &[("MODEL_SMART", "qwen3:8b-q9")],
        "MODEL_SMART=qwen3:8b-q9: `qwen3:8b-q9`: unknown quantization",
    );
    check_config_error(&["serve"], &[("MODEL_CODE", "llama3")], "MODEL_CODE=llama3");
    check_config_error(
        &["serve"],
        &[("MODEL_REASON", "/nowhere/model.gguf")],
        "MODEL_REASON=/nowhere/model.gguf: no such model file",
    );

    // A data directory that cannot be created (its parent is a regular file).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let bad_dir = file.join("data");
    let out = run_binary(&["serve"], &[("DATA_DIR", bad_dir.to_str().unwrap())], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot create directory"), "{stderr}");
}

#[test]
fn help_explains_every_option() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_binary(&["--help"], &[], dir.path());
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--bind",
        "BIND=",
        "--data-dir",
        "--database-url",
        "--models-dir",
        "--webchat-token",
        "--history-messages",
        "--model-main",
        "--zai-api-key",
        "--whatsapp-app-secret",
        "--nextcloud-bot-secret",
        "--cron-secret",
        "serve",
        "chat",
        "bench",
        "models",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

/// A model file cut short (an interrupted download) stops `serve` at start, with one line
/// naming the file and how many bytes it lacks, before the database is opened; before, the
/// server started and every answer failed with that reason. The file is the real SmolLM2
/// with its last 12345 bytes cut off, and it is also every tier's stand-in (the only GGUF in
/// `MODELS_DIR`).
#[test]
fn serve_refuses_a_truncated_model_at_start() {
    const CUT: u64 = 12345;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let original = util::smollm2_path();
    let truncated = models.join("SmolLM2-cut.gguf");
    let len = std::fs::metadata(&original).unwrap().len();
    {
        use std::io::Read;
        let mut source = std::fs::File::open(&original).unwrap().take(len - CUT);
        let mut target = std::fs::File::create(&truncated).unwrap();
        std::io::copy(&mut source, &mut target).unwrap();
    }
    let data_dir = dir.path().join("data");
    let mut serve = Command::new(util::binary());
    serve
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND", "127.0.0.1:0")
        .env("DATA_DIR", &data_dir)
        .env("MODELS_DIR", &models)
        .env("MODEL_MAIN", &truncated)
        .env("WEBCHAT_TOKEN", util::TEST_TOKEN)
        .current_dir(dir.path());
    let out = util::run_until_exit(serve, Duration::from_secs(60));
    let status = out.status;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("my-claw: error: cannot set up the model tiers: "), "{stderr}");
    assert!(last.contains(&format!("model file {}: truncated: ", truncated.display())), "{last}");
    assert!(last.contains(&format!("{CUT} bytes missing")), "{last}");
    assert!(last.contains(&format!("the file has {}", len - CUT)), "{last}");
    // Refused before anything: no data directory was made.
    assert!(!data_dir.exists(), "{stderr}");
    // `models list` says it too.
    let models_dir = models.display().to_string();
    let out = run_binary(&["models", "list"], &[("MODELS_DIR", &models_dir)], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("cannot be used: truncated: {CUT} bytes missing")),
        "{stdout}"
    );
    // Also a tier's own file outside MODELS_DIR (QA pass 11: listed as if usable).
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (empty, model) = (empty.display().to_string(), truncated.display().to_string());
    let envs = [("MODELS_DIR", empty.as_str()), ("MODEL_MAIN", model.as_str())];
    let out = run_binary(&["models", "list"], &envs, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let tier = stdout.lines().position(|l| l.trim_start().starts_with("main ")).unwrap();
    let next = stdout.lines().nth(tier + 1).unwrap_or_default();
    assert!(next.contains(&format!("cannot be used: truncated: {CUT} bytes missing")), "{stdout}");
}

/// QA pass 11: a second `serve` on a data directory another one serves from (a second
/// systemd unit, a copy started by hand on another port) is refused before it opens the
/// database. Before, it stored the first one's answer in progress as interrupted, beside
/// the real answer that came after, and ran a second scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_is_refused_and_changes_nothing() {
    let mut envs = util::smollm2_env();
    envs.push(("REPLY_MAX_TOKENS".into(), "300".into()));
    let server = tokio::task::block_in_place(|| {
        Server::start(ServerOptions { envs: envs.clone(), data_dir: None })
    });
    let client = reqwest::Client::new();
    let mut answer = client
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({"message": "Write a long story about a cat who sails around the world."}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(answer.status(), 200);
    let mut streamed = String::new();
    while !streamed.contains("\"token\"") {
        let chunk = answer.chunk().await.expect("the stream").expect("a token before the end");
        streamed.push_str(&String::from_utf8_lossy(&chunk));
    }

    let mut second = Command::new(util::binary());
    second
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND", "127.0.0.1:0")
        .env("DATA_DIR", &server.data_dir)
        .env("WEBCHAT_TOKEN", util::TEST_TOKEN)
        .envs(envs.iter().map(|(k, v)| (k, v)));
    let out = tokio::task::block_in_place(|| util::run_until_exit(second, Duration::from_secs(60)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let pid = server.child.id();
    assert_eq!(
        last,
        format!(
            "my-claw: error: another my-claw (process {pid}) is serving from {}: stop it \
             first, or give this one its own DATA_DIR",
            server.data_dir.join("my-claw.db").display()
        ),
        "{stderr}"
    );

    // Another data directory on the same database: refused the same way.
    let elsewhere = tempfile::tempdir().unwrap();
    let database = server.data_dir.join("my-claw.db");
    let mut third = Command::new(util::binary());
    third
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND", "127.0.0.1:0")
        .env("DATA_DIR", elsewhere.path())
        .env("DATABASE_URL", format!("sqlite://{}", database.display()))
        .env("WEBCHAT_TOKEN", util::TEST_TOKEN)
        .envs(envs.iter().map(|(k, v)| (k, v)));
    let out = tokio::task::block_in_place(|| util::run_until_exit(third, Duration::from_secs(60)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("another my-claw (process {pid})")), "{stderr}");

    // The first server's answer ends as it would have, alone in its conversation.
    while let Some(chunk) = answer.chunk().await.expect("the stream") {
        streamed.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(streamed.contains("\"done\""), "{streamed}");
    let (status, list) = http_get(&server, "/api/conversations", Some(&server.token)).await;
    assert_eq!(status, 200);
    let id = list["conversations"][0]["id"].as_i64().unwrap();
    let (_, messages) =
        http_get(&server, &format!("/api/conversations/{id}/messages"), Some(&server.token)).await;
    let messages = messages["messages"].as_array().unwrap();
    let shape: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["status"].as_str().unwrap()))
        .collect();
    assert_eq!(shape, [("user", "complete"), ("assistant", "complete")], "{messages:?}");
}

/// `models list`, `chat` and `bench` with a missing model create no directory: not
/// DATA_DIR, not MODELS_DIR, not the model's parent, not a cache under HOME. Before,
/// `bench` made DATA_DIR (and checked it writable) before looking at its model; it now
/// makes it only to save a report it measured. `models list` succeeds (it lists the missing
/// tiers), the others fail naming the file.
#[test]
fn commands_on_a_missing_model_create_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let path = |name: &str| root.join(name).display().to_string();
    let envs = [
        ("DATA_DIR", path("data")),
        ("MODELS_DIR", path("models")),
        ("HOME", path("home")),
        ("HF_HOME", path("hf")),
        ("XDG_CACHE_HOME", path("cache")),
    ];
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let model = "missing/model.gguf";
    let cases: [(&[&str], i32); 4] = [
        (&["models", "list"], 0),
        (&["chat", "--model", model], 1),
        (&["bench", "--model", model, "--json"], 1),
        (&["--bench", "--model", model], 1),
    ];
    for (args, code) in cases {
        let out = run_binary(args, &envs, root);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        if code != 0 {
            assert!(stderr.contains(&format!("model file {model}: cannot open")), "{stderr}");
        } else {
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("MISSING"), "{stdout}");
        }
        let left: Vec<_> = std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "{args:?} left {left:?} behind");
    }
}

/// `bench --parallel 0`, or a count no engine runs, is refused before a model is loaded
/// (QA pass 10: 0 was accepted silently, 100000 ran 36 s before failing).
#[test]
fn bench_refuses_stream_counts_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = util::smollm2_path();
    for parallel in ["0", "1,100000"] {
        let out = run_binary(
            &["bench", "--model", model.to_str().unwrap(), "--parallel", parallel],
            &[("DATA_DIR", dir.path().join("data").to_str().unwrap())],
            dir.path(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--parallel {parallel}: {stderr}");
        assert!(stderr.contains("--parallel"), "{stderr}");
    }
}

async fn open(path: &std::path::Path) -> sqlx::SqlitePool {
    db::connect(&format!("sqlite://{}", path.display())).await.expect("open db")
}

#[tokio::test]
async fn memory_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let pool = open(&path).await;
    let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "33600", None)
        .await
        .unwrap();
    memory::add_message(&pool, &memory::NewMessage::plain(conv.id, Role::User, "bonjour"))
        .await
        .unwrap();
    memory::setting_set(&pool, "persona_name", "Pince").await.unwrap();
    pool.close().await;

    let pool = open(&path).await;
    let again = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "33600", None)
        .await
        .unwrap();
    assert_eq!(again.id, conv.id);
    let history = memory::history(&pool, conv.id, 20).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].content, "bonjour");
    assert_eq!(memory::setting_get(&pool, "persona_name").await.unwrap().as_deref(), Some("Pince"));
}

const WRITER_DB_ENV: &str = "MY_CLAW_TEST_WRITER_DB";

/// Writes messages in a loop and prints the id of each one after its commit returned.
/// As a child process (the env var set) it writes until killed; as a plain test it writes
/// a short burst into its own database and checks every message is there.
#[tokio::test]
async fn durability_writer() {
    let (path, limit, _tmp) = match std::env::var(WRITER_DB_ENV) {
        Ok(path) => (std::path::PathBuf::from(path), usize::MAX, None),
        Err(_) => {
            let tmp = tempfile::tempdir().unwrap();
            (tmp.path().join("w.db"), 50, Some(tmp))
        }
    };
    let pool = open(&path).await;
    let conv = memory::get_or_create_conversation(&pool, ChannelKind::WebChat, "burst", None)
        .await
        .unwrap();
    let mut written = Vec::new();
    for i in 0..limit {
        let id = memory::add_message(
            &pool,
            &memory::NewMessage::plain(conv.id, Role::User, format!("message {i}")),
        )
        .await
        .unwrap();
        println!("committed {} {i}", id.0);
        written.push(id);
    }
    let history = memory::history(&pool, conv.id, 1000).await.unwrap();
    assert_eq!(history.iter().map(|m| m.id).collect::<Vec<_>>(), written);
}

#[tokio::test]
async fn kill_9_during_a_burst_of_writes_loses_no_committed_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("burst.db");
    // The writer is this same test binary running `durability_writer` in child mode.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "foundation::durability_writer", "--nocapture", "--test-threads=1"])
        .env(WRITER_DB_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().unwrap();
    let mut committed: Vec<(i64, String)> = Vec::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("committed ") {
            let (id, i) = rest.split_once(' ').unwrap();
            committed.push((id.parse().unwrap(), format!("message {i}")));
        }
        // Kill in the middle of the burst, never after a quiet period.
        if committed.len() >= 300 || started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let _ = child.wait();
    assert!(committed.len() >= 300, "the writer committed only {} messages", committed.len());

    let pool = open(&path).await;
    assert_eq!(db::integrity_check(&pool).await.unwrap(), "ok");
    for (id, content) in &committed {
        let msg = memory::get_message(&pool, my_claw::domain::MessageId(*id))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("committed message {id} is gone after kill -9"));
        assert_eq!(&msg.content, content);
    }
}

async fn http_get(server: &Server, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut req = client.get(server.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn server_reports_health_and_stops_gracefully() {
    let mut server = Server::start(ServerOptions { envs: util::smollm2_env(), data_dir: None });
    let (status, body) = http_get(&server, "/api/health", None).await;
    assert_eq!(status, 200);
    // Anonymous callers learn only whether it is up.
    assert_eq!(body, serde_json::json!({"status": "ok"}));

    let (status, body) = http_get(&server, "/api/health", Some(&server.token.clone())).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["database"]["ok"], true);
    // The newest embedded migration, whichever number that is.
    let newest = my_claw::db::MIGRATOR.iter().map(|m| m.version).max();
    assert_eq!(body["database"]["migration_version"].as_i64(), newest);

    let (status, _) =
        http_get(&server, "/api/conversations", Some("wrong-token-wrong-token")).await;
    assert_eq!(status, 401);

    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0), "{}", server.output());
    let output = server.output();
    assert!(output.contains("stopped"), "{output}");
    // With WEBCHAT_TOKEN set (as `Server` sets it) no token file exists: the start message
    // points at the setting, never at the file.
    assert!(output.contains("Sign in with the token set in WEBCHAT_TOKEN."), "{output}");
    assert!(!output.contains("webchat_token"), "{output}");
    assert!(!server.data_dir.join("webchat_token").exists());
}

/// Starts `my-claw serve` with a fresh data directory, `BIND=127.0.0.1:0` and no
/// `WEBCHAT_TOKEN` (so one is generated), optionally under a pseudo-terminal (`script`), and
/// returns what it printed on stdout up to the line naming the token file, and its dir.
fn first_start_stdout(on_terminal: bool) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut cmd = if on_terminal {
        // `script` runs the command on a new pseudo-terminal and copies what it writes.
        let mut cmd = Command::new("script");
        cmd.args(["-qfec", &format!("{} serve", util::binary()), "/dev/null"]);
        cmd
    } else {
        let mut cmd = Command::new(util::binary());
        cmd.arg("serve");
        cmd
    };
    let mut child = cmd
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATA_DIR", &data_dir)
        .env("BIND", "127.0.0.1:0")
        .env("MODELS_DIR", dir.path())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn my-claw");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut ready = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            ready |= util::parse_ready_line(line.trim()).is_some();
            // The sign-in lines after the ready line end with the one naming the file.
            if ready && line.contains("webchat_token") {
                break;
            }
        }
        let _ = tx.send(seen);
    });
    let seen = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let seen = seen.expect("my-claw printed its ready line within 60 s");
    (seen, dir)
}

#[test]
fn sign_in_link_goes_to_a_terminal_only() {
    // Piped (systemd, a log file): the file's path, never the token.
    let (out, dir) = first_start_stdout(false);
    let saved_path = dir.path().join("data").join("webchat_token");
    let token = std::fs::read_to_string(&saved_path).unwrap().trim().to_string();
    assert_eq!(token.len(), 64, "256 bits of randomness, hex");
    assert!(!out.contains(&token), "the token reached a pipe:\n{out}");
    assert!(!out.contains("?token="), "{out}");
    assert!(out.contains(&saved_path.display().to_string()), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&saved_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    assert!(!out.contains("?code="), "a sign-in code reached a pipe:\n{out}");

    // On a terminal: a ready-to-click link carrying a one-time code, never the token (a
    // link stays in the browser's history).
    let (out, dir) = first_start_stdout(true);
    let saved_path = dir.path().join("data").join("webchat_token");
    let token = std::fs::read_to_string(&saved_path).unwrap().trim().to_string();
    assert!(!out.contains(&token), "the token reached the terminal:\n{out}");
    let line = out.lines().find(|l| l.contains("?code=")).unwrap_or_else(|| panic!("{out}"));
    let code = line[line.find("?code=").unwrap() + 6..].trim();
    assert_eq!(code.len(), 32, "{line}");
    assert!(code.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    assert!(out.contains(&saved_path.display().to_string()), "{out}");
}

/// `my-claw sign-in-link` writes a one-time code into the database of the running server;
/// the page's exchange (`POST /api/sign-in`) gives the token once, then refuses the code.
/// The command needs neither the token (none is set, and the server keeps no token file)
/// nor a request to the server, and a mistyped DATA_DIR is said, never created.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_link_signs_in_once() {
    let server = tokio::task::block_in_place(|| Server::start(ServerOptions::default()));
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-data");
    let bind = server.addr.to_string();
    let data_dir = server.data_dir.display().to_string();
    // The server got its token from WEBCHAT_TOKEN: there is no token file to read either.
    assert!(!server.data_dir.join("webchat_token").exists());
    let run = |data_dir: &str| {
        let envs = [("BIND", bind.as_str()), ("DATA_DIR", data_dir)];
        tokio::task::block_in_place(|| run_binary(&["sign-in-link"], &envs, tmp.path()))
    };
    let out = run(&data_dir);
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(out.status.success(), "{stdout} {stderr}");
    let prefix = format!("http://{bind}/?code=");
    let code = stdout.strip_prefix(&prefix).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(code.len(), 32, "{stdout}");
    assert!(!stdout.contains(&server.token));
    assert_eq!(stderr, "(it signs one browser in, once, within 10 minutes)");

    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let redeem = |code: &str| {
        client.post(server.url("/api/sign-in")).json(&serde_json::json!({ "code": code })).send()
    };
    let first = redeem(code).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["cache-control"], "no-store");
    let body: serde_json::Value = first.json().await.unwrap();
    assert_eq!(body["token"], server.token.as_str());
    let again = redeem(code).await.unwrap();
    assert_eq!(again.status(), 401);
    let body: serde_json::Value = again.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("already used or has expired"),
        "{body}"
    );
    // Issuing over HTTP needs the token, and its codes are spent the same way.
    let anonymous = client.post(server.url("/api/sign-in/codes")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let issued = client
        .post(server.url("/api/sign-in/codes"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(issued.status(), 200);
    assert_eq!(issued.headers()["cache-control"], "no-store");
    let issued: serde_json::Value = issued.json().await.unwrap();
    assert_eq!(issued["expires_in_seconds"], 600);
    let issued = issued["code"].as_str().unwrap().to_string();
    assert_eq!(redeem(&issued).await.unwrap().status(), 200);
    assert_eq!(redeem(&issued).await.unwrap().status(), 401);

    // A mistyped DATA_DIR: one line that says to start my-claw, and nothing created.
    let out = run(missing.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("there is no database at"), "{stderr}");
    assert!(stderr.contains("start my-claw once"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!missing.exists(), "sign-in-link created the data directory");

    // `backup` reads a database: a mistyped DATA_DIR is said, not created.
    let backup = tmp.path().join("copy.db");
    let out = tokio::task::block_in_place(|| {
        run_binary(
            &["backup", backup.to_str().unwrap()],
            &[("DATA_DIR", missing.to_str().unwrap())],
            tmp.path(),
        )
    });
    assert!(!out.status.success());
    assert!(!missing.exists(), "backup created the data directory");
}

/// With my-claw stopped, another local user can take its port. `sign-in-link` sends that
/// listener nothing (before, it sent the token as a bearer to whatever answered on BIND):
/// it writes its code into the database, says no server is running, and the code signs in
/// once my-claw is started.
#[tokio::test(flavor = "multi_thread")]
async fn sign_in_link_sends_nothing_to_whatever_listens_on_bind() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // A data directory a server has used and left: its database and its lock file.
    let server = tokio::task::block_in_place(|| {
        Server::start(ServerOptions { envs: Vec::new(), data_dir: Some(data_dir.clone()) })
    });
    drop(server);
    assert!(data_dir.join("my-claw.db.lock").exists());

    let (impostor, addr) = util::bound_listener();
    let bind = addr.to_string();
    let out = tokio::task::block_in_place(|| {
        run_binary(
            &["sign-in-link"],
            &[
                ("BIND", bind.as_str()),
                ("DATA_DIR", data_dir.to_str().unwrap()),
                // What the command used to send: it must not go anywhere.
                ("WEBCHAT_TOKEN", util::TEST_TOKEN),
            ],
            dir.path(),
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // A connection the command made, even one it closed at once, waits in the listener's
    // queue: anything it sent would be there to read.
    impostor.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match impostor.accept() {
            Ok((mut stream, from)) => {
                use std::io::Read;
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut received = Vec::new();
                let _ = stream.read_to_end(&mut received);
                panic!(
                    "sign-in-link connected to the listener on BIND from {from} and sent:\n{}",
                    String::from_utf8_lossy(&received)
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let code = stdout
        .strip_prefix(&format!("http://{bind}/?code="))
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string();
    assert!(stderr.contains("no my-claw is serving from"), "{stderr}");
    assert!(stderr.contains("if my-claw is started within 10 minutes"), "{stderr}");
    assert!(!stdout.contains(util::TEST_TOKEN) && !stderr.contains(util::TEST_TOKEN));

    // Started within the ten minutes (on a port of its own), my-claw takes the code once.
    let server = tokio::task::block_in_place(|| {
        Server::start(ServerOptions { envs: Vec::new(), data_dir: Some(data_dir.clone()) })
    });
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let redeem = || {
        client.post(server.url("/api/sign-in")).json(&serde_json::json!({ "code": code })).send()
    };
    let first = redeem().await.unwrap();
    assert_eq!(first.status(), 200);
    let body: serde_json::Value = first.json().await.unwrap();
    assert_eq!(body["token"], server.token.as_str());
    assert_eq!(redeem().await.unwrap().status(), 401);
}

/// A database of an older my-claw (before the sign-in table) is not migrated by
/// `sign-in-link`: an older server may be serving from it. The command says to start this
/// version, and leaves the file as it was.
#[tokio::test(flavor = "multi_thread")]
async fn sign_in_link_leaves_an_older_database_untouched() {
    use std::borrow::Cow;
    use std::str::FromStr;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my-claw.db");
    let url = format!("sqlite://{}", path.display());
    let older = sqlx::migrate::Migrator {
        migrations: Cow::Owned(
            db::MIGRATOR.iter().filter(|m| m.version < 12).cloned().collect::<Vec<_>>(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    let options =
        sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    older.run(&pool).await.unwrap();
    pool.close().await;
    let before = std::fs::read(&path).unwrap();

    let out = tokio::task::block_in_place(|| {
        run_binary(
            &["sign-in-link"],
            &[("DATA_DIR", dir.path().to_str().unwrap()), ("BIND", "127.0.0.1:9")],
            dir.path(),
        )
    });
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is at migration 11 and this my-claw needs"), "{stderr}");
    assert!(stderr.contains("start (or restart) my-claw with this version once"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read(&path).unwrap(), before, "the database changed");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["my-claw.db"]);
}

/// At most 16 sign-in links work at once. The 17th cancels the oldest unused one, whose
/// redeem would then say "already used or has expired": the command says it cancelled it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sign_in_link_beyond_the_bound_says_it_cancelled_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(&dir.path().join("my-claw.db")).await;
    let mut live = Vec::new();
    for _ in 0..db::sign_in::MAX_LIVE_CODES {
        live.push(db::sign_in::issue(&pool, Duration::from_secs(600)).await.unwrap());
    }
    let out = tokio::task::block_in_place(|| {
        run_binary(
            &["sign-in-link"],
            &[("DATA_DIR", dir.path().to_str().unwrap()), ("BIND", "127.0.0.1:9")],
            dir.path(),
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("http://127.0.0.1:9/?code="), "{stdout}");
    let cancelled: Vec<&str> = stderr.lines().filter(|l| l.contains("cancelled")).collect();
    assert_eq!(
        cancelled,
        ["(this cancelled the oldest unused link: at most 16 work at once)"],
        "{stderr}"
    );
    assert!(!db::sign_in::redeem(&pool, live[0].expose()).await.unwrap(), "the oldest went");
    assert!(db::sign_in::redeem(&pool, live[1].expose()).await.unwrap());

    // With room (one was just spent), a new link cancels nothing and says nothing of it.
    let out = tokio::task::block_in_place(|| {
        run_binary(
            &["sign-in-link"],
            &[("DATA_DIR", dir.path().to_str().unwrap()), ("BIND", "127.0.0.1:9")],
            dir.path(),
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("cancelled"), "{stderr}");
    pool.close().await;
}

/// A database path that cannot be looked at (for a user who cannot read DATA_DIR:
/// permission denied; here, as the tests may run as root, a DATA_DIR that is a regular
/// file: ENOTDIR) is said with its cause, not as a missing database to start my-claw for.
#[test]
fn sign_in_link_says_why_it_cannot_read_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("data");
    std::fs::write(&not_a_dir, b"").unwrap();
    let out = run_binary(
        &["sign-in-link"],
        &[("DATA_DIR", not_a_dir.to_str().unwrap()), ("BIND", "127.0.0.1:9")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let database = not_a_dir.join("my-claw.db");
    assert!(stderr.contains(&format!("cannot read {}: ", database.display())), "{stderr}");
    assert!(!stderr.contains("start my-claw once"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn data_dir_and_database_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let files = ["my-claw.db", "my-claw.db-wal", "my-claw.db-shm"];
    let check = |data_dir: &std::path::Path, when: &str| {
        assert_eq!(mode(data_dir), 0o700, "{when}: data dir");
        for file in files {
            assert_eq!(mode(&data_dir.join(file)), 0o600, "{when}: {file}");
        }
    };
    // A fresh data directory, under the common umask 022.
    let options = ServerOptions { envs: Vec::new(), data_dir: Some(data_dir.clone()) };
    let mut server = tokio::task::block_in_place(|| Server::start_with_umask(options, 0o022));
    check(&data_dir, "fresh");
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0), "{}", server.output());

    // Left readable by an older version: narrowed again at the next start.
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in files {
        let path = data_dir.join(file);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let options = ServerOptions { envs: Vec::new(), data_dir: Some(data_dir.clone()) };
    let _server = tokio::task::block_in_place(|| Server::start_with_umask(options, 0o022));
    check(&data_dir, "restarted");
}

/// `ENGINE_ISA` lowers the kernels' instruction set for the whole process: the bench on the
/// real SmolLM2 reports the one it ran (portable here, whatever the CPU has), and `auto`
/// reports the best this CPU has.
#[test]
fn engine_isa_chooses_the_kernels_instruction_set() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let model = util::smollm2_path();
    let best = my_claw::llm::engine::kernels::Isa::detect().name();
    for (setting, expected) in [("portable", "portable"), ("auto", best)] {
        let out = run_binary(
            &[
                "bench",
                "--model",
                model.to_str().unwrap(),
                "--prompt-tokens",
                "8",
                "--gen-tokens",
                "2",
                "--runs",
                "1",
                "--turns",
                "0",
                "--json",
            ],
            &[("DATA_DIR", data_dir.to_str().unwrap()), ("ENGINE_ISA", setting)],
            dir.path(),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{setting}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("bench JSON");
        assert_eq!(report["isa"], expected, "ENGINE_ISA={setting}: {stdout}");
        assert_eq!(report["decode_path"], "kernels", "{stdout}");
    }
}

/// `GPU_DECODE` (the GPU's decode path) takes `fused`, `fused-own` or `ops`: anything else
/// is refused at start with exit code 2 and the setting named, before any model is touched.
#[test]
fn gpu_decode_setting_is_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let out = run_binary(
        &["bench", "--model", "no-such.gguf", "--json"],
        &[("DATA_DIR", data_dir.to_str().unwrap()), ("GPU_DECODE", "sometimes")],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("GPU_DECODE=sometimes: must be fused, fused-own, fused-own-pdl or ops"),
        "{stderr}"
    );
}
