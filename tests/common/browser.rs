//! A real headless Chromium (Debian's package; scripts/ensure-browser.sh
//! installs it) driven through the DevTools protocol: open a page, run
//! script, click and press keys as trusted input, take screenshots as pixels.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct Browser {
    child: Child,
    profile: PathBuf,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

/// A screenshot's pixels, RGBA.
pub struct Shot {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

impl Shot {
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * self.width + x) * 4) as usize;
        [self.rgba[i], self.rgba[i + 1], self.rgba[i + 2]]
    }
}

fn binary() -> String {
    std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into())
}

/// How a browser is started.
#[derive(Clone, Copy, Default)]
pub struct Options {
    /// The browser's own autoplay rule: media may sound only after a real
    /// user gesture (a trusted click or key). Off, any script may start
    /// playback with sound.
    pub autoplay_rule: bool,
}

impl Browser {
    /// Start Chromium headless with a fresh profile and attach to its page;
    /// any script may start playback.
    pub async fn start() -> Browser {
        Browser::start_with(Options::default()).await
    }

    /// Start Chromium headless with a fresh profile and attach to its page.
    pub async fn start_with(options: Options) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "lesson-replay-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = Command::new(binary());
        if !options.autoplay_rule {
            command.arg("--autoplay-policy=no-user-gesture-required");
        }
        // --mute-audio silences the machine's speakers only: the page's
        // WebAudio graph (where the tests listen) still carries the sound.
        let mut child = command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--mute-audio",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--window-size=1400,1100",
                "--remote-debugging-port=0",
                "--allow-file-access-from-files",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium runs (scripts/ensure-browser.sh installs it)");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let port = lines.by_ref().map_while(Result::ok).find_map(|line| {
                let rest = line.split("ws://127.0.0.1:").nth(1)?;
                rest.split('/').next()?.parse::<u16>().ok()
            });
            // Keep draining, so Chromium never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            port
        })
        .await
        .unwrap()
        .expect("chromium prints its DevTools address");
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut browser = Browser {
            child,
            profile,
            socket,
            next_id: 0,
        };
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser
    }

    /// One DevTools command; its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(60), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("the DevTools socket is open")
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Open `url` and wait until it loaded.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.eval("new Promise(r => document.readyState === 'complete' ? r(1) : addEventListener('load', () => r(1)))")
            .await;
    }

    /// Evaluate `script` (awaiting a promise) and return its value.
    pub async fn eval(&mut self, script: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": script, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{script}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// A left click at page coordinates.
    pub async fn click(&mut self, x: f64, y: f64) {
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    /// A trusted key press (down, then up), as a keyboard gives it: `key`
    /// is a `KeyboardEvent.key` value (`" "`, `"k"`, `"ArrowLeft"`, `"<"`, `"?"`, `"Tab"`, …).
    pub async fn press(&mut self, key: &str) {
        let (code, vk, shift) = key_code(key);
        let text = if key.chars().count() == 1 { key } else { "" };
        let modifiers = if shift { 8 } else { 0 };
        for kind in ["keyDown", "keyUp"] {
            let mut params = json!({"type": kind, "key": key, "code": code,
                "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk, "modifiers": modifiers});
            if kind == "keyDown" && !text.is_empty() {
                params["text"] = json!(text);
                params["unmodifiedText"] = json!(text);
            }
            self.call("Input.dispatchKeyEvent", params).await;
        }
    }

    /// Run `source` in every document before the page's own scripts.
    pub async fn before_each_page(&mut self, source: &str) {
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": source}),
        )
        .await;
    }

    /// Show pages at `width`×`height` CSS pixels; `mobile` as a phone does
    /// (its viewport meta tag, touch).
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        self.call(
            "Emulation.setTouchEmulationEnabled",
            json!({"enabled": mobile}),
        )
        .await;
    }

    /// Open another tab in front: this page's tab becomes hidden, as when a
    /// viewer switches tabs. [`Browser::bring_to_front`] shows it again.
    pub async fn other_tab(&mut self) {
        self.call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
    }

    /// Bring this page's tab to the front.
    pub async fn bring_to_front(&mut self) {
        self.call("Page.bringToFront", json!({})).await;
    }

    /// The element `selector`'s box: x, y, width, height in page pixels.
    pub async fn rect(&mut self, selector: &str) -> (f64, f64, f64, f64) {
        let r = self
            .eval(&format!(
                "(() => {{ const r = document.querySelector({selector:?}).getBoundingClientRect(); \
                 return [r.x, r.y, r.width, r.height]; }})()"
            ))
            .await;
        let n = |i: usize| r[i].as_f64().unwrap();
        (n(0), n(1), n(2), n(3))
    }

    /// A PNG screenshot of the page area `(x, y, w, h)`, as the PNG's bytes.
    pub async fn screenshot_png(&mut self, clip: Option<(f64, f64, f64, f64)>) -> Vec<u8> {
        let mut params = json!({"format": "png", "captureBeyondViewport": false});
        if let Some((x, y, width, height)) = clip {
            params["clip"] = json!({"x": x, "y": y, "width": width, "height": height, "scale": 1});
        }
        let shot = self.call("Page.captureScreenshot", params).await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }

    /// The pixels of the page area `(x, y, w, h)`.
    pub async fn screenshot(&mut self, clip: (f64, f64, f64, f64)) -> Shot {
        decode_png(&self.screenshot_png(Some(clip)).await)
    }
}

/// `KeyboardEvent.code`, the Windows virtual key code, and whether Shift is
/// held, of the keys the tests press (a US keyboard).
fn key_code(key: &str) -> (String, u32, bool) {
    let named = match key {
        " " => Some(("Space", 32, false)),
        "Tab" => Some(("Tab", 9, false)),
        "Enter" => Some(("Enter", 13, false)),
        "Escape" => Some(("Escape", 27, false)),
        "ArrowLeft" => Some(("ArrowLeft", 37, false)),
        "ArrowUp" => Some(("ArrowUp", 38, false)),
        "ArrowRight" => Some(("ArrowRight", 39, false)),
        "ArrowDown" => Some(("ArrowDown", 40, false)),
        "<" => Some(("Comma", 188, true)),
        ">" => Some(("Period", 190, true)),
        "?" => Some(("Slash", 191, true)),
        _ => None,
    };
    if let Some((code, vk, shift)) = named {
        return (code.to_owned(), vk, shift);
    }
    let c = key.chars().next().expect("a key");
    if c.is_ascii_digit() {
        (format!("Digit{c}"), c as u32, false)
    } else if c.is_ascii_alphabetic() {
        let upper = c.to_ascii_uppercase();
        (format!("Key{upper}"), upper as u32, c.is_ascii_uppercase())
    } else {
        panic!("no key code for {key:?}")
    }
}

pub fn decode_png(bytes: &[u8]) -> Shot {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let rgba = match info.color_type {
        png::ColorType::Rgba => buf[..info.buffer_size()].to_vec(),
        png::ColorType::Rgb => buf[..info.buffer_size()]
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    Shot {
        width: info.width,
        height: info.height,
        rgba,
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
