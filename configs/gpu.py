"""Training on one GPU or a multi-GPU box (2, 4 or 8 GPUs), bfloat16 compute.

The TPU recipe (configs/tpu.py) scaled to GPU memory: 960 faces per global batch (P = 48
identities x K = 20 images), which splits evenly over 1, 2, 3, 4, 6, 8 or 16 GPUs (120 per GPU on
8). Sized for a ResNet-18 at 112x112 in bf16 on one 16-24 GB GPU (an estimate, not measured here:
roughly 4 MB of activations per image); lower P on a smaller GPU. bf16 convs/matmuls need an
Ampere or newer GPU to be fast; on older GPUs set ``--config.model.dtype=float32``. One process
drives all GPUs of a machine; several machines run one process each (see docs/parallel.md).

  python -m facenet_jax.main --config=configs/gpu.py --workdir=/tmp/gpu \
      --config.data.root=/path/to/faces --config.data.group_depth=1
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "folder"  # An image tree on disk, prepared once into ArrayRecord (data/folder.py).
    d.root = ""  # Required: set --config.data.root to ROOT/[<group>/]<identity>/<image>.
    d.image_size = 112  # 112x112 face crops: the common size for aligned-face embedding models.
    d.channels = 3  # RGB faces.
    d.identities_per_batch = 48  # P: 48 identities per global batch...
    d.images_per_identity = 20  # K: ...of 20 images each = 960 images.
    d.augment = ("random_crop", "flip", "color")  # Shift, mirror, brightness/contrast jitter.
    d.random_crop_padding = 8  # random_crop: up to +-8 pixels of shift at 112x112.
    d.num_workers = 8  # Grain workers decoding JPEGs: keep the GPUs fed.
    d.prefetch = 4  # Batches in flight ahead of the train step.

    m = config.model
    m.name = "resnet18"  # A larger backbone than the CPU default (11M parameters).
    m.width = 64  # Standard ResNet widths: 64, 128, 256, 512 channels.
    m.embedding_dim = 128  # d = 128 as in FaceNet.
    m.dtype = "bfloat16"  # bf16 convs/matmuls on tensor cores; params and loss stay float32.

    t = config.train
    t.num_steps = 30_000  # 29M images seen.
    t.optimizer = "adamw"  # Adam with decoupled weight decay.
    t.learning_rate = 1e-3  # Peak learning rate.
    t.warmup_steps = 1_000  # Linear warm-up before the cosine decay.
    t.weight_decay = 5e-4  # Decoupled weight decay of adamw.
    t.grad_clip_norm = 5.0  # Guards the early steps against exploding triplet gradients.
    t.log_every = 100  # Metric logging every 100 steps (a host sync each time).
    t.checkpoint_every = 1_000  # Checkpoints every 1,000 steps.
    t.keep_checkpoints = 3  # Three most recent checkpoints kept.
    t.eval_every = 5_000  # Verification on the held-out identities every 5,000 steps.

    e = config.eval
    e.num_pairs = 6_000  # LFW-sized protocol: 3,000 same and 3,000 different pairs.
    e.batch_size = 512  # Embedding batches of 512.
    return config
