"""Cropped Extended Yale B: 38 people x ~64 grey frontal faces under varied lighting.

Identities differ little in pose but a lot in illumination: a test of lighting invariance.
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "folder"  # CroppedYale/<identity>/<image>.png, prepared once.
    d.root = "../shared/data/extended_yaleb/CroppedYale"  # From the working dir, else the repo.
    d.group_depth = 0  # One folder per person, no group folders.
    d.image_size = 48  # The 168x168 central square, shrunk to 48x48.
    d.channels = 1  # Grey images.
    d.crop = "center"  # Drop rows above and below the central square of the 168x192 crops.
    d.center_crop_fraction = 1.0  # The largest central square.
    d.val_fraction = 0.1  # 4 people for validation...
    d.test_fraction = 0.25  # ...and 10 unseen people for test.
    d.identities_per_batch = 8  # P: 8 of the 24 training people per batch...
    d.images_per_identity = 8  # K: ...of 8 images each: 64 images per step.
    d.augment = ("random_crop", "flip")  # No color jitter: lighting is what must be learned.
    config.train.num_steps = 1500  # Small data: many passes.
    return config
