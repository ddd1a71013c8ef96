//! The real browser test: Debian's headless Chromium, driven through chromedriver with the
//! W3C WebDriver protocol (plain JSON over HTTP), uses the WebChat page of the real binary
//! with the real SmolLM2 model. It signs in, watches tokens stream in, reloads, switches
//! conversations, edits the persona, stops an answer, and saves `target/webchat.png`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{self, Server, ServerOptions};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL: &str = "apt-get update && apt-get install -y chromium chromium-driver \
     (or run scripts/install-deps.sh test)";
/// The W3C name of an element reference in WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const ENTER: &str = "\u{E007}";
/// Pressed once it holds Shift down for the next keys; pressed again it releases it.
const SHIFT: &str = "\u{E008}";

/// A prompt that keeps SmolLM2 writing until the reply limit (REPLY_MAX_TOKENS) most times.
const LONG_PROMPT: &str = "Write a long story about a cat who sails around the world.";
/// The reply limit of the server under test: long enough to watch an answer stream and to
/// stop it, short enough that the whole test stays quick on a busy 2-core machine.
const REPLY_MAX_TOKENS: &str = "48";

/// The port in chromedriver's "ChromeDriver was started successfully on port N." line. The
/// rest of its output is drained so the pipe never fills.
async fn driver_port(driver: &mut Child) -> u16 {
    use std::io::BufRead;
    let stdout = driver.stdout.take().expect("chromedriver stdout is piped");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let port = line
                .strip_prefix("ChromeDriver was started successfully on port ")
                .and_then(|rest| rest.trim_end_matches('.').parse::<u16>().ok());
            if let Some(port) = port {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(port);
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(20), rx).await {
        Ok(Ok(port)) => port,
        Ok(Err(_)) => panic!("chromedriver exited without saying its port"),
        Err(_) => panic!("chromedriver did not say its port within 20 s"),
    }
}

/// A chromedriver process and one browser session. Dropping it ends both, and kills any
/// Chromium process left with this session's profile directory.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for binary in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: the browser test needs Debian's Chromium. Install it with: {INSTALL}"
            );
        }
        // Port 0: chromedriver binds a free port itself and says which, so no other test
        // can take the port between our choosing it and chromedriver binding it.
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}. Install: {INSTALL}"));
        let port = driver_port(&mut driver).await;
        let profile = tempfile::tempdir().expect("profile dir");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser { http, base, session: String::new(), driver, profile };

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser.http.get(format!("{}/status", browser.base)).send().await;
            if let Ok(response) = ready {
                let status: Value = response.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile_arg = format!("--user-data-dir={}", browser.profile.path().display());
        let downloads = browser.downloads().display().to_string();
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", "--disable-dev-shm-usage",
                            "--window-size=1280,860", profile_arg,
                        ],
                        "prefs": {
                            "download.default_directory": downloads,
                            "download.prompt_for_download": false,
                        }
                    }
                }
            }
        });
        let response = browser
            .http
            .post(format!("{}/session", browser.base))
            .json(&capabilities)
            .send()
            .await
            .expect("new session");
        let body: Value = response.json().await.expect("session JSON");
        browser.session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {body}"))
            .to_string();
        browser
    }

    /// One WebDriver command; panics with the driver's message on failure.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        match self.try_command(method.clone(), path, body).await {
            Ok(value) => value,
            Err(message) => panic!("WebDriver {method} {path}: {message}"),
        }
    }

    async fn try_command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/session/{}{}", self.base, self.session, path);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("{status} {value}"));
        }
        Ok(value["value"].clone())
    }

    async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn refresh(&self) {
        self.command(reqwest::Method::POST, "/refresh", Some(json!({}))).await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        found[ELEMENT_KEY].as_str().unwrap_or_else(|| panic!("no element {css}")).to_string()
    }

    /// Clicks an element. The page re-renders lists when live events arrive, so an element
    /// found a moment ago can be replaced before the click: find it again then.
    async fn click(&self, css: &str) {
        let mut last_error = String::new();
        for _ in 0..20 {
            let id = self.find(css).await;
            let path = format!("/element/{id}/click");
            match self.try_command(reqwest::Method::POST, &path, Some(json!({}))).await {
                Ok(_) => return,
                Err(message) if message.contains("stale element") => last_error = message,
                Err(message) => panic!("click {css}: {message}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("click {css}: the element kept being replaced: {last_error}");
    }

    /// Types into an element as a user would (key events, so Enter really sends).
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn clear(&self, css: &str) {
        let id = self.find(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/clear"), Some(json!({}))).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Polls `script` until it returns something truthy; returns that value.
    async fn wait_for(&self, what: &str, script: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.js(script).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    async fn screenshot(&self, path: &Path) {
        let data = self.command(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64_decode(data.as_str().expect("base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    async fn set_window(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    /// Turns the mouse wheel over an element by `delta_y` pixels (negative: up), as a
    /// wheel or a touchpad does.
    async fn wheel(&self, css: &str, delta_y: i64) {
        let id = self.find(css).await;
        let scroll = json!({ "type": "scroll", "x": 0, "y": 0, "deltaX": 0, "deltaY": delta_y,
            "duration": 0, "origin": { ELEMENT_KEY: id } });
        let actions =
            json!({ "actions": [{ "type": "wheel", "id": "wheel", "actions": [scroll] }] });
        self.command(reqwest::Method::POST, "/actions", Some(actions)).await;
    }

    /// Presses and releases each key of `keys` where the focus is, as a keyboard does
    /// (WebDriver key codes such as `ENTER` included).
    async fn press(&self, keys: &str) {
        let mut steps = Vec::new();
        for key in keys.chars() {
            steps.push(json!({ "type": "keyDown", "value": key.to_string() }));
            steps.push(json!({ "type": "keyUp", "value": key.to_string() }));
        }
        let actions = json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": steps }] });
        self.command(reqwest::Method::POST, "/actions", Some(actions)).await;
    }

    /// Where the browser saves downloads (inside this session's profile directory).
    fn downloads(&self) -> PathBuf {
        self.profile.path().join("downloads")
    }

    /// A Chrome DevTools Protocol command through chromedriver (media emulation, downloads).
    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
        .await
    }

    async fn quit(&self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium processes of this session only: those started with our profile dir.
        let marker = self.profile.path().display().to_string();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                }
            }
        }
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in text.bytes() {
        let Some(value) = ALPHABET.iter().position(|&c| c == byte) else {
            continue; // padding and line breaks
        };
        acc = (acc << 6) | value as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The last answer bubble as the page shows it.
const LAST_ANSWER: &str = "const all = document.querySelectorAll('#messages .msg.assistant'); \
    const b = all[all.length - 1]; if (!b) return null; \
    return { state: b.dataset.state || '', text: b.querySelector('.content').textContent, \
             prompt: Number(b.dataset.promptTokens || 0), meta: b.querySelector('.meta').textContent, \
             count: all.length };";

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").to_path_buf()
}

async fn api(server: &Server, path: &str) -> Value {
    reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(&server.token)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("API call")
        .json()
        .await
        .expect("API JSON")
}

/// The server with the real model and `extra` settings, over `data_dir` (seeded by the
/// test) or a fresh one.
async fn start_server(data_dir: Option<&Path>, extra: &[(&str, &str)]) -> Server {
    let mut envs = util::smollm2_env();
    envs.extend(extra.iter().map(|(name, value)| (name.to_string(), value.to_string())));
    let data_dir = data_dir.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || Server::start(ServerOptions { envs, data_dir }))
        .await
        .expect("server start")
}

async fn send_message(browser: &Browser, text: &str) {
    browser.type_into("#input", text).await;
    browser.type_into("#input", ENTER).await;
}

/// Sends `LONG_PROMPT` and waits until its answer streams some text (or has already ended:
/// SmolLM2 sometimes ends a story in a few tokens, which callers check).
async fn send_long_prompt(browser: &Browser) {
    // The answer looked for is a new bubble: the one before it is `done` already.
    let before =
        browser.js("return document.querySelectorAll('#messages .msg.assistant').length;").await;
    send_message(browser, LONG_PROMPT).await;
    let script = format!(
        "{LAST_ANSWER_FN} \
         if (document.querySelectorAll('#messages .msg.assistant').length <= {before}) return false; \
         const a = lastAnswer(); \
         return a && (a.state === 'streaming' && a.text.length > 2 || a.state === 'done');"
    );
    browser.wait_for("tokens of the long answer", &script, Duration::from_secs(60)).await;
}

async fn wait_answer_state(browser: &Browser, states: &[&str], limit: Duration) -> Value {
    let states = serde_json::to_string(states).unwrap();
    let script = format!("{LAST_ANSWER_FN} const a = lastAnswer(); return a && {states}.includes(a.state) ? a : null;");
    browser.wait_for(&format!("an answer in state {states}"), &script, limit).await
}

const LAST_ANSWER_FN: &str = "function lastAnswer() { \
    const all = document.querySelectorAll('#messages .msg.assistant'); \
    const b = all[all.length - 1]; if (!b) return null; \
    return { state: b.dataset.state || '', text: b.querySelector('.content').textContent, \
             prompt: Number(b.dataset.promptTokens || 0), meta: b.querySelector('.meta').textContent }; }";

/// The browser tests each start a server with the real model and a Chromium: one at a time,
/// so that they do not fight over the cores (and their timing bounds stay meaningful).
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn webchat_in_headless_chromium_with_the_real_model() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let server =
        start_server(None, &[("REPLY_MAX_TOKENS", REPLY_MAX_TOKENS), ("CONTEXT_SIZE", "4096")])
            .await;
    let browser = Browser::start().await;

    // 1. Sign in: a wrong token is refused and asked again; the right one opens the page.
    browser.goto(&server.url("/")).await;
    browser
        .wait_for(
            "the token dialog",
            "return !document.getElementById('token-dialog').hidden;",
            Duration::from_secs(20),
        )
        .await;
    browser.type_into("#token-input", "not-the-right-token-000000").await;
    browser.click("#token-submit").await;
    browser
        .wait_for(
            "the bad-token message",
            "return !document.getElementById('token-dialog').hidden && \
             document.getElementById('token-reason').textContent.includes('refused');",
            Duration::from_secs(20),
        )
        .await;
    browser.type_into("#token-input", &server.token).await;
    browser.click("#token-submit").await;
    browser
        .wait_for(
            "the page to be ready",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('token-dialog').hidden && \
             document.getElementById('model-select').options.length === 5;",
            Duration::from_secs(20),
        )
        .await;
    let stored = browser.js("return localStorage.getItem('my-claw.token');").await;
    assert_eq!(stored, json!(server.token), "the token is kept in the browser");
    let models = browser
        .js("return [...document.getElementById('model-select').options].map(o => o.value + ':' + o.disabled);")
        .await;
    assert_eq!(
        models,
        json!(["fast:false", "smart:false", "main:false", "code:false", "reason:false"])
    );
    browser
        .wait_for(
            "the live events stream",
            "return document.getElementById('connection').dataset.state === 'live';",
            Duration::from_secs(20),
        )
        .await;

    // 2. Send with Enter and watch the tokens arrive before the answer is complete.
    let sent_at = Instant::now();
    send_message(&browser, LONG_PROMPT).await;
    let mut streaming_lengths: Vec<usize> = Vec::new();
    let final_answer = loop {
        let answer = browser.js(LAST_ANSWER).await;
        if !answer.is_null() {
            let state = answer["state"].as_str().unwrap_or_default().to_string();
            let length = answer["text"].as_str().unwrap_or_default().chars().count();
            if state == "streaming" && length > 0 && streaming_lengths.last() != Some(&length) {
                streaming_lengths.push(length);
            }
            if state == "done" || state == "error" {
                break answer;
            }
        }
        assert!(sent_at.elapsed() < Duration::from_secs(60), "no complete answer within 60 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(final_answer["state"], "done", "{final_answer}");
    let final_length = final_answer["text"].as_str().unwrap().chars().count();
    assert!(
        streaming_lengths.len() >= 2,
        "the page showed the answer growing while it streamed: {streaming_lengths:?}"
    );
    assert!(
        *streaming_lengths.last().unwrap() < final_length || streaming_lengths.len() >= 3,
        "partial text came before the complete answer: {streaming_lengths:?} then {final_length}"
    );
    let meta = final_answer["meta"].as_str().unwrap();
    assert!(
        meta.contains("main") && meta.contains("SmolLM2"),
        "the answering model is shown: {meta}"
    );
    assert!(meta.contains("on this machine"), "{meta}");
    let first_text = final_answer["text"].as_str().unwrap().to_string();
    let first_hash = browser.js("return location.hash;").await;
    assert!(first_hash.as_str().unwrap().starts_with("#c="), "{first_hash}");

    // 3. Reload: the history is shown again, with the same conversation open.
    browser.refresh().await;
    browser
        .wait_for(
            "the history after reload",
            "return document.documentElement.dataset.ready === 'true' && \
             document.querySelectorAll('#messages .msg').length === 2;",
            Duration::from_secs(20),
        )
        .await;
    let reloaded = browser.js(LAST_ANSWER).await;
    assert_eq!(reloaded["text"].as_str().unwrap(), first_text, "the stored answer is shown");
    assert!(reloaded["meta"].as_str().unwrap().contains("SmolLM2"));
    let user_text = browser
        .js("return document.querySelector('#messages .msg.user .content').textContent;")
        .await;
    assert_eq!(user_text, json!(LONG_PROMPT));

    // 4. A second conversation, then switch back to the first one.
    browser.click("#new-chat").await;
    browser
        .wait_for(
            "an empty chat",
            "return document.querySelectorAll('#messages .msg').length === 0;",
            Duration::from_secs(5),
        )
        .await;
    // Shift+Enter makes a new line and sends nothing.
    browser.type_into("#input", &format!("one{SHIFT}{ENTER}{SHIFT}two")).await;
    let draft = browser.js("return document.getElementById('input').value;").await;
    assert_eq!(draft, json!("one\ntwo"));
    assert_eq!(browser.js("return document.querySelectorAll('#messages .msg').length;").await, 0);
    browser.clear("#input").await;
    send_message(&browser, "Hello!").await;
    let hello = wait_answer_state(&browser, &["done"], Duration::from_secs(60)).await;
    let default_prompt_tokens = hello["prompt"].as_u64().unwrap();
    assert!(default_prompt_tokens > 0, "{hello}");
    browser
        .wait_for(
            "two conversations in the list",
            "return document.querySelectorAll('#conversation-list li').length === 2;",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#conversation-list li:nth-child(2) button").await;
    browser
        .wait_for(
            "the first conversation",
            &format!(
                "return document.querySelector('#messages .msg.user .content')?.textContent === {};",
                json!(LONG_PROMPT)
            ),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(browser.js("return location.hash;").await, first_hash);
    browser.click("#conversation-list li:nth-child(1) button").await;
    browser
        .wait_for(
            "the second conversation",
            "return document.querySelector('#messages .msg.user .content')?.textContent === 'Hello!';",
            Duration::from_secs(10),
        )
        .await;

    // 5. Edit the persona; the next prompt changes (it is longer by the new system prompt,
    //    and it is what the server stores).
    browser.click("#toggle-persona").await;
    browser
        .wait_for(
            "the persona form",
            "return document.getElementById('persona-name').value === 'Claw';",
            Duration::from_secs(10),
        )
        .await;
    browser.clear("#persona-name").await;
    browser.type_into("#persona-name", "Zorblax").await;
    browser.clear("#persona-prompt").await;
    let new_prompt = "You are {name}, the keeper of an old lighthouse on a windy island \
        in the far north. Every answer you give mentions the lighthouse, the grey sea, the \
        gulls and the puffins that nest on the cliffs, and the weather of the day, which is \
        usually rain and a strong westerly wind. You speak calmly and kindly, like someone \
        who has spent forty winters alone with the sea, and you always sign your answers \
        with your name and the words: from the lighthouse.";
    browser.type_into("#persona-prompt", new_prompt).await;
    browser.click("#persona-save").await;
    browser
        .wait_for(
            "the persona to be saved",
            "return document.getElementById('persona-status').textContent.startsWith('Saved');",
            Duration::from_secs(10),
        )
        .await;
    let persona = api(&server, "/api/settings/persona").await;
    assert_eq!(persona["persona_name"], "Zorblax");
    assert_eq!(persona["system_prompt"], new_prompt);
    browser.click("#persona-close").await;
    browser.click("#new-chat").await;
    send_message(&browser, "Hello!").await;
    let persona_answer = wait_answer_state(&browser, &["done"], Duration::from_secs(60)).await;
    let persona_prompt_tokens = persona_answer["prompt"].as_u64().unwrap();
    assert!(
        persona_prompt_tokens > default_prompt_tokens + 40,
        "the new system prompt is in the next prompt: {default_prompt_tokens} → {persona_prompt_tokens} tokens"
    );

    // 6. Stop mid-answer: the page shows it stopped, the server stored a partial answer and
    //    the engine is free for the next message at once. SmolLM2 sometimes ends a story in
    //    a few tokens; on a fast machine that can beat the click, so try up to 3 times,
    //    again in a new chat (in one that holds a short story already, SmolLM2 writes the
    //    same short one again).
    let mut stopped = Value::Null;
    for attempt in 0..3 {
        if attempt > 0 {
            browser.click("#new-chat").await;
        }
        send_long_prompt(&browser).await;
        let stop = browser.find("#stop").await;
        let _ = browser
            .try_command(reqwest::Method::POST, &format!("/element/{stop}/click"), Some(json!({})))
            .await;
        // A click that came too late lets the answer run to its end: under the whole
        // suite's load that can take longer than the stop itself, so wait as long as a
        // whole answer may take, then try again.
        stopped =
            wait_answer_state(&browser, &["stopped", "done", "error"], Duration::from_secs(60))
                .await;
        if stopped["state"] == "stopped" {
            break;
        }
    }
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped["meta"].as_str().unwrap().contains("stopped before the end"), "{stopped}");
    let hash = browser.js("return location.hash;").await;
    let conversation_id: i64 = hash.as_str().unwrap().trim_start_matches("#c=").parse().unwrap();
    let history = api(&server, &format!("/api/conversations/{conversation_id}/messages")).await;
    let last = history["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "partial", "{last}");
    let after_stop = Instant::now();
    send_message(&browser, "Thanks!").await;
    wait_answer_state(&browser, &["done"], Duration::from_secs(30)).await;
    let after = api(&server, &format!("/api/conversations/{conversation_id}/messages")).await;
    let after = after["messages"].as_array().unwrap().clone();
    assert_eq!(after[after.len() - 3]["status"], "partial", "{after:?}");
    assert_eq!(after.last().unwrap()["status"], "complete", "{after:?}");
    assert!(after_stop.elapsed() < Duration::from_secs(30), "the engine answered after the stop");

    // 7. A message stored elsewhere (another client here; cron jobs in production) shows
    //    up in the open page without a reload, through the live events stream.
    let response = reqwest::Client::new()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({"conversation_id": conversation_id, "message": "Sent from elsewhere"}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(response.status(), 200);
    // Leaving right away cancels that answer; the stored user message is what we watch for.
    drop(response);
    browser
        .wait_for(
            "the message from elsewhere in the open page",
            "return [...document.querySelectorAll('#messages .msg.user .content')]
                .some(e => e.textContent === 'Sent from elsewhere');",
            Duration::from_secs(20),
        )
        .await;

    // 8. A sign-in link (`?token=`) signs in and leaves the address bar clean.
    browser.js("localStorage.clear(); return true;").await;
    browser.goto(&server.url(&format!("/?token={}", server.token))).await;
    browser
        .wait_for(
            "sign-in through the link",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('token-dialog').hidden;",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(browser.js("return location.search;").await, json!(""));
    assert_eq!(
        browser.js("return localStorage.getItem('my-claw.token');").await,
        json!(server.token)
    );

    // 8b. A one-time sign-in link (`?code=`, what `my-claw` prints on a terminal and
    //     `my-claw sign-in-link` makes) signs in while the address never holds the token;
    //     opened again, it says it was used, and the address bar is clean either way.
    let issued: Value = reqwest::Client::new()
        .post(server.url("/api/sign-in/codes"))
        .bearer_auth(&server.token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("POST /api/sign-in/codes")
        .json()
        .await
        .expect("a code");
    let link = server.url(&format!("/?code={}", issued["code"].as_str().expect("code")));
    browser.js("localStorage.clear(); return true;").await;
    browser.goto(&link).await;
    browser
        .wait_for(
            "sign-in through the one-time link",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('token-dialog').hidden;",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(browser.js("return location.search;").await, json!(""));
    assert_eq!(
        browser.js("return localStorage.getItem('my-claw.token');").await,
        json!(server.token)
    );
    browser.js("localStorage.clear(); return true;").await;
    browser.goto(&link).await;
    browser
        .wait_for(
            "the sign-in dialog saying the link was used",
            "return !document.getElementById('token-dialog').hidden && \
             document.getElementById('token-reason').textContent.includes('already used');",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(browser.js("return location.search;").await, json!(""));
    browser.goto(&server.url(&format!("/?token={}", server.token))).await;
    browser
        .wait_for(
            "signed in again",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('token-dialog').hidden;",
            Duration::from_secs(20),
        )
        .await;

    // Model output is untrusted: the page's Markdown renderer keeps HTML and script URLs as
    // text while still formatting the safe subset.
    let rendered = browser
        .js(
            "const div = document.createElement('div'); \
             window.__pwned = 0; \
             myClaw.renderMarkdown(div, '<img src=x onerror=\"window.__pwned=1\"> **bold** \
             [click](javascript:window.__pwned=2) `<b>code</b>`\\n\\n- item\\n\\n```\\n<script>x</script>\\n```'); \
             document.body.appendChild(div); \
             const out = { imgs: div.querySelectorAll('img, script, b').length, \
               strong: div.querySelector('strong')?.textContent, \
               links: div.querySelectorAll('a').length, \
               code: div.querySelector('p code')?.textContent, \
               pre: div.querySelector('pre code')?.textContent, \
               items: div.querySelectorAll('ul li').length, \
               text: div.textContent }; \
             div.remove(); return out;",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(browser.js("return window.__pwned;").await, json!(0), "{rendered}");
    assert_eq!(rendered["imgs"], 0, "{rendered}");
    assert_eq!(rendered["links"], 0, "{rendered}");
    assert_eq!(rendered["strong"], "bold", "{rendered}");
    assert_eq!(rendered["code"], "<b>code</b>", "{rendered}");
    assert_eq!(rendered["pre"], "<script>x</script>", "{rendered}");
    assert_eq!(rendered["items"], 1, "{rendered}");
    assert!(rendered["text"].as_str().unwrap().contains("<img src=x"), "{rendered}");

    // 9. Screenshots: desktop, and a phone-sized window.
    let target = target_dir();
    browser.screenshot(&target.join("webchat.png")).await;
    browser.set_window(390, 844).await;
    // Let the layout settle (the list becomes a drawer with a short transition).
    tokio::time::sleep(Duration::from_millis(600)).await;
    browser.screenshot(&target.join("webchat-mobile.png")).await;

    browser.quit().await;
    eprintln!(
        "browser test: {:?} in all; screenshots in {}",
        test_started.elapsed(),
        target.display()
    );
}

/// A job's message arrives in the open conversation: the page creates a job every few
/// seconds aimed at the conversation it shows, lists it with its next run, and the live
/// events stream brings the scheduled answer into the page without a reload.
#[tokio::test]
async fn a_schedule_made_in_the_page_writes_into_the_open_conversation() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    // One-word answers: the model is slow on a busy machine.
    let server = start_server(None, &[("REPLY_MAX_TOKENS", "16"), ("CONTEXT_SIZE", "4096")]).await;
    let browser = Browser::start().await;

    // 1. Sign in through the link and start a WebChat conversation from the page.
    browser.goto(&server.url(&format!("/?token={}", server.token))).await;
    browser
        .wait_for(
            "the page to be ready",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('token-dialog').hidden && \
             document.getElementById('connection').dataset.state === 'live';",
            Duration::from_secs(30),
        )
        .await;
    send_message(&browser, "Hi").await;
    wait_answer_state(&browser, &["done"], Duration::from_secs(60)).await;
    let hash = browser.js("return location.hash;").await;
    let conversation_id: i64 = hash
        .as_str()
        .and_then(|h| h.strip_prefix("#c="))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("the open conversation is in the address: {hash}"));
    // Set on this page only: still there at the end means the page was never reloaded.
    browser.js("window.__sameCronPage = 'yes'; return true;").await;

    // 2. Open the Schedules panel and fill the form as a user would.
    browser.click("#toggle-cron").await;
    browser
        .wait_for(
            "the Schedules panel",
            "return !document.getElementById('cron-panel').hidden && \
             document.getElementById('cron-new') !== null && \
             document.querySelector('#cron-jobs li') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#cron-new").await;
    browser
        .wait_for(
            "the new schedule form",
            "return document.getElementById('cron-form') !== null && \
             document.querySelector('#cron-target option') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.type_into("#cron-name", "Hello job").await;
    browser.clear("#cron-schedule").await;
    // Once a minute (the most a job may run), at a second soon enough to see it run: the
    // form is saved in a few seconds, else the job runs a minute later.
    let second = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 15)
        % 60;
    let schedule = format!("{second} * * * * *");
    // Second 0 is a plain minute (`describe::describe`: "0 * * * * *" is "every minute").
    let every_minute = match second {
        0 => "every minute".to_string(),
        _ => format!("every minute at :{second:02}"),
    };
    browser.type_into("#cron-schedule", &schedule).await;
    let described = browser
        .wait_for(
            "the expression explained in words, and its next runs",
            &format!(
                "const line = document.getElementById('cron-description'); \
                 const ready = line.dataset.expression === {} && \
                   document.getElementById('cron-preview').textContent.startsWith('Next runs:'); \
                 return ready && line.textContent ? line.textContent : null;",
                json!(schedule)
            ),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(described, json!(every_minute));
    browser.click("#cron-channel option[value='webchat']").await;
    browser.click(&format!("#cron-target option[value='{conversation_id}']")).await;
    browser.type_into("#cron-prompt", "Say hello in one word.").await;
    browser.click("#cron-tier option[value='main']").await;
    let form = browser
        .js("return ['cron-channel', 'cron-target', 'cron-tier'].map(id => document.getElementById(id).value) \
             .concat([document.getElementById('cron-enabled').checked]);")
        .await;
    assert_eq!(form, json!(["webchat", conversation_id.to_string(), "main", true]));
    browser.click("#cron-save").await;

    // 3. The job is listed, with its next run shown.
    let listed = browser
        .wait_for(
            "the new job in the list",
            "const item = [...document.querySelectorAll('#cron-jobs li.cron-job')] \
               .find(li => li.querySelector('.cron-name').textContent === 'Hello job'); \
             if (!item || document.getElementById('cron-form')) return null; \
             return { id: Number(item.dataset.jobId), enabled: item.dataset.enabled, \
                      when: item.querySelector('.cron-when').textContent, \
                      next: item.querySelector('.cron-next').textContent, \
                      status: document.getElementById('cron-status').textContent };",
            Duration::from_secs(15),
        )
        .await;
    let job_id = listed["id"].as_i64().unwrap_or_else(|| panic!("a job id: {listed}"));
    assert_eq!(listed["enabled"], "true", "{listed}");
    assert!(listed["when"].as_str().unwrap().starts_with(&every_minute), "{listed}");
    let next = listed["next"].as_str().unwrap();
    assert!(next.starts_with("Next run: "), "{listed}");
    assert!(!next.contains("—"), "a next run time is shown: {listed}");
    assert!(next.contains(" s") || next.contains(" min"), "{listed}");
    assert!(listed["status"].as_str().unwrap().contains("saved"), "{listed}");
    let jobs = api(&server, "/api/cron/jobs").await;
    let job = jobs["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["id"] == job_id))
        .unwrap_or_else(|| panic!("job {job_id} in {jobs}"))
        .clone();
    assert_eq!(job["schedule"], schedule, "{job}");
    assert_eq!(job["channel"], "webchat", "{job}");
    assert_eq!(job["target"].as_str().map(str::to_owned), Some(conversation_id.to_string()));
    assert_eq!(job["tier"], "main", "{job}");
    assert_eq!(job["prompt"], "Say hello in one word.", "{job}");
    assert!(job["next_run"].is_i64(), "{job}");

    // 4. Back to the conversation: the scheduled turn and its answer arrive by themselves.
    browser.click("#cron-close").await;
    browser
        .wait_for(
            "the panel to close",
            "return document.getElementById('cron-panel').hidden;",
            Duration::from_secs(5),
        )
        .await;
    let waiting_since = Instant::now();
    let arrived = browser
        .wait_for(
            "the scheduled answer in the open conversation",
            "const msgs = [...document.querySelectorAll('#messages .msg')]; \
             const i = msgs.findIndex(m => m.classList.contains('user') && \
               m.querySelector('.content').textContent.startsWith('[scheduled: Hello job]')); \
             if (i < 0) return null; \
             const a = msgs.slice(i + 1).find(m => m.classList.contains('assistant') && \
               m.dataset.state === 'done' && m.querySelector('.content').textContent.trim()); \
             return a ? { text: a.querySelector('.content').textContent, \
                          id: Number(a.dataset.messageId || 0), \
                          prompt: msgs[i].querySelector('.content').textContent, \
                          same: window.__sameCronPage || '', hash: location.hash } : null;",
            Duration::from_secs(90),
        )
        .await;
    let arrived_after = waiting_since.elapsed();
    assert_eq!(arrived["same"], "yes", "the page was not reloaded: {arrived}");
    assert_eq!(arrived["hash"], hash, "{arrived}");
    assert_eq!(arrived["prompt"], "[scheduled: Hello job] Say hello in one word.", "{arrived}");
    let history = api(&server, &format!("/api/conversations/{conversation_id}/messages")).await;
    let stored = history["messages"].as_array().cloned().unwrap_or_default();
    assert!(
        stored.iter().any(|m| m["role"] == "assistant" && m["id"] == arrived["id"]),
        "the answer shown is the stored one: {arrived} vs {history}"
    );

    // 5. Disable the job in the page; then no new run starts.
    browser.click("#toggle-cron").await;
    let item = format!("#cron-jobs li.cron-job[data-job-id='{job_id}']");
    browser
        .wait_for(
            "the job in the reopened panel",
            &format!("return document.querySelector(\"{item}\") !== null;"),
            Duration::from_secs(10),
        )
        .await;
    browser.click(&format!("{item} input.cron-enabled")).await;
    let disabled = browser
        .wait_for(
            "the job shown disabled",
            &format!(
                "const li = document.querySelector(\"{item}[data-enabled='false']\"); \
                 return li ? {{ next: li.querySelector('.cron-next').textContent, \
                               last: li.querySelector('.cron-last').textContent }} : null;"
            ),
            Duration::from_secs(10),
        )
        .await;
    assert!(disabled["next"].as_str().unwrap().contains("disabled"), "{disabled}");
    let job = api(&server, &format!("/api/cron/jobs/{job_id}")).await;
    assert_eq!(job["enabled"], false, "{job}");
    let runs_at_disable = api(&server, &format!("/api/cron/jobs/{job_id}/runs")).await["runs"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    assert!(runs_at_disable >= 1, "at least the run we saw");
    // Proving that nothing happens needs an event, not a long sleep: a witness job with the
    // same schedule, made after the disable, fires on the same slots. Once one of its runs
    // has finished, the disabled job has passed a slot where it would have run too.
    let witness = reqwest::Client::new()
        .post(server.url("/api/cron/jobs"))
        .bearer_auth(&server.token)
        .json(&json!({
            "name": "Witness", "schedule": schedule, "prompt": "Say ok.",
            "channel": "webchat", "target": conversation_id.to_string(), "tier": "main",
            "enabled": true,
        }))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("create the witness job");
    assert_eq!(witness.status(), 201, "the witness job is created");
    let witness: Value = witness.json().await.expect("witness JSON");
    let witness_id = witness["id"].as_i64().unwrap_or_else(|| panic!("witness id: {witness}"));
    let witness_runs = format!("/api/cron/jobs/{witness_id}/runs");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let runs = api(&server, &witness_runs).await;
        let finished = runs["runs"]
            .as_array()
            .is_some_and(|runs| runs.iter().any(|r| r["outcome"] != "running"));
        if finished {
            break;
        }
        assert!(Instant::now() < deadline, "the witness job ran within 90 s: {runs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs_later = api(&server, &format!("/api/cron/jobs/{job_id}/runs")).await["runs"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    assert_eq!(runs_later, runs_at_disable, "a disabled job starts no run");
    reqwest::Client::new()
        .delete(server.url(&format!("/api/cron/jobs/{witness_id}")))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("delete the witness job");

    // 6. The screenshot: the panel with the job and its last outcome above the conversation.
    browser.click("#cron-refresh").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target = target_dir();
    browser.screenshot(&target.join("webchat-cron.png")).await;
    browser.quit().await;
    eprintln!(
        "browser cron test: the answer came {arrived_after:?} after the job was saved; \
         {:?} in all; screenshot {}",
        test_started.elapsed(),
        target.join("webchat-cron.png").display()
    );
}

/// The answer of the kind Qwen3 writes every day: a table, a nested list, a task list, code.
const REMINDER_POST: &str = "⏰ Reminder: water the plants";

const RICH_ANSWER: &str = "Here is the plan:\n\n\
| Day | Task | Time |\n|:----|:----:|-----:|\n| Mon | Run | 07:00 |\n| Tue | Swim | 18:30 |\n\n\
1. Pack\n   - socks\n   - shoes\n2. Go\n\n\
- [x] book the train\n- [ ] call ~~Bob~~ Alice\n\n\
See https://example.com/docs for more.\n\n\
```rust\nfn main() {\n    println!(\"<b>hi</b>\");\n}\n```\n";
const RICH_CODE: &str = "fn main() {\n    println!(\"<b>hi</b>\");\n}";

/// Model output as an attacker would write it, then an ordinary answer after it.
fn hostile_answer() -> String {
    format!(
        "<img src=x onerror=\"window.__pwned=1\"> [click](javascript:window.__pwned=2) \
         <script>window.__pwned=3</script>\n\n{} deep\n\n![pic](javascript:window.__pwned=4)",
        ">".repeat(5000)
    )
}

/// Stores conversations directly in the database the server will open, so what the page
/// renders is deterministic (the model is used only for regenerate and edit).
async fn seed(data_dir: &Path) -> (i64, i64, i64, i64) {
    use my_claw::db::memory::{self, NewMessage};
    use my_claw::domain::{ChannelKind, Role};
    let url = format!("sqlite://{}", data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("seed database");
    let add = |conversation, role, text: &str| {
        let message = NewMessage::plain(conversation, role, text.to_string());
        let pool = pool.clone();
        async move { memory::add_message(&pool, &message).await.expect("seed message").0 }
    };
    let whatsapp = memory::get_or_create_conversation(
        &pool,
        ChannelKind::WhatsApp,
        "33612345678",
        Some("WhatsApp Anna"),
    )
    .await
    .expect("seed whatsapp")
    .id;
    let tomatoes = add(whatsapp, Role::User, "Remind me to buy tomatoes for the soup").await;
    for n in 0..30 {
        add(whatsapp, Role::Assistant, &format!("Noted, item {n}.")).await;
    }
    let hostile = memory::create_webchat_conversation(&pool, Some("Hostile")).await.unwrap().id;
    add(hostile, Role::User, "Show me something odd").await;
    add(hostile, Role::Assistant, &hostile_answer()).await;
    add(hostile, Role::Assistant, "After the storm, **still bold**.").await;
    let rich = memory::create_webchat_conversation(&pool, Some("Weekly plan")).await.unwrap().id;
    add(rich, Role::User, "Plan my week.").await;
    // An answer a model wrote (`provider` set), so a regenerate replaces it: a message stored
    // without a model, like a reminder firing, would be kept.
    let answer = NewMessage {
        tier: Some("main".into()),
        provider: Some("local".into()),
        model: Some("SmolLM2-135M-Instruct.Q4_1.gguf".into()),
        ..NewMessage::plain(rich, Role::Assistant, RICH_ANSWER)
    };
    memory::add_message(&pool, &answer).await.expect("seed answer");
    // A reminder that fired after the answer (stored without a model): regenerate and edit
    // keep it, on the server and in the page.
    add(rich, Role::Assistant, REMINDER_POST).await;
    pool.close().await;
    (rich.0, hostile.0, whatsapp.0, tomatoes)
}

#[tokio::test]
async fn webchat_renders_markdown_and_runs_message_actions_search_and_export() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let (rich, hostile, whatsapp, tomatoes) = seed(data.path()).await;
    let limits = [("REPLY_MAX_TOKENS", "12"), ("CONTEXT_SIZE", "4096")];
    let server = start_server(Some(data.path()), &limits).await;
    let browser = Browser::start().await;
    let ready = "return document.documentElement.dataset.ready === 'true' && \
                 document.getElementById('token-dialog').hidden;";

    // 1. Markdown: table, nested list, task list, strikethrough, autolink, fenced code.
    browser.goto(&server.url(&format!("/?token={}#c={rich}", server.token))).await;
    browser.wait_for("the page", ready, Duration::from_secs(30)).await;
    let rendered = browser
        .wait_for(
            "the rich answer",
            "const c = document.querySelector('#messages .msg.assistant .content'); \
             if (!c || !c.querySelector('table')) return null; \
             return { th: [...c.querySelectorAll('table th')].map(e => e.textContent), \
               td: c.querySelectorAll('table td').length, \
               right: c.querySelectorAll('table .align-right').length, \
               nested: c.querySelectorAll('ol > li > ul > li').length, \
               boxes: [...c.querySelectorAll('li.task > input[type=checkbox]')] \
                 .map(b => b.disabled + ':' + b.checked), \
               taskText: c.querySelector('li.task')?.textContent, \
               del: c.querySelector('del, s')?.textContent, \
               link: c.querySelector('a')?.href, \
               lang: c.querySelector('.code-block .code-lang')?.textContent, \
               code: c.querySelector('.code-block pre code')?.textContent, \
               copy: c.querySelectorAll('.code-block .copy-code').length, \
               bold: c.querySelectorAll('b').length, \
               failed: c.classList.contains('render-failed') };",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(rendered["th"], json!(["Day", "Task", "Time"]), "{rendered}");
    assert_eq!(rendered["td"], 6, "{rendered}");
    assert_eq!(rendered["right"], 3, "{rendered}");
    assert_eq!(rendered["nested"], 2, "a <ul> inside an <li>: {rendered}");
    assert_eq!(rendered["boxes"], json!(["true:true", "true:false"]), "{rendered}");
    assert_eq!(rendered["taskText"], "book the train", "{rendered}");
    assert_eq!(rendered["del"], "Bob", "{rendered}");
    assert_eq!(rendered["link"], "https://example.com/docs", "{rendered}");
    assert_eq!(rendered["lang"], "rust", "{rendered}");
    assert_eq!(rendered["code"], RICH_CODE, "{rendered}");
    assert_eq!(rendered["copy"], 1, "{rendered}");
    assert_eq!(rendered["bold"], 0, "HTML in code stays text: {rendered}");
    assert_eq!(rendered["failed"], false, "{rendered}");

    // 2. Copy: the code block's button copies the code; the message's copies its Markdown.
    browser
        .js("window.__copied = []; \
             navigator.clipboard.writeText = async (text) => { window.__copied.push(text); }; \
             return true;")
        .await;
    browser.click("#messages .msg.assistant .copy-code").await;
    browser.click("#messages .msg.assistant .act-copy").await;
    let copied = browser
        .wait_for(
            "two copies",
            "return window.__copied.length === 2 ? window.__copied : null;",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(copied, json!([RICH_CODE, RICH_ANSWER]));
    let label =
        browser.js("return document.querySelector('.msg.assistant .act-copy').textContent;").await;
    assert_eq!(label, "Copied");

    // 3. While streaming, a finished block keeps its DOM node; only the changed one is new.
    let kept = browser
        .js("const div = document.createElement('div'); \
             myClaw.renderMarkdown(div, 'First paragraph.\\n\\nSecond'); \
             const first = div.firstChild, second = div.lastChild; \
             myClaw.renderMarkdown(div, 'First paragraph.\\n\\nSecond, longer'); \
             return [div.firstChild === first, div.lastChild === second, div.childNodes.length];")
        .await;
    assert_eq!(kept, json!([true, false, 2]));

    // Screenshots: desktop with the rich answer, then dark mode.
    let target = target_dir();
    browser.screenshot(&target.join("webchat-markdown.png")).await;
    browser
        .cdp(
            "Emulation.setEmulatedMedia",
            json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
        )
        .await;
    let dark = browser
        .wait_for(
            "the dark theme",
            "return matchMedia('(prefers-color-scheme: dark)').matches && \
             getComputedStyle(document.body).backgroundColor;",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dark, "rgb(23, 25, 28)");
    browser.screenshot(&target.join("webchat-dark.png")).await;
    browser
        .cdp(
            "Emulation.setEmulatedMedia",
            json!({ "features": [{ "name": "prefers-color-scheme", "value": "light" }] }),
        )
        .await;

    // 4. Hostile Markdown stays inert, and the message after it still renders.
    browser.js("window.__pwned = 0; return true;").await;
    browser.goto(&server.url(&format!("/#c={hostile}"))).await;
    let hostile_view = browser
        .wait_for(
            "the hostile conversation",
            "const all = document.querySelectorAll('#messages .msg.assistant .content'); \
             if (all.length !== 2 || !all[1].querySelector('strong')) return null; \
             return { pwned: window.__pwned || 0, \
               dangerous: document.querySelectorAll('#messages img, #messages script, \
                 #messages a[href^=\"javascript\"], #messages [onerror]').length, \
               firstText: all[0].textContent.slice(0, 40), \
               deep: all[0].textContent.includes('deep'), \
               depth: all[0].querySelectorAll('blockquote').length, \
               next: all[1].querySelector('strong').textContent };",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(hostile_view["dangerous"], 0, "{hostile_view}");
    assert_eq!(hostile_view["next"], "still bold", "{hostile_view}");
    assert_eq!(hostile_view["deep"], true, "the deeply quoted text is kept: {hostile_view}");
    assert!(hostile_view["depth"].as_u64().unwrap() <= 40, "nesting is capped: {hostile_view}");
    assert!(
        hostile_view["firstText"].as_str().unwrap().starts_with("<img src=x onerror"),
        "raw HTML shows as text: {hostile_view}"
    );
    // Event handlers would have run by the time a later command is answered.
    browser.wait_for("a round trip", "return true;", Duration::from_secs(1)).await;
    assert_eq!(browser.js("return window.__pwned || 0;").await, 0, "{hostile_view}");

    // 5. Search: type a word from the WhatsApp conversation, click, land on the message.
    browser.type_into("#search-input", "tomat").await;
    let result = browser
        .wait_for(
            "a search result",
            "const r = document.querySelector('#search-results .search-result'); \
             return r ? { id: Number(r.dataset.messageId), mark: r.querySelector('mark')?.textContent, \
                          badge: r.querySelector('.badge')?.textContent } : null;",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(result["id"], tomatoes, "{result}");
    assert_eq!(result["mark"], "tomatoes", "{result}");
    assert_eq!(result["badge"], "whatsapp", "{result}");
    browser.click("#search-results .search-result").await;
    let landed = browser
        .wait_for(
            "the found message in view",
            "const m = document.querySelector('.msg.found'); if (!m) return null; \
             const box = m.getBoundingClientRect(), view = document.getElementById('messages').getBoundingClientRect(); \
             return { id: Number(m.dataset.messageId), hash: location.hash, \
                      visible: box.top >= view.top - 1 && box.bottom <= view.bottom + 1 };",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(landed["id"], tomatoes, "{landed}");
    assert_eq!(landed["hash"], format!("#c={whatsapp}"), "{landed}");
    assert_eq!(landed["visible"], true, "scrolled into view: {landed}");

    // 6. Regenerate the rich answer with the real model: the old one is replaced.
    browser.goto(&server.url(&format!("/#c={rich}"))).await;
    browser
        .wait_for(
            "the rich conversation",
            "return document.querySelector('#messages .msg.last-answer .act-regenerate') !== null \
                && getComputedStyle(document.querySelector('.msg.last-answer .act-regenerate')).display !== 'none';",
            Duration::from_secs(20),
        )
        .await;
    let before = api(&server, &format!("/api/conversations/{rich}/messages")).await;
    let old_answer = before["messages"][1]["id"].as_i64().unwrap();
    // The answer's actions are on the model's answer, not on the reminder posted after it.
    let marked = browser
        .js("return document.querySelector('#messages .msg.last-answer').dataset.messageId;")
        .await;
    assert_eq!(marked, old_answer.to_string());
    browser.click("#messages .msg.last-answer .act-regenerate").await;
    let regenerated = wait_answer_state(&browser, &["done"], Duration::from_secs(60)).await;
    assert!(regenerated["meta"].as_str().unwrap().contains("SmolLM2"), "{regenerated}");
    let after = api(&server, &format!("/api/conversations/{rich}/messages")).await;
    let after = after["messages"].as_array().unwrap().clone();
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(after[1]["content"], REMINDER_POST, "the reminder is kept: {after:?}");
    assert!(after[2]["id"].as_i64().unwrap() > old_answer, "a new answer: {after:?}");
    assert!(!after[2]["content"].as_str().unwrap().is_empty(), "{after:?}");
    // The page shows what is stored, in the same order, without a reload.
    let shown = browser
        .js("return [...document.querySelectorAll('#messages .msg')].map(m => m.dataset.messageId || '');")
        .await;
    let stored: Vec<String> = after.iter().map(|m| m["id"].to_string()).collect();
    assert_eq!(shown, json!(stored));

    // 7. Up in the empty input edits the last message; Enter resends it.
    browser.click("#input").await;
    browser.type_into("#input", "\u{E013}").await;
    let editing = browser
        .wait_for(
            "the last message in the input",
            "return document.getElementById('input').value && !document.getElementById('edit-note').hidden \
                ? document.getElementById('input').value : null;",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(editing, "Plan my week.");
    browser.clear("#input").await;
    send_message(&browser, "Plan my weekend.").await;
    wait_answer_state(&browser, &["done"], Duration::from_secs(60)).await;
    let edited = api(&server, &format!("/api/conversations/{rich}/messages")).await;
    let edited = edited["messages"].as_array().unwrap().clone();
    assert_eq!(edited.len(), 3, "{edited:?}");
    assert_eq!(edited[0]["content"], "Plan my weekend.");
    assert_eq!(edited[1]["content"], REMINDER_POST, "{edited:?}");
    assert_eq!(edited[2]["role"], "assistant");
    assert_eq!(browser.js("return document.querySelectorAll('#messages .msg').length;").await, 3);
    let shown = browser
        .js("return document.querySelector('#messages .msg.user .content').textContent;")
        .await;
    assert_eq!(shown, "Plan my weekend.");

    // 8. Export: the download holds the conversation as Markdown.
    browser
        .cdp(
            "Browser.setDownloadBehavior",
            json!({ "behavior": "allow", "downloadPath": browser.downloads().display().to_string() }),
        )
        .await;
    browser.click("#export-md").await;
    let name = format!("my-claw-{rich}-weekly-plan.md");
    let file = browser.downloads().join(&name);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exported = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if text.contains("Plan my weekend.") {
                break text;
            }
        }
        assert!(Instant::now() < deadline, "no download {} within 20 s", file.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exported.starts_with("# Weekly plan\n"), "{exported}");
    assert!(exported.contains(edited[2]["content"].as_str().unwrap().trim_end()), "{exported}");

    // 8b. Import: ChatGPT's conversations.json chosen in the file picker becomes a
    //     conversation the page opens, saying what was added; the same file again adds
    //     nothing and says so.
    let chatgpt = json!([{
        "id": "g-browser", "title": "Sourdough timing", "create_time": 1_700_000_000.0,
        "current_node": "a",
        "mapping": {
            "u": {"parent": null, "message": {"author": {"role": "user"},
                "content": {"content_type": "text", "parts": ["How long should sourdough proof?"]}}},
            "a": {"parent": "u", "message": {"author": {"role": "assistant"},
                "content": {"content_type": "text", "parts": ["Four to **twelve** hours."]}}}
        }
    }]);
    let file = data.path().join("conversations.json");
    std::fs::write(&file, chatgpt.to_string()).unwrap();
    let choose_file = || async {
        let document = browser.cdp("DOM.getDocument", json!({})).await;
        let input = browser
            .cdp(
                "DOM.querySelector",
                json!({"nodeId": document["root"]["nodeId"], "selector": "#import-file"}),
            )
            .await;
        browser
            .cdp(
                "DOM.setFileInputFiles",
                json!({"nodeId": input["nodeId"], "files": [file.display().to_string()]}),
            )
            .await;
    };
    choose_file().await;
    let imported = browser
        .wait_for(
            "the imported conversation, open",
            "const said = document.getElementById('banner-text').textContent; \
             const title = document.getElementById('conversation-title').textContent; \
             if (!said.startsWith('Imported') || title !== 'Sourdough timing') return null; \
             return { said, answer: document.querySelector('#messages .msg.assistant .content strong')?.textContent };",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(imported["said"], "Imported 1 conversation (2 messages).", "{imported}");
    assert_eq!(imported["answer"], "twelve", "rendered as Markdown: {imported}");
    browser.js("document.getElementById('banner-text').textContent = ''; return true;").await;
    choose_file().await;
    let again = browser
        .wait_for(
            "the second import's summary",
            "const said = document.getElementById('banner-text').textContent; \
             return said.startsWith('Imported') ? said : null;",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(again, "Imported 0 conversations (0 messages); 1 conversation already here.");

    // 9. A phone: the title stays readable, secondary actions live in a menu, and nothing
    //    overflows at 400 px nor at 360 px.
    for width in [400, 360] {
        browser.set_window(width, 850).await;
        let layout = browser
            .wait_for(
                "the phone layout",
                &format!(
                    "if (window.innerWidth > {width}) return null; \
                     const t = document.getElementById('conversation-title'); \
                     const input = document.getElementById('input'); \
                     return {{ inner: window.innerWidth, scroll: document.documentElement.scrollWidth, \
                       title: t.getBoundingClientRect().width, titleText: t.textContent, \
                       menu: getComputedStyle(document.getElementById('chat-menu')).display, \
                       button: getComputedStyle(document.getElementById('chat-menu-button')).display, \
                       placeholderLines: Math.round(input.scrollHeight / parseFloat(getComputedStyle(input).lineHeight)) }};"
                ),
                Duration::from_secs(5),
            )
            .await;
        let inner = layout["inner"].as_f64().unwrap();
        assert!(layout["scroll"].as_f64().unwrap() <= inner, "nothing overflows: {layout}");
        assert!(layout["title"].as_f64().unwrap() >= 80.0, "the title is readable: {layout}");
        assert_eq!(layout["menu"], "none", "{layout}");
        assert_ne!(layout["button"], "none", "{layout}");
        assert!(layout["placeholderLines"].as_f64().unwrap() <= 2.0, "{layout}");
        if width == 400 {
            browser.click("#chat-menu-button").await;
            browser
                .wait_for(
                    "the menu",
                    "return getComputedStyle(document.getElementById('chat-menu')).display === 'flex' && \
                     document.getElementById('export-json').getBoundingClientRect().width > 0;",
                    Duration::from_secs(5),
                )
                .await;
            // A live update that re-renders the open conversation leaves the menu open (it
            // used to close it, so that a tap meant to close it opened it again).
            browser
                .js("return window.myClaw.openConversation(window.myClaw.currentConversationId());")
                .await;
            let menu = browser
                .js("return getComputedStyle(document.getElementById('chat-menu')).display;")
                .await;
            assert_eq!(menu, "flex", "a refresh of the same conversation closed the menu");
            browser.screenshot(&target.join("webchat-phone-menu.png")).await;
            browser.click("#chat-menu-button").await;
            browser
                .wait_for(
                    "the menu to close on a second tap",
                    "return getComputedStyle(document.getElementById('chat-menu')).display === 'none' && \
                     document.getElementById('chat-menu-button').getAttribute('aria-expanded') === 'false';",
                    Duration::from_secs(5),
                )
                .await;
            browser.screenshot(&target.join("webchat-phone.png")).await;
        }
    }
    browser.quit().await;
    eprintln!(
        "browser markdown test: {:?}; screenshots webchat-markdown.png, webchat-dark.png, \
         webchat-phone.png in {}",
        test_started.elapsed(),
        target.display()
    );
}

/// Issue 15: a stored answer's tool rounds show as "used NAME" lines inside the answer that
/// open on their arguments and result; names, arguments and results stay inert text.
#[tokio::test]
async fn webchat_shows_stored_tool_use_compactly_and_as_text() {
    use my_claw::db::memory::{self, NewMessage};
    use my_claw::domain::{Role, ToolCall, ToolResult, ToolRound};
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let data = tempfile::tempdir().expect("data dir");
    let url = format!("sqlite://{}", data.path().join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("seed database");
    let conversation = memory::create_webchat_conversation(&pool, Some("Tools")).await.unwrap().id;
    memory::add_message(&pool, &NewMessage::plain(conversation, Role::User, "Remind me at 9"))
        .await
        .unwrap();
    let hostile = "<img src=x onerror=\"window.__pwned=1\">";
    let rounds = vec![ToolRound {
        text: "Let me **check** the time.".into(),
        calls: vec![
            ToolCall { id: "call_1".into(), name: "current_time".into(), arguments: "{}".into() },
            ToolCall {
                id: "call_2".into(),
                name: "reminders_create".into(),
                arguments: format!(r#"{{"text":"{}"}}"#, hostile.replace('"', "\\\"")),
            },
        ],
        results: vec![
            ToolResult { call_id: "call_1".into(), content: "09:00".into(), is_error: false },
            ToolResult { call_id: "call_2".into(), content: hostile.into(), is_error: true },
        ],
    }];
    let answer = NewMessage::plain(conversation, Role::Assistant, "Your reminder is set.");
    memory::add_message_with_rounds(&pool, &answer, &rounds).await.unwrap();
    pool.close().await;

    let server = start_server(Some(data.path()), &[]).await;
    let browser = Browser::start().await;
    browser.goto(&server.url(&format!("/?token={}#c={}", server.token, conversation.0))).await;
    let shown = browser
        .wait_for(
            "the tool use",
            "const a = document.querySelector('#messages .msg.assistant'); \
             if (!a || a.querySelectorAll('details.tool-use').length < 2) return null; \
             const d = [...a.querySelectorAll('details.tool-use')]; \
             return { lines: d.map(x => x.querySelector('summary').textContent), \
               open: d.map(x => x.open), \
               before: a.querySelector('.tool-text strong')?.textContent, \
               args: d[1].querySelector('.tool-arguments pre').textContent, \
               result: d[1].querySelector('.tool-result pre').textContent, \
               failed: d[1].classList.contains('failed'), \
               imgs: a.querySelectorAll('img').length, \
               answer: a.querySelector('.content').textContent };",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        shown["lines"],
        json!(["used current_time", "used reminders_create (failed)"]),
        "{shown}"
    );
    assert_eq!(shown["open"], json!([false, false]), "compact until opened: {shown}");
    assert_eq!(shown["before"], "check", "{shown}");
    // Arguments are shown as indented JSON, so the quotes inside the string stay escaped.
    assert!(shown["args"].as_str().unwrap().contains("<img src=x onerror="), "{shown}");
    assert_eq!(shown["result"], hostile, "{shown}");
    assert_eq!(shown["failed"], true, "{shown}");
    assert_eq!(shown["imgs"], 0, "untrusted text never becomes markup: {shown}");
    assert_eq!(shown["answer"].as_str().unwrap().trim(), "Your reminder is set.", "{shown}");
    browser.click("#messages details.tool-use summary").await;
    let opened = browser
        .wait_for(
            "the first call opened",
            "const d = document.querySelector('#messages details.tool-use'); \
             return d.open ? d.querySelector('.tool-result pre').textContent : null;",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(opened, "09:00");
    assert_eq!(browser.js("return window.__pwned || 0;").await, 0);
}

/// A title of 60 characters, the longest the page makes from a first message.
const LONG_TITLE: &str = "A conversation whose title is sixty characters long, really!";

/// The length of a text without its white space.
fn squeeze_len(text: &Value) -> usize {
    text.as_str().unwrap_or_default().chars().filter(|c| !c.is_whitespace()).count()
}

/// Replaces the page's fetch for `POST /api/chat` only (`__fake` decides what it answers);
/// `__realFetch` stays reachable so a step can put the real one back.
const FAKE_CHAT_FETCH: &str = "if (!window.__realFetch) window.__realFetch = window.fetch; \
    window.fetch = (url, options) => String(url) === '/api/chat' && window.__fake \
        ? window.__fake(options) : window.__realFetch(url, options); \
    return true;";

/// An SSE response made of `events` (objects), ending with `end`: `close` or a network error.
fn fake_stream(events: &[Value], end: &str) -> String {
    let blocks: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    let fail = if end == "close" { "c.close()" } else { "c.error(new TypeError('network error'))" };
    format!(
        "window.__fake = () => Promise.resolve(new Response(new ReadableStream({{ start(c) {{ \
           const enc = new TextEncoder(); \
           for (const b of {blocks}) c.enqueue(enc.encode(b)); \
           setTimeout(() => {fail}, 50); }} }}), \
           {{ status: 200, headers: {{ 'Content-Type': 'text/event-stream' }} }})); return true;",
        blocks = serde_json::to_string(&blocks).unwrap(),
    )
}

/// The QA pass of the WebChat, in a real Chromium with the real model: a failed send keeps
/// its text and never lends its place to Edit/Regenerate (which would change the stored
/// exchange before it), the limit shows before sending, a refresh keeps the reader where they
/// were, sent messages get their stored ids, an answer goes on while the user looks
/// elsewhere, banners close, Escape and Edit respect what the user is doing, a lost
/// connection says so, a link in an answer cannot swap the token, and the phone layout holds.
#[tokio::test]
async fn webchat_recovers_from_failures_and_respects_what_the_user_is_doing() {
    use my_claw::db::memory::{self, NewMessage};
    use my_claw::domain::Role;
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let url = format!("sqlite://{}", data.path().join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("seed database");
    let add = |conversation, role, text: String| {
        let pool = pool.clone();
        async move {
            let message = NewMessage::plain(conversation, role, text);
            memory::add_message(&pool, &message).await.expect("seed message").0
        }
    };
    let long = memory::create_webchat_conversation(&pool, Some(LONG_TITLE)).await.unwrap().id;
    for n in 0..40 {
        let role = if n % 2 == 0 { Role::User } else { Role::Assistant };
        add(long, role, format!("Message number {n} of a long conversation.")).await;
    }
    let plan = memory::create_webchat_conversation(&pool, Some("Plan")).await.unwrap().id;
    let plan_question = add(plan, Role::User, "Plan my week.".into()).await;
    // Written by a model (`provider` set): one stored without it is a reminder post, which
    // carries no answer actions.
    let plan_answer = NewMessage {
        provider: Some("local".into()),
        ..NewMessage::plain(plan, Role::Assistant, "Here is the plan.")
    };
    let plan_answer = memory::add_message(&pool, &plan_answer).await.expect("seed answer").0;
    pool.close().await;
    let (plan, long) = (plan.0, long.0);

    // Long enough to act while a story streams: SmolLM2 writes this story to the limit, and
    // 400 tokens (2.5 s here) could end before a loaded machine's browser had switched
    // conversations. The other answers are short anyway.
    let limits = [("REPLY_MAX_TOKENS", "1200"), ("CONTEXT_SIZE", "4096")];
    let server = start_server(Some(data.path()), &limits).await;
    let browser = Browser::start().await;
    browser.goto(&server.url(&format!("/?token={}#c={plan}", server.token))).await;
    browser
        .wait_for(
            "the page, live, with the plan",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('connection').dataset.state === 'live' && \
             document.querySelectorAll('#messages .msg').length === 2;",
            Duration::from_secs(30),
        )
        .await;
    let messages_of = |id: i64| format!("/api/conversations/{id}/messages");

    // 1. The 16,000-character limit shows before sending: a counter, Send disabled, and
    //    Enter sends nothing.
    let set_input = |text: String| {
        format!(
            "const i = document.getElementById('input'); i.value = {}; \
             i.dispatchEvent(new Event('input', {{ bubbles: true }})); \
             const c = document.getElementById('input-count'); \
             return {{ count: c && !c.hidden ? c.textContent : '', \
                       send: document.getElementById('send').disabled }};",
            json!(text)
        )
    };
    let over = browser.js(&set_input("x".repeat(16_001))).await;
    let count = over["count"].as_str().unwrap_or_default();
    assert!(count.contains("Too long") && count.contains("16,001 / 16,000"), "{over}");
    assert_eq!(over["send"], true, "{over}");
    browser.type_into("#input", ENTER).await;
    browser.wait_for("a round trip", "return true;", Duration::from_secs(1)).await;
    assert_eq!(browser.js("return document.querySelectorAll('#messages .msg').length;").await, 2);
    let near = browser.js(&set_input("x".repeat(15_000))).await;
    assert_eq!(near, json!({ "count": "15,000 / 16,000 characters", "send": false }));
    browser.js(&set_input(String::new())).await;

    // 2. A send that fails (the server cannot be reached) keeps its text in the composer and
    //    marks its bubble unsent, with Retry; Edit and Regenerate stay on the stored exchange.
    browser.js(FAKE_CHAT_FETCH).await;
    browser
        .js("window.__fake = () => Promise.reject(new TypeError('Failed to fetch')); return true;")
        .await;
    send_message(&browser, "What about Sunday?").await;
    let unsent = browser
        .wait_for(
            "the unsent message",
            "const u = document.querySelector('#messages .msg.user.unsent'); if (!u) return null; \
             const shown = (sel) => { const b = document.querySelector(sel); \
               return b ? getComputedStyle(b).display !== 'none' : false; }; \
             return { input: document.getElementById('input').value, \
               note: u.querySelector('.error-text')?.textContent, id: u.dataset.messageId || '', \
               retry: shown('.msg.unsent .act-retry'), edit: shown('.msg.unsent .act-edit'), \
               answers: document.querySelectorAll('#messages .msg.assistant').length, \
               lastUser: Number(document.querySelector('.msg.last-user')?.dataset.messageId), \
               lastAnswer: Number(document.querySelector('.msg.last-answer')?.dataset.messageId) };",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(unsent["input"], "What about Sunday?", "the text is back: {unsent}");
    assert!(unsent["note"].as_str().unwrap().starts_with("Not sent"), "{unsent}");
    assert_eq!(unsent["id"], "", "{unsent}");
    assert_eq!(unsent["retry"], true, "{unsent}");
    assert_eq!(unsent["edit"], false, "no Edit on a message the server never stored: {unsent}");
    assert_eq!(unsent["answers"], 1, "{unsent}");
    assert_eq!(unsent["lastUser"], plan_question, "{unsent}");
    assert_eq!(unsent["lastAnswer"], plan_answer, "{unsent}");

    // 3. Edit puts an unsent draft aside; Escape brings it back.
    browser.click("#messages .msg.last-user .act-edit").await;
    let editing = browser.js("return document.getElementById('input').value;").await;
    assert_eq!(editing, "Plan my week.");
    browser.type_into("#input", "\u{E00C}").await;
    let restored = browser.js("return document.getElementById('input').value;").await;
    assert_eq!(restored, "What about Sunday?", "the draft survives a cancelled edit");

    // 4. Retry sends it for real. The bubble gets its stored id from the stream, and a later
    //    refresh of the conversation keeps the very same nodes (no redraw).
    browser.js("window.__fake = null; return true;").await;
    browser.click("#messages .msg.unsent .act-retry").await;
    browser
        .js("const u = [...document.querySelectorAll('#messages .msg.user')].pop(); \
             u.__mark = 'sunday'; return true;")
        .await;
    wait_answer_state(&browser, &["done"], Duration::from_secs(90)).await;
    browser
        .js("window.__refreshed = false; \
             myClaw.openConversation(myClaw.currentConversationId()).then(() => { window.__refreshed = true; }); \
             return true;")
        .await;
    browser.wait_for("the refresh", "return window.__refreshed;", Duration::from_secs(10)).await;
    let stored = api(&server, &messages_of(plan)).await;
    let stored = stored["messages"].as_array().unwrap().clone();
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert_eq!(stored[2]["content"], "What about Sunday?");
    let sent = browser
        .js("const u = [...document.querySelectorAll('#messages .msg.user')].pop(); \
             return { mark: u.__mark || '', id: Number(u.dataset.messageId || 0), \
               unsent: document.querySelectorAll('.msg.unsent').length, \
               input: document.getElementById('input').value };")
        .await;
    assert_eq!(sent["id"], stored[2]["id"], "{sent}");
    assert_eq!(sent["mark"], "sunday", "the refresh redrew the conversation: {sent}");
    assert_eq!(sent["unsent"], 0, "{sent}");
    assert_eq!(sent["input"], "", "{sent}");

    // 5. Search finds the message sent in this page and jumps to it.
    browser.type_into("#search-input", "Sunday").await;
    let result = format!("#search-results .search-result[data-message-id='{}']", stored[2]["id"]);
    browser
        .wait_for(
            "the sent message among the search results",
            &format!("return document.querySelector(\"{result}\") !== null;"),
            Duration::from_secs(10),
        )
        .await;
    browser.click(&result).await;
    let found = browser
        .wait_for(
            "the found message",
            "const m = document.querySelector('.msg.found'); \
             return m ? { id: Number(m.dataset.messageId), mark: m.__mark || '', \
               banner: document.getElementById('banner').hidden } : null;",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(found, json!({ "id": stored[2]["id"], "mark": "sunday", "banner": true }));
    browser.clear("#search-input").await;

    // 6. A message stored elsewhere arrives in the open conversation without moving the
    //    reader, who is reading its beginning.
    browser.click(&format!("#conversation-list li[data-conversation-id='{long}'] button")).await;
    browser
        .wait_for(
            "the long conversation, scrolled to its end",
            "const m = document.getElementById('messages'); \
             return document.querySelectorAll('#messages .msg').length === 40 && m.scrollTop > 0;",
            Duration::from_secs(10),
        )
        .await;
    browser
        .js("const m = document.getElementById('messages'); m.scrollTop = 0; \
             m.querySelector('.msg').__mark = 'first'; return true;")
        .await;
    let response = reqwest::Client::new()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({"conversation_id": long, "message": "Sent from elsewhere"}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(response.status(), 200);
    drop(response);
    let kept = browser
        .wait_for(
            "the message from elsewhere",
            "const m = document.getElementById('messages'); \
             const arrived = [...m.querySelectorAll('.msg.user .content')] \
               .some(e => e.textContent === 'Sent from elsewhere'); \
             return arrived ? { top: m.scrollTop, mark: m.querySelector('.msg').__mark || '' } : null;",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(kept, json!({ "top": 0, "mark": "first" }), "the reader stays in place");

    // 7. A message banner closes, and goes when the user moves on.
    browser.js("myClaw.showError('Something went wrong.'); return true;").await;
    browser.click("#banner-close").await;
    assert_eq!(browser.js("return document.getElementById('banner').hidden;").await, true);
    browser.js("myClaw.showError('Something went wrong again.'); return true;").await;
    browser.click(&format!("#conversation-list li[data-conversation-id='{plan}'] button")).await;
    browser
        .wait_for(
            "the plan, without the banner",
            "return document.getElementById('conversation-title').textContent === 'Plan' && \
             document.getElementById('banner').hidden;",
            Duration::from_secs(10),
        )
        .await;

    // 8. While a story streams: Escape in the search box does not stop it, and another
    //    conversation opens; the answer goes on and is stored complete. A story can end in
    //    a few tokens: then try again, in a new chat (in one that holds a short story
    //    already, SmolLM2 writes the same short one again).
    let mut went_elsewhere = false;
    let mut attempts = Vec::new();
    for _attempt in 0..3 {
        browser.click("#new-chat").await;
        send_long_prompt(&browser).await;
        let story = browser
            .js("return Number((location.hash.match(/^#c=(\\d+)$/) || [])[1] || 0);")
            .await
            .as_i64()
            .unwrap();
        assert!(story > 0, "the new chat has no conversation id in the address");
        browser.click("#search-input").await;
        browser.type_into("#search-input", "\u{E00C}").await;
        browser
            .click(&format!("#conversation-list li[data-conversation-id='{long}'] button"))
            .await;
        browser
            .wait_for(
                "the other conversation",
                &format!(
                    "return document.getElementById('conversation-title').textContent === {};",
                    json!(LONG_TITLE)
                ),
                Duration::from_secs(10),
            )
            .await;
        // Whether the story was still being written while the other conversation was open:
        // then the list marks it. A mark missing while the server says it is being written
        // is a failure; no mark because the story already ended means trying again.
        // (5 s: the list is asked again when the page leaves the answer, and a loaded
        // machine's browser can take seconds to do it.)
        let marked = format!("return {};", answering_mark(story));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut shown = false;
        while !shown && Instant::now() < deadline {
            shown = browser.js(&marked).await == json!(true);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        if !shown {
            let list = api(&server, "/api/conversations").await;
            let conversations = list["conversations"].as_array().unwrap();
            let still = conversations.iter().any(|c| c["id"] == story && c["answering"] == true);
            assert!(!still, "the story is being answered, and the list does not say so: {list}");
        }
        let elsewhere = json!({ "note": shown });
        // Wait for the answer to be stored, whichever way it ended.
        let deadline = Instant::now() + Duration::from_secs(90);
        let last = loop {
            let history = api(&server, &messages_of(story)).await;
            let last = history["messages"].as_array().unwrap().last().unwrap().clone();
            if last["role"] == "assistant" && last["status"] != "streaming" {
                break last;
            }
            assert!(Instant::now() < deadline, "the story was not stored: {history}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_ne!(last["status"], "partial", "the answer was stopped: {last}");
        attempts.push(json!({"status": last["status"], "chars": squeeze_len(&last["content"])}));
        browser
            .click(&format!("#conversation-list li[data-conversation-id='{story}'] button"))
            .await;
        // The story is shown (the other conversation's answers are done too).
        browser
            .wait_for(
                "the story again",
                &format!("return location.hash === '#c={story}';"),
                Duration::from_secs(10),
            )
            .await;
        let back = wait_answer_state(&browser, &["done"], Duration::from_secs(10)).await;
        // The page shows the stored answer (as rendered Markdown: compare without spaces).
        let squeeze = |v: &Value| v.as_str().unwrap_or_default().replace(char::is_whitespace, "");
        assert_eq!(squeeze(&back["text"]), squeeze(&last["content"]), "{back}");
        if elsewhere["note"] == true {
            went_elsewhere = true;
            break;
        }
    }
    assert!(
        went_elsewhere,
        "the story always ended before the other conversation opened: {attempts:?}"
    );
    browser
        .wait_for(
            "the mark gone once the answer ended",
            "return !document.querySelector('#conversation-list .badge.answering');",
            Duration::from_secs(10),
        )
        .await;
    browser.click(&format!("#conversation-list li[data-conversation-id='{plan}'] button")).await;
    browser
        .wait_for(
            "the plan again",
            &format!("return location.hash === '#c={plan}';"),
            Duration::from_secs(10),
        )
        .await;

    // 9. A lost connection and a server restart say what happened to the answer.
    let meta = json!({"type": "meta", "conversation_id": plan, "tier": "main", "provider": "local",
        "model": "SmolLM2", "leaves_machine": false});
    browser
        .js(&fake_stream(&[meta.clone(), json!({"type": "token", "text": "Once"})], "error"))
        .await;
    send_message(&browser, "Tell me more.").await;
    let lost = browser
        .wait_for(
            "the lost answer",
            "const a = [...document.querySelectorAll('#messages .msg.assistant')].pop(); \
             return a.dataset.state === 'error' ? a.textContent : null;",
            Duration::from_secs(10),
        )
        .await;
    let lost = lost.as_str().unwrap();
    assert!(lost.contains("connection to my-claw was lost"), "{lost}");
    assert!(!lost.contains("network error"), "{lost}");
    let done = json!({"type": "done", "message_id": 999_999, "finish": "cancelled",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "timings": {"decode_tok_s": 1.0}});
    browser
        .js(&fake_stream(&[meta, json!({"type": "token", "text": "Once"}), done], "close"))
        .await;
    send_message(&browser, "And then?").await;
    let restarted = wait_answer_state(&browser, &["stopped"], Duration::from_secs(10)).await;
    let meta_text = restarted["meta"].as_str().unwrap();
    assert!(meta_text.contains("restart") && !meta_text.contains("before the end"), "{restarted}");

    // 10. Stop before the server answered anything: nothing is left behind in a new chat,
    //     and the text is back in the composer.
    browser
        .js("window.__fake = (options) => new Promise((_, reject) => options.signal.addEventListener( \
               'abort', () => reject(new DOMException('stopped', 'AbortError')))); return true;")
        .await;
    browser.click("#new-chat").await;
    send_message(&browser, "Never mind.").await;
    browser
        .wait_for(
            "the waiting answer",
            "return document.querySelector('#messages .msg.assistant[data-state=waiting]') !== null;",
            Duration::from_secs(5),
        )
        .await;
    browser.click("#stop").await;
    let cleared = browser
        .wait_for(
            "the stopped send undone",
            "return document.getElementById('stop').hidden && { msgs: document.querySelectorAll('#messages .msg').length, \
               empty: !document.getElementById('empty').hidden, input: document.getElementById('input').value };",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(cleared, json!({ "msgs": 0, "empty": true, "input": "Never mind." }));
    browser.js("window.__fake = null; return true;").await;
    browser.clear("#input").await;

    // 11. `code` without a Z.ai key: the answer's label says main answered.
    browser.click("#model-select option[value='code']").await;
    send_message(&browser, "Hi").await;
    let code = wait_answer_state(&browser, &["done"], Duration::from_secs(90)).await;
    assert!(code["meta"].as_str().unwrap().contains("code → main"), "{code}");
    browser.click("#model-select option[value='main']").await;

    // 12. Model output cannot link into the app, and a link with another token does not
    //     replace a working one.
    let links = browser
        .js("const div = document.createElement('div'); \
             myClaw.renderMarkdown(div, '[x](/?token=GARBAGE) [y](https://example.com/)'); \
             return [...div.querySelectorAll('a')].map(a => a.href);")
        .await;
    assert_eq!(links, json!(["https://example.com/"]));
    browser.goto(&server.url("/?token=GARBAGE-GARBAGE-GARBAGE-0000")).await;
    browser
        .wait_for(
            "the page, still signed in",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('token-dialog').hidden && \
             document.getElementById('connection').dataset.state === 'live';",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        browser.js("return localStorage.getItem('my-claw.token');").await,
        json!(server.token)
    );
    let said = browser.js("return document.getElementById('banner-text').textContent;").await;
    assert!(said.as_str().unwrap().contains("refused"), "the page says why: {said}");

    // 13. A phone: Enter makes a new line on a touch screen, the ⋯ menu closes on a tap
    //     outside it, and the Schedules form fits 360 px with a 60-character title.
    browser.set_window(360, 800).await;
    browser.wait_for("a phone", "return window.innerWidth <= 360;", Duration::from_secs(5)).await;
    browser
        .cdp("Emulation.setTouchEmulationEnabled", json!({"enabled": true, "maxTouchPoints": 1}))
        .await;
    browser.type_into("#input", &format!("line one{ENTER}line two")).await;
    let typed = browser.js("return document.getElementById('input').value;").await;
    assert_eq!(typed, "line one\nline two", "Enter made a new line on a touch screen");
    browser.cdp("Emulation.setTouchEmulationEnabled", json!({"enabled": false})).await;
    browser.clear("#input").await;
    browser.click("#chat-menu-button").await;
    browser
        .wait_for(
            "the menu",
            "return getComputedStyle(document.getElementById('chat-menu')).display === 'flex';",
            Duration::from_secs(5),
        )
        .await;
    browser.click("#messages").await;
    browser
        .wait_for(
            "the menu to close on a tap outside",
            "return getComputedStyle(document.getElementById('chat-menu')).display === 'none';",
            Duration::from_secs(5),
        )
        .await;
    browser.click("#open-sidebar").await;
    browser
        .wait_for(
            "the drawer open",
            "return document.getElementById('sidebar').getBoundingClientRect().left >= 0;",
            Duration::from_secs(5),
        )
        .await;
    browser.click("#toggle-cron").await;
    browser
        .wait_for(
            "the Schedules panel",
            "return document.getElementById('cron-new') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#cron-new").await;
    browser
        .wait_for(
            "the form",
            "return document.querySelector('#cron-channel option[value=webchat]') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#cron-channel option[value='webchat']").await;
    let form = browser
        .wait_for(
            "the conversation targets",
            &format!(
                "const t = document.getElementById('cron-target'); \
                 if (!t || ![...t.options].some(o => o.textContent.includes({}))) return null; \
                 return {{ inner: window.innerWidth, scroll: document.documentElement.scrollWidth, \
                   target: t.getBoundingClientRect().right }};",
                json!(LONG_TITLE)
            ),
            Duration::from_secs(10),
        )
        .await;
    let inner = form["inner"].as_f64().unwrap();
    assert!(form["scroll"].as_f64().unwrap() <= inner, "the form overflows: {form}");
    assert!(form["target"].as_f64().unwrap() <= inner, "the select overflows: {form}");

    browser.quit().await;
    eprintln!("browser recovery test: {:?}", test_started.elapsed());
}

/// Wide tables: a header of 30 columns, the kind that was crushed letter by letter.
fn wide_table() -> String {
    let head: Vec<String> = (1..=30).map(|n| format!("Column {n}")).collect();
    let rule = vec!["---"; 30].join(" | ");
    let row: Vec<String> = (1..=30).map(|n| format!("value {n}")).collect();
    format!("A wide one:\n\n| {} |\n| {rule} |\n| {} |\n", head.join(" | "), row.join(" | "))
}

/// The contrast of an element's text (its opacity and its ancestors' included) against the
/// page's background, as WCAG computes it.
const CONTRAST_FN: &str = "function contrastOf(node) { \
    const rgb = (s) => s.match(/[\\d.]+/g).map(Number); \
    const lin = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); }; \
    const lum = (c) => 0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2]); \
    let alpha = 1; for (let n = node; n && n.nodeType === 1; n = n.parentElement) alpha *= Number(getComputedStyle(n).opacity); \
    const bg = rgb(getComputedStyle(document.body).backgroundColor); \
    const fg = rgb(getComputedStyle(node).color); \
    const mixed = [0, 1, 2].map((i) => fg[i] * alpha + bg[i] * (1 - alpha)); \
    const [a, b] = [lum(mixed), lum(bg)].sort((x, y) => y - x); \
    return (a + 0.05) / (b + 0.05); }";

/// The second QA pass of the WebChat: a conversation deleted elsewhere (also while its answer
/// streams), wide tables, reference links, the view after a crash, the reminder form, the
/// settings panels, accessibility, right-to-left text and the zone of scheduled times.
#[tokio::test]
async fn webchat_follows_deletions_and_keeps_the_view_true() {
    use my_claw::db::cron::{insert_job, JobKind, JobSpec};
    use my_claw::db::memory::{self, NewMessage};
    use my_claw::domain::{ChannelKind, Role};
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let url = format!("sqlite://{}", data.path().join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("seed database");
    let add = |conversation, role, text: String| {
        let pool = pool.clone();
        async move {
            let message = NewMessage::plain(conversation, role, text);
            memory::add_message(&pool, &message).await.expect("seed message").0
        }
    };
    let doomed = memory::create_webchat_conversation(&pool, Some("Doomed")).await.unwrap().id;
    add(doomed, Role::User, "Hello there".into()).await;
    add(doomed, Role::Assistant, "Hi!".into()).await;
    let crash = memory::create_webchat_conversation(&pool, Some("Crash")).await.unwrap().id;
    add(crash, Role::User, "First question".into()).await;
    add(crash, Role::Assistant, "First answer".into()).await;
    add(crash, Role::User, "Tell me more.".into()).await;
    let wide = memory::create_webchat_conversation(&pool, Some("Wide")).await.unwrap().id;
    add(wide, Role::User, "A wide table, please".into()).await;
    add(wide, Role::Assistant, wide_table()).await;
    let reminder = insert_job(
        &pool,
        &JobSpec {
            name: "Plumber".into(),
            schedule: "at 2099-01-02 09:00".into(),
            timezone: Some("Asia/Tokyo".into()),
            prompt: "call the plumber".into(),
            channel: ChannelKind::WebChat,
            target: crash.0.to_string(),
            tier: None,
            enabled: true,
            kind: JobKind::Reminder,
            conversation_id: Some(crash),
        },
    )
    .await
    .expect("seed reminder")
    .id
    .0;
    pool.close().await;
    let (doomed, crash, wide) = (doomed.0, crash.0, wide.0);

    // A fixed port, so that the page finds the server again after it is killed and restarted.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bind = format!("127.0.0.1:{port}");
    let limits = [("REPLY_MAX_TOKENS", "400"), ("CONTEXT_SIZE", "4096"), ("BIND", bind.as_str())];
    let mut server = start_server(Some(data.path()), &limits).await;
    let (base, token) = (server.url(""), server.token.clone());
    let browser = Browser::start().await;
    let open = |id: i64| format!("#conversation-list li[data-conversation-id='{id}'] button");
    let delete = |id: i64| {
        let request = reqwest::Client::new()
            .delete(format!("{base}/api/conversations/{id}"))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(60))
            .send();
        async move {
            let response = request.await.expect("DELETE conversation");
            assert!(response.status().is_success(), "delete {id}: {}", response.status());
        }
    };

    // 1. The sign-in dialog is a modal dialog that keeps the focus; once signed in, the
    //    message box has it.
    browser.goto(&server.url(&format!("/#c={doomed}"))).await;
    let dialog = browser
        .wait_for(
            "the sign-in dialog",
            "const d = document.getElementById('token-dialog'); \
             return !d.hidden && document.activeElement?.id === 'token-input' && \
               { role: d.getAttribute('role'), modal: d.getAttribute('aria-modal'), \
                 inert: document.getElementById('app').inert };",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(dialog, json!({ "role": "dialog", "modal": "true", "inert": true }));
    for _ in 0..3 {
        // Tab where the focus is (sending keys to an element would focus it first).
        let active = browser.command(reqwest::Method::GET, "/element/active", None).await;
        let active = active[ELEMENT_KEY].as_str().expect("an active element").to_string();
        browser
            .command(
                reqwest::Method::POST,
                &format!("/element/{active}/value"),
                Some(json!({ "text": "\u{E004}" })),
            )
            .await;
        let inside = browser
            .js("return document.getElementById('token-dialog').contains(document.activeElement);")
            .await;
        assert_eq!(inside, true, "Tab left the sign-in dialog");
    }
    browser.click("#token-input").await;
    browser.type_into("#token-input", &server.token).await;
    browser.type_into("#token-input", ENTER).await;
    let signed_in = browser
        .wait_for(
            "the page, live, with Doomed",
            "return document.documentElement.dataset.ready === 'true' && \
             document.getElementById('connection').dataset.state === 'live' && \
             document.querySelectorAll('#messages .msg').length === 2 && \
             { focus: document.activeElement?.id, inert: document.getElementById('app').inert };",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(signed_in, json!({ "focus": "input", "inert": false }));

    // 2. Doomed is deleted elsewhere: the page leaves it, says so, offers nothing of it.
    delete(doomed).await;
    let gone = browser
        .wait_for(
            "the deleted conversation left",
            &format!(
                "const note = document.getElementById('empty-deleted'); \
                 return note && !note.hidden && {{ msgs: document.querySelectorAll('#messages .msg').length, \
                   listed: document.querySelector(\"#conversation-list li[data-conversation-id='{doomed}']\") !== null, \
                   hash: location.hash, title: document.getElementById('conversation-title').textContent, \
                   note: note.textContent }};"
            ),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(gone["msgs"], 0, "{gone}");
    assert_eq!(gone["listed"], false, "{gone}");
    assert_eq!(gone["hash"], "", "{gone}");
    assert_eq!(gone["title"], "New chat", "{gone}");
    assert!(gone["note"].as_str().unwrap().starts_with("This conversation was deleted."), "{gone}");

    // 3. Accessibility: the list is a log that does not read out each token, the connection
    //    dot says its state, a skip link leads to the message box, and the message actions
    //    have a 4.5:1 contrast in light and dark.
    let a11y = browser
        .js("const m = document.getElementById('messages'), c = document.getElementById('connection'); \
             return { role: m.getAttribute('role'), live: m.getAttribute('aria-live') || '', \
               announcer: document.getElementById('announcer')?.getAttribute('aria-live'), \
               dot: c.getAttribute('role') + ':' + c.getAttribute('aria-label') };")
        .await;
    assert_eq!(
        a11y,
        json!({ "role": "log", "live": "off", "announcer": "polite",
                "dot": "status:Connected: live updates on" })
    );
    browser.click(&open(wide)).await;
    browser
        .wait_for(
            "the wide conversation",
            "return document.querySelector('#messages .msg.assistant table') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.js("document.getElementById('search-input').focus(); return true;").await;
    browser.js("document.getElementById('skip-link').focus(); return true;").await;
    let skip = browser
        .js("return document.getElementById('skip-link').getBoundingClientRect().top >= 0;")
        .await;
    assert_eq!(skip, true, "the focused skip link is visible");
    browser.type_into("#skip-link", ENTER).await;
    let skipped = browser.js("return [document.activeElement?.id, location.hash];").await;
    assert_eq!(skipped, json!(["input", format!("#c={wide}")]));
    for scheme in ["light", "dark"] {
        browser
            .cdp(
                "Emulation.setEmulatedMedia",
                json!({ "features": [{ "name": "prefers-color-scheme", "value": scheme }] }),
            )
            .await;
        let contrast = browser
            .wait_for(
                "the actions' contrast",
                &format!(
                    "{CONTRAST_FN} if (matchMedia('(prefers-color-scheme: dark)').matches !== {}) return null; \
                     document.activeElement.blur(); \
                     return [...document.querySelectorAll('#messages .msg-actions .btn')] \
                       .filter(b => getComputedStyle(b).display !== 'none').map(contrastOf);",
                    scheme == "dark"
                ),
                Duration::from_secs(5),
            )
            .await;
        let contrast = contrast.as_array().unwrap();
        assert!(!contrast.is_empty());
        for c in contrast {
            assert!(c.as_f64().unwrap() >= 4.5, "{scheme}: action contrast {contrast:?}");
        }
    }

    // 4. A wide table scrolls sideways inside its bubble, its headers on one line, on a
    //    desktop and on a phone, and the page itself does not scroll sideways.
    for width in [1280, 360] {
        browser.set_window(width, 850).await;
        let table = browser
            .wait_for(
                "the wide table laid out",
                &format!(
                    "if ((window.innerWidth > 400) !== {}) return null; \
                     const w = document.querySelector('#messages .table-wrap'); \
                     const th = w.querySelector('th'); \
                     const line = parseFloat(getComputedStyle(th).lineHeight); \
                     return {{ scrolls: w.scrollWidth > w.clientWidth + 100, \
                       thLines: Math.round((th.clientHeight - 8) / line), thWidth: th.getBoundingClientRect().width, \
                       page: document.documentElement.scrollWidth <= window.innerWidth }};",
                    width > 400
                ),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(table["scrolls"], true, "{width}: {table}");
        assert_eq!(table["page"], true, "{width}: no page-level scroll: {table}");
        assert!(table["thLines"].as_i64().unwrap() <= 2, "{width}: {table}");
        assert!(table["thWidth"].as_f64().unwrap() >= 40.0, "{width}: {table}");
    }
    browser.set_window(1280, 860).await;

    // 5. A reference definition arriving after its use makes the link, while the answer
    //    streams and when it is redrawn at its end; Arabic text is laid out right to left.
    let links = browser
        .js("const div = document.createElement('div'); \
             myClaw.renderMarkdown(div, 'See [the docs][d].\\n\\nMore'); \
             const before = div.querySelectorAll('a').length; \
             myClaw.renderMarkdown(div, 'See [the docs][d].\\n\\nMore\\n\\n[d]: https://example.com/docs'); \
             const during = [...div.querySelectorAll('a')].map(a => a.href); \
             const p = div.firstChild; \
             myClaw.renderMarkdown(div, 'See [the docs][d].\\n\\nMore\\n\\n[d]: https://example.com/docs', true); \
             return { before, during, rebuilt: div.firstChild !== p, \
               after: [...div.querySelectorAll('a')].map(a => a.href) };")
        .await;
    assert_eq!(
        links,
        json!({ "before": 0, "during": ["https://example.com/docs"], "rebuilt": true,
                "after": ["https://example.com/docs"] })
    );
    let rtl = browser
        .js("const div = document.createElement('div'); document.body.appendChild(div); \
             myClaw.renderMarkdown(div, 'مرحبا بالعالم، هذه فقرة.\\n\\nAn English one.'); \
             const dirs = [...div.querySelectorAll('p')].map(p => getComputedStyle(p).direction); \
             div.remove(); \
             const user = document.querySelector('#messages .msg.user .content'); \
             return { dirs, user: user.getAttribute('dir') };")
        .await;
    assert_eq!(rtl, json!({ "dirs": ["rtl", "ltr"], "user": "auto" }));

    // 6. One settings panel at a time; unsaved persona edits are kept unless the user agrees
    //    to drop them; an empty system prompt says the default is used.
    browser.click("#toggle-persona").await;
    browser
        .wait_for(
            "the persona",
            "return document.getElementById('persona-name').value === 'Claw';",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#toggle-cron").await;
    let panels = browser
        .wait_for(
            "the Schedules panel",
            "return document.getElementById('cron-new') && !document.getElementById('cron-panel').hidden && \
             { persona: document.getElementById('persona-panel').hidden, \
               expanded: document.getElementById('toggle-persona').getAttribute('aria-expanded') };",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(panels, json!({ "persona": true, "expanded": "false" }), "both panels open");
    browser.click("#toggle-persona").await;
    browser
        .wait_for(
            "the persona alone",
            "return !document.getElementById('persona-panel').hidden && \
             document.getElementById('cron-panel').hidden && \
             document.getElementById('persona-name').value === 'Claw';",
            Duration::from_secs(10),
        )
        .await;
    browser.type_into("#persona-name", "ette").await;
    browser.js("window.__asked = []; window.confirm = (q) => { window.__asked.push(q); return false; }; return true;").await;
    browser.click("#persona-close").await;
    let kept = browser
        .js("return { open: !document.getElementById('persona-panel').hidden, \
               name: document.getElementById('persona-name').value, asked: window.__asked.length };")
        .await;
    assert_eq!(kept, json!({ "open": true, "name": "Clawette", "asked": 1 }));
    browser.click("#toggle-cron").await;
    let refused = browser
        .js("return { cron: document.getElementById('cron-panel').hidden, \
               persona: !document.getElementById('persona-panel').hidden, asked: window.__asked.length };")
        .await;
    assert_eq!(refused, json!({ "cron": true, "persona": true, "asked": 2 }));
    browser.clear("#persona-name").await;
    browser.type_into("#persona-name", "Claw").await;
    browser.clear("#persona-prompt").await;
    browser.click("#persona-save").await;
    let said = browser
        .wait_for(
            "the empty prompt saved",
            "const s = document.getElementById('persona-status').textContent; \
             return s.startsWith('Saved') && { status: s, prompt: document.getElementById('persona-prompt').value };",
            Duration::from_secs(10),
        )
        .await;
    assert!(said["status"].as_str().unwrap().contains("default"), "{said}");
    assert!(!said["prompt"].as_str().unwrap().is_empty(), "{said}");
    browser.click("#persona-close").await;
    let closed = browser
        .js("return { open: !document.getElementById('persona-panel').hidden, asked: window.__asked.length };")
        .await;
    assert_eq!(
        closed,
        json!({ "open": false, "asked": 2 }),
        "nothing unsaved: closed without asking"
    );

    // 7. A reminder's form offers neither its destination nor a model; Save works; its next
    //    run names its zone.
    browser.click("#toggle-cron").await;
    let item = format!("#cron-jobs li.cron-job[data-job-id='{reminder}']");
    let next = browser
        .wait_for(
            "the reminder in the panel",
            &format!("return document.querySelector(\"{item} .cron-next\")?.textContent;"),
            Duration::from_secs(10),
        )
        .await;
    assert!(next.as_str().unwrap().contains("Asia/Tokyo"), "{next}");
    browser.click(&format!("{item} .cron-edit")).await;
    let form = browser
        .wait_for(
            "the reminder form",
            "const t = document.getElementById('cron-target'); \
             return t && { channel: document.getElementById('cron-channel').disabled, target: t.disabled, \
               value: t.value, tier: document.getElementById('cron-tier') !== null };",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        form,
        json!({ "channel": true, "target": true, "value": crash.to_string(), "tier": false })
    );
    browser.clear("#cron-prompt").await;
    browser.type_into("#cron-prompt", "call the plumber at last").await;
    browser.click("#cron-save").await;
    let saved = browser
        .wait_for(
            "the reminder saved",
            "return document.getElementById('cron-form') === null && \
             document.getElementById('cron-status').textContent;",
            Duration::from_secs(10),
        )
        .await;
    assert!(saved.as_str().unwrap().contains("saved"), "{saved}");
    let job = api(&server, &format!("/api/cron/jobs/{reminder}")).await;
    assert_eq!(job["prompt"], "call the plumber at last", "{job}");
    assert_eq!(job["target"], crash.to_string(), "{job}");
    browser.click("#cron-close").await;

    // 8. The connection breaks mid-answer and the server stored nothing of it: the answer
    //    says so; my-claw is killed and comes back; then the view is what is stored, and the
    //    question offers Answer.
    browser.click(&open(crash)).await;
    browser
        .wait_for(
            "the crash conversation",
            "return document.querySelectorAll('#messages .msg').length === 3 && \
             getComputedStyle(document.querySelector('.msg.last-user .act-answer')).display !== 'none';",
            Duration::from_secs(10),
        )
        .await;
    let meta = json!({"type": "meta", "conversation_id": crash, "tier": "main", "provider": "local",
        "model": "SmolLM2", "leaves_machine": false});
    let blocks: Vec<String> = [meta, json!({"type": "token", "text": "Once upon a time"})]
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect();
    browser
        .js(&format!(
            "if (!window.__realFetch) window.__realFetch = window.fetch; \
             window.__fakePath = '/regenerate'; \
             window.fetch = (url, options) => window.__fakePath && String(url).endsWith(window.__fakePath) \
               ? window.__fake(options) : window.__realFetch(url, options); \
             window.__fake = () => Promise.resolve(new Response(new ReadableStream({{ start(c) {{ \
               const enc = new TextEncoder(); for (const b of {}) c.enqueue(enc.encode(b)); \
               setTimeout(() => c.error(new TypeError('network error')), 300); }} }}), \
               {{ status: 200, headers: {{ 'Content-Type': 'text/event-stream' }} }})); return true;",
            serde_json::to_string(&blocks).unwrap()
        ))
        .await;
    browser.click("#messages .msg.last-user .act-answer").await;
    browser
        .wait_for(
            "the lost answer",
            "const a = [...document.querySelectorAll('#messages .msg.assistant')].pop(); \
             return a.classList.contains('lost') && a.textContent.includes('Once upon');",
            Duration::from_secs(10),
        )
        .await;
    browser.js("window.__fakePath = null; return true;").await;
    server.kill_9();
    browser
        .wait_for(
            "the page to see my-claw gone",
            "return document.getElementById('connection').dataset.state === 'down';",
            Duration::from_secs(10),
        )
        .await;
    // While my-claw is away, the lost answer stays, saying what happened.
    let lost = browser.js("return document.querySelectorAll('#messages .msg.lost').length;").await;
    assert_eq!(lost, 1);
    // Restarted on the same port and data; kept alive until the test ends.
    let _restarted = start_server(Some(data.path()), &limits).await;
    let after_crash = browser
        .wait_for(
            "the stored view back",
            "const msgs = [...document.querySelectorAll('#messages .msg')]; \
             const answer = document.querySelector('.msg.last-user .act-answer'); \
             return msgs.length === 3 && !document.querySelector('.msg.lost') && answer && \
               getComputedStyle(answer).display !== 'none' && msgs.map(m => m.textContent.includes('Once upon'));",
            Duration::from_secs(40),
        )
        .await;
    assert_eq!(after_crash, json!([false, false, false]));

    // 9. An edit refused because the conversation is gone (404): one clear sentence, and the
    //    view says it was deleted.
    browser
        .wait_for(
            "live again",
            "return document.getElementById('connection').dataset.state === 'live';",
            Duration::from_secs(40),
        )
        .await;
    browser
        .js("window.__fakePath = '/edit'; window.__fake = () => Promise.resolve(new Response( \
               JSON.stringify({ error: { code: 'not_found', message: 'conversation 3 does not exist' } }), \
               { status: 404, headers: { 'Content-Type': 'application/json' } })); return true;")
        .await;
    browser.click("#messages .msg.last-user .act-edit").await;
    browser.clear("#input").await;
    send_message(&browser, "Tell me much more.").await;
    let refused = browser
        .wait_for(
            "the refused edit",
            "return !document.getElementById('banner').hidden && \
             { banner: document.getElementById('banner-text').textContent, \
               deleted: !document.getElementById('empty-deleted').hidden, \
               input: document.getElementById('input').value };",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        refused,
        json!({ "banner": "Your edit was not sent: this conversation was deleted. Send starts a new chat.",
                "deleted": true, "input": "Tell me much more." })
    );
    browser.js("window.__fakePath = null; return true;").await;
    browser.clear("#input").await;
    browser.click("#banner-close").await;

    // 10. The end of an answer is said once to screen readers.
    browser.click(&open(wide)).await;
    browser
        .wait_for(
            "the wide conversation",
            "return document.querySelector('#messages .msg.assistant table') !== null;",
            Duration::from_secs(10),
        )
        .await;
    let meta = json!({"type": "meta", "conversation_id": wide, "tier": "main", "provider": "local",
        "model": "SmolLM2", "leaves_machine": false});
    let done = json!({"type": "done", "message_id": 999_999, "finish": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "timings": {"decode_tok_s": 1.0}});
    browser.js(FAKE_CHAT_FETCH).await;
    browser
        .js(&fake_stream(
            &[meta, json!({"type": "token", "text": "Here is **the** answer to it."}), done],
            "close",
        ))
        .await;
    send_message(&browser, "Anything?").await;
    let announced = browser
        .wait_for(
            "the announcement",
            "return document.getElementById('announcer').textContent;",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(announced, "Answer finished: Here is the answer to it.");
    browser.js("window.__fake = null; return true;").await;

    // 11. Deleted while its answer streams: the answer ends quietly, the view says the
    //     conversation was deleted, and nothing claims a restart or a lost answer.
    browser.click("#new-chat").await;
    send_long_prompt(&browser).await;
    let story = browser
        .wait_for(
            "the new conversation's id",
            "const m = location.hash.match(/^#c=(\\d+)$/); return m ? Number(m[1]) : null;",
            Duration::from_secs(10),
        )
        .await;
    // Whatever is said in the list meanwhile, even for a moment, is recorded.
    browser
        .js("window.__said = []; new MutationObserver((changes) => changes.forEach((c) => \
               c.addedNodes.forEach((n) => { if (n.nodeType === 1 && (n.matches('.error-text') || n.querySelector('.error-text'))) \
                 window.__said.push(n.textContent); }))) \
               .observe(document.getElementById('messages'), { childList: true, subtree: true }); return true;")
        .await;
    delete(story.as_i64().unwrap()).await;
    let quiet = browser
        .wait_for(
            "the deleted story",
            "return !document.getElementById('empty-deleted').hidden && \
             !document.getElementById('send').hidden && \
             { note: document.getElementById('busy-note').hidden, \
               errors: document.querySelectorAll('#messages .error-text').length, \
               banner: document.getElementById('banner').hidden, msgs: document.querySelectorAll('#messages .msg').length };",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(quiet, json!({ "note": true, "errors": 0, "banner": true, "msgs": 0 }));
    // The stopped answer's end arrives: still nothing to say.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = browser
        .js("return { note: document.getElementById('busy-note').hidden, \
               banner: document.getElementById('banner').hidden, \
               deleted: !document.getElementById('empty-deleted').hidden, \
               msgs: document.querySelectorAll('#messages .msg').length };")
        .await;
    assert_eq!(later, json!({ "note": true, "banner": true, "deleted": true, "msgs": 0 }));
    assert_eq!(browser.js("return window.__said;").await, json!([]), "an alarm was raised");

    browser.quit().await;
    eprintln!("browser deletion test: {:?}", test_started.elapsed());
}

/// A prompt that keeps SmolLM2 counting until the reply limit.
const COUNTING_PROMPT: &str = "Count from 1 to 1000, one number per line, with no other text.";

/// An answer outlives its page: a page reloaded while its answer streams follows that
/// answer (`/live`) to its end, as streaming as before, and then shows what was stored;
/// a message another client stores in the open conversation is followed the same way.
#[tokio::test]
async fn webchat_follows_an_answer_that_outlived_its_page() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    // The answers come from the slow stand-in (the default tier), so each is long enough to
    // reload in the middle of, on any machine.
    let slow = util::slow_model().await;
    let tiers = [("MODEL_FAST", slow.as_str()), ("DEFAULT_TIER", "fast")];
    let server = start_server(None, &tiers).await;
    let browser = Browser::start().await;
    browser.goto(&server.url(&format!("/?token={}", server.token))).await;
    let live = "return document.documentElement.dataset.ready === 'true' && \
                document.getElementById('connection').dataset.state === 'live';";
    browser.wait_for("the page, live", live, Duration::from_secs(30)).await;

    // 1. A long answer streams; the page reloads in the middle of it.
    send_message(&browser, COUNTING_PROMPT).await;
    let script = format!(
        "{LAST_ANSWER_FN} const a = lastAnswer(); \
         return a && a.state === 'streaming' && a.text.length > 20 && location.hash.startsWith('#c=') && a;"
    );
    let before =
        browser.wait_for("the counting answer streaming", &script, Duration::from_secs(90)).await;
    let hash = browser.js("return location.hash;").await;
    let id: i64 =
        hash.as_str().unwrap().trim_start_matches("#c=").parse().expect("conversation id");
    browser.refresh().await;

    // 2. The reloaded page follows it: a streaming answer after the stored question, whose
    //    text grows; Stop is offered, Send and the message actions are not.
    let following = format!(
        "{LAST_ANSWER_FN} const a = lastAnswer(); \
         return document.documentElement.dataset.ready === 'true' && a && a.state === 'streaming' && \
           a.text.length > 0 && {{ text: a.text, \
             users: document.querySelectorAll('#messages .msg.user').length, \
             answers: document.querySelectorAll('#messages .msg.assistant').length, \
             stop: !document.getElementById('stop').hidden, send: !document.getElementById('send').hidden, \
             actions: document.getElementById('messages').classList.contains('actions-enabled') }};"
    );
    let first = browser
        .wait_for("the answer followed after the reload", &following, Duration::from_secs(30))
        .await;
    assert_eq!(first["users"], 1, "{first}");
    assert_eq!(first["answers"], 1, "one answer bubble: {first}");
    assert_eq!(first["stop"], true, "Stop is offered: {first}");
    assert_eq!(first["send"], false, "{first}");
    assert_eq!(first["actions"], false, "no Edit or Regenerate meanwhile: {first}");
    let first_text = first["text"].as_str().unwrap().to_string();
    assert!(
        first_text.len() >= before["text"].as_str().unwrap().len(),
        "the text so far comes at once: {first} after {before}"
    );
    let grows = format!(
        "{LAST_ANSWER_FN} const a = lastAnswer(); \
         return a && a.state === 'streaming' && a.text.length > {};",
        first_text.len()
    );
    browser.wait_for("the followed answer growing", &grows, Duration::from_secs(60)).await;

    // 3. It ends as it was stored: complete, one answer, the same text, Send back.
    let done = wait_answer_state(&browser, &["done"], Duration::from_secs(240)).await;
    let messages = api(&server, &format!("/api/conversations/{id}/messages")).await;
    let stored = messages["messages"].as_array().unwrap();
    assert_eq!(stored.len(), 2, "{messages}");
    assert_eq!(stored[1]["status"], "complete", "{messages}");
    let settled = format!(
        "const all = [...document.querySelectorAll('#messages .msg')]; \
         const a = all[all.length - 1]; \
         return all.length === 2 && a.dataset.messageId === '{}' && a.dataset.state === 'done' && \
           a.__bubble.text === {} && !document.getElementById('send').hidden && \
           document.getElementById('messages').classList.contains('actions-enabled');",
        stored[1]["id"],
        json!(stored[1]["content"])
    );
    browser.wait_for("the view as stored", &settled, Duration::from_secs(20)).await;
    assert!(done["text"].as_str().unwrap().len() > first_text.len(), "{done}");

    // 4. Another client (a second tab) asks in the open conversation: the page follows
    //    that answer too, instead of offering Answer on the question meanwhile.
    let request = reqwest::Client::new()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({ "message": "Now count from 1 to 500, one number per line.", "conversation_id": id }))
        .send();
    let other = tokio::spawn(async move {
        let response = request.await.expect("POST /api/chat");
        assert!(response.status().is_success(), "{}", response.status());
        response.text().await.expect("the other client's stream")
    });
    let script = format!(
        "{LAST_ANSWER_FN} const a = lastAnswer(); \
         return document.querySelectorAll('#messages .msg').length === 4 && a && a.state === 'streaming' && \
           !document.getElementById('stop').hidden;"
    );
    browser.wait_for("the other client's answer followed", &script, Duration::from_secs(60)).await;
    let events = other.await.expect("the other client");
    assert!(events.contains("\"type\":\"done\""), "{events}");
    let messages = api(&server, &format!("/api/conversations/{id}/messages")).await;
    let stored = messages["messages"].as_array().unwrap();
    assert_eq!(stored.len(), 4, "{messages}");
    let settled = format!(
        "const all = [...document.querySelectorAll('#messages .msg')]; \
         return all.length === 4 && all.every((w) => w.dataset.messageId) && \
           all[3].dataset.messageId === '{}' && all[3].__bubble.text === {};",
        stored[3]["id"],
        json!(stored[3]["content"])
    );
    browser.wait_for("the second answer as stored", &settled, Duration::from_secs(20)).await;
    eprintln!("webchat follow test took {:?}", test_started.elapsed());
}

/// The page at `hash` (`#c=<id>`, or empty), signed in, once it is ready and live.
async fn open_live(browser: &Browser, server: &Server, hash: &str) {
    browser.goto(&server.url(&format!("/?token={}{hash}", server.token))).await;
    let live = "return document.documentElement.dataset.ready === 'true' && \
                document.getElementById('connection').dataset.state === 'live';";
    browser.wait_for("the page, live", live, Duration::from_secs(30)).await;
}

/// Posts a message into conversation `id` as another tab would; the task ends with its
/// answer's events once the answer ended.
fn chat_from_elsewhere(server: &Server, id: i64, message: &str) -> tokio::task::JoinHandle<String> {
    let request = reqwest::Client::new()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .timeout(Duration::from_secs(120))
        .json(&json!({ "message": message, "conversation_id": id }))
        .send();
    tokio::spawn(async move {
        let response = request.await.expect("POST /api/chat");
        assert!(response.status().is_success(), "{}", response.status());
        response.text().await.expect("the other tab's stream")
    })
}

/// The texts of conversation `id`'s stored messages, in order.
async fn stored_texts(server: &Server, id: i64) -> Vec<String> {
    let messages = api(server, &format!("/api/conversations/{id}/messages")).await;
    let list = messages["messages"].as_array().cloned().unwrap_or_default();
    list.iter().map(|m| m["content"].as_str().unwrap_or_default().to_string()).collect()
}

/// Stores a WebChat conversation `title` of one question and its answer (by a model) in
/// the database at `data_dir`; returns its id.
async fn seed_exchange(data_dir: &Path, title: &str, question: &str, answer: &str) -> i64 {
    use my_claw::db::memory::{self, NewMessage};
    use my_claw::domain::Role;
    let url = format!("sqlite://{}", data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("seed database");
    let id = memory::create_webchat_conversation(&pool, Some(title)).await.expect("seed").id;
    let question = NewMessage::plain(id, Role::User, question.to_string());
    memory::add_message(&pool, &question).await.expect("seed question");
    let answer = NewMessage {
        provider: Some("local".into()),
        ..NewMessage::plain(id, Role::Assistant, answer.to_string())
    };
    memory::add_message(&pool, &answer).await.expect("seed answer");
    pool.close().await;
    id.0
}

const ARROW_UP: &str = "\u{E013}";

/// Two tabs on one conversation: an edit overtaken by a message sent in another tab is not
/// sent, never moves to that message, and comes back as an ordinary draft.
#[tokio::test]
async fn webchat_between_tabs_keeps_what_each_tab_did() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let tabs = seed_exchange(data.path(), "Tabs", "First question", "First answer").await;
    let slow = util::slow_model().await;
    let tiers = [("MODEL_FAST", slow.as_str()), ("DEFAULT_TIER", "fast")];
    let server = start_server(Some(data.path()), &tiers).await;
    let browser = Browser::start().await;
    open_live(&browser, &server, &format!("#c={tabs}")).await;

    // 1. This tab edits its last message (Up in the empty box); meanwhile another tab sends
    //    a message, which is answered. Enter here: the server refuses the edit (409); the
    //    page leaves edit mode, keeps the text unsent in the box, says why without ids, and
    //    shows the conversation as stored. A second Enter sends the text as a new message:
    //    the other tab's message and its answer stay.
    browser.click("#input").await;
    browser.type_into("#input", ARROW_UP).await;
    browser
        .wait_for(
            "the edit",
            "return !document.getElementById('edit-note').hidden && \
             document.getElementById('input').value === 'First question';",
            Duration::from_secs(10),
        )
        .await;
    browser.clear("#input").await;
    browser.type_into("#input", "Edited in this tab").await;
    let events =
        chat_from_elsewhere(&server, tabs, "Sent from the other tab").await.expect("the other tab");
    assert!(events.contains("\"type\":\"done\""), "{events}");
    browser.type_into("#input", ENTER).await;
    let refused = browser
        .wait_for(
            "the refused edit",
            "const b = document.getElementById('banner'); \
             return !b.hidden && document.querySelectorAll('#messages .msg').length === 4 && { \
               banner: document.getElementById('banner-text').textContent, editing: !document.getElementById('edit-note').hidden || \
                 document.querySelectorAll('#messages .msg.editing').length > 0, \
               input: document.getElementById('input').value, \
               texts: [...document.querySelectorAll('#messages .msg')].map((w) => w.__bubble.text) };",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(refused["editing"], false, "edit mode ended: {refused}");
    assert_eq!(refused["input"], "Edited in this tab", "{refused}");
    let banner = refused["banner"].as_str().unwrap();
    assert!(banner.contains("another tab or window"), "{refused}");
    assert!(!banner.chars().any(|c| c.is_ascii_digit()), "no message ids: {refused}");
    let stored = stored_texts(&server, tabs).await;
    assert_eq!(refused["texts"], json!(stored), "shown as stored");
    assert_eq!(stored[2], "Sent from the other tab");
    browser.type_into("#input", ENTER).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = stored_texts(&server, tabs).await;
        if stored.len() >= 5 {
            assert_eq!(stored[2], "Sent from the other tab", "{stored:?}");
            assert_eq!(stored[4], "Edited in this tab", "sent as a new message: {stored:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the draft was not sent: {stored:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_answer_state(&browser, &["done"], Duration::from_secs(30)).await;

    // 2. Renamed in another tab: the list, the header and the window's title follow.
    let rename = |title: &'static str| {
        let request = reqwest::Client::new()
            .patch(server.url(&format!("/api/conversations/{tabs}")))
            .bearer_auth(&server.token)
            .json(&json!({ "title": title }))
            .send();
        async move {
            let renamed = request.await.expect("PATCH conversation");
            assert!(renamed.status().is_success(), "{}", renamed.status());
        }
    };
    rename("Renamed elsewhere").await;
    let script = format!(
        "return document.getElementById('conversation-title').textContent === 'Renamed elsewhere' && \
           document.querySelector(\"#conversation-list li[data-conversation-id='{tabs}'] .conv-title\") \
             .textContent === 'Renamed elsewhere' && document.title.startsWith('Renamed elsewhere');"
    );
    browser.wait_for("the new title", &script, Duration::from_secs(10)).await;

    // 3. Loads of the list overlap and can come back in any order: one asked before a
    //    rename and answered after the load the rename caused does not put the old title
    //    back.
    browser
        .js("if (!window.__realFetch) window.__realFetch = window.fetch; \
             window.fetch = (url, options) => { \
               const p = window.__realFetch(url, options); \
               if (String(url) !== '/api/conversations' || !window.__holdList) return p; \
               window.__holdList = false; \
               return p.then((r) => new Promise((resolve) => { window.__heldList = () => resolve(r); })); }; \
             window.__holdList = true; window.__olderDone = false; \
             myClaw.refreshConversations().then(() => { window.__olderDone = true; }); \
             return true;")
        .await;
    browser
        .wait_for(
            "the older load, answered and held",
            "return typeof window.__heldList === 'function';",
            Duration::from_secs(10),
        )
        .await;
    rename("Renamed again").await;
    let listed = format!(
        "return document.querySelector(\"#conversation-list li[data-conversation-id='{tabs}'] .conv-title\") \
           .textContent;"
    );
    let newer = format!("{} === 'Renamed again';", listed.trim_end_matches(';'));
    browser.wait_for("the newer list", &newer, Duration::from_secs(10)).await;
    browser.js("window.__heldList(); return true;").await;
    browser
        .wait_for("the older load's end", "return window.__olderDone;", Duration::from_secs(10))
        .await;
    assert_eq!(browser.js(&listed).await, "Renamed again", "a late, older list was shown");

    browser.quit().await;
    eprintln!("browser tabs test: {:?}", test_started.elapsed());
}

/// Where the message list is: how far above its bottom (px), whether "Jump to latest"
/// shows, and the length of the last answer's text.
const SCROLL_STATE: &str = "const box = document.getElementById('messages'); \
    const all = document.querySelectorAll('#messages .msg.assistant'); const a = all[all.length - 1]; \
    return { below: box.scrollHeight - box.scrollTop - box.clientHeight, \
             overflow: box.scrollHeight - box.clientHeight, \
             jump: !document.getElementById('jump-latest').hidden, \
             state: a ? a.dataset.state : '', text: a ? a.__bubble.text.length : 0 };";

/// Waits until the streaming answer's text is longer than `length` (tokens came after a
/// scroll), and returns the scroll state then.
async fn scroll_state_after(browser: &Browser, length: u64) -> Value {
    let script = format!(
        "const s = (() => {{ {SCROLL_STATE} }})(); \
         return s.state === 'streaming' && s.text > {} && s;",
        length + 6
    );
    browser.wait_for("more tokens of the answer", &script, Duration::from_secs(10)).await
}

/// The reader scrolls up while an answer streams: any move up, however small (a wheel
/// step, a touchpad's few pixels), stops the view from following the answer; "Jump to
/// latest" brings it back and follows again. Sending still scrolls to the message sent.
#[tokio::test]
async fn webchat_lets_the_reader_scroll_up_while_an_answer_streams() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let slow = util::slow_model().await;
    let tiers = [("MODEL_FAST", slow.as_str()), ("DEFAULT_TIER", "fast")];
    let server = start_server(None, &tiers).await;
    let browser = Browser::start().await;
    open_live(&browser, &server, "").await;

    // 1. The counting answer streams past the bottom of the view, which follows it.
    send_message(&browser, COUNTING_PROMPT).await;
    let script = format!(
        "const s = (() => {{ {SCROLL_STATE} }})(); \
         return s.state === 'streaming' && s.overflow > 200 && s;"
    );
    let long =
        browser.wait_for("an answer longer than the view", &script, Duration::from_secs(30)).await;
    let followed = scroll_state_after(&browser, long["text"].as_u64().unwrap()).await;
    assert!(followed["below"].as_f64().unwrap() <= 4.0, "followed: {followed}");
    assert_eq!(followed["jump"], false, "{followed}");

    // 2. A small step up (60 px, less than a wheel notch): the next tokens leave it there,
    //    and "Jump to latest" shows.
    browser.js("document.getElementById('messages').scrollBy(0, -60); return true;").await;
    let up = scroll_state_after(&browser, followed["text"].as_u64().unwrap()).await;
    assert!(up["below"].as_f64().unwrap() > 40.0, "pulled back to the end: {up}");
    assert_eq!(up["jump"], true, "{up}");

    // 3. Jump to latest: at the end, and following the answer again.
    browser.click("#jump-latest").await;
    let back = scroll_state_after(&browser, up["text"].as_u64().unwrap()).await;
    assert!(back["below"].as_f64().unwrap() <= 4.0, "{back}");
    assert_eq!(back["jump"], false, "{back}");

    // 4. A touchpad's step of 8 px up is a move up too.
    browser.wheel("#messages", -8).await;
    let nudged = scroll_state_after(&browser, back["text"].as_u64().unwrap()).await;
    assert!(nudged["below"].as_f64().unwrap() > 4.0, "pulled back to the end: {nudged}");
    assert_eq!(nudged["jump"], true, "{nudged}");
    wait_answer_state(&browser, &["done"], Duration::from_secs(30)).await;

    // 5. Sending scrolls to the message sent, wherever the reader was.
    browser.js("document.getElementById('messages').scrollTop = 0; return true;").await;
    send_message(&browser, "And again.").await;
    let sent = format!(
        "const s = (() => {{ {SCROLL_STATE} }})(); \
         return document.querySelectorAll('#messages .msg').length === 4 && s.below <= 4 && s;"
    );
    browser.wait_for("the message sent, in view", &sent, Duration::from_secs(10)).await;

    browser.quit().await;
    eprintln!("browser scrolling test: {:?}", test_started.elapsed());
}

/// The sidebar entry of conversation `id`, and whether it says an answer is being written.
fn answering_mark(id: i64) -> String {
    format!(
        "Boolean(document.querySelector(\"#conversation-list li[data-conversation-id='{id}'] .badge.answering\"))"
    )
}

/// An answer streaming in one conversation holds up no other: the page stops reading it when
/// the user leaves (the server writes and stores it), marks its conversation "answering…"
/// (after a reload too), follows it again on coming back, and sends elsewhere meanwhile. In
/// the conversation being answered, Enter says why it does not send.
#[tokio::test]
async fn webchat_sends_anywhere_while_another_conversation_is_answered() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let one = seed_exchange(data.path(), "One", "Question one", "Answer one").await;
    let two = seed_exchange(data.path(), "Two", "Question two", "Answer two").await;
    let slow = util::slow_model().await;
    let tiers = [("MODEL_FAST", slow.as_str()), ("DEFAULT_TIER", "fast")];
    let server = start_server(Some(data.path()), &tiers).await;
    let browser = Browser::start().await;
    let title_is = |title: &str| {
        format!(
            "return document.getElementById('conversation-title').textContent === {};",
            json!(title)
        )
    };

    // 1. Another tab asks in One; this page opens (as after a reload) on Two: One's entry
    //    says it is being answered, Two's does not, until the answer is stored.
    let other = chat_from_elsewhere(&server, one, "Count for me.");
    open_live(&browser, &server, &format!("#c={two}")).await;
    let marked = format!("return {} && !{};", answering_mark(one), answering_mark(two));
    browser.wait_for("One marked as being answered", &marked, Duration::from_secs(10)).await;
    let label = browser
        .js(&format!(
            "return document.querySelector(\"#conversation-list li[data-conversation-id='{one}'] button\").textContent;"
        ))
        .await;
    assert!(label.as_str().unwrap().contains("answering…"), "said in the entry's name: {label}");
    assert!(other.await.expect("the other tab").contains("\"type\":\"done\""));
    let unmarked = format!("return !{};", answering_mark(one));
    browser.wait_for("the mark gone", &unmarked, Duration::from_secs(10)).await;

    // 2. This page asks in One, and opens Two while the answer streams: One is marked, and
    //    Two sends at once.
    browser.click(&format!("#conversation-list li[data-conversation-id='{one}'] button")).await;
    browser.wait_for("One", &title_is("One"), Duration::from_secs(10)).await;
    send_message(&browser, COUNTING_PROMPT).await;
    wait_answer_state(&browser, &["streaming"], Duration::from_secs(10)).await;
    browser.click(&format!("#conversation-list li[data-conversation-id='{two}'] button")).await;
    let left = format!(
        "return document.getElementById('conversation-title').textContent === 'Two' && {};",
        answering_mark(one)
    );
    browser.wait_for("Two, with One marked", &left, Duration::from_secs(10)).await;
    send_message(&browser, "Hello in two").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_texts(&server, two).await.get(2).map(String::as_str) != Some("Hello in two") {
        assert!(Instant::now() < deadline, "Two did not send while One was answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_answer_state(&browser, &["streaming", "done"], Duration::from_secs(10)).await;

    // 3. Back in One: its answer is followed (or shown as stored, if it ended), and ends as
    //    stored, complete. Two's answer, left in turn, is stored complete too.
    browser.click(&format!("#conversation-list li[data-conversation-id='{one}'] button")).await;
    browser.wait_for("One again", &title_is("One"), Duration::from_secs(10)).await;
    let done = wait_answer_state(&browser, &["done"], Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (stored_one, stored_two) = loop {
        let one = api(&server, &format!("/api/conversations/{one}/messages")).await;
        let two = api(&server, &format!("/api/conversations/{two}/messages")).await;
        let ended = |v: &Value, n: usize| {
            v["messages"]
                .as_array()
                .is_some_and(|m| m.len() == n && m[n - 1]["role"] == "assistant")
        };
        if ended(&one, 6) && ended(&two, 4) {
            break (one, two);
        }
        assert!(Instant::now() < deadline, "not stored: {one} {two}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let last_one = stored_one["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last_one["status"], "complete", "{stored_one}");
    let squeeze = |v: &Value| v.as_str().unwrap_or_default().replace(char::is_whitespace, "");
    assert_eq!(squeeze(&done["text"]), squeeze(&last_one["content"]), "{done}");
    let last_two = stored_two["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last_two["status"], "complete", "{stored_two}");

    // 4. One answer at a time in a conversation: Enter while it streams says so, and the
    //    message stays in the box.
    send_message(&browser, COUNTING_PROMPT).await;
    wait_answer_state(&browser, &["streaming"], Duration::from_secs(10)).await;
    let users = browser.js("return document.querySelectorAll('#messages .msg.user').length;").await;
    send_message(&browser, "Too soon").await;
    let refused = browser
        .wait_for(
            "the note",
            "const n = document.getElementById('busy-note'); return !n.hidden && n.offsetHeight > 0 && \
             { input: document.getElementById('input').value, \
               users: document.querySelectorAll('#messages .msg.user').length };",
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(refused, json!({ "input": "Too soon", "users": users }));
    wait_answer_state(&browser, &["done"], Duration::from_secs(30)).await;
    browser
        .wait_for(
            "the note gone with the answer",
            "return document.getElementById('busy-note').hidden;",
            Duration::from_secs(5),
        )
        .await;

    browser.quit().await;
    eprintln!("browser conversations-in-parallel test: {:?}", test_started.elapsed());
}

/// Each conversation keeps its own draft (a new chat too), across a reload, until it is
/// sent; Back and Forward move between the conversations opened.
#[tokio::test]
async fn webchat_keeps_a_draft_per_conversation_and_a_history_of_them() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let one = seed_exchange(data.path(), "One", "Question one", "Answer one").await;
    let two = seed_exchange(data.path(), "Two", "Question two", "Answer two").await;
    let slow = util::slow_model().await;
    let tiers = [("MODEL_FAST", slow.as_str()), ("DEFAULT_TIER", "fast")];
    let server = start_server(Some(data.path()), &tiers).await;
    let browser = Browser::start().await;
    open_live(&browser, &server, &format!("#c={one}")).await;
    // The view: which conversation, and what the message box holds.
    let view = |title: &str, input: &str| {
        format!(
            "return document.getElementById('conversation-title').textContent === {} && \
               document.getElementById('input').value === {};",
            json!(title),
            json!(input)
        )
    };
    let open = |id: i64| format!("#conversation-list li[data-conversation-id='{id}'] button");

    // 1. A draft per conversation, and one for a new chat; each comes back, after a reload too.
    browser.type_into("#input", "Draft for one").await;
    browser.click(&open(two)).await;
    browser.wait_for("Two, with an empty box", &view("Two", ""), Duration::from_secs(10)).await;
    browser.type_into("#input", "Draft for two").await;
    browser.refresh().await;
    browser
        .wait_for(
            "Two's draft after a reload",
            &view("Two", "Draft for two"),
            Duration::from_secs(20),
        )
        .await;
    browser.click(&open(one)).await;
    browser.wait_for("One's draft", &view("One", "Draft for one"), Duration::from_secs(10)).await;
    browser.click("#new-chat").await;
    browser.wait_for("a new chat, empty", &view("New chat", ""), Duration::from_secs(10)).await;
    browser.type_into("#input", "Draft for new").await;
    browser.click(&open(one)).await;
    browser
        .wait_for("One's draft again", &view("One", "Draft for one"), Duration::from_secs(10))
        .await;
    browser.click("#new-chat").await;
    browser
        .wait_for(
            "the new chat's draft",
            &view("New chat", "Draft for new"),
            Duration::from_secs(10),
        )
        .await;

    // 2. Back returns to the conversation before, Forward to the one after.
    browser.click(&open(one)).await;
    browser.wait_for("One", &view("One", "Draft for one"), Duration::from_secs(10)).await;
    browser.click(&open(two)).await;
    browser.wait_for("Two", &view("Two", "Draft for two"), Duration::from_secs(10)).await;
    browser.command(reqwest::Method::POST, "/back", Some(json!({}))).await;
    let back = format!(
        "return document.getElementById('conversation-title').textContent === 'One' && \
           document.getElementById('input').value === 'Draft for one' && location.hash === '#c={one}';"
    );
    browser.wait_for("One after Back", &back, Duration::from_secs(10)).await;
    browser.command(reqwest::Method::POST, "/forward", Some(json!({}))).await;
    browser
        .wait_for("Two after Forward", &view("Two", "Draft for two"), Duration::from_secs(10))
        .await;

    // 3. A draft sent is gone, after a reload too.
    browser.type_into("#input", ENTER).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_texts(&server, two).await.get(2).map(String::as_str) != Some("Draft for two") {
        assert!(Instant::now() < deadline, "the draft was not sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser.refresh().await;
    browser.wait_for("Two, nothing left to send", &view("Two", ""), Duration::from_secs(20)).await;

    browser.quit().await;
    eprintln!("browser drafts and history test: {:?}", test_started.elapsed());
}

const ESCAPE: &str = "\u{E00C}";
const TAB: &str = "\u{E004}";

/// What the focused element is: its id, or the id of the nearest ancestor that has one.
const FOCUSED: &str = "const a = document.activeElement; const n = a && a.closest('[id]'); \
    return { id: a ? a.id : '', within: n ? n.id : '', panel: a ? (a.closest('.panel, #sidebar') || {}).id || '' : '' };";

/// The page for keyboards and screen readers: the open conversation is marked current,
/// choosing one with the keyboard puts the focus in the message box, the settings panels and
/// the phone's drawer take the focus, hold it (the page behind the drawer is inert), close on
/// Escape and give it back; each message says who wrote it, Copy buttons say what they
/// copy, and an answer's headings stay below the page's own.
#[tokio::test]
async fn webchat_is_usable_with_a_keyboard_and_a_screen_reader() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let test_started = Instant::now();
    let data = tempfile::tempdir().expect("data dir");
    let answer =
        "# Big title\n\n## Smaller title\n\n###### Smallest\n\nSome text.\n\n```\ncode\n```\n";
    let headings = seed_exchange(data.path(), "Headings", "Show me headings", answer).await;
    let other = seed_exchange(data.path(), "Other", "Another question", "Another answer").await;
    let server = start_server(Some(data.path()), &[]).await;
    let browser = Browser::start().await;
    open_live(&browser, &server, &format!("#c={headings}")).await;

    // 1. The open conversation is the list's current page; the answer's headings are h3 to
    //    h6 of the page; each message says who wrote it; the Copy buttons differ by name.
    let page = browser
        .js("const current = [...document.querySelectorAll('#conversation-list [aria-current=page]')]; \
             return { current: current.map((b) => b.closest('li').dataset.conversationId), \
               high: document.querySelectorAll('#messages h1, #messages h2').length, \
               headings: [...document.querySelectorAll('#messages .content :is(h3, h4, h5, h6)')] \
                 .map((h) => h.tagName + ' ' + h.className), \
               authors: [...document.querySelectorAll('#messages .msg')].map((m) => (m.querySelector('.author') || {}).textContent), \
               copy: [...document.querySelectorAll('#messages .act-copy, #messages .copy-code')] \
                 .map((b) => b.getAttribute('aria-label')) };")
        .await;
    assert_eq!(page["current"], json!([headings.to_string()]), "{page}");
    assert_eq!(page["high"], 0, "{page}");
    assert_eq!(page["headings"], json!(["H3 md-h1", "H4 md-h2", "H6 md-h6"]), "{page}");
    assert_eq!(page["authors"], json!(["You said:", "Assistant said:"]), "{page}");
    let mut copy: Vec<String> = page["copy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap_or("").to_string())
        .collect();
    copy.sort();
    assert_eq!(copy, ["Copy code", "Copy message", "Copy message"], "{page}");

    // 2. Another conversation chosen with the keyboard: the focus goes to the message box.
    browser
        .js(&format!(
            "document.querySelector(\"#conversation-list li[data-conversation-id='{other}'] button\").focus(); return true;"
        ))
        .await;
    browser.press(ENTER).await;
    let chosen = format!(
        "return document.getElementById('conversation-title').textContent === 'Other' && \
           document.activeElement.id === 'input' && \
           document.querySelector(\"#conversation-list li[data-conversation-id='{other}'] button\") \
             .getAttribute('aria-current') === 'page';"
    );
    browser.wait_for("Other, the focus in the box", &chosen, Duration::from_secs(10)).await;

    // 3. Persona and Schedules: the focus goes into the panel, Escape closes it, and the
    //    focus is back on the button that opened it.
    for (button, panel) in [("toggle-persona", "persona-panel"), ("toggle-cron", "cron-panel")] {
        browser.click(&format!("#{button}")).await;
        let inside =
            format!("const f = (() => {{ {FOCUSED} }})(); return f.panel === '{panel}' && f;");
        browser.wait_for(&format!("the focus in {panel}"), &inside, Duration::from_secs(10)).await;
        browser.press(ESCAPE).await;
        let back = format!(
            "return document.getElementById('{panel}').hidden && document.activeElement.id === '{button}';"
        );
        browser
            .wait_for(&format!("{panel} closed, the focus back"), &back, Duration::from_secs(5))
            .await;
    }

    // 4. A phone: the drawer takes the focus, Tab stays out of the page behind it (inert),
    //    and Escape closes it, giving the focus back to the button that opened it.
    browser.set_window(360, 800).await;
    browser.wait_for("a phone", "return window.innerWidth <= 360;", Duration::from_secs(5)).await;
    browser.click("#open-sidebar").await;
    let opened = format!(
        "const f = (() => {{ {FOCUSED} }})(); \
         return f.panel === 'sidebar' && document.getElementById('main').inert && f;"
    );
    browser.wait_for("the focus in the drawer", &opened, Duration::from_secs(5)).await;
    for _ in 0..20 {
        browser.press(TAB).await;
        let in_main = browser
            .js("return document.getElementById('main').contains(document.activeElement);")
            .await;
        assert_eq!(in_main, false, "Tab reached the page behind the drawer");
    }
    browser.press(ESCAPE).await;
    browser
        .wait_for(
            "the drawer closed, the focus back",
            "return !document.getElementById('app').classList.contains('sidebar-open') && \
             !document.getElementById('main').inert && document.activeElement.id === 'open-sidebar';",
            Duration::from_secs(5),
        )
        .await;
    browser.set_window(1280, 860).await;

    browser.quit().await;
    eprintln!("browser accessibility test: {:?}", test_started.elapsed());
}

/// A reloaded page says why a stored answer failed (the server keeps the reason), and says
/// "stopped" only of an answer the user stopped.
#[tokio::test]
async fn webchat_says_why_a_stored_answer_failed() {
    use my_claw::db::memory::{self, MessageStatus, NewMessage};
    use my_claw::domain::Role;
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let data = tempfile::tempdir().expect("data dir");
    let url = format!("sqlite://{}", data.path().join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("seed database");
    let id = memory::create_webchat_conversation(&pool, Some("Failures")).await.unwrap().id;
    let answers = [
        (MessageStatus::Partial, "Half of it", Some("the model server closed the connection")),
        (MessageStatus::Error, "", Some("the model is not available")),
        (MessageStatus::Partial, "Stopped here", None),
    ];
    for (status, text, failure) in answers {
        let question = NewMessage::plain(id, Role::User, "Tell me.".to_string());
        memory::add_message(&pool, &question).await.expect("seed question");
        let answer = NewMessage {
            provider: Some("local".into()),
            status,
            ..NewMessage::plain(id, Role::Assistant, text.to_string())
        };
        memory::add_answer(&pool, &answer, &[], failure).await.expect("seed answer");
    }
    pool.close().await;
    let server = start_server(Some(data.path()), &[]).await;
    let browser = Browser::start().await;
    open_live(&browser, &server, &format!("#c={}", id.0)).await;
    let shown = browser
        .js("return [...document.querySelectorAll('#messages .msg.assistant')].map((a) => ({ \
               meta: a.querySelector('.meta .stopped')?.textContent || '', \
               error: a.querySelector('.error-text')?.textContent || '' }));")
        .await;
    assert_eq!(
        shown,
        json!([
            { "meta": "failed before the end", "error": "Error: the model server closed the connection" },
            { "meta": "failed", "error": "Error: the model is not available" },
            { "meta": "stopped before the end", "error": "" },
        ])
    );
    browser.quit().await;
}

/// Small things that must say what they mean: a blank rename says it did not rename, a
/// conversation's entry shows its whole title and date on hover, the model selector's labels
/// fit it on a desktop and on a phone, hint text is readable on the sidebar, and the
/// Schedules form drops an earlier "saved" note when a save fails and says when a time zone
/// is mistyped.
#[tokio::test]
async fn webchat_small_things_say_what_they_mean() {
    let _one_at_a_time = ONE_BROWSER.lock().await;
    let data = tempfile::tempdir().expect("data dir");
    let title = "A conversation with a title far too long for the sidebar to show";
    let id = seed_exchange(data.path(), title, "Question", "Answer").await;
    let server = start_server(Some(data.path()), &[]).await;
    let browser = Browser::start().await;
    open_live(&browser, &server, &format!("#c={id}")).await;

    // 1. A blank name: not renamed, and said so.
    browser.js("window.prompt = () => '   '; return true;").await;
    browser.click("#rename-chat").await;
    let said = browser
        .wait_for(
            "the banner",
            "const b = document.getElementById('banner'); \
             return !b.hidden && document.getElementById('banner-text').textContent;",
            Duration::from_secs(5),
        )
        .await;
    assert!(said.as_str().unwrap().starts_with("Not renamed"), "{said}");

    // 2. The entry's tooltip: the whole title and a date.
    let tooltip = browser
        .js(&format!(
            "return document.querySelector(\"#conversation-list li[data-conversation-id='{id}'] button\").title;"
        ))
        .await;
    let tooltip = tooltip.as_str().unwrap();
    assert!(tooltip.starts_with(title) && tooltip.len() > title.len() + 4, "{tooltip}");

    // 3. Each usable tier's label fits the closed selector, at 1280 and 360 px.
    for width in [1280, 360] {
        browser.set_window(width, 800).await;
        let fits = browser
            .wait_for(
                "the selector laid out",
                &format!(
                    "if ((window.innerWidth > 400) !== {}) return null; \
                     const s = document.getElementById('model-select'); const cs = getComputedStyle(s); \
                     const ctx = document.createElement('canvas').getContext('2d'); ctx.font = cs.font; \
                     const room = s.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight) - 16; \
                     return {{ room, over: [...s.options].filter((o) => !o.disabled && ctx.measureText(o.textContent).width > room) \
                       .map((o) => o.textContent), title: s.title }};",
                    width > 400
                ),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(fits["over"], json!([]), "{width}: {fits}");
        assert!(fits["title"].as_str().unwrap().contains(':'), "the model in the tooltip: {fits}");
    }
    browser.set_window(1280, 860).await;

    // 4. Hint text on the sidebar (a search's status) reads at 4.5:1 at least.
    browser.type_into("#search-input", "nothing matches this").await;
    let contrast = browser
        .wait_for(
            "the search status",
            "const n = document.getElementById('search-status'); \
             if (!n.textContent.startsWith('No message')) return null; \
             const rgb = (s) => s.match(/[\\d.]+/g).map(Number); \
             const lin = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); }; \
             const lum = (c) => 0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2]); \
             const fg = lum(rgb(getComputedStyle(n).color)); \
             const bg = lum(rgb(getComputedStyle(document.getElementById('sidebar')).backgroundColor)); \
             return (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);",
            Duration::from_secs(10),
        )
        .await;
    assert!(contrast.as_f64().unwrap() >= 4.5, "hint contrast {contrast}");
    browser.clear("#search-input").await;

    // 5. Schedules: a job saved, then a failed save: the "saved" note goes. A mistyped zone
    //    is said beside its field once the field is left.
    browser.click("#toggle-cron").await;
    browser
        .wait_for(
            "the panel",
            "return document.getElementById('cron-new') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#cron-new").await;
    browser
        .wait_for(
            "the form",
            "return document.getElementById('cron-name') !== null;",
            Duration::from_secs(5),
        )
        .await;
    browser.type_into("#cron-name", "Morning").await;
    browser.type_into("#cron-prompt", "Say good morning").await;
    browser.click("#cron-save").await;
    browser
        .wait_for(
            "the saved note",
            "return document.getElementById('cron-status').textContent.includes('saved') && \
             document.querySelector('#cron-jobs .cron-edit') !== null;",
            Duration::from_secs(10),
        )
        .await;
    browser.click("#cron-jobs .cron-edit").await;
    browser
        .wait_for(
            "the edit form",
            "return document.getElementById('cron-schedule') !== null;",
            Duration::from_secs(5),
        )
        .await;
    browser.clear("#cron-schedule").await;
    browser.type_into("#cron-schedule", "bogus cron").await;
    browser.click("#cron-save").await;
    let failed = browser
        .wait_for(
            "the failed save",
            "const s = document.getElementById('cron-form-status'); \
             return s.className === 'error-text' && s.textContent && \
               { status: document.getElementById('cron-status').textContent };",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(failed["status"], "", "the earlier note is gone: {failed}");
    browser.type_into("#cron-timezone", "Europe/Parsi").await;
    browser.click("#cron-name").await;
    let zone = browser
        .wait_for(
            "the zone's note",
            "const n = document.getElementById('cron-timezone-note'); \
             return n && n.textContent && { note: n.textContent, \
               invalid: document.getElementById('cron-timezone').getAttribute('aria-invalid') };",
            Duration::from_secs(10),
        )
        .await;
    assert!(zone["note"].as_str().unwrap().contains("Europe/Parsi"), "{zone}");
    assert_eq!(zone["invalid"], "true", "{zone}");

    browser.quit().await;
}
