"""The zoo: each model's source, recipe, data and natural metric.

Shipped ONNX models are built as the user gets them (the wheel's file). PyTorch models are
exported first with ``edgeq export`` (a separate, timed step) and built from that ``.onnx``: the
same float file is then the reference for the natural metrics and the input of ONNX Runtime's
baseline even when ``edgeq build`` fails, and export failures are told apart from build failures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo import data as D
from zoo import metrics as M


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    recipe: str
    make_data: Callable[[Path, Path], dict]  # (data folder, float onnx) -> extra eval data, written as feeds
    metric: Callable
    shipped: tuple[str, str, str] | None = None  # (import name, file inside it, pip name)
    factory: str | None = None  # package.module:callable for `edgeq export`
    inputs: tuple[str, ...] = ()
    dims: tuple[str, ...] = ()  # --dim NAME=SIZE for the export's example inputs
    outputs: tuple[str, ...] = ()


def _seed(name: str, split: str) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, name)), 0 if split == "calib" else 1])


def _write(folder: Path, calib, evaluation, extra: dict | None = None) -> dict:
    D.write_feeds(folder / "calib", calib)
    D.write_feeds(folder / "eval", evaluation)
    extra = extra or {}
    np.savez(folder / "extra.npz", **extra)
    return extra


# ---- images ----------------------------------------------------------------------------------

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _imagenet(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((x.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))


# EfficientNet-Lite was trained on inputs (x - 127) / 128 ("edge models use inception-style mean and
# stddev for better post-quantization": tensorflow/tpu models/official/efficientnet/lite/
# efficientnet_lite_builder.py) and is evaluated on a centre crop of size / (size + 32) of the short
# side, resized bicubic (the repository's preprocessing.py, crop_padding 32); the PyTorch port keeps
# the TF weights, so it expects the same, not the ImageNet mean/std of torchvision models.
LITE_MEAN, LITE_STD, LITE_CROP_PADDING = 127.0, 128.0, 32


def _lite_input(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((x.astype(np.float32) - LITE_MEAN) / LITE_STD).transpose(2, 0, 1))


# Every real photo that ships in the installed packages (scikit-image, scikit-learn, matplotlib), split in
# two disjoint sets. Evaluation: the photos on whose crops float EfficientNet-Lite1 decides (top-1/top-2
# probability margin >= 0.05 on 64-100 % of 25 random crops: espresso, Egyptian cat, tripod, maze, palace,
# moped, ...); 22 crops each = 220 held out. Calibration: the others (margin >= 0.05 on 4-56 % of crops:
# textures, text, a face, a rocket at a distance); 20 crops each = 200. On crops the float model itself
# cannot decide, top-1 agreement measures how a near-tie flips under any small change of the input (the
# float model with 40 dB SNR noise on the image agrees with itself on 90.5 % of such a set), not what
# quantization did; the metric still reports agreement by margin.
LITE_EVALUATION_PHOTOS = ("coffee", "chelsea", "camera", "brick", "retina", "hubble_deep_field", "sklearn:china.jpg",
                          "moon", "immunohistochemistry", "stereo_motorcycle")
LITE_CALIBRATION_PHOTOS = ("astronaut", "rocket", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg", "clock",
                           "coins", "grass", "gravel", "cell", "page")


def _efficientnet_data(size: int):
    def make(folder: Path, onnx: Path) -> dict:
        crop = {"first_fraction": size / (size + LITE_CROP_PADDING), "resample": "bicubic"}
        calib = D.photo_crops(LITE_CALIBRATION_PHOTOS, size, 20, _seed("photos", "calib"), **crop)  # 200
        evaluation = D.photo_crops(LITE_EVALUATION_PHOTOS, size, 22, _seed("photos", "eval"), **crop)  # 220 held out
        return _write(folder, ({"image": b} for b in D.batches([_lite_input(x) for x in calib], 8)),
                      ({"image": b} for b in D.batches([_lite_input(x) for x in evaluation], 8)))

    return make


def _mtcnn_data(size: int):
    def make(folder: Path, onnx: Path) -> dict:
        def prep(x):
            return np.ascontiguousarray(((x.astype(np.float32) - 127.5) / 128).transpose(2, 0, 1))

        out = {}
        for split in ("calib", "eval"):
            crops, labels = D.face_crops(split, size, _seed("faces", split))
            out[split] = ({"image": b} for b in D.batches([prep(c) for c in crops], 16))
            if split == "eval":
                extra = {"labels": np.array(labels)}
        return _write(folder, out["calib"], out["eval"], extra)

    return make


def _craft_data(folder: Path, onnx: Path) -> dict:
    def pages(split, shapes):
        rng = _seed("pages", split)
        for h, w in shapes:
            page = D.render_page(D.phrases(split, 14, rng, (2, 7)), rng, h, w)
            yield {"image": _imagenet(page)[None]}

    return _write(folder, pages("calib", [(256, 384)] * 6 + [(384, 256)] * 4),
                  pages("eval", [(256, 384)] * 4 + [(384, 256)] * 2))


def _pnet_data(folder: Path, onnx: Path) -> dict:
    """MTCNN P-Net runs on an image pyramid: whole photos (faces among them) resized to 96×128 and
    144×192 (portrait ones transposed), scaled ``(x - 127.5) / 128``; face photos of the face split."""
    from PIL import Image

    def pyramid(names):
        for name in names:
            img = D.photo(name)
            for h, w in ((96, 128), (144, 192)):
                h, w = (w, h) if img.shape[0] > img.shape[1] else (h, w)
                x = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(np.float32)
                yield {"image": np.ascontiguousarray(((x - 127.5) / 128).transpose(2, 0, 1))[None]}

    return _write(folder, pyramid((*D.FACE_PHOTOS["calib"], "rocket", "sklearn:flower.jpg",
                                   "matplotlib:grace_hopper.jpg", "coins")),
                  pyramid((*D.FACE_PHOTOS["eval"], "immunohistochemistry")))


def _ppocr_det_data(folder: Path, onnx: Path) -> dict:
    """Rendered pages 320×480 and 480×320 (the DB detector takes sizes divisible by 32), PaddleOCR's
    normalisation (BGR, ``(x / 255 - 0.5) / 0.5``)."""
    def pages(split, shapes):
        rng = _seed("ppocr_det", split)
        for h, w in shapes:
            page = D.render_page(D.phrases(split, 14, rng, (2, 7)), rng, h, w)
            yield {"x": _paddle_norm(page, w)[None]}

    return _write(folder, pages("calib", [(320, 480)] * 6 + [(480, 320)] * 4),
                  pages("eval", [(320, 480)] * 4 + [(480, 320)] * 2))


def _lines(split: str, count: int, name: str, words=(1, 5)):
    rng = _seed(name, split)
    texts = D.phrases(split, count, rng, words)
    return texts, [D.render_line(t, rng, 48 if name != "easyocr" else 64) for t in texts], rng


def _resize_h(img: np.ndarray, height: int, max_width: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    nw = min(max_width, max(8, math.ceil(height * w / h)))
    return np.asarray(Image.fromarray(img).resize((nw, height), Image.BILINEAR))


def _paddle_norm(img: np.ndarray, width: int) -> np.ndarray:
    """PaddleOCR: BGR, ``(x / 255 - 0.5) / 0.5``, zero-padded on the right to ``width``."""
    x = (img[..., ::-1].astype(np.float32) / 255 - 0.5) / 0.5
    out = np.zeros((3, img.shape[0], width), np.float32)
    out[:, :, :x.shape[1]] = x.transpose(2, 0, 1)
    return out


def _ppocr_rec_data(folder: Path, onnx: Path) -> dict:
    out = {}
    for split in ("calib", "eval"):
        texts, imgs, _ = _lines(split, 64, "ppocr_rec", (1, 5))
        xs = [_paddle_norm(_resize_h(i, 48, 320), 320) for i in imgs]
        out[split] = ([{"x": b} for b in D.batches(xs, 8)], texts)
    return _write(folder, out["calib"][0], out["eval"][0], {"texts": np.array(out["eval"][1])})


def _ppocr_cls_data(folder: Path, onnx: Path) -> dict:
    out = {}
    for split, n in (("calib", 64), ("eval", 96)):
        _, imgs, _ = _lines(split, n, "ppocr_cls", (1, 4))
        labels = (np.arange(n) % 2).astype(np.int64)  # 1: upside down
        xs = [_paddle_norm(_resize_h(i[::-1, ::-1] if lab else i, 48, 192), 192) for i, lab in zip(imgs, labels)]
        out[split] = ([{"x": b} for b in D.batches(xs, 8)], labels)
    return _write(folder, out["calib"][0], out["eval"][0], {"labels": out["eval"][1]})


def _easyocr_rec_data(folder: Path, onnx: Path) -> dict:
    """Grey lines 64 px tall, batches of 8 padded to their widest line (rounded up to 32) by
    repeating the last column (EasyOCR's ``NormalizePAD``)."""
    out = {}
    for split in ("calib", "eval"):
        texts, imgs, _ = _lines(split, 64, "easyocr", (1, 3))
        grey = [(_resize_h(i, 64, 800).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) for i in imgs]
        feeds = []
        for k in range(0, len(grey), 8):
            group = grey[k:k + 8]
            width = -(-max(g.shape[1] for g in group) // 32) * 32
            batch = np.stack([np.pad(g, ((0, 0), (0, width - g.shape[1])), mode="edge") for g in group])
            feeds.append({"image": ((batch / 255 - 0.5) / 0.5)[:, None].astype(np.float32)})
        out[split] = (feeds, texts)
    return _write(folder, out["calib"][0], out["eval"][0], {"texts": np.array(out["eval"][1])})


# ---- audio -----------------------------------------------------------------------------------

FRAME, CONTEXT = 512, 64


def _vad_frames(wavs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Utterances → ``[n, frames, 576]`` (each 512-sample frame after the previous 64 samples, as
    silero's wrappers feed it) and a validity mask (shorter utterances are zero-padded)."""
    t = max(-(-len(w) // FRAME) for w in wavs)
    out = np.zeros((len(wavs), t, CONTEXT + FRAME), np.float32)
    valid = np.zeros((len(wavs), t), bool)
    for i, w in enumerate(wavs):
        x = np.zeros(t * FRAME + CONTEXT, np.float32)
        x[CONTEXT:CONTEXT + len(w)] = w
        for j in range(t):
            out[i, j] = x[j * FRAME:j * FRAME + CONTEXT + FRAME]
        valid[i, :-(-len(w) // FRAME)] = True
    return out, valid


def _speech(split: str) -> list[np.ndarray]:
    return D.utterances(split, 12, _seed("speech", split), recorded=4)


def _silero_op15_data(folder: Path, onnx: Path) -> dict:
    """Feeds are steps of the float model's own stream (all utterances as one batch, the state the
    float model carried): every 2nd step for calibration, every 3rd for evaluation. The metric
    streams whole utterances with each model carrying its own state. ``sr`` only where the model
    takes it (silero_vad_half.onnx does not)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    sr = {"sr": np.array(16000, np.int64)} if "sr" in {i.name for i in sess.get_inputs()} else {}
    sets = {}
    for split, every in (("calib", 2), ("eval", 3)):
        frames, valid = _vad_frames(_speech(split))
        n = len(frames)
        state = np.zeros((2, n, 128), np.float32)
        feeds = []
        for i in range(frames.shape[1]):
            feed = {"input": frames[:, i], "state": state, **sr}
            if i % every == 0:
                feeds.append(feed)
            state = sess.run(["stateN"], feed)[0]
        sets[split] = (feeds, frames, valid)
    return _write(folder, sets["calib"][0], sets["eval"][0], {"frames": sets["eval"][1], "valid": sets["eval"][2]})


def _silero_seq_data(folder: Path, onnx: Path) -> dict:
    """One feed per utterance (all its frames in one call, zero LSTM state), as silero's
    ``SileroVADSequence`` runs it."""
    sets = {}
    for split in ("calib", "eval"):
        wavs = _speech(split)
        frames, valid = _vad_frames(wavs)
        z = np.zeros((1, 1, 128), np.float32)
        feeds = [{"input": f[v], "h": z, "c": z} for f, v in zip(frames, valid)]
        sets[split] = (feeds, frames, valid)
    return _write(folder, sets["calib"][0], sets["eval"][0], {"frames": sets["eval"][1], "valid": sets["eval"][2]})


def _crepe_data(folder: Path, onnx: Path) -> dict:
    """Frames (1024 samples, normalised) of harmonic tones and of speech; every 5th frame."""
    from samples.zoo.crepe import frames_of, normalise_frames

    out = {}
    for split, ntones in (("calib", 40), ("eval", 48)):
        rng = _seed("tones", split)
        wavs, _ = D.tones(ntones, rng)
        wavs += D.utterances(split, 3, rng, recorded=1)
        frames = np.concatenate([frames_of(w)[::5] for w in wavs])
        frames = frames[np.abs(frames).max(axis=1) > 1e-3]  # silent frames normalise to noise
        out[split] = [{"frames": b} for b in D.batches(list(normalise_frames(frames)), 64)]
    return _write(folder, out["calib"], out["eval"])


def _ge2e_data(folder: Path, onnx: Path) -> dict:
    """Partial utterances of 160 mel frames (step 80), speech of the split's voices and recordings."""
    from samples.zoo.ge2e import PARTIAL_FRAMES, mel_frames

    out = {}
    for split in ("calib", "eval"):
        parts = []
        for w in D.utterances(split, 10, _seed("ge2e", split), recorded=6):
            m = mel_frames(w)
            for s in range(0, max(1, len(m) - PARTIAL_FRAMES + 1), 80):
                p = m[s:s + PARTIAL_FRAMES]
                if len(p) == PARTIAL_FRAMES:
                    parts.append(p)
        out[split] = [{"mels": b} for b in D.batches(parts, 8)]
    return _write(folder, out["calib"], out["eval"])


def _ppocr_decode():
    from functools import lru_cache

    @lru_cache(maxsize=1)
    def charset():
        import onnx

        m = onnx.load(str(_shipped_path("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx",
                                        "rapidocr-onnxruntime")), load_external_data=False)
        chars = next(p.value for p in m.metadata_props if p.key == "character").splitlines()
        return ["<blank>"] + chars + [" "]

    def decode(indices) -> str:
        out, prev = [], 0
        for i in indices:
            i = int(i)
            if i != prev and i != 0:
                out.append(charset()[i])
            prev = i
        return "".join(out)

    return decode


def _easyocr_decode(indices) -> str:
    from samples.zoo.easyocr_rec import greedy_decode

    return greedy_decode(indices)


def _shipped_path(package: str, relative: str, pip_name: str) -> Path:
    from samples.zoo.weights import package_file

    return package_file(package, relative, pip_name)


ZOO: dict[str, ZooModel] = {m.name: m for m in [
    # PP-OCRv4 rec (PPLCNetV3 + an SVTR transformer neck): W8A16, the natural recipe of a transformer. W8A8 measured
    # 14.2 dB (floor 15): 86 activation quantizers of 24.5-56 dB each add up (notes/zoo4.md); with activations float
    # and int8 weights chosen for each layer's output (the w8a16 preset's Conv rounding and bias correction) 26.8 dB.
    ZooModel("ppocr_rec", "PP-OCRv4 text recognizer (rapidocr-onnxruntime, paddle2onnx opset 12)", "w8a16",
             _ppocr_rec_data, M.ctc_text("softmax_11.tmp_0", _ppocr_decode()),
             shipped=("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "rapidocr-onnxruntime")),
    # PP-OCRv4 det W8A8 is marginal on Android: on these pages 15.7 dB, cosine below the 0.99 gate (FAIL), text IoU
    # 0.959 (ios18 20.2 dB, pass; ORT quantize_static 15.4 dB); W8A16 passes at 33.1 dB but runs 0.73x of float on
    # the host, W8A8 1.9x (notes/probe.md).
    ZooModel("ppocr_det", "PP-OCRv4 DB text detector (paddle2onnx opset 12, dynamic H/W, upsampling)", "w8a8",
             _ppocr_det_data, M.text_map("sigmoid_0.tmp_0", 0.3, channel=(1, 0)),
             shipped=("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "rapidocr-onnxruntime")),
    ZooModel("ppocr_cls", "PP-OCR mobile v2.0 text direction classifier (opset 11)", "w8a8",
             _ppocr_cls_data, M.top1("save_infer_model/scale_0.tmp_1", labels="labels"),
             shipped=("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "rapidocr-onnxruntime")),
    ZooModel("silero_vad_op15", "Silero VAD v5 16 kHz streaming, opset 15 (If on the sample rate)", "w8a8",
             _silero_op15_data, M.vad_stream(True),
             shipped=("silero_vad", "data/silero_vad_16k_op15.onnx", "silero-vad")),
    ZooModel("silero_vad_half", "Silero VAD 16 kHz streaming, the half variant (float32 weights despite the name; no sr input)", "w8a8",
             _silero_op15_data, M.vad_stream(True, sr=False),
             shipped=("silero_vad", "data/silero_vad_half.onnx", "silero-vad")),
    ZooModel("silero_vad_seq", "Silero VAD 16 kHz sequence model (LSTM over all frames)", "w8a8",
             _silero_seq_data, M.vad_stream(False),
             shipped=("silero_vad", "data/silero_vad_16k_sequence.onnx", "silero-vad")),
    ZooModel("craft", "EasyOCR CRAFT text detector (VGG16-BN U-Net)", "w8a8", _craft_data, M.text_map("scores"),
             factory="samples.zoo.craft:build_craft", inputs=("image:float32[batch,3,height,width]",),
             dims=("height=256", "width=384"), outputs=("scores",)),
    ZooModel("easyocr_rec", "EasyOCR english_g2 recognizer (VGG + 2×BiLSTM + CTC)", "w8a8", _easyocr_rec_data,
             M.ctc_text("logits", _easyocr_decode), factory="samples.zoo.easyocr_rec:build_recognizer",
             inputs=("image:float32[batch,1,64,width]",), dims=("width=256",), outputs=("logits",)),
    ZooModel("crepe_tiny", "torchcrepe tiny pitch CNN", "w8a8", _crepe_data, M.pitch("probs"),
             factory="samples.zoo.crepe:build_crepe_tiny", inputs=("frames:float32[batch,1024]",), outputs=("probs",)),
    ZooModel("crepe_full", "torchcrepe full pitch CNN (22 M parameters)", "w8a8", _crepe_data, M.pitch("probs"),
             factory="samples.zoo.crepe:build_crepe_full", inputs=("frames:float32[batch,1024]",), outputs=("probs",)),
    ZooModel("mtcnn_pnet", "facenet-pytorch MTCNN P-Net (fully convolutional, dynamic H/W)", "w8a8", _pnet_data,
             M.text_map("prob", 0.6, channel=(1, 1), what="face-cell"), factory="samples.zoo.mtcnn:build_pnet",
             inputs=("image:float32[batch,3,height,width]",), dims=("height=96", "width=128"),
             outputs=("box", "prob")),
    ZooModel("mtcnn_rnet", "facenet-pytorch MTCNN R-Net (24 px)", "w8a8", _mtcnn_data(24), M.face(),
             factory="samples.zoo.mtcnn:build_rnet", inputs=("image:float32[batch,3,24,24]",),
             outputs=("box", "prob")),
    ZooModel("mtcnn_onet", "facenet-pytorch MTCNN O-Net (48 px)", "w8a8", _mtcnn_data(48), M.face(),
             factory="samples.zoo.mtcnn:build_onet", inputs=("image:float32[batch,3,48,48]",),
             outputs=("box", "landmarks", "prob")),
    ZooModel("ge2e", "resemblyzer GE2E speaker encoder (3-layer LSTM)", "w8a16", _ge2e_data, M.embedding("embedding"),
             factory="samples.zoo.ge2e:build_speaker_encoder", inputs=("mels:float32[batch,160,40]",),
             outputs=("embedding",)),
    ZooModel("efficientnet_lite1", "EfficientNet-Lite1 ImageNet (240 px)", "w8a8", _efficientnet_data(240),
             M.top1("logits"), factory="samples.zoo.efficientnet_lite:build_lite1",
             inputs=("image:float32[batch,3,240,240]",), outputs=("logits",)),
    ZooModel("efficientnet_lite2", "EfficientNet-Lite2 ImageNet (260 px)", "w8a8", _efficientnet_data(260),
             M.top1("logits"), factory="samples.zoo.efficientnet_lite:build_lite2",
             inputs=("image:float32[batch,3,260,260]",), outputs=("logits",)),
]}


def shipped_path(model: ZooModel) -> Path:
    return _shipped_path(*model.shipped)
