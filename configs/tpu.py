"""FaceNet-scale training on an 8-core TPU (Colab TPU, TPU VM v2-8/v3-8/v4-8/v5e-8) or a pod slice.

The FaceNet recipe (Schroff et al. 2015, section 3.2): ~1,800 faces per global batch with about
40 faces of each identity, so every anchor has many positives and semi-hard negatives are mined
against the whole batch (``train.mining_scope = "global"``, the default). 1,800 = 45 x 40 splits
evenly over 1, 2, 4 or 8 devices (225 images per core on a v2-8/v3-8); on 16 or 32 devices use
``--config.data.identities_per_batch=48`` (1,920 images). Convolutions and
matmuls run in bfloat16 (the TPU's native matmul type); parameters, BatchNorm statistics,
embeddings, distances and the loss stay float32 (see facenet_jax/models.py).

Point it at any face folder ROOT/[<group>/]<identity>/<image> (BFW, a VGGFace2 export, ...):

  python -m facenet_jax.main --config=configs/tpu.py --workdir=/tmp/tpu \
      --config.data.root=/path/to/faces --config.data.group_depth=1

or at a tfds catalog dataset with ``--config.data.source=tfds --config.data.tfds_name=NAME``.
On a multi-host pod slice run the same command on every host (see docs/parallel.md).
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "folder"  # An image tree on disk, prepared once into ArrayRecord (data/folder.py).
    d.root = ""  # Required: set --config.data.root (there is no face data on a fresh TPU VM).
    d.image_size = 112  # 112x112 face crops: the common size for aligned-face embedding models.
    d.channels = 3  # RGB faces.
    d.identities_per_batch = 45  # P: 45 identities per global batch...
    d.images_per_identity = 40  # K: ...of 40 images each = 1,800 images, as in FaceNet.
    d.augment = ("random_crop", "flip", "color")  # Shift, mirror, brightness/contrast jitter.
    d.random_crop_padding = 8  # random_crop: up to +-8 pixels of shift at 112x112.
    d.num_workers = 8  # Grain workers decoding JPEGs: 1,800 images per step need many host cores.
    d.prefetch = 4  # Batches in flight ahead of the train step.

    m = config.model
    m.name = "resnet34"  # A larger backbone than the CPU default (21M parameters).
    m.width = 64  # Standard ResNet widths: 64, 128, 256, 512 channels.
    m.embedding_dim = 128  # d = 128 as in FaceNet.
    m.dtype = "bfloat16"  # bf16 convs/matmuls; params and loss stay float32.

    t = config.train
    t.num_steps = 20_000  # 36M images seen: ~18 passes over a 2M-image training set.
    t.optimizer = "adamw"  # Adam with decoupled weight decay.
    t.learning_rate = 1e-3  # Peak learning rate for the 1,800-image batch.
    t.warmup_steps = 1_000  # Linear warm-up: large batches diverge without it.
    t.weight_decay = 5e-4  # Decoupled weight decay of adamw.
    t.grad_clip_norm = 5.0  # Guards the early steps against exploding triplet gradients.
    t.log_every = 100  # Metric logging every 100 steps (a host sync each time).
    t.checkpoint_every = 1_000  # Checkpoints every 1,000 steps (Colab sessions get preempted).
    t.keep_checkpoints = 3  # Three most recent checkpoints kept.
    t.eval_every = 5_000  # Verification on the held-out identities every 5,000 steps.

    e = config.eval
    e.num_pairs = 6_000  # LFW-sized protocol: 3,000 same and 3,000 different pairs.
    e.batch_size = 1_024  # Embedding batches of 1,024 (128 per core on 8 cores).
    return config
