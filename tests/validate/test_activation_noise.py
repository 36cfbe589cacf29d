"""Each W8A8 activation quantizer alone on the float model's values (edgeq.validate.activation_noise):
the worst tensors first, their noise powers added up, and a note that says what to change."""

import numpy as np
from w8a8_models import cnn, cnn_feeds

import edgeq
from edgeq.validate.activation_noise import activation_noise


def test_each_activation_quantizer_is_measured_alone_and_their_noise_added(tmp_path):
    src = cnn(tmp_path / "cnn.onnx")
    out = tmp_path / "q.onnx"
    res = edgeq.quantize(src, out, "w8a8", calib=cnn_feeds(6), force=True, progress=False)
    noise = activation_noise(src, out, cnn_feeds(4, seed=3))
    quantized = {a.tensor for a in res.plan.activations}
    assert noise is not None and {t for t, _ in noise.per_tensor} <= quantized and len(noise.per_tensor) >= 3
    dbs = [db for _, db in noise.per_tensor]
    assert dbs == sorted(dbs) and all(15 < db < 60 for db in dbs)  # 8-bit roundings of real activations
    # noise powers add: the sum is below the worst alone, by 10·log10(n) at most
    assert dbs[0] - 10 * np.log10(len(dbs)) - 1e-6 <= noise.summed_db < dbs[0]
    assert abs(noise.summed_db - (-10 * np.log10(sum(10 ** (-d / 10) for d in dbs)))) < 1e-9
    assert noise.weights_db is not None and noise.weights_db > noise.summed_db  # int8 weights, float activations
    text = noise.note(floor_db=80.0)
    assert text.startswith(f"{len(dbs)} quantized activations") and "(< 80 dB)" in text and noise.per_tensor[0][0] in text


def test_one_tensor_far_worse_than_the_rest_is_named_as_the_remedy(tmp_path):
    from edgeq.validate.activation_noise import ActivationNoise

    one = ActivationNoise((("bad", 12.0), ("a", 40.0), ("b", 41.0)), summed_db=11.99)
    spread = ActivationNoise(tuple((f"t{i}", 30.0) for i in range(20)), summed_db=30 - 10 * np.log10(20))
    assert "keep the worst in higher precision" in one.note(15.0)
    assert "keep the activations float" in spread.note(15.0) and "spread" in spread.note(15.0)
