// The replay player: one lesson clock drives every <video>. Each track is
// shown only while it plays and only where the record's layout segment of
// the moment puts it; a video that drifts from the clock is re-seeked.
// Everything shown from the record is set as text, never parsed as HTML.
(() => {
  "use strict";
  const record = JSON.parse(document.getElementById("record").textContent);
  const sources = JSON.parse(document.getElementById("sources").textContent);
  const DRIFT = 0.25; // seconds a playing video may be off the clock
  const stage = document.getElementById("stage");
  const seekBar = document.getElementById("seek");
  const clock = document.getElementById("clock");
  const button = document.getElementById("play");
  const timeline = document.getElementById("timeline");
  const duration = Math.max(record.duration_ms, 1);
  seekBar.max = String(duration);

  const players = record.tracks.map((track) => {
    const video = document.createElement("video");
    video.muted = true;
    video.playsInline = true;
    video.preload = "auto";
    video.dataset.track = track.track_id;
    const urls = sources[track.track_id] || [track.source_url];
    let next = 0;
    video.src = urls[next];
    // The archived copy first; when it cannot be reached, the next source.
    video.addEventListener("error", () => {
      if (++next < urls.length) {
        video.src = urls[next];
        show(now(), true);
      }
    });
    stage.appendChild(video);
    return { track, video };
  });

  let playing = false;
  let base = 0; // lesson ms at `since`
  let since = 0;
  const now = () =>
    playing ? Math.min(duration, base + (performance.now() - since)) : base;

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

  // What each track should show at `ms`: its box and media time, or nothing.
  function wanted(ms) {
    const placed = placements(ms);
    return players.map(({ track, video }) => {
      const box = placed.get(track.track_id);
      const on = box && ms >= track.offset_ms && ms < track.offset_ms + track.duration_ms;
      return { video, box: on ? box : null, at: (ms - track.offset_ms) / 1000 };
    });
  }

  function show(ms, exact) {
    for (const { video, box, at } of wanted(ms)) {
      if (!box) {
        video.style.display = "none";
        if (!video.paused) video.pause();
        continue;
      }
      Object.assign(video.style, {
        display: "block",
        left: box.x * 100 + "%",
        top: box.y * 100 + "%",
        width: box.w * 100 + "%",
        height: box.h * 100 + "%",
      });
      const off = Math.abs(video.currentTime - at);
      if ((exact && off > 0.001) || off > DRIFT) {
        try { video.currentTime = at; } catch (e) { /* not loaded yet: set on loadedmetadata */ }
      }
      if (playing && video.paused) video.play().catch(() => {});
      if (!playing && !video.paused) video.pause();
    }
    seekBar.value = String(Math.round(ms));
    clock.textContent = `${format(ms)} / ${format(duration)}`;
    playhead.style.left = (ms / duration) * 100 + "%";
    button.textContent = playing ? "Pause" : "Play";
  }

  function frame() {
    if (!playing) return;
    const ms = now();
    if (ms >= duration) { pause(); return; }
    show(ms, false);
    requestAnimationFrame(frame);
  }

  function play() {
    if (playing) return;
    if (base >= duration) base = 0;
    playing = true;
    since = performance.now();
    show(base, true);
    requestAnimationFrame(frame);
  }

  function pause() {
    base = now();
    playing = false;
    show(base, true);
  }

  function seek(ms) {
    base = Math.max(0, Math.min(duration, ms));
    since = performance.now();
    show(base, true);
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
        const ready = wanted(ms).every(({ video, box, at }) =>
          !box || (video.readyState >= 2 && !video.seeking &&
            (playing || Math.abs(video.currentTime - at) < 0.05)));
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
  const facts = document.getElementById("facts");
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

  button.addEventListener("click", () => (playing ? pause() : play()));
  seekBar.addEventListener("input", () => seek(Number(seekBar.value)));
  for (const { video } of players) video.addEventListener("loadedmetadata", () => show(now(), !playing));

  // `#t=754000` opens the lesson at that moment (ms), for support tickets.
  const fromHash = () => {
    const m = /(?:^#|&)t=(\d+)/.exec(location.hash);
    return m ? Number(m[1]) : 0;
  };
  window.addEventListener("hashchange", () => seek(fromHash()));
  seek(fromHash());

  window.lessonReplay = { play, pause, seek, settled, time: now, playing: () => playing };
})();
