// syncavatar browser client: mic -> WebRTC -> talking portrait, with a latency overlay.
// Vanilla JS, no build step. State for people is on the page; state for tests is window.syncavatar.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("video"), overlay = $("overlay"), errorBox = $("error"), stateBox = $("state");
  const startBtn = $("start"), stopBtn = $("stop"), avatarInput = $("avatar"), unmuteBtn = $("unmute");
  const params = new URLSearchParams(location.search);

  const ICE_GATHER_TIMEOUT_MS = 5000; // send what was gathered by then (no STUN: host candidates are instant)
  const MEDIAN_OF = 25;               // rolling median of the last N chunk latencies
  const TELEMETRY_KEEP = 2000;        // messages kept in window.syncavatar.telemetry
  const SIZE = 128;                   // the avatar's frame size

  // The page is served at "/" (also reachable as /static/index.html): the API lives beside "/".
  const basePath = location.pathname.replace(/static\/[^/]*$/, "").replace(/[^/]*$/, "");
  const api = (p) => basePath + p;
  // A server with a bearer token ([server] token): open the page as .../#token=SECRET. The fragment never
  // leaves the browser (not in requests, not in the server's logs); it is sent as Authorization only.
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  const auth = token ? { Authorization: `Bearer ${token}` } : {};

  let pc = null, dc = null, mic = null, remote = null;
  let attempt = 0;          // bumps on every start/stop so late callbacks of an old session do nothing
  let latencies = [];       // last MEDIAN_OF latency_est_ms values
  let frameMarks = [];      // [t_ms, frames] samples, last ~1.5 s, for the received fps
  let statsTimer = null;

  const grabCanvas = document.createElement("canvas");
  grabCanvas.width = grabCanvas.height = SIZE;
  const grabCtx = grabCanvas.getContext("2d", { willReadFrequently: true });

  const sa = window.syncavatar = {
    state: "idle",          // idle | mic | gathering | negotiating | connecting | connected | playing | stopped | error
    error: null,            // the last error shown, as text
    session: null,          // server session id from POST /offer
    avatar: null,
    framesReceived: 0,      // video frames presented by the <video> element this session
    frameSource: "requestVideoFrameCallback" in HTMLVideoElement.prototype ? "rvfc" : "playback-quality",
    fps: 0,                 // received fps over the last second
    firstFrameAt: null,     // performance.now() of the first presented frame
    micStartedAt: null,     // performance.now() when getUserMedia resolved (the mic's time zero)
    answeredAt: null,       // performance.now() when the answer was applied
    connectedAt: null,      // performance.now() when the peer connection reached "connected"
    telemetry: [],          // data channel messages (parsed JSON + recv_ms), the last TELEMETRY_KEEP
    telemetryCount: 0,      // all messages received this session
    lastChunk: null, lastSecond: null, lastDecision: null,
    latencyMs: null, latencyMedianMs: null,
    rtc: null,              // inbound video/audio stats from getStats(), once a second
    start, stop, grabFrame,
  };

  // ------------------------------------------------------------------ ui helpers

  function setState(s) {
    sa.state = s;
    stateBox.textContent = s;
    document.body.dataset.state = s;
    const busy = !["idle", "stopped", "error"].includes(s);
    startBtn.disabled = busy;
    stopBtn.disabled = !busy;
    avatarInput.disabled = busy;
  }

  function showError(msg) {
    sa.error = String(msg);
    errorBox.textContent = sa.error;
    errorBox.hidden = false;
  }

  function clearError() {
    sa.error = null;
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  // Any failure: show it, close everything, tell the server (the session may exist already).
  function fail(msg) {
    showError(msg);
    const session = sa.session;
    teardown();
    setState("error");
    deleteSession(session);
  }

  // ------------------------------------------------------------------ session

  async function start() {
    if (pc || mic) return;
    const my = ++attempt;
    const stale = () => my !== attempt;
    clearError();
    resetCounters();
    sa.avatar = (avatarInput.value || "").trim() || "0";

    setState("mic");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      fail("microphone: not available here (the page needs https or http://localhost)");
      return;
    }
    try {
      mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      if (!stale()) fail(`microphone: ${e.name === "NotAllowedError" ? "permission denied" : e.name}: ${e.message}`);
      return;
    }
    if (stale()) { mic.getTracks().forEach((t) => t.stop()); return; }
    sa.micStartedAt = performance.now();

    let iceServers = [];  // the server's STUN/TURN list ([server] ice_servers), none by default
    try {
      const r = await fetch(api("ice-servers"));
      if (r.ok) iceServers = (await r.json()).iceServers || [];
    } catch (e) { /* no list: host candidates only */ }
    if (stale()) { mic.getTracks().forEach((t) => t.stop()); return; }
    pc = new RTCPeerConnection({ iceServers });
    const thisPc = pc;
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv", streams: [mic] });
    pc.addTransceiver("video", { direction: "recvonly" });
    dc = pc.createDataChannel("telemetry");
    dc.onmessage = onTelemetry;
    remote = new MediaStream();
    pc.ontrack = (ev) => { if (thisPc === pc) remote.addTrack(ev.track); };
    pc.oniceconnectionstatechange = () => {
      if (thisPc !== pc) return;
      if (pc.iceConnectionState === "failed") fail("ICE failed: no network path to the server");
    };
    pc.onconnectionstatechange = () => {
      if (thisPc !== pc) return;
      const s = pc.connectionState;
      if (s === "connected" && sa.state !== "playing") {
        sa.connectedAt = sa.connectedAt ?? performance.now();
        setState("connected");
      } else if (s === "failed") {
        fail("connection failed (ICE/DTLS)");
      } else if (s === "disconnected") {
        showError("connection interrupted, waiting for it to come back");
      }
    };

    try {
      setState("gathering");
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringDone(pc, ICE_GATHER_TIMEOUT_MS);
      if (stale()) return;
      setState("negotiating");
      const offer = pc.localDescription;
      const resp = await fetch(api("offer"), {
        method: "POST",
        headers: { "Content-Type": "application/json", ...auth },
        body: JSON.stringify({ sdp: offer.sdp, type: offer.type, avatar: sa.avatar }),
      });
      let body = null;
      try { body = await resp.json(); } catch (_) { /* not JSON */ }
      if (stale()) { if (body && body.session) deleteSession(body.session); return; }
      if (!resp.ok || !body || !body.sdp) {
        const why = body && body.error ? body.error : `${resp.status} ${resp.statusText}`.trim();
        fail(`server refused the session: ${why}`);
        return;
      }
      sa.session = body.session ?? null;
      await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
      if (stale()) return;
      sa.answeredAt = performance.now();
      if (pc.connectionState !== "connected") setState("connecting");
      video.srcObject = remote;
      play();
      watchFrames();
      statsTimer = setInterval(pollStats, 1000);
    } catch (e) {
      if (!stale()) fail(`could not connect: ${e.message || e}`);
    }
  }

  async function stop() {
    const session = sa.session;
    teardown();
    setState("stopped");
    await deleteSession(session);
  }

  function teardown() {
    attempt++;
    if (statsTimer) clearInterval(statsTimer);
    statsTimer = null;
    if (dc) { dc.onmessage = null; try { dc.close(); } catch (_) { /* closed */ } }
    if (pc) { try { pc.close(); } catch (_) { /* closed */ } }
    if (mic) mic.getTracks().forEach((t) => t.stop());
    if (remote) remote.getTracks().forEach((t) => t.stop());
    dc = pc = mic = remote = null;
    video.srcObject = null;
    unmuteBtn.hidden = true;
  }

  async function deleteSession(session) {
    if (!session) return;
    try {
      await fetch(api(`sessions/${encodeURIComponent(session)}`), { method: "DELETE", keepalive: true, headers: auth });
    } catch (_) { /* the server may be gone; nothing to do */ }
  }

  function iceGatheringDone(conn, timeoutMs) {
    if (conn.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { conn.removeEventListener("icegatheringstatechange", check); clearTimeout(timer); resolve(); };
      const check = () => { if (conn.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, timeoutMs);
      conn.addEventListener("icegatheringstatechange", check);
    });
  }

  // Autoplay with sound needs a user gesture in most browsers: fall back to muted and offer a button.
  function play() {
    video.muted = false;
    video.play().catch(() => {
      video.muted = true;
      unmuteBtn.hidden = false;
      video.play().catch(() => { /* shown as paused; the unmute button retries */ });
    });
  }

  function resetCounters() {
    Object.assign(sa, {
      session: null, framesReceived: 0, fps: 0, firstFrameAt: null, micStartedAt: null, answeredAt: null,
      connectedAt: null, telemetry: [], telemetryCount: 0, lastChunk: null, lastSecond: null, lastDecision: null,
      latencyMs: null, latencyMedianMs: null, rtc: null,
    });
    latencies = [];
    frameMarks = [];
  }

  // ------------------------------------------------------------------ received frames

  function onFrames(n) {
    const now = performance.now();
    if (n > 0 && sa.firstFrameAt === null) {
      sa.firstFrameAt = now;
      if (sa.state === "connected" || sa.state === "connecting") setState("playing");
    }
    sa.framesReceived = n;
    frameMarks.push([now, n]);
    while (frameMarks.length > 2 && now - frameMarks[1][0] >= 1000) frameMarks.shift();
    const [t0, n0] = frameMarks[0];
    if (now - t0 >= 500) sa.fps = (n - n0) * 1000 / (now - t0);
  }

  function watchFrames() {
    const my = attempt;
    if (sa.frameSource === "rvfc") {
      const cb = (_now, meta) => {
        if (my !== attempt) return;
        onFrames(meta.presentedFrames);
        video.requestVideoFrameCallback(cb);
      };
      video.requestVideoFrameCallback(cb);
    }
    const poll = () => {
      if (my !== attempt) return;
      if (sa.frameSource !== "rvfc" && video.getVideoPlaybackQuality) {
        onFrames(video.getVideoPlaybackQuality().totalVideoFrames);
      }
      // no frame for a second: let the fps fall to 0 rather than keep the last value
      if (frameMarks.length && performance.now() - frameMarks[frameMarks.length - 1][0] > 1000) sa.fps = 0;
      drawOverlay();
      setTimeout(poll, 250);
    };
    poll();
  }

  // Draw the current video frame at 128x128; RGBA bytes as base64 (default) or a plain array.
  function grabFrame(format = "base64") {
    if (!video.videoWidth) return null;
    grabCtx.drawImage(video, 0, 0, SIZE, SIZE);
    const px = grabCtx.getImageData(0, 0, SIZE, SIZE).data;
    if (format === "array") return Array.from(px);
    let s = "";
    for (let i = 0; i < px.length; i += 0x8000) s += String.fromCharCode.apply(null, px.subarray(i, i + 0x8000));
    return btoa(s);
  }

  async function pollStats() {
    if (!pc) return;
    const my = attempt;
    let report;
    try { report = await pc.getStats(); } catch (_) { return; }
    if (my !== attempt) return;
    const rtc = {};
    report.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      const jb = s.jitterBufferEmittedCount ? Math.round(1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount) : null;
      if (s.kind === "video") {
        rtc.video = { framesReceived: s.framesReceived, framesDecoded: s.framesDecoded, framesDropped: s.framesDropped,
                      framesPerSecond: s.framesPerSecond, packetsLost: s.packetsLost, jitterBufferMs: jb,
                      width: s.frameWidth, height: s.frameHeight };
      } else if (s.kind === "audio") {
        rtc.audio = { packetsReceived: s.packetsReceived, packetsLost: s.packetsLost, jitterBufferMs: jb,
                      concealedSamples: s.concealedSamples };
      }
    });
    sa.rtc = rtc;
  }

  // ------------------------------------------------------------------ telemetry

  function onTelemetry(ev) {
    let m;
    try { m = JSON.parse(ev.data); } catch (_) { return; }
    if (!m || typeof m !== "object") return;
    m.recv_ms = performance.now();
    sa.telemetry.push(m);
    if (sa.telemetry.length > TELEMETRY_KEEP) sa.telemetry.splice(0, sa.telemetry.length - TELEMETRY_KEEP);
    sa.telemetryCount++;
    if (m.type === "chunk") {
      sa.lastChunk = m;
      if (typeof m.latency_est_ms === "number") {
        sa.latencyMs = m.latency_est_ms;
        latencies.push(m.latency_est_ms);
        if (latencies.length > MEDIAN_OF) latencies.shift();
        sa.latencyMedianMs = median(latencies);
      }
    } else if (m.type === "second") {
      sa.lastSecond = m;
    } else if (m.type === "decision") {
      sa.lastDecision = m;
    } else if (m.type === "error" && m.error) {
      showError(`server: ${m.error}`);
    }
  }

  function median(xs) {
    const s = [...xs].sort((a, b) => a - b), k = s.length >> 1;
    return s.length % 2 ? s[k] : (s[k - 1] + s[k]) / 2;
  }

  const fmt = (x, d = 0) => (typeof x === "number" && isFinite(x) ? x.toFixed(d) : "-");

  function drawOverlay() {
    const c = sa.lastChunk, s = sa.lastSecond, d = sa.lastDecision;
    const lines = [];
    lines.push(`latency  ${fmt(sa.latencyMs)} ms  (median ${fmt(sa.latencyMedianMs)} of ${latencies.length})`);
    if (c) {
      lines.push(`chunk    #${c.chunk ?? "-"} ${c.kind ?? ""}  steps ${fmt(c.computed_steps)} computed / ${fmt(c.reused_steps)} reused`);
    }
    if (s) {
      const level = s.cache_level ?? s.level;
      const name = d && d.level === level && d.level_name ? ` (${d.level_name})` : "";
      lines.push(`server   ${fmt(s.fps_out, 1)} fps  drops ${fmt(s.drops)}  cache level ${level ?? "-"}${name}`);
      lines.push(`         cpu ${fmt(s.cpu_percent)}%  rss ${fmt(s.rss_mb)} MB`);
    }
    lines.push(`page     ${fmt(sa.fps, 1)} fps  frames ${sa.framesReceived}`);
    overlay.textContent = sa.state === "idle" ? "" : lines.join("\n");
  }

  // ------------------------------------------------------------------ wiring

  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
  stopBtn.addEventListener("click", () => { stop(); });
  unmuteBtn.addEventListener("click", () => {
    video.muted = false;
    video.play().then(() => { unmuteBtn.hidden = true; }).catch(() => { /* still blocked */ });
  });
  // Leaving the page ends the session on the server too (keepalive lets the request outlive the page).
  window.addEventListener("pagehide", () => { if (sa.session) deleteSession(sa.session); });

  if (params.has("avatar")) avatarInput.value = params.get("avatar");
  setState("idle");
  if (params.get("autostart") === "1") start();
})();
