"""Omniglot background set: 964 characters of 30 alphabets, 20 drawings each (one-shot learning).

Each character is an identity and each alphabet a group; characters are split identity-disjoint
(stratified over alphabets), so the test split measures one-shot recognition of characters never
seen in training. The official evaluation alphabets are another zip: point
``--config.data.root`` at ``omniglot/images_evaluation.zip/images_evaluation`` to train on them.
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "folder"  # Read straight from the zip, prepared once.
    d.root = "../shared/data/omniglot/images_background.zip/images_background"  # Zip folder.
    d.group_depth = 1  # images_background/<alphabet>/<character>/<image>.png.
    d.image_size = 28  # The customary 105 -> 28 downsampling.
    d.channels = 1  # Binary strokes, read as grey.
    d.crop = "none"  # Whole 105x105 drawings.
    d.val_fraction = 0.05  # ~48 characters for validation...
    d.test_fraction = 0.1  # ...~96 unseen characters for test: the one-shot numbers come from
    # the 20 evaluation alphabets, so the background set mostly trains (819 characters).
    d.identities_per_batch = 32  # P: 32 characters per batch...
    d.images_per_identity = 4  # K: ...of 4 drawings each: 128 images per step.
    d.augment = ("random_crop", "affine")  # No flip: a mirrored character is another glyph.
    d.random_crop_padding = 2  # Up to +-2 pixels of shift at 28x28.
    d.affine_degrees = 10.0  # Small rotations and zooms, as a hand draws a character again.
    d.affine_scale = 0.1
    d.rotation_classes = 4  # Each character also trains turned 90/180/270 degrees, as 3 new
    # characters (Vinyals et al. 2016): 4x the training classes; within-alphabet 20-way 1-shot
    # 0.850 -> 0.861 (docs/ablations.md, "Omniglot, session 7").
    config.model.width = 32  # 32/64/128 channels (304k parameters).
    config.train.num_steps = 3000  # Many identities, few images each.
    config.eval.num_pairs = 6000  # Pairs from ~193 test characters.
    return config
