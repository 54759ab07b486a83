"""ORL / AT&T faces: 40 people x 10 grey 92x112 images with small pose and expression changes.

Small enough to train in a few minutes on a CPU; 10 of the 40 people are held out as unseen test
identities for verification and one-shot identification.
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "folder"  # orl/s<k>/<n>.pgm, prepared once (PGM is re-encoded as PNG).
    d.root = "../shared/data/orl"  # From the working directory, else from the repository root.
    d.group_depth = 0  # One identity folder per person, no group folders.
    d.image_size = 48  # The 92x92 central square, shrunk to 48x48.
    d.channels = 1  # Grey images.
    d.crop = "center"  # Drop the rows above and below the central square.
    d.center_crop_fraction = 1.0  # The largest central square (92x92).
    d.val_fraction = 0.1  # 4 people for validation...
    d.test_fraction = 0.25  # ...and 10 unseen people for test.
    d.identities_per_batch = 8  # P: 8 of the 26 training people per batch...
    d.images_per_identity = 5  # K: ...of 5 images each (of 10): 40 images per step.
    d.augment = ("random_crop", "flip", "color")  # Shift, mirror, brightness/contrast jitter.
    config.train.num_steps = 1500  # Small data: many passes.
    config.eval.num_pairs = 2000  # 10 test people x 10 images.
    return config
