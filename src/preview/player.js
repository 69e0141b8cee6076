// The replay player. One lesson clock drives every <video>: TIC records each
// user's camera and microphone on a track of its own, at its own offset, so
// no one track spans the lesson. A track plays (and is heard) while the clock
// is inside its span, and is shown where the record's layout segment of the
// moment puts it; a video that drifts from the clock is re-seeked.
//
// The clock stands while any track on the timeline has no data to play
// (`waiting`, a seek): every track pauses, and they go on together once all
// can play. Sound needs one real click (the browser's autoplay rule); when it
// is refused, the page says so and offers the click. Speed, volume, mute,
// keys, full screen, resume and a hidden tab shown again all act on that one
// clock. Everything shown from the record is set as text, never parsed as HTML.
(() => {
  "use strict";
  const record = JSON.parse(document.getElementById("record").textContent);
  const sources = JSON.parse(document.getElementById("sources").textContent);
  const DRIFT = 0.25; // seconds a playing video may be off the clock
  const RATES = [0.5, 0.75, 1, 1.25, 1.5, 1.75, 2];
  const END_GUARD = 10000; // ms: no resume offered this close to the end
  const STALL_LIMIT = 15000; // ms the clock waits for one late track before going on without it
  const $ = (id) => document.getElementById(id);
  const player = $("player"), stage = $("stage"), seekBar = $("seek"), clock = $("clock");
  const button = $("play"), muteButton = $("mute"), volumeBar = $("volume"), speed = $("speed");
  const fullButton = $("fullscreen"), keysButton = $("keys-button"), keys = $("keys");
  const status = $("status"), notice = $("notice"), resumeBox = $("resume"), timeline = $("timeline");
  const duration = Math.max(record.duration_ms, 1);
  seekBar.max = String(duration);
  // iOS lets one element of a page sound at a time: there, the main track.
  const oneAudible = /iP(hone|ad|od)/.test(navigator.userAgent) ||
    (navigator.platform === "MacIntel" && navigator.maxTouchPoints > 1);

  // --- what is kept between visits: the position per lesson, the volume, mute and speed ---
  const store = {
    get(key) { try { return JSON.parse(localStorage.getItem(key)); } catch (e) { return null; } },
    set(key, value) { try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode */ } },
    remove(key) { try { localStorage.removeItem(key); } catch (e) { /* private mode */ } },
  };
  const positionKey = "lesson-replay:position:" + record.replay_id;
  const prefsKey = "lesson-replay:prefs";
  const prefs = store.get(prefsKey) || {};

  let playing = false; // the viewer wants the lesson to play
  let waiting = false; // a track on the timeline has no data: the clock stands
  let base = 0; // lesson ms at `since`
  let since = 0;
  let rate = RATES.includes(prefs.rate) ? prefs.rate : 1;
  let volume = typeof prefs.volume === "number" ? Math.max(0, Math.min(1, prefs.volume)) : 1;
  let muted = prefs.muted === true;
  let savedAt = 0;
  let playedFrom = 0; // where the last Play was pressed
  let waitingSince = 0;
  let frameId = 0;
  const now = () =>
    playing && !waiting ? Math.min(duration, base + (performance.now() - since) * rate) : base;

  const players = record.tracks.map((track) => {
    const video = document.createElement("video");
    video.playsInline = true;
    video.setAttribute("playsinline", "");
    video.preload = "auto";
    video.dataset.track = track.track_id;
    const p = { track, video, urls: sources[track.track_id] || [track.source_url], next: 0, failed: false };
    video.src = p.urls[0];
    // The archived copy first; when it cannot be reached, the next source.
    video.addEventListener("error", () => {
      if (++p.next < p.urls.length) {
        video.src = p.urls[p.next];
      } else {
        p.failed = true; // no source left: never waited for
        const lane = timeline.querySelector(`.lane[data-track="${CSS.escape(track.track_id)}"]`);
        if (lane) lane.classList.add("failed");
      }
      show(now(), false);
    });
    // Its media time can be set from now on: put it on the clock.
    video.addEventListener("loadedmetadata", () => {
      const ms = now();
      if (onTimeline(p, ms)) video.currentTime = (ms - track.offset_ms) / 1000;
      show(ms, false);
    });
    video.addEventListener("waiting", tick);
    // A hidden tab's timers are slowed down: its media's progress steps the clock too.
    video.addEventListener("timeupdate", () => { if (document.hidden) tick(); });
    stage.appendChild(video);
    return p;
  });

  function segmentAt(ms) {
    const segments = record.layout;
    for (const s of segments) if (ms >= s.from_ms && ms < s.to_ms) return s;
    return segments.length ? segments[segments.length - 1] : null;
  }

  function placements(ms) {
    const placed = new Map();
    const s = segmentAt(ms);
    if (!s) return placed;
    if (s.main) placed.set(s.main.track_id, s.main);
    for (const tile of s.tiles) placed.set(tile.track_id, tile);
    return placed;
  }

  // A track's span: its declared one, cut short where its file ends sooner
  // (a probe within 2 % keeps the declared duration).
  const spanEnd = (p) => {
    const media = p.video.duration;
    const declared = p.track.duration_ms;
    return p.track.offset_ms + (Number.isFinite(media) ? Math.min(declared, media * 1000) : declared);
  };
  const onTimeline = (p, ms) => !p.failed && ms >= p.track.offset_ms && ms < spanEnd(p);
  const speaks = (p) => p.track.kind === "camera" || p.track.kind === "mixed";

  // Where only one element may sound: the main track when it carries a
  // voice, else the first speaking track on screen, else the first on the timeline.
  function soundingTrack(ms, placed) {
    const s = segmentAt(ms);
    const live = players.filter((p) => onTimeline(p, ms));
    const main = s && s.main && live.find((p) => p.track.track_id === s.main.track_id);
    const pick = (main && speaks(main) && main) ||
      live.find((p) => speaks(p) && placed.has(p.track.track_id)) || live.find(speaks) || live[0];
    return pick ? pick.track.track_id : null;
  }

  // Put every track where the clock says at `ms`: shown or hidden, sounding
  // or not, at its media time (exactly, or within DRIFT), playing or paused.
  function show(ms, exact) {
    const placed = placements(ms);
    const sounding = oneAudible ? soundingTrack(ms, placed) : null;
    const run = playing && !waiting;
    for (const p of players) {
      const { track, video } = p;
      const on = onTimeline(p, ms);
      const box = on ? placed.get(track.track_id) : null;
      if (box) {
        Object.assign(video.style, {
          display: "block",
          left: box.x * 100 + "%",
          top: box.y * 100 + "%",
          width: box.w * 100 + "%",
          height: box.h * 100 + "%",
        });
      } else {
        video.style.display = "none";
      }
      video.muted = muted || (sounding !== null && sounding !== track.track_id);
      video.volume = volume;
      if (video.playbackRate !== rate) video.playbackRate = rate;
      video.preservesPitch = true;
      if (!on) {
        if (!video.paused) video.pause();
        continue;
      }
      const at = (ms - track.offset_ms) / 1000;
      const off = Math.abs(video.currentTime - at);
      if (video.readyState >= 1 && ((exact && off > 0.001) || (run && off > DRIFT))) {
        video.currentTime = at;
      }
      if (run && video.paused && !video.ended) start(video);
      if (!run && !video.paused) video.pause();
    }
    seekBar.value = String(Math.round(ms));
    seekBar.setAttribute("aria-valuetext", `${format(ms)} of ${format(duration)}`);
    clock.textContent = `${format(ms)} / ${format(duration)}`;
    playhead.style.left = (ms / duration) * 100 + "%";
    const label = playing ? "Pause" : "Play";
    if (button.textContent !== label) {
      button.textContent = label;
      button.setAttribute("aria-label", label);
      button.title = `${label} (k)`;
    }
    const said = playing && waiting ? "Buffering…" : "";
    if (status.textContent !== said) status.textContent = said;
  }

  function start(video) {
    const promise = video.play();
    if (promise) {
      promise.catch((e) => {
        // AbortError: a pause() came first, nothing to tell.
        if (e && e.name === "NotAllowedError") refused();
      });
    }
  }

  // The browser refused to play with sound: stop (back to where Play was
  // pressed, when nothing was heard since), say so, offer the click.
  function refused() {
    if (!playing) return;
    const at = now();
    playing = false;
    waiting = false;
    base = at - playedFrom < 2000 ? playedFrom : at;
    show(base, true);
    notice.hidden = false;
    $("notice-play").focus();
  }

  // The clock's step: stand while a track on the timeline cannot play (at
  // the earliest moment such a track has shown, so nothing is skipped), go
  // on when all can. A track late for longer than STALL_LIMIT is left
  // behind: the lesson goes on, and the track joins again once it can play.
  function tick() {
    if (!playing) return;
    const ms = now();
    if (ms >= duration) {
      pause();
      base = duration;
      store.remove(positionKey);
      show(base, false);
      return;
    }
    for (const p of players) if (p.behind && p.video.readyState >= 3) p.behind = false;
    const late = players.filter((p) => onTimeline(p, ms) && !p.video.ended && !p.behind &&
      (p.video.seeking || p.video.readyState < 3));
    if (late.length && waiting && performance.now() - waitingSince > STALL_LIMIT) {
      for (const p of late) p.behind = true;
      late.length = 0;
    }
    if (late.length && !waiting) {
      waitingSince = performance.now();
      let at = ms;
      for (const { track, video } of late) {
        if (video.readyState >= 1 && !video.seeking) at = Math.min(at, track.offset_ms + video.currentTime * 1000);
      }
      base = Math.max(0, at);
      waiting = true;
    } else if (!late.length && waiting) {
      waiting = false;
      since = performance.now();
    }
    show(now(), false);
    if (performance.now() - savedAt > 1000) savePosition();
  }

  function frame() {
    if (!playing) return;
    tick();
    frameId = requestAnimationFrame(frame);
  }
  // A hidden tab gets no animation frames: the clock still steps, slower.
  setInterval(() => { if (document.hidden) tick(); }, 250);

  function play() {
    notice.hidden = true;
    resumeBox.hidden = true;
    if (playing) return;
    if (base >= duration) base = 0;
    playedFrom = base;
    playing = true;
    waiting = false;
    since = performance.now();
    show(base, true);
    cancelAnimationFrame(frameId);
    frameId = requestAnimationFrame(frame);
  }

  function pause() {
    base = now();
    playing = false;
    waiting = false;
    show(base, true);
    savePosition();
  }

  const toggle = () => (playing ? pause() : play());

  function seek(ms) {
    base = Math.max(0, Math.min(duration, ms));
    since = performance.now();
    waiting = false;
    show(base, true);
    if (playing) tick();
  }

  function setRate(r) {
    base = now();
    since = performance.now();
    rate = r;
    speed.value = String(r);
    savePrefs();
    show(base, false);
  }

  function stepRate(step) {
    const i = RATES.indexOf(rate) + step;
    if (i >= 0 && i < RATES.length) setRate(RATES[i]);
  }

  function setVolume(v) {
    volume = Math.round(Math.max(0, Math.min(1, v)) * 100) / 100;
    if (volume > 0) muted = false;
    volumeBar.value = String(volume);
    savePrefs();
    show(now(), false);
    showMute();
  }

  function toggleMute() {
    muted = !muted;
    savePrefs();
    show(now(), false);
    showMute();
  }

  function showMute() {
    const label = muted ? "Unmute" : "Mute";
    muteButton.textContent = label;
    muteButton.setAttribute("aria-label", label);
    muteButton.setAttribute("aria-pressed", String(muted));
    volumeBar.setAttribute("aria-valuetext", muted ? "muted" : `${Math.round(volume * 100)} %`);
  }

  function toggleFullscreen() {
    if (document.fullscreenElement) {
      document.exitFullscreen().catch(() => {});
    } else if (player.requestFullscreen) {
      player.requestFullscreen().catch(() => {});
    } else {
      // iOS: no element full screen, only a video's own.
      const main = players.find((p) => p.video.style.display === "block");
      if (main && main.video.webkitEnterFullscreen) main.video.webkitEnterFullscreen();
    }
  }

  function toggleKeys() {
    keys.hidden = !keys.hidden;
    keysButton.setAttribute("aria-expanded", String(!keys.hidden));
  }

  function savePrefs() {
    store.set(prefsKey, { rate, volume, muted });
  }

  // The position, for "Resume at …" on return: not near the start or the end.
  function savePosition() {
    savedAt = performance.now();
    const ms = now();
    if (ms < 5000 || ms > duration - END_GUARD) store.remove(positionKey);
    else store.set(positionKey, Math.round(ms));
  }

  function format(ms) {
    const s = Math.floor(ms / 1000);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const mm = h ? String(m).padStart(2, "0") : String(m);
    return (h ? h + ":" : "") + mm + ":" + String(r).padStart(2, "0");
  }

  // Resolves once every visible video shows the clock's frame.
  function settled() {
    return new Promise((resolve) => {
      const check = () => {
        const ms = now();
        const ready = players.every((p) => {
          const { video, track } = p;
          if (!onTimeline(p, ms) || video.style.display !== "block") return true;
          const at = (ms - track.offset_ms) / 1000;
          return video.readyState >= 2 && !video.seeking &&
            (playing || Math.abs(video.currentTime - at) < 0.05);
        });
        if (ready) requestAnimationFrame(() => requestAnimationFrame(() => resolve(now())));
        else setTimeout(check, 30);
      };
      check();
    });
  }

  // --- the timeline: one lane per track, the layout, the warnings ---
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const pct = (ms) => (Math.max(0, Math.min(duration, ms)) / duration) * 100 + "%";
  const segLane = el("div", "lane segments");
  for (const s of record.layout) {
    const seg = el("div", "seg", (s.main ? "main" : "") + (s.tiles.length ? ` +${s.tiles.length}` : ""));
    seg.style.left = pct(s.from_ms);
    seg.style.width = `calc(${pct(s.to_ms)} - ${pct(s.from_ms)})`;
    seg.title = `${format(s.from_ms)}–${format(s.to_ms)}: ${s.main ? s.main.track_id : "no main"}, ${s.tiles.length} tile(s)`;
    segLane.appendChild(seg);
  }
  timeline.appendChild(segLane);
  for (const { track } of players) {
    const lane = el("div", "lane");
    lane.dataset.track = track.track_id;
    lane.appendChild(el("span", "label", `${track.kind.replace("_", " ")} ${track.user_id || ""}`.trim()));
    const bar = el("div", "bar " + track.kind);
    bar.style.left = pct(track.offset_ms);
    bar.style.width = `calc(${pct(track.offset_ms + track.duration_ms)} - ${pct(track.offset_ms)})`;
    bar.title = `${track.track_id}: ${format(track.offset_ms)}–${format(track.offset_ms + track.duration_ms)}`;
    lane.appendChild(bar);
    for (const w of record.warnings) {
      if (w.track_id !== track.track_id) continue;
      const mark = el("div", "mark");
      mark.style.left = pct(track.offset_ms);
      mark.title = `${w.code}: ${w.message}`;
      lane.appendChild(mark);
    }
    timeline.appendChild(lane);
  }
  const lessonWide = record.warnings.filter((w) => !record.tracks.some((t) => t.track_id === w.track_id));
  for (const w of lessonWide) {
    const mark = el("div", "mark");
    mark.style.left = "0%";
    mark.title = `${w.code}: ${w.message}`;
    segLane.appendChild(mark);
  }
  const playhead = el("div", "playhead");
  timeline.appendChild(playhead);
  timeline.addEventListener("click", (e) => {
    const r = timeline.getBoundingClientRect();
    seek(((e.clientX - r.left) / r.width) * duration);
  });

  // --- the facts panel ---
  const facts = $("facts");
  facts.appendChild(el("h2", null, `Lesson ${record.room_id}`));
  const table = (rows) => {
    const t = el("table");
    for (const [k, v] of rows) {
      const tr = el("tr");
      tr.appendChild(el("th", null, k));
      tr.appendChild(el("td", null, v === null || v === undefined ? "—" : String(v)));
      t.appendChild(tr);
    }
    facts.appendChild(t);
  };
  table([["replay_id", record.replay_id], ["room", record.room_id], ["task", record.task_id],
    ["source", record.source], ["started", record.started_at], ["duration", format(record.duration_ms)]]);
  for (const t of record.tracks) {
    const probe = t.probe || {};
    table([["track", `${t.track_id} (${t.kind})`], ["user", t.user_id],
      ["on the timeline", `${format(t.offset_ms)} – ${format(t.offset_ms + t.duration_ms)}`],
      ["duration declared / probed", `${t.duration_ms} ms / ${probe.duration_ms ?? "—"} ms`],
      ["size declared / picture", `${t.size_bytes ?? "—"} bytes / ${probe.width ?? "?"}×${probe.height ?? "?"}`],
      ["archive", t.archive ? t.archive.uri : null], ["source", t.source_url]]);
  }
  for (const w of record.warnings) facts.appendChild(el("p", "warning", `${w.code}: ${w.message}`));

  // --- controls ---
  button.addEventListener("click", toggle);
  $("notice-play").addEventListener("click", play);
  seekBar.addEventListener("input", () => seek(Number(seekBar.value)));
  muteButton.addEventListener("click", toggleMute);
  volumeBar.addEventListener("input", () => setVolume(Number(volumeBar.value)));
  speed.addEventListener("change", () => setRate(Number(speed.value)));
  fullButton.addEventListener("click", toggleFullscreen);
  document.addEventListener("fullscreenchange", () =>
    fullButton.setAttribute("aria-pressed", String(document.fullscreenElement === player)));
  keysButton.addEventListener("click", toggleKeys);
  speed.value = String(rate);
  volumeBar.value = String(volume);
  showMute();

  // Keys, as video players have them; none while typing in a field, and
  // a slider's or a list's own arrows stay theirs.
  const ours = (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return false;
    const t = e.target;
    if (!(t instanceof Element)) return true;
    if (t.isContentEditable || t.tagName === "TEXTAREA") return false;
    if (t.tagName === "INPUT" && t.type !== "range") return false;
    // Space presses a focused button (but Play) and opens a list.
    if (e.key === " " && ((t.tagName === "BUTTON" && t !== button) || t.tagName === "SELECT")) return false;
    // The volume slider's and the speed list's arrows stay theirs; the
    // lesson time's are the page's 5 s steps.
    const native = (t.tagName === "INPUT" && t.type === "range" && t !== seekBar) || t.tagName === "SELECT";
    return !(native && /^(Arrow|Home|End|Page)/.test(e.key));
  };
  const actions = {
    " ": toggle, k: toggle, K: toggle,
    ArrowLeft: () => seek(now() - 5000), ArrowRight: () => seek(now() + 5000),
    j: () => seek(now() - 10000), J: () => seek(now() - 10000),
    l: () => seek(now() + 10000), L: () => seek(now() + 10000),
    ArrowUp: () => setVolume(volume + 0.1), ArrowDown: () => setVolume(volume - 0.1),
    m: toggleMute, M: toggleMute, f: toggleFullscreen, F: toggleFullscreen,
    "<": () => stepRate(-1), ">": () => stepRate(1), "?": toggleKeys,
    Escape: () => { if (!keys.hidden) toggleKeys(); },
  };
  for (let d = 0; d <= 9; d++) actions[String(d)] = () => seek((duration * d) / 10);
  document.addEventListener("keydown", (e) => {
    const action = actions[e.key];
    if (!action || !ours(e)) return;
    // Else Space would also press a focused button, and arrows scroll.
    e.preventDefault();
    if (!e.repeat || !/^[ kKmMfF?]$/.test(e.key)) action();
  });

  // A hidden tab: the lesson goes on by ear (the clock steps on a timer,
  // tracks start and stop on it). Shown again, every track is put back on
  // the clock at once (Chromium suspends the pictures of hidden tabs), not at
  // the next frame.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") tick();
    else if (playing) savePosition();
  });
  window.addEventListener("pagehide", () => { if (playing) savePosition(); });

  // `#t=754000` opens the lesson at that moment (ms), for support tickets;
  // without it, a lesson left part-way is offered where it was left.
  const fromHash = () => {
    const m = /(?:^#|&)t=(\d+)/.exec(location.hash);
    return m ? Number(m[1]) : null;
  };
  window.addEventListener("hashchange", () => seek(fromHash() ?? 0));
  const asked = fromHash();
  const left = store.get(positionKey);
  seek(asked ?? 0);
  if (asked === null && typeof left === "number" && left < duration) {
    $("resume-play").textContent = `Resume at ${format(left)}`;
    resumeBox.hidden = false;
    $("resume-play").addEventListener("click", () => { seek(left); play(); });
    $("resume-restart").addEventListener("click", () => { store.remove(positionKey); seek(0); play(); });
  }

  window.lessonReplay = {
    play, pause, seek, settled, time: now, playing: () => playing, waiting: () => waiting,
    rate: () => rate, volume: () => volume, muted: () => muted,
  };
})();
