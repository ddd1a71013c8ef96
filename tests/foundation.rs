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
    check_config_error(&["serve"], &[("MODEL_KEEP_ALIVE", "soon")], "MODEL_KEEP_ALIVE=soon");
    check_config_error(
        &["serve"],
        &[("NEXTCLOUD_URL", "https://cloud.example.org")],
        "also set NEXTCLOUD_BOT_SECRET",
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
    assert!(server.output().contains("stopped"), "{}", server.output());
}

#[test]
fn webchat_token_is_generated_once_and_saved_private() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = util::free_port();
    let mut child = Command::new(util::binary())
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATA_DIR", &data_dir)
        .env("BIND", format!("127.0.0.1:{port}"))
        .env("MODELS_DIR", dir.path())
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut link = None;
    let started = Instant::now();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(pos) = line.find("?token=") {
            link = Some(line[pos + 7..].trim().to_string());
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let token = link.expect("a ready-to-click link with the token is printed on first start");
    assert_eq!(token.len(), 64, "256 bits of randomness, hex");
    let saved_path = data_dir.join("webchat_token");
    assert_eq!(std::fs::read_to_string(&saved_path).unwrap().trim(), token);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&saved_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
