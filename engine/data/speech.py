"""Speech with per-phoneme times from libespeak-ng's C API (ctypes), resampled to 16 kHz.

`espeak-ng --pho` needs MBROLA voices; the C API instead reports a PHONEME event (mnemonic + time in
ms) for every phoneme when initialised with espeakINITIALIZE_PHONEME_EVENTS.
The synthesiser keeps a little state from one utterance to the next (a sample or two of length), so
a sequence of utterances is repeatable only from a fresh process: the corpus makes each clip in one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from engine.audio import SAMPLE_RATE

# espeak_ng / speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_EVENT_LIST_TERMINATED, _EVENT_PHONEME = 0, 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class SpeechError(RuntimeError):
    """espeak-ng is missing or refused a voice."""


@dataclass
class Utterance:
    audio: np.ndarray  # float32 [S] at 16 kHz
    phonemes: list  # [(mnemonic, start_s, end_s)]
    text: str
    voice: str


class _Espeak:
    """One process-wide libespeak-ng handle (the library is not re-entrant)."""

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError:
            raise SpeechError("libespeak-ng not found: apt-get install espeak-ng") from None
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self._samples, self._events = [], []
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: ctypes must not free it
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 200, None, _INIT_PHONEME_EVENTS)
        if self.rate <= 0:
            raise SpeechError("espeak_Initialize failed")
        self.lib.espeak_SetSynthCallback(self._cb)
        self.libc = ctypes.CDLL(None)
        self.lock = threading.Lock()

    def _on_audio(self, wav, n, events):
        if n > 0 and wav:
            self._samples.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == _EVENT_PHONEME:
                self._events.append((e.id.string.decode("ascii", "replace"), e.audio_position))
            i += 1
        return 0

    def synth(self, text, voice, rate, pitch, pitch_range):
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SpeechError(f"espeak-ng has no voice {voice!r}")
            for key, val in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
                self.lib.espeak_SetParameter(key, int(val), 0)
            self._samples, self._events = [], []
            self.libc.srand(0)  # espeak-ng draws noise (breath, frication) from rand()
            data = text.encode("utf-8") + b"\0"
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            if err != 0:
                raise SpeechError(f"espeak_Synth failed ({err})")
            samples = np.concatenate(self._samples) if self._samples else np.zeros(0, np.int16)
            return samples, list(self._events)


_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> Utterance:
    """Speak text -> 16 kHz float32 audio and [(phoneme, start_s, end_s)] with the audio's timing."""
    eng = _engine()
    pcm, events = eng.synth(text, voice, rate, pitch, pitch_range)
    audio = resample_poly(pcm.astype(np.float32) / 32768.0, SAMPLE_RATE, eng.rate).astype(np.float32)
    dur = len(audio) / SAMPLE_RATE
    phonemes = []
    for k, (name, ms) in enumerate(events):
        end = events[k + 1][1] / 1000 if k + 1 < len(events) else dur
        phonemes.append((name, ms / 1000, max(ms / 1000, min(end, dur))))
    return Utterance(audio, phonemes, text, voice)
