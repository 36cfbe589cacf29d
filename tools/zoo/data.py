"""Real inputs for the zoo, made offline with fixed seeds; calibration and evaluation disjoint.

- photos: scikit-image ``skimage.data`` and scikit-learn ``load_sample_images()`` (the
  ``efficientnet_lite0`` sample's photo lists, or EfficientNet-Lite1/2's in ``models.py``, with
  matplotlib's ``grace_hopper.jpg``: calibration and evaluation use different photos);
- text: the 400 sentences of ``samples/minilm/sentences.txt`` (1–200 calibration, 201–400
  evaluation), rendered with PIL in the DejaVu fonts of matplotlib's wheel;
- faces: scikit-image's LFW subset (100 faces, 100 non-faces; even indices calibration, odd
  evaluation) and faces found by scikit-image's LBP cascade in the photos, with jittered boxes;
- speech: Debian ``espeak-ng`` (several voices) speaking the sentences, and the recorded human
  voice of ``asterisk-core-sounds-en-wav`` (8 kHz, resampled), all at 16 kHz;
- tones: harmonic tones with vibrato at pitches drawn on a log scale, for the pitch tracker.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SENTENCES = REPO / "samples" / "minilm" / "sentences.txt"
ASTERISK = Path("/usr/share/asterisk/sounds/en")
SR = 16000


class DataUnavailable(RuntimeError):
    """A data source (a Debian package, a font) is missing; the message says how to install it."""


# ---- text -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _all_sentences() -> list[str]:
    return [s for s in SENTENCES.read_text().splitlines() if s and not s.startswith("#")]


def sentences(split: str) -> list[str]:
    s = _all_sentences()
    return s[:200] if split == "calib" else s[200:400]


def phrases(split: str, count: int, rng: np.random.Generator, words=(2, 6)) -> list[str]:
    """``count`` short runs of consecutive words from the split's sentences."""
    out = []
    pool = sentences(split)
    while len(out) < count:
        w = pool[int(rng.integers(len(pool)))].split()
        n = int(rng.integers(words[0], words[1] + 1))
        start = int(rng.integers(0, max(1, len(w) - n + 1)))
        out.append(" ".join(w[start:start + n]))
    return out


@lru_cache(maxsize=1)
def fonts() -> list[str]:
    """The DejaVu TTF fonts in matplotlib's wheel (found, not imported)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("the OCR text is rendered with matplotlib's DejaVu fonts: bash tools/setup_zoo.sh")
    folder = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    names = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")
    return [str(folder / n) for n in names if (folder / n).is_file()]


def render_line(text: str, rng: np.random.Generator, height: int = 48) -> np.ndarray:
    """One text line as an RGB uint8 image, ``height`` px tall: random font, ink and paper colours,
    margins, slight blur; cropped to the text with a margin."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(fonts()[int(rng.integers(len(fonts())))], size=int(height * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = font.getbbox(text)
    paper = tuple(int(v) for v in rng.integers(170, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    pad = int(rng.integers(2, 8))
    img = Image.new("RGB", (right - left + 2 * pad, height), paper)
    ImageDraw.Draw(img).text((pad - left, (height - (bottom - top)) // 2 - top), text, font=font, fill=ink)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    return np.asarray(img)


def render_page(lines: list[str], rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A page ``height × width`` (RGB uint8): text lines at random sizes and places, on paper or on a
    photo background."""
    from PIL import Image, ImageDraw, ImageFont

    if rng.random() < 0.3:
        from samples.efficientnet_lite0 import photo

        bg = photo(("astronaut", "coffee", "chelsea", "rocket")[int(rng.integers(4))])
        img = Image.fromarray(bg).resize((width, height))
        img = Image.blend(img, Image.new("RGB", (width, height), (235, 235, 235)), 0.6)
    else:
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 20))
    for text in lines:
        font = ImageFont.truetype(fonts()[int(rng.integers(len(fonts())))], size=int(rng.integers(12, 30)))
        x = int(rng.integers(4, max(5, width // 4)))
        draw.text((x, y), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
        y += font.size + int(rng.integers(4, 16))
        if y > height - 30:
            break
    return np.asarray(img)


# ---- photos and faces ----------------------------------------------------------------------

def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo: ``matplotlib:<file>`` from matplotlib's sample data, else as the
    efficientnet_lite0 sample names them (a ``skimage.data`` function or ``sklearn:<file>``)."""
    if name.startswith("matplotlib:"):
        from PIL import Image

        spec = importlib.util.find_spec("matplotlib")  # found, not imported (as for the fonts)
        if spec is None or not spec.submodule_search_locations:
            raise DataUnavailable(f"photo {name} ships in matplotlib's wheel: bash tools/setup_zoo.sh")
        path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "sample_data" / name.split(":", 1)[1]
        return np.asarray(Image.open(path).convert("RGB"))
    from samples.efficientnet_lite0 import photo as sample_photo

    return sample_photo(name)


def photo_crops(names, size: int, count: int, rng: np.random.Generator, *, first_fraction: float = 1.0,
                resample: str = "bilinear") -> list[np.ndarray]:
    """``count`` square crops of each photo as RGB uint8 ``size × size`` (the first a centre crop
    of ``first_fraction`` of the short side, the others random in scale 0.35–1 and place, half
    mirrored), resized with PIL's ``resample`` filter."""
    from PIL import Image

    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]
    out = []
    for name in names:
        img = photo(name)
        h, w = img.shape[:2]
        short = min(h, w)
        for i in range(count):
            if i == 0:
                side = int(short * first_fraction)
                top, left, flip = (h - side) // 2, (w - side) // 2, False
            else:
                side = int(short * rng.uniform(0.35, 1.0))
                top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                flip = bool(rng.integers(0, 2))
            x = np.asarray(Image.fromarray(img[top:top + side, left:left + side]).resize((size, size), method))
            out.append(x[:, ::-1] if flip else x)
    return out


FACE_PHOTOS = {"calib": ("astronaut", "camera"), "eval": ("sklearn:china.jpg", "coffee", "chelsea", "rocket")}


def _detect_faces(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.feature import Cascade

    det = Cascade(skimage.data.lbp_frontal_face_cascade_filename())
    found = det.detect_multi_scale(rgb2gray(img), scale_factor=1.2, step_ratio=1, min_size=(40, 40),
                                   max_size=(400, 400))
    return [(d["r"], d["c"], d["height"], d["width"]) for d in found]


def face_crops(split: str, size: int, rng: np.random.Generator, per_face: int = 12,
               negatives: int = 48) -> tuple[list[np.ndarray], list[int]]:
    """MTCNN-style candidate windows ``size × size`` (RGB uint8) and labels (1 face, 0 not): LFW
    subset faces and non-faces, jittered boxes around cascade-detected faces, random photo crops."""
    import skimage.data
    from PIL import Image

    from samples.efficientnet_lite0 import photo

    crops, labels = [], []
    lfw = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, grey 25×25 in [0, 1]
    for i in range(0 if split == "calib" else 1, 200, 2):
        g = Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        crops.append(np.stack([np.asarray(g)] * 3, axis=-1))
        labels.append(int(i < 100))
    for name in FACE_PHOTOS[split]:
        img = photo(name)
        h, w = img.shape[:2]
        for r, c, fh, fw in _detect_faces(img):
            for _ in range(per_face):
                s = int(max(fh, fw) * rng.uniform(0.8, 1.25))
                cy, cx = r + fh / 2 + rng.normal(0, 0.08) * fh, c + fw / 2 + rng.normal(0, 0.08) * fw
                t, lft = int(np.clip(cy - s / 2, 0, h - s)), int(np.clip(cx - s / 2, 0, w - s))
                crops.append(np.asarray(Image.fromarray(img[t:t + s, lft:lft + s]).resize((size, size))))
                labels.append(1)
        for _ in range(negatives // len(FACE_PHOTOS[split])):
            s = int(rng.integers(24, min(h, w) // 2))
            t, lft = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            crops.append(np.asarray(Image.fromarray(img[t:t + s, lft:lft + s]).resize((size, size))))
            labels.append(0)
    return crops, labels


# ---- audio ---------------------------------------------------------------------------------

ESPEAK_VOICES = {"calib": ("en-us", "en-gb+f3", "en-us+m3", "en-gb-scotland+f2"),
                 "eval": ("en-gb", "en-us+f4", "en-029+m5", "en-gb-x-rp+f1")}


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            raise DataUnavailable(f"{path}: expected 16-bit PCM")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        if w.getnchannels() > 1:
            x = x.reshape(-1, w.getnchannels()).mean(axis=1)
        return x, w.getframerate()


def _to_16k(x: np.ndarray, sr: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    if sr == SR:
        return x.astype(np.float32)
    g = gcd(SR, sr)
    return resample_poly(x, SR // g, sr // g).astype(np.float32)


def espeak(text: str, voice: str, speed: int = 160) -> np.ndarray:
    """``text`` spoken by Debian's espeak-ng, 16 kHz float32."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataUnavailable("speech needs Debian's espeak-ng: apt-get install espeak-ng (tools/setup_zoo.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(out), text], check=True,
                       capture_output=True, timeout=60)
        x, sr = _read_wav(out)
    return _to_16k(x, sr)


def recorded_speech(split: str, count: int) -> list[np.ndarray]:
    """Recorded prompts of ``asterisk-core-sounds-en-wav`` (a human voice), 16 kHz; sorted files,
    even-numbered for calibration, odd for evaluation. Empty when the package is not installed."""
    files = sorted(ASTERISK.glob("*.wav")) if ASTERISK.is_dir() else []
    files = files[0 if split == "calib" else 1::2]
    step = max(1, len(files) // max(count, 1))
    return [_to_16k(*_read_wav(f)) for f in files[::step][:count]]


def utterances(split: str, count: int, rng: np.random.Generator, recorded: int = 0,
               max_seconds: float = 5.0) -> list[np.ndarray]:
    """Speech (at most ``max_seconds``) with silence around it (0.2–0.8 s, faint noise), 16 kHz:
    espeak-ng sentences in the split's voices, then ``recorded`` human recordings."""
    out = []
    voices = ESPEAK_VOICES[split]
    pool = sentences(split)
    clips = [espeak(pool[(i * 7) % len(pool)], voices[i % len(voices)], int(rng.integers(140, 190)))
             for i in range(count - recorded)]
    clips += recorded_speech(split, recorded)
    for c in clips:
        c = c[:int(SR * max_seconds)]
        c = c / max(1e-6, np.abs(c).max()) * rng.uniform(0.3, 0.9)
        lead, tail = (int(SR * rng.uniform(0.2, 0.8)) for _ in range(2))
        x = np.concatenate([np.zeros(lead, np.float32), c, np.zeros(tail, np.float32)])
        out.append((x + rng.normal(0, 10 ** rng.uniform(-4, -2.5), x.shape)).astype(np.float32))
    return out


def tones(count: int, rng: np.random.Generator, seconds: float = 0.5) -> tuple[list[np.ndarray], list[float]]:
    """Harmonic tones (random harmonic amplitudes, 5 Hz vibrato of ±20 cents, a little noise) at
    pitches log-uniform in 50–1000 Hz; returns the waveforms and their base frequencies."""
    t = np.arange(int(SR * seconds)) / SR
    out, f0s = [], []
    for _ in range(count):
        f0 = float(np.exp(rng.uniform(np.log(50), np.log(1000))))
        phase = 2 * np.pi * np.cumsum(f0 * 2 ** (20 / 1200 * np.sin(2 * np.pi * 5 * t))) / SR
        amps = rng.uniform(0, 1, 8) * (1.0 / np.arange(1, 9)) ** rng.uniform(0.5, 2)
        amps[0] = max(amps[0], 0.3)
        x = sum(a * np.sin((k + 1) * phase) for k, a in enumerate(amps) if (k + 1) * f0 < SR / 2)
        x = x / np.abs(x).max() * rng.uniform(0.2, 0.9) + rng.normal(0, 1e-3, t.shape)
        out.append(x.astype(np.float32))
        f0s.append(f0)
    return out, f0s


# ---- feeds on disk --------------------------------------------------------------------------

def write_feeds(folder: Path, feeds) -> int:
    """Write each feed (a dict of arrays) as ``NNNN.npz`` into ``folder``, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    for n, feed in enumerate(feeds, 1):
        np.savez(tmp / f"{n:04d}.npz", **feed)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return n


def read_feeds(folder: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for f in sorted(Path(folder).glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            out.append({k: z[k] for k in z.files})
    return out


def batches(items: list[np.ndarray], size: int) -> list[np.ndarray]:
    return [np.stack(items[i:i + size]) for i in range(0, len(items), size)]
