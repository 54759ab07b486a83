"""BFW: 20,000 aligned in-the-wild face crops of 800 identities in 8 demographic groups.

Trains on a folder of faces with PK batches: the folder is prepared once into a tfds ArrayRecord
dataset under ``config.data.data_dir`` and read with grain workers. Any folder laid out as
ROOT/<group>/<identity>/<image> (or ROOT/<identity>/<image> with group_depth=0) works the same:

  python -m facenet_jax.main --config=configs/bfw.py --config.data.root=/path/to/faces
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "folder"  # An image tree on disk, prepared once (facenet_jax/data/folder.py).
    d.root = "../shared/data/bfw"  # From the working directory, else from the repository root.
    d.group_depth = 1  # bfw/<group>/<identity>/<image>.jpg: groups are the demographic folders.
    d.image_size = 64  # 108x124 crops squeezed to 64x64: trains in reasonable time on 2 CPU cores.
    d.channels = 3  # RGB faces.
    d.crop = "none"  # The images are already tight, aligned face crops.
    d.identities_per_batch = 16  # P: 16 identities per global batch...
    d.images_per_identity = 8  # K: ...of 8 images each (of 25): 128 images per step.
    d.augment = ("random_crop", "flip", "color")  # Shift, mirror, brightness/contrast jitter.
    d.random_crop_padding = 4  # random_crop: up to +-4 pixels of shift at 64x64.
    d.num_workers = 1  # One grain worker decodes while the main process runs the train step.
    d.prefetch = 4  # Batches in flight ahead of the train step.
    config.train.num_steps = 3000  # Several passes over the 640 training identities.
    config.train.warmup_steps = 100  # Linear warm-up before the cosine decay.
    config.train.log_every = 100  # Log every 100 steps.
    config.train.checkpoint_every = 500  # Checkpoint every 500 steps.
    config.eval.num_pairs = 6000  # 80 unseen test identities x 25 images: plenty of pairs.
    return config
