"""The Python WebRTC client's pure parts (onsets, latency matching, A/V offset, timelines), its errors, and
one short session against a stub server (no avatar model). Synthetic data only; all traffic on 127.0.0.1.
"""
import asyncio
import json
import socket
import time
from fractions import Fraction
from types import SimpleNamespace

import aioice.ice
import av
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from clients import client as C
from engine.media import read_mp4, save_wav

SR = C.MIC_RATE


def _speech(segments, total_s, sr=SR, seed=0):
    """Noise bursts ("speech") at the given (start, end) seconds over a -80 dBFS floor."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1e-4, int(total_s * sr)).astype(np.float32)
    for s, e in segments:
        a[int(s * sr):int(e * sr)] += rng.normal(0, 0.2, int(e * sr) - int(s * sr)).astype(np.float32)
    return a


# ------------------------------------------------------------------------------------- onsets


async def _serve(posts, deletes=None):
    """A throwaway aiohttp server on a free loopback port -> (runner, port); runner.cleanup() ends it."""
    from aiohttp import web
    app = web.Application()
    for path, fn in posts.items():
        app.router.add_post(path, fn)
    for path, fn in (deletes or {}).items():
        app.router.add_delete(path, fn)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]

def test_speech_onsets_need_a_pause_before_them():
    # 0.1 s between the first two bursts is no pause; 0.4 s before the third is
    a = _speech([(0.30, 0.80), (0.90, 1.30), (1.70, 2.20)], 2.6)
    onsets = C.speech_onsets(a, SR) / SR
    assert onsets == pytest.approx([0.30, 1.70], abs=0.011)


def test_silence_has_no_onsets():
    assert len(C.speech_onsets(np.zeros(SR, np.float32), SR)) == 0


def test_onset_send_time_is_its_frame_send_time_plus_its_place_in_the_frame():
    send = [5.0, 5.03, 5.041, 5.07]  # late and early frames: the recorded times count, not k * 20 ms
    t = C.sample_send_times(np.array([0, 2 * C.MIC_FRAME + 480, 10 * C.MIC_FRAME]), send)
    assert t == pytest.approx([5.0, 5.041 + 0.01])  # the last sample was never sent


# --------------------------------------------------------------------------------------- latency

def _session_tracks(delay, seed=0):
    """Phrases separated by 0.3 s (shorter than the delay), each with a mouth closure near its end.

    Returns onset send times, frame receive times (25 fps, jittered), the received openness (the
    phrases delayed by `delay`) and the speech track per 40 ms from t0 = 100 s.
    """
    rng = np.random.default_rng(seed)
    t0, phrases = 100.0, [(0.5 + 1.1 * i, 1.3 + 1.1 * i) for i in range(6)]  # 0.8 s on, 0.3 s off
    ft = t0 + np.arange(int(8.5 * 25)) / 25 + rng.uniform(0, 0.006, int(8.5 * 25))
    x = ft - t0 - delay + 0.02  # a frame shows the middle of its 40 ms of speech
    open_at = np.zeros(len(ft))
    for s, e in phrases:
        closure = (x >= s + 0.55) & (x < s + 0.67)  # a /p/: 3 closed frames
        open_at += (x >= s) & (x < e) & ~closure
    openness = 0.1 + 0.6 * open_at + rng.normal(0, 0.02, len(ft))
    k = np.arange(int(7.6 * 25)) / 25 + 0.02
    speech_track = np.array([any(s <= x < e for s, e in phrases) for x in k], float)
    return t0 + np.array([s for s, _ in phrases]), ft, openness, speech_track, t0


def test_latency_matches_a_known_delay_longer_than_the_pauses():
    delay = 0.62
    onsets, ft, openness, speech_track, t0 = _session_tracks(delay)
    lag, corr = C.speech_to_video_lag(speech_track, t0, ft, openness)
    assert lag == pytest.approx(delay, abs=0.04) and corr > 0.6
    lat = C.match_latencies(onsets, ft, openness, lag_hint=lag)
    assert len(lat) == len(onsets)
    assert np.all(np.abs(lat - delay) <= 0.04 + 0.006)  # within one frame (+ the jitter)
    # without the hint the reopening after each closure of the previous phrase is taken: the hard case
    naive = C.match_latencies(onsets, ft, openness)
    assert np.any(np.abs(naive - delay) > 0.1)


def test_latency_of_an_avatar_that_never_opens_its_mouth_is_unmatched():
    onsets, ft, _, speech_track, t0 = _session_tracks(0.5)
    still = np.full(len(ft), 0.1)
    assert len(C.match_latencies(onsets, ft, still, lag_hint=None)) == 0


def test_mouth_openings_need_closed_frames_before_them():
    o = np.array([0.9, 0.1, 0.9, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1, 0.1, 0.9])
    assert list(C.mouth_openings(o, 0.5, closed=2)) == [0, 5, 10]


# ------------------------------------------------------------------------------------ A/V offset

@pytest.mark.parametrize("video_late_s", [0.12, -0.08, 0.0])
def test_av_offset_sign_positive_when_video_is_late(video_late_s):
    sr, t_audio = C.REC_RATE, 50.0
    phrases = [(0.4, 0.9), (1.3, 1.5), (2.0, 2.7), (3.1, 3.3)]
    audio = _speech(phrases, 4.0, sr=sr, seed=1)
    ft = t_audio + 0.2 + np.arange(85) / 25  # video starts 0.2 s after the audio
    heard = ft - t_audio - video_late_s + 0.02  # a frame shows the middle of its 40 ms of speech
    speaking = np.array([any(s <= x < e for s, e in phrases) for x in heard], float)
    off, corr = C.av_offset(audio, t_audio, ft, 0.2 + speaking)
    assert off == pytest.approx(video_late_s * 1000, abs=20) and corr > 0.5


# -------------------------------------------------------------------------------------- timelines

def test_audio_timeline_fills_a_stall_with_silence_but_not_jitter():
    chunk = np.ones(320, np.float32)
    audio, t0 = C.audio_timeline([chunk] * 4, [10.0, 10.05, 10.055, 10.6])  # jitter, then a stall
    assert t0 == 10.0
    assert len(audio) == 3 * 320 + round((10.6 - 10.06) * 16000) + 320
    assert audio[:960].all() and not audio[960:-320].any() and audio[-320:].all()
    assert C.audio_timeline([], [])[1] is None


def test_align_audio_trims_or_pads_to_the_first_frame():
    a = np.arange(1, 16001, dtype=np.float32)  # 1 s at 16 kHz from t = 10 s
    late = C.align_audio(a, 10.0, 10.5, 4000)  # first frame half a second into the audio
    assert late[0] == 8001 and len(late) == 4000
    early = C.align_audio(a, 10.0, 9.9, 4000)  # first frame before any audio played
    assert not early[:1600].any() and early[1600] == 1
    tail = C.align_audio(a, 10.0, 10.9, 4000)
    assert tail[1599] == 16000 and not tail[1600:].any()


# ------------------------------------------------------------------------------------ the mic track

def test_mic_track_sends_the_file_then_the_tail_in_paced_20ms_frames():
    audio = np.full(int(0.05 * SR), 0.5, np.float32)  # 2.5 frames of speech

    async def drain():
        track = C.MicTrack(audio, tail_s=0.04)
        frames = []
        while True:
            try:
                frames.append(await track.recv())
            except C.MediaStreamError:
                return track, frames

    track, frames = asyncio.run(drain())
    assert len(frames) == 3 + 2 and track.finished.is_set() and track.readyState == "ended"
    assert [f.pts for f in frames] == [k * 960 for k in range(5)]
    f = frames[0]
    assert (f.format.name, f.layout.name, f.sample_rate, f.samples) == ("s16", "mono", SR, 960)
    pcm = np.concatenate([x.to_ndarray().reshape(-1) for x in frames])
    assert pcm[:2400].min() == 16384 and not pcm[2400:].any()
    st = np.array(track.send_times)
    assert np.all(st[1:] - st[0] >= np.arange(1, 5) * 0.02 - 1e-3)  # never ahead of real time


# ---------------------------------------------------------------------------------- loopback ICE

ANSWER = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"
          "a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n"
          "a=candidate:2 1 udp 2130706431 127.0.0.1 40001 typ host\r\na=end-of-candidates\r\n")


def test_answer_keeps_loopback_candidates_only():
    sdp = C.loopback_candidates_only(ANSWER)
    assert "127.0.0.1 40001" in sdp and "10.0.0.5" not in sdp and "a=end-of-candidates" in sdp
    with pytest.raises(C.ClientError, match="loopback ICE"):
        C.loopback_candidates_only(ANSWER.replace("127.0.0.1", "192.168.1.9"))


def test_loopback_ice_patch_is_scoped_and_nests():
    original = aioice.ice.get_host_addresses
    with C.loopback_ice():
        with C.loopback_ice():
            assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses is original


# ------------------------------------------------------------------------------------- errors

@pytest.fixture
def short_wav(tmp_path):
    path = tmp_path / "speech.wav"
    save_wav(path, _speech([(0.1, 0.4)], 0.5, sr=16000), 16000)
    return str(path)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_and_corrupt_audio_files_are_client_errors(tmp_path):
    with pytest.raises(C.ClientError, match="not found"):
        C.run_client("http://127.0.0.1:9", str(tmp_path / "nope.wav"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x01garbage" * 10)
    with pytest.raises(C.ClientError, match="bad.wav"):
        C.run_client("http://127.0.0.1:9", str(bad))


def test_unreachable_server_is_a_client_error(short_wav):
    with pytest.raises(C.ClientError, match="cannot connect to the server"):
        C.run_client(f"http://127.0.0.1:{_closed_port()}", short_wav)


def test_bad_server_url_is_a_client_error(short_wav):
    with pytest.raises(C.ClientError, match="http"):
        C.run_client("127.0.0.1:8080", short_wav)


def test_http_error_from_offer_is_a_client_error_with_the_servers_reason(short_wav):
    async def scenario():
        async def offer(request):
            body = await request.json()
            assert body["type"] == "offer" and body["avatar"] == "7"
            assert "m=audio" in body["sdp"] and "m=video" in body["sdp"] and "webrtc-datachannel" in body["sdp"]
            assert "127.0.0.1" in body["sdp"]  # the loopback candidate was offered
            return web.json_response({"error": "unknown avatar '7'"}, status=400)

        runner, port = await _serve({"/offer": offer})
        try:
            await C.run_client_async(f"http://127.0.0.1:{port}", short_wav, avatar="7")
        finally:
            await runner.cleanup()

    with pytest.raises(C.ClientError, match=r"HTTP 400\): unknown avatar '7'"):
        asyncio.run(scenario())


def test_main_prints_one_line_and_returns_2(tmp_path, capsys):
    args = SimpleNamespace(server="http://127.0.0.1:9", audio=str(tmp_path / "nope.wav"), record=None,
                           json=None, avatar="0", duration=None)
    assert C.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err


# ---------------------------------------------------------------------------------- stats

def test_stats_of_a_synthetic_session():
    delay = 0.62
    onsets, ft, openness, speech_track, t0 = _session_tracks(delay)
    audio = _speech([(s - t0, s - t0 + 0.8) for s in onsets], 7.6)
    n_sent = len(audio) // C.MIC_FRAME + 75
    cap = C.Capture(audio=audio, send_times=list(t0 + np.arange(n_sent) * 0.02), t_offer=t0 - 0.5,
                    t_connected=t0 - 0.1, session="s1", telemetry=[{"type": "chunk"}] * 3)
    cap.frame_times = list(ft)
    cap.frames = [np.zeros((128, 128, 3), np.uint8)] * len(ft)
    # the audio comes back 0.1 s before the video: 20 ms frames from t0 + delay - 0.1
    heard = np.repeat(openness > 0.4, 640)[: len(ft) * 640].astype(np.float32) * 0.3
    cap.audio_chunks = list(heard.reshape(-1, 320))
    cap.audio_times = list(ft[0] - 0.1 + np.arange(len(cap.audio_chunks)) * 0.02)
    stats = C.compute_stats(cap, openness=openness, speech_track=speech_track)
    assert stats["frames_received"] == len(ft) and stats["fps"] == pytest.approx(25, abs=0.1)
    assert stats["ttff_ms"] == pytest.approx((ft[0] - t0 + 0.1) * 1000, abs=0.1)
    assert stats["ttff_from_offer_ms"] == pytest.approx((ft[0] - t0 + 0.5) * 1000, abs=0.1)
    assert stats["onsets"] == stats["onsets_sent"] == len(onsets)
    assert stats["latency_ms_p50"] == pytest.approx(delay * 1000, abs=46)
    assert stats["latency_ms_p95"] >= stats["latency_ms_p50"]
    assert stats["av_offset_ms"] == pytest.approx(100, abs=20)
    assert stats["telemetry_messages"] == 3 and stats["session"] == "s1"
    assert stats["audio_s"] == pytest.approx(7.6, abs=0.001)


# ------------------------------------------------------------------ a session with a stub server

class _StubVideo(MediaStreamTrack):
    """25 fps 128x128 frames whose brightness cycles (no avatar: the wire only)."""
    kind = "video"

    def __init__(self):
        super().__init__()
        self.k, self.start = 0, None

    async def recv(self):
        self.start = self.start or time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.k / 25 - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(np.full((128, 128, 3), 40 * (self.k % 5), np.uint8), format="rgb24")
        frame.pts, frame.time_base = self.k * 3600, Fraction(1, 90000)
        self.k += 1
        return frame


def test_a_loopback_session_with_a_stub_server(short_wav, tmp_path):
    """The wire: offer (loopback ICE), mic audio echoed back, video and telemetry received, DELETE."""
    deleted, pcs = [], {}

    async def offer(request):
        body = await request.json()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs["s1"], relay = pc, MediaRelay()
        pc.on("track", lambda track: pc.addTrack(relay.subscribe(track)) if track.kind == "audio" else None)

        @pc.on("datachannel")
        def on_channel(channel):
            channel.send(json.dumps({"type": "second", "fps": 25}))
            channel.send("not json")

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        for t in pc.getTransceivers():
            if t.kind == "video":
                t.sender.replaceTrack(_StubVideo())
                t.direction = "sendonly"
        with C.loopback_ice():
            await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer", "session": "s1"})

    async def delete(request):
        deleted.append(request.match_info["sid"])
        await pcs.pop(request.match_info["sid"]).close()
        return web.json_response({})

    async def scenario():
        runner, port = await _serve({"/offer": offer}, {"/sessions/{sid}": delete})
        try:
            return await C.run_client_async(f"http://127.0.0.1:{port}", short_wav, record=str(tmp_path / "r.mp4"),
                                            json_path=str(tmp_path / "s.json"), tail_s=0.3)
        finally:
            for pc in pcs.values():
                await pc.close()
            await runner.cleanup()

    stats = asyncio.run(scenario())
    assert deleted == ["s1"] and stats["session"] == "s1" and not stats["disconnected"]
    assert stats["frames_received"] > 0 and stats["ttff_ms"] is not None
    assert stats["audio_received_s"] > 0 and stats["telemetry_messages"] == 2
    assert json.loads((tmp_path / "s.json").read_text()) == stats
    frames, audio, fps = read_mp4(tmp_path / "r.mp4")
    assert len(frames) == stats["frames_received"] and fps == 25 and audio is not None


def test_a_weak_global_lag_does_not_steer_the_matching():
    """An avatar whose mouth does not follow the speech gives a meaningless global lag: not used."""
    delay = 0.25  # shorter than the pauses: the plain search is right
    onsets, ft, openness, _, t0 = _session_tracks(delay)
    unrelated = np.random.default_rng(3).uniform(0, 1, 190)
    audio = _speech([(s - t0, s - t0 + 0.8) for s in onsets], 7.6)
    cap = C.Capture(audio=audio, send_times=list(t0 + np.arange(len(audio) // C.MIC_FRAME + 75) * 0.02))
    cap.frame_times, cap.frames = list(ft), [np.zeros((128, 128, 3), np.uint8)] * len(ft)
    stats = C.compute_stats(cap, openness=openness, speech_track=unrelated)
    assert stats["latency_xcorr_corr"] < C.HINT_MIN_CORR
    assert stats["onsets"] == len(onsets)
    assert stats["latency_ms_p50"] == pytest.approx(delay * 1000, abs=46)


def test_real_time_gate_of_the_lip_sync_checks():
    """The client counts chunk kinds from the data channel; the end-to-end tests' lip-sync checks run only
    where >= 90% of the speech chunks were generated on time (idle chunks do not count), else skip."""
    from clients.client import chunk_kinds
    from conftest import require_real_time
    told = [{"type": "chunk", "kind": "speech"}] * 18 + [{"type": "chunk", "kind": "idle"}] * 30 + \
        [{"type": "chunk", "kind": "late"}, {"type": "second"}, "not json"]
    kinds = chunk_kinds(told)
    assert kinds == {"speech": 18, "idle": 30, "late": 1}
    require_real_time(kinds, "lips")  # 18 of 19: checked
    require_real_time({"idle": 40}, "lips")  # nothing was to be generated: checked (and fails there if mouths move)
    with pytest.raises(pytest.skip.Exception, match="only 18 of 21 speech chunks on time"):
        require_real_time(kinds | {"skipped": 2}, "lips")
